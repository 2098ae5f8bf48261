"""sft_train.py on a tiny random Llama: masking token by token, learning, LoRA merge, packing, resume, CLI errors."""

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

import sft_train
from rlhfkit.cli import parse_args

torch.set_num_threads(1)  # 2 shared cores: oversubscribed threads make tiny models ~50x slower
ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = "cat dog bird tree river mountain city friend teacher doctor sea ship sun moon star child".split()
GOOD = "good great happy kind bright warm wonderful nice".split()


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _chat_rows(subjects, seed, n):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = subjects[i % len(subjects)]
        words = rng.sample(GOOD, 3)
        rows.append({"messages": [
            {"role": "user", "content": f"Say something good about the {subject}"},
            {"role": "assistant", "content": f"The {subject} is {words[0]}, {words[1]} and {words[2]}."},
        ]})
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_data")
    _write(out / "train.jsonl", _chat_rows(SUBJECTS[:12], 0, 48))
    _write(out / "heldout.jsonl", _chat_rows(SUBJECTS[12:], 1, 8))  # subjects never seen in training
    return out


TYPES = sft_train.ARGUMENTS


def _args(*argv):
    return parse_args(TYPES, list(argv))


COMMON = ["--model_name_or_path", "tiny-random-llama", "--logging_steps", "5", "--disable_tqdm", "true",
          "--save_strategy", "no", "--seed", "0"]


# ---------------------------------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------------------------------
MULTI_TURN = {"messages": [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "Say something good about the cat"},
    {"role": "assistant", "content": "The cat is kind."},
    {"role": "user", "content": "and the dog?"},
    {"role": "assistant", "content": "The dog is happy and warm."},
]}


def _prepared_dataset(tmp_path, rows, *extra):
    """The dataset exactly as SFTTrainer will train on it, built through sft_train's own wiring."""
    from trl import SFTTrainer

    from rlhfkit.models import load_causal_lm, load_tokenizer, resolve_model
    from rlhfkit.train.sft_data import load_sft

    script_args, model_args, training_args = _args(
        "--dataset_path", _write(tmp_path / "rows.jsonl", rows), "--output_dir", str(tmp_path / "unused"), *COMMON, *extra
    )
    path, _ = resolve_model("tiny-random-llama")
    tokenizer = load_tokenizer(path, model_args.chat_template)
    data = load_sft(script_args.dataset_path, script_args.text_template)
    masking = sft_train.configure_loss_masking(training_args, data.kind, tokenizer)
    training_args.output_dir = str(tmp_path / "ckpt")
    trainer = sft_train.build_trainer(SFTTrainer, load_causal_lm(path), tokenizer, training_args,
                                      sft_train.sft_dataset(data.rows, tokenizer, masking), None, None)
    return trainer.train_dataset, tokenizer


def test_assistant_only_masking_token_by_token(tmp_path):
    dataset, tokenizer = _prepared_dataset(tmp_path, [MULTI_TURN])
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]

    # independent expectation: the characters of each assistant reply and its <|im_end|>, via offsets
    text = tokenizer.apply_chat_template(MULTI_TURN["messages"], tokenize=False)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert encoded["input_ids"] == ids
    spans, cursor = [], 0
    for message in MULTI_TURN["messages"]:
        if message["role"] == "assistant":
            start = text.index("<|im_start|>assistant\n", cursor) + len("<|im_start|>assistant\n")
            end = start + len(message["content"] + "<|im_end|>")
            assert text[start:end] == message["content"] + "<|im_end|>"
            spans.append((start, end))
            cursor = end
    expected = [any(s <= a and b <= e for s, e in spans) for a, b in encoded["offset_mapping"]]

    for position, (token, label, trained) in enumerate(zip(ids, labels, expected)):
        piece = tokenizer.decode([token])
        if trained:
            assert label == token, f"token {position} {piece!r} (assistant) carries no loss"
        else:
            assert label == -100, f"token {position} {piece!r} (user/system/template) carries loss"
    trained_text = "".join(tokenizer.decode([t]) for t, label in zip(ids, labels) if label != -100)
    assert trained_text == "The cat is kind.<|im_end|>The dog is happy and warm.<|im_end|>"
    special_trained = {tokenizer.decode([t]) for t, label in zip(ids, labels) if label != -100 and t in tokenizer.all_special_ids}
    assert special_trained == {"<|im_end|>"}


# Chat templates without {% generation %} markers that TRL cannot patch, of three shapes, each with the text its
# assistant turns must train on (the reply and its end-of-turn token, nothing of the layout around them).
CHATML_NO_MARKERS = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_HEADERS = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-2 style: the system turn folded into the first user turn, no generation prompt, EOS after each reply
SYSTEM_FOLDED = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = none %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' }}{% if loop.first and system %}"
    "{{ '<<SYS>>\n' + system + '\n<</SYS>>\n\n' }}{% endif %}{{ m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
TEMPLATES_WITHOUT_MARKERS = {
    "chatml": (CHATML_NO_MARKERS, "{}<|im_end|>"),
    "llama3_headers": (LLAMA3_HEADERS, "{}<|eot_id|>"),
    "system_folded": (SYSTEM_FOLDED, " {} <|im_end|>"),
}


def _expected_assistant_tokens(tokenizer, messages, reply_format, ids):
    """Per token, whether it lies inside an assistant reply (as `reply_format` spells it), found in the rendered
    text by character offsets: an expectation independent of the masking code."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert encoded["input_ids"] == ids
    spans, cursor = [], 0
    for message in messages:
        if message["role"] == "assistant":
            reply = reply_format.format(message["content"])
            start = text.index(reply, cursor)
            spans.append((start, start + len(reply)))
            cursor = start + len(reply)
    return [any(s <= a and b <= e for s, e in spans) for a, b in encoded["offset_mapping"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TEMPLATES_WITHOUT_MARKERS))
def test_assistant_only_loss_without_generation_markers_trains_with_default_flags(tmp_path, data_dir, name,
                                                                                 monkeypatch):
    from trl.chat_template_utils import get_training_chat_template

    from rlhfkit.models import load_tokenizer, resolve_model

    template, reply_format = TEMPLATES_WITHOUT_MARKERS[name]
    template_file = tmp_path / f"{name}.jinja"
    template_file.write_text(template)
    with pytest.raises(ValueError):  # TRL alone refuses it: the case the incremental render exists for
        get_training_chat_template(load_tokenizer(resolve_model("tiny-random-llama")[0], template))

    built = []

    def build_and_keep(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    real_build = sft_train.build_trainer
    monkeypatch.setattr(sft_train, "build_trainer", build_and_keep)
    rows = [MULTI_TURN] + _chat_rows(SUBJECTS[:4], 0, 7)
    out = tmp_path / "sft"
    metrics = sft_train.main(*_args(  # default flags: --assistant_only_loss true
        "--dataset_path", _write(tmp_path / "rows.jsonl", rows), "--output_dir", str(out), "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--chat_template", str(template_file), *COMMON,
    ))
    assert metrics["train_loss"] > 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["loss_on"] == "assistant tokens" and info["assistant_mask"] == "incremental render"

    tokenizer = built[0].processing_class
    prepared = list(built[0].train_dataset)  # shuffled
    assert len(prepared) == len(rows)
    for messages in (MULTI_TURN["messages"], rows[1]["messages"]):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        row = next(row for row in prepared if row["input_ids"] == ids)
        expected = _expected_assistant_tokens(tokenizer, messages, reply_format, ids)
        for position, (token, label, trained) in enumerate(zip(ids, row["labels"], expected)):
            piece = tokenizer.decode([token])
            if trained:
                assert label == token, f"{name}: token {position} {piece!r} (assistant) carries no loss"
            else:
                assert label == -100, f"{name}: token {position} {piece!r} (user/system/template) carries loss"
        trained_text = "".join(tokenizer.decode([t]) for t, label in zip(ids, row["labels"]) if label != -100)
        assert trained_text == "".join(reply_format.format(m["content"]) for m in messages if m["role"] == "assistant")


def test_text_template_puts_loss_on_the_answer_and_plain_text_on_everything(tmp_path):
    rows = [{"question": "Why is the sky blue", "response": "because of the sun"}]
    dataset, tokenizer = _prepared_dataset(tmp_path, rows, "--text_template", "Question: {question}\\n\\nAnswer: {response}")
    ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    untrained = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100])
    assert trained == " because of the sun<|im_end|>"  # TRL appends EOS to completions
    assert untrained == "Question: Why is the sky blue\n\nAnswer:"

    dataset, _ = _prepared_dataset(tmp_path, [{"text": "a short story about the sea"}])
    assert dataset[0]["labels"] == dataset[0]["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# training end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sft_lowers_heldout_loss_and_writes_the_stage_contract(tmp_path, data_dir):
    out = tmp_path / "sft"
    sft_train.main(*_args(
        "--dataset_path", str(data_dir / "train.jsonl"), "--eval_dataset_path", str(data_dir / "heldout.jsonl"),
        "--output_dir", str(out), "--max_steps", "30", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
        *COMMON,
    ))
    assert out.is_dir() and not (tmp_path / "sft.partial").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] < 0.6 * metrics["eval_loss_before"], metrics
    info = json.loads((out / "run_info.json").read_text())
    assert info["complete"] and info["stage"] == "sft"
    assert info["model"]["requested"] == "tiny-random-llama"
    assert info["dataset"]["train_rows"] == 48 and info["dataset"]["eval_rows"] == 8
    assert info["loss_on"] == "assistant tokens"
    assert {"model.safetensors", "config.json", "tokenizer.json", "args.yaml"} <= set(os.listdir(out))

    from rlhfkit.checkpoints import check_parent

    assert check_parent(out)["stage"] == "sft"
    # the args.yaml re-runs: it parses back with the same flags
    rerun = _args("--config", str(out / "args.yaml"))
    assert rerun[0].dataset_path == [str(data_dir / "train.jsonl")] and rerun[2].max_steps == 30
    assert rerun[2].output_dir == str(out)


@pytest.mark.slow
def test_lora_merged_output_is_a_plain_model_with_base_plus_adapter_logits(tmp_path, data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rlhfkit.builtin_models import materialize

    out = tmp_path / "lora"
    sft_train.main(*_args(
        "--dataset_path", str(data_dir / "train.jsonl"), "--output_dir", str(out), "--max_steps", "6",
        "--learning_rate", "1e-2", "--per_device_train_batch_size", "8", "--use_peft", "true", "--lora_r", "4",
        "--lora_alpha", "8", *COMMON[:-4], "--save_strategy", "steps", "--save_steps", "6", "--seed", "0",
    ))
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter_dir = out / "checkpoints" / "checkpoint-6"
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    base_plus_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(materialize("tiny-random-llama")),
                                                  adapter_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(materialize("tiny-random-llama")).eval()
    ids = torch.tensor([[1, 88, 86, 262, 202, 54, 68, 92, 2, 202, 1, 349, 86]])
    with torch.no_grad():
        merged_logits = merged.eval()(ids).logits
        adapted_logits = base_plus_adapter(ids).logits
        base_logits = base(ids).logits
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-4, rtol=1e-4)

    adapter_only = tmp_path / "adapter_only"
    sft_train.main(*_args(
        "--dataset_path", str(data_dir / "train.jsonl"), "--output_dir", str(adapter_only), "--max_steps", "1",
        "--use_peft", "true", "--save_adapter_only", "true", *COMMON,
    ))
    files = set(os.listdir(adapter_only))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files


@pytest.mark.slow
def test_chat_template_for_a_tokenizer_without_one(tmp_path, data_dir):
    import shutil

    from transformers import AutoTokenizer

    from rlhfkit.builtin_models import CHATML_TEMPLATE, materialize

    bare = tmp_path / "no_template"
    shutil.copytree(materialize("tiny-random-llama"), bare)
    (bare / "chat_template.jinja").unlink()
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    for extra, source, rendered_start in (([], "default", "<|endoftext|>User: "),
                                          (["--chat_template", str(template)], "argument", "<|im_start|>user\n")):
        out = tmp_path / f"sft_{source}"
        sft_train.main(*_args(*COMMON, "--model_name_or_path", str(bare), "--dataset_path",
                              str(data_dir / "train.jsonl"), "--output_dir", str(out), "--max_steps", "1", *extra))
        assert json.loads((out / "run_info.json").read_text())["chat_template_source"] == source
        saved = AutoTokenizer.from_pretrained(out)  # the next stage renders prompts the way this one trained
        assert saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(rendered_start)


@pytest.mark.slow
def test_packing_with_gradient_checkpointing_trains(tmp_path, data_dir):
    out = tmp_path / "packed"
    sft_train.main(*_args(
        "--dataset_path", str(data_dir / "train.jsonl"), "--output_dir", str(out), "--max_steps", "3",
        "--packing", "true", "--max_length", "128", "--per_device_train_batch_size", "2",
        "--gradient_checkpointing", "true", *COMMON,
    ))
    assert json.loads((out / "metrics.json").read_text())["train_loss"] > 0


def test_resume_continues_from_the_last_checkpoint(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "resumed"
    argv = ["--dataset_path", str(data_dir / "train.jsonl"), "--output_dir", str(out), "--max_steps", "4",
            "--per_device_train_batch_size", "4", *COMMON[:-4], "--save_strategy", "steps", "--save_steps", "2",
            "--seed", "0"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed after training, before the final save

    monkeypatch.setattr("rlhfkit.saving.save_final_model", crash)
    with pytest.raises(KeyboardInterrupt):
        sft_train.main(*_args(*argv))
    monkeypatch.undo()
    partial = tmp_path / "resumed.partial"
    assert (partial / "INCOMPLETE").exists() and (partial / "checkpoints" / "checkpoint-4").is_dir()

    from rlhfkit.checkpoints import check_parent
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="interrupted run"):
        check_parent(out)
    with pytest.raises(UserError, match="resume_from_checkpoint true"):
        sft_train.main(*_args(*argv))

    argv[argv.index("--max_steps") + 1] = "6"
    sft_train.main(*_args(*argv, "--resume_from_checkpoint", "true"))
    state = json.loads((out / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_runtime"] > 0 and "eval_loss_before" not in metrics


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def test_cli_help_and_one_line_errors(tmp_path, data_dir, capsys):
    from rlhfkit.cli import run_stage

    with pytest.raises(SystemExit) as info:
        run_stage(sft_train.main, TYPES, ["--help"])
    help_text = capsys.readouterr().out
    assert info.value.code == 0 and "--assistant_only_loss" in help_text and "--text_template" in help_text

    def stage_error(*argv):
        with pytest.raises(SystemExit) as info:
            run_stage(sft_train.main, TYPES, list(argv))
        assert info.value.code == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    base = ["--model_name_or_path", "tiny-random-llama", "--dataset_path", str(data_dir / "train.jsonl")]
    assert "QLoRA" in stage_error(*base, "--output_dir", str(tmp_path / "q"), "--use_peft", "true",
                                  "--load_in_4bit", "true")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "bot", "content": "x"}]}\n')
    assert stage_error("--model_name_or_path", "tiny-random-llama", "--dataset_path", str(bad), "--output_dir",
                       str(tmp_path / "b")) == (
        f"error: {bad}: row 2: field 'messages': message 0: role 'bot' is not one of system, user, assistant, tool")
    assert "unknown argument '--learnin_rate'" in stage_error(*base, "--output_dir", str(tmp_path / "c"),
                                                              "--learnin_rate", "1")
    if importlib.util.find_spec("wandb") is None:
        assert "needs the 'wandb' package" in stage_error(*base, "--output_dir", str(tmp_path / "w"), "--report_to",
                                                          "wandb")
    # no markers, and no incremental rendering either: the header counts the turns, so no prefix of a conversation
    # renders as a prefix of the whole
    not_incremental = tmp_path / "counted.jinja"
    not_incremental.write_text("{{ messages | length }} turns\n{% for m in messages %}{{ m['role'] }}: "
                               "{{ m['content'] }}\n{% endfor %}")
    error = stage_error(*base, "--output_dir", str(tmp_path / "d"), "--chat_template", str(not_incremental))
    assert "{% generation %}" in error and "conversation 1" in error and "not a prefix" in error


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "recipes" / "sft").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_parse(recipe):
    script_args, model_args, training_args = _args("--config", str(recipe))
    assert script_args.dataset_path and training_args.output_dir and model_args.model_name_or_path
