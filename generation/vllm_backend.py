"""The vLLM backend of generate.py (optional: `pip install 'rlhfkit[vllm]'`, needs a CUDA GPU).

Only vLLM's stable offline interface is used: `vllm.LLM(...)`, `vllm.SamplingParams(...)`, `LLM.generate(prompts,
sampling_params)` returning one `RequestOutput` per prompt whose `.outputs` are `CompletionOutput`s with `.index`,
`.text`, `.token_ids` and `.finish_reason`. Prompts are passed as token ids rendered by our own chat-template code
(`{"prompt_token_ids": [...]}`), so both backends see exactly the same prompt tokens and no double BOS.

One request per prompt with `n=K` and the prompt's own seed (`SamplingParams.seed`), so a prompt's samples do not
depend on batch or shard, as in the HF backend (the two backends' samples differ from each other).

GPU memory: vLLM keeps its weights and KV cache until the engine is torn down, and the next stage of a chain
needs that memory. `VLLMGenerator.close()` (also on `with` exit and on error) deletes the engine, destroys vLLM's
distributed state and empties the CUDA cache; generate.py also ends its process after the stage.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import logging
from collections.abc import Sequence

from rlhfkit.errors import UserError

logger = logging.getLogger(__name__)


def is_installed() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # a module injected into sys.modules without a spec
        import sys

        return "vllm" in sys.modules


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def usable() -> bool:
    """vLLM installed and a GPU visible: what `--backend auto` picks vLLM on."""
    return is_installed() and cuda_available()


_VLLM_PARAMS = {"repetition_penalty": "repetition_penalty", "min_new_tokens": "min_tokens"}


def vllm_processor_params(settings: dict) -> dict:
    """generation_config.json processor settings as `SamplingParams` keywords; the ones vLLM has no equivalent for
    are a one-line error (rather than samples from another distribution than the HF backend's)."""
    missing = sorted(set(settings) - set(_VLLM_PARAMS))
    if missing:
        raise UserError(f"generation_config.json sets {', '.join(missing)}, which the vLLM backend does not apply; "
                        "pass --checkpoint_processors false or use --backend hf")
    return {_VLLM_PARAMS[key]: value for key, value in settings.items()}


class VLLMGenerator:
    def __init__(
        self,
        model_path: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        if not is_installed():
            raise UserError("--backend vllm needs the 'vllm' package, which is not installed (pip install 'rlhfkit[vllm]')")
        if not cuda_available():
            raise UserError("--backend vllm needs a CUDA GPU and none is visible to this process (use --backend hf)")
        vllm = importlib.import_module("vllm")
        self._vllm = vllm
        kwargs = dict(
            model=model_path,
            tokenizer=model_path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**kwargs)

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
        params = [
            self._vllm.SamplingParams(
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=int(seed),
                stop_token_ids=list(stop_ids),
                skip_special_tokens=True,
                **extra,
            )
            for seed in seeds
        ]
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        results = []
        for output in outputs:
            completions = sorted(output.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples where n={n} were asked")
            results.append(
                [
                    {"text": c.text, "token_ids": list(c.token_ids), "finished": c.finish_reason == "stop"}
                    for c in completions
                ]
            )
        return results

    def close(self) -> None:
        """Free the GPU memory vLLM holds (engine, KV cache, NCCL groups)."""
        if getattr(self, "llm", None) is None:
            return
        del self.llm
        self.llm = None
        for module_name, function_name in (
            ("vllm.distributed.parallel_state", "destroy_model_parallel"),
            ("vllm.distributed.parallel_state", "destroy_distributed_environment"),
        ):
            with contextlib.suppress(Exception):  # the names moved between vLLM versions; each is optional
                getattr(importlib.import_module(module_name), function_name)()
        gc.collect()
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        logger.info("vLLM engine closed and GPU memory released")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
