"""generation/: HF backend for real (reproducible, sharded == unsharded, resume after a kill), merge_data.py checks.
The vLLM backend runs for real in tests/test_vllm_generation.py, the API servers in tests/test_vllm_serve.py."""

from __future__ import annotations

import json
import sys

import pytest

from generation import generate, merge_data, shards
from rlhfkit.errors import UserError
from rlhfkit.sampling import derive_seed
from tests.conftest import GENERATION_PROMPTS

PROMPTS = GENERATION_PROMPTS  # tests/conftest.py, with the prompt_file fixture


def args_for(prompt_file, output_dir, **overrides):
    values = dict(model_name_or_path="tiny-random-llama", dataset_path=[prompt_file], output_dir=str(output_dir),
                  num_samples=2, max_new_tokens=6, temperature=1.0, top_p=0.95, seed=11, backend="hf", batch_size=2)
    values.update(overrides)
    return generate.ScriptArguments(**values)


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.fixture
def unsharded(prompt_file, tmp_path):
    metrics = generate.main(args_for(prompt_file, tmp_path / "full"))
    return read(tmp_path / "full" / "generations.jsonl"), metrics


@pytest.mark.slow
def test_hf_output_rows_and_stage_contract(unsharded, tmp_path):
    rows, metrics = unsharded
    out = tmp_path / "full"
    assert len(rows) == len(PROMPTS) and all(len(r["responses"]) == 2 for r in rows)
    assert rows[0]["prompt"] == [{"role": "user", "content": "tell me a story about the sea"}]
    meta = rows[0]["meta"]
    assert {k: meta[k] for k in ("model", "backend", "num_samples", "temperature", "top_p", "max_new_tokens", "seed")} == {
        "model": "tiny-random-llama", "backend": "hf", "num_samples": 2, "temperature": 1.0, "top_p": 0.95,
        "max_new_tokens": 6, "seed": 11}
    assert meta["prompt_seed"] == derive_seed(11, rows[0]["id"])
    assert metrics["prompts"] == 5 and metrics["samples"] == 10 and metrics["tokens_per_second"] > 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["complete"] and info["stage"] == "generate"
    assert sorted(p.name for p in out.iterdir()) == ["args.yaml", "checksums.json", "generations.jsonl", "metrics.json", "run_info.json"]
    assert not (tmp_path / "full.partial").exists()


@pytest.mark.slow
def test_reproducible_with_fixed_seed_and_other_batch_size(unsharded, prompt_file, tmp_path):
    rows, _ = unsharded
    generate.main(args_for(prompt_file, tmp_path / "again", batch_size=5))
    assert read(tmp_path / "again" / "generations.jsonl") == rows
    generate.main(args_for(prompt_file, tmp_path / "other_seed", seed=12))
    assert [r["responses"] for r in read(tmp_path / "other_seed" / "generations.jsonl")] != [r["responses"] for r in rows]


@pytest.mark.slow
def test_sharded_then_merged_equals_unsharded(unsharded, prompt_file, tmp_path):
    rows, _ = unsharded
    out = tmp_path / "sharded"
    assert generate.main(args_for(prompt_file, out, local_index=1, world_size=2, batch_size=1)) is None
    with pytest.raises(UserError, match="shard 0 of 2 has not started"):
        merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2))
    generate.main(args_for(prompt_file, out, local_index=0, world_size=2, batch_size=3))
    metrics = merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2, dataset_path=[prompt_file]))
    merged = read(out / "generations.jsonl")
    assert merged == rows  # same prompts, same order, same samples: no duplicates, no gaps
    assert metrics["prompts"] == 5 and metrics["shards"] == 2


@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating(unsharded, prompt_file, tmp_path, monkeypatch):
    rows, _ = unsharded
    out = tmp_path / "resumed"
    import rlhfkit.sampling as sampling  # main() imports generate_batch from here at call time

    real = sampling.generate_batch
    calls = []

    def dies_on_second_batch(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate.main(args_for(prompt_file, out))
    shard_file = tmp_path / "resumed.partial" / "shard-00000-of-00001.jsonl"
    assert len(read(shard_file)) == 2 and not (tmp_path / "resumed").exists()
    with open(shard_file, "a", encoding="utf-8") as handle:  # a write torn by the kill
        handle.write('{"id": "torn", "prompt": [{"role": "us')

    generated = []

    def counting(model, tokenizer, prompts, *args, **kwargs):
        generated.extend(p[0]["content"] for p in prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_batch", counting)
    generate.main(args_for(prompt_file, out))
    assert len(generated) == 3  # only the prompts the killed run had not written
    assert read(out / "generations.jsonl") == rows


def test_resume_refuses_other_settings(prompt_file, tmp_path, monkeypatch):
    out = tmp_path / "g"
    partial = tmp_path / "g.partial"
    partial.mkdir()
    row = {"id": "x", "prompt": [], "responses": [], "meta": {"model": "tiny-random-llama", "backend": "hf",
           "num_samples": 2, "temperature": 0.5, "top_p": 0.95, "max_new_tokens": 6, "seed": 11}}
    (partial / "shard-00000-of-00001.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"row 1: field 'meta.temperature': written with 0.5"):
        generate.main(args_for(prompt_file, out))


@pytest.mark.slow
def test_merge_detects_duplicates_and_gaps(unsharded, prompt_file, tmp_path):
    out = tmp_path / "dup"
    generate.main(args_for(prompt_file, out, local_index=0, world_size=2))
    generate.main(args_for(prompt_file, out, local_index=1, world_size=2))
    shard = tmp_path / "dup.partial" / "shard-00001-of-00002.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines + lines[:1]))
    with pytest.raises(UserError, match="written twice"):
        merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2))
    shard.write_text("".join(lines[1:]))
    with pytest.raises(UserError, match="1 assigned prompt"):
        merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2))
    shard.write_text("".join(lines))
    done_file = tmp_path / "dup.partial" / "shard-00001-of-00002.done.json"
    done = json.loads(done_file.read_text())
    done_file.write_text(json.dumps({**done, "meta": {**done["meta"], "temperature": 0.3}}))
    with pytest.raises(UserError, match=r"shard 1 was generated with other settings than shard 0 \(temperature\)"):
        merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2))
    done_file.write_text(json.dumps(done))
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS[:4]))
    with pytest.raises(UserError, match="not in the prompt set"):
        merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2, dataset_path=[str(fewer)]))


def test_bad_prompt_row_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl: row 2: field 'prompt'"):
        generate.main(args_for(str(bad), tmp_path / "o"))


def test_read_rows_torn_tail(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "pro')
    rows, good = shards.read_rows(path, allow_torn_tail=True)
    assert [r["id"] for r in rows] == ["a", "b"] and good == len(b'{"id": "a"}\n{"id": "b"}\n')
    with pytest.raises(UserError, match="row 3"):
        shards.read_rows(path)
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(UserError, match="row 2: damaged"):
        shards.read_rows(path, allow_torn_tail=True)


@pytest.mark.slow  # starts Python processes (~12 s each here): kept out of make test-fast
def test_cli_help_and_one_line_error(tmp_path):
    import subprocess

    script = str(generate.__file__)
    usage = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "--num_samples" in usage.stdout and "--world_size" in usage.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"messages": 5}\n')
    run = subprocess.run([sys.executable, script, "--model_name_or_path", "tiny-random-llama", "--dataset_path",
                          str(bad), "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: row 2: field 'messages': expected a string or a list of messages, got int"]
    assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_accelerate_processes_shard_and_merge_like_one_process(unsharded, prompt_file, tmp_path):
    """Two ranks under `accelerate launch` (gloo on CPU): each generates its shard, the main rank merges."""
    import subprocess

    from tests.conftest import REPO

    out = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
               "--num_processes", "2", "generation/generate.py", "--model_name_or_path", "tiny-random-llama",
               "--dataset_path", prompt_file, "--output_dir", str(out), "--num_samples", "2", "--max_new_tokens", "6",
               "--temperature", "1.0", "--top_p", "0.95", "--seed", "11", "--backend", "hf", "--batch_size", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shard 0/2" in result.stderr  # the main rank reports a world of two
    rows, _ = unsharded
    two = read(out / "generations.jsonl")
    assert [r["id"] for r in two] == [r["id"] for r in rows]
    assert [r["responses"] for r in two] == [r["responses"] for r in rows]


@pytest.mark.slow
def test_checkpoint_generation_config_applies_unless_turned_off(prompt_file, tmp_path, tiny_llama_dir):
    """Plain generation honours the checkpoint's generation_config.json (as model.generate would), says so in
    run_info.json, and --checkpoint_processors false samples the raw distribution (what PPO's rollouts use)."""
    import shutil

    from transformers import GenerationConfig

    model_dir = tmp_path / "suppressing"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = GenerationConfig.from_pretrained(model_dir)
    config.suppress_tokens = list(range(100, 356))  # half the vocabulary
    config.save_pretrained(model_dir)

    def tokens(out):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts = [text for row in read(out / "generations.jsonl") for text in row["responses"]]
        return [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False)]

    applied = tmp_path / "applied"
    generate.main(args_for(prompt_file, applied, model_name_or_path=str(model_dir), max_new_tokens=12))
    info = json.loads((applied / "run_info.json").read_text())
    assert info["generation_config_processors"] == {"suppress_tokens": list(range(100, 356))}
    assert info["sampling"]["checkpoint_processors"] is True
    raw = tmp_path / "raw"
    generate.main(args_for(prompt_file, raw, model_name_or_path=str(model_dir), max_new_tokens=12,
                           checkpoint_processors=False))
    assert json.loads((raw / "run_info.json").read_text())["generation_config_processors"] == {}
    in_range = lambda ids: sum(100 <= t < 356 for t in ids) / len(ids)  # noqa: E731
    # re-encoding decoded text can merge pieces, so "never" is checked as "rarely" on the applied side
    assert in_range(tokens(applied)) < 0.2 < 0.35 < in_range(tokens(raw))
