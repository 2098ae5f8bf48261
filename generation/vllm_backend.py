"""The vLLM backend of generate.py: an offline engine in this process, on a CUDA GPU or on a CPU.

The engine comes from `rlhfkit.vllm_engine.make_engine` (the machine's settings: on a CPU the in-process engine,
eager mode, no chunked prefill, a small KV cache, threads bound to this process's cores). Only vLLM's stable offline
interface is used: `LLM.generate(prompts, sampling_params)` returning one `RequestOutput` per prompt whose `.outputs`
are `CompletionOutput`s with `.index` and `.token_ids`.

Same inputs and outputs as the HF backend (`rlhfkit.sampling.generate_batch`):
- prompts are passed as token ids rendered by our own chat-template code (`{"prompt_token_ids": [...]}`), so both
  backends see exactly the same prompt tokens (and no double BOS);
- the response ids are cut after the first of our stop tokens and decoded by our tokenizer with
  `skip_special_tokens=True` (vLLM's own incremental detokenization is switched off), so equal ids give equal text;
- one request per prompt with `n=K` and the prompt's own seed (`SamplingParams.seed`): a prompt's samples do not
  depend on its batch or shard, as in the HF backend. The two backends' *sampled* responses differ (different
  random streams); greedy responses agree up to float rounding (tests/test_vllm_generation.py).

Memory: vLLM keeps its weights and KV cache until the engine is torn down, and the next stage of a chain needs that
memory; `VLLMGenerator.close()` (also on `with` exit and on error) closes the engine (`close_engine`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rlhfkit.errors import UserError
from rlhfkit.vllm_engine import close_engine, is_installed, make_engine, settings_of, unsupported_reason, usable

__all__ = ["VLLMGenerator", "auto_backend", "is_installed", "usable", "vllm_processor_params"]

logger = logging.getLogger(__name__)

_VLLM_PARAMS = {"repetition_penalty": "repetition_penalty", "min_new_tokens": "min_tokens"}


def vllm_processor_params(settings: dict) -> dict:
    """generation_config.json processor settings as `SamplingParams` keywords; the ones vLLM has no equivalent for
    are a one-line error (rather than samples from another distribution than the HF backend's)."""
    missing = sorted(set(settings) - set(_VLLM_PARAMS))
    if missing:
        raise UserError(f"generation_config.json sets {', '.join(missing)}, which the vLLM backend does not apply; "
                        "pass --checkpoint_processors false or use --backend hf")
    return {_VLLM_PARAMS[key]: value for key, value in settings.items()}


def auto_backend(model_path: str, trust_remote_code: bool = False) -> tuple[str, str]:
    """(`vllm` or `hf`, why) for `--backend auto`: vLLM whenever it imports and can run the model, on a GPU or a
    CPU; the HF backend otherwise."""
    if not is_installed():
        return "hf", "vLLM is not installed"
    import torch

    # a first look without importing vLLM (seconds): a model the CPU engine cannot run needs no import
    reason = unsupported_reason(model_path, cpu=not torch.cuda.is_available(), trust_remote_code=trust_remote_code,
                                check_registry=False)
    if reason is not None:
        return "hf", f"vLLM cannot run this model: {reason}"
    if not usable():
        return "hf", "vLLM is installed but does not import (see the warning above)"
    reason = unsupported_reason(model_path, trust_remote_code=trust_remote_code)
    if reason is not None:
        return "hf", f"vLLM cannot run this model: {reason}"
    return "vllm", "vLLM imports and supports the model"


def greedy_n(n: int, temperature: float) -> int:
    """Samples to ask vLLM for: it refuses n > 1 with greedy decoding, whose K samples are all the same anyway (the
    one answer is repeated K times)."""
    return 1 if temperature <= 0 else n


class VLLMGenerator:
    """An engine for one model; `generate` takes prompt token ids and gives `generate_batch`-like samples."""

    def __init__(
        self,
        model_path: str,
        tokenizer,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        kv_cache_gib: float | None = None,
        cpu_threads: int | None = None,
        cpu_offset: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.llm = None
        self.llm = make_engine(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                               kv_cache_gib=kv_cache_gib, tensor_parallel_size=tensor_parallel_size,
                               gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
                               cpu_threads=cpu_threads, cpu_offset=cpu_offset, what="--backend vllm")
        import vllm

        self._vllm = vllm
        self.settings = settings_of(self.llm)

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: Sequence[int],
        stop_ids: Sequence[int],
        processors: dict | None = None,
    ) -> list[list[dict]]:
        """`n` samples per prompt as `{"text", "token_ids", "finished"}`, like `rlhfkit.sampling.generate_batch`.

        processors: the checkpoint's generation_config.json settings to apply (`checkpoint_processor_settings`),
        mapped onto vLLM's own parameters; vLLM applies none of them to an explicit `SamplingParams` by itself.
        """
        extra = vllm_processor_params(processors or {})
        asked = greedy_n(n, temperature)
        params = [
            self._vllm.SamplingParams(
                n=asked,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=int(seed),
                stop_token_ids=list(stop_ids),
                detokenize=False,  # our tokenizer decodes the ids, as in the HF backend
                **extra,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        results = []
        for request, output in zip(requests, outputs):
            if list(output.prompt_token_ids) != request["prompt_token_ids"]:
                raise RuntimeError("vLLM answered with other prompt tokens than were sent (outputs out of order?)")
            completions = sorted(output.outputs, key=lambda c: c.index)
            if len(completions) != asked:
                raise RuntimeError(f"vLLM returned {len(completions)} samples where n={asked} were asked")
            samples = [self.sample(c.token_ids, stop_ids) for c in completions]
            results.append(samples * (n // asked))
        return results

    def sample(self, token_ids: Sequence[int], stop_ids: Sequence[int]) -> dict:
        from rlhfkit.sampling import truncate_at_stop

        ids, finished = truncate_at_stop(list(token_ids), stop_ids)
        return {"text": self.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "finished": finished}

    def close(self) -> None:
        """Free what vLLM holds (engine, KV cache, GPU memory; on a CPU, this process's threads and affinity)."""
        if getattr(self, "llm", None) is None:
            return
        llm, self.llm = self.llm, None
        close_engine(llm)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
