"""Choosing the pairwise layout for a loaded model (`choose_layout`): refuse what cannot hold a packed layout, then
check each candidate, fastest first, on a small synthetic batch against each sequence run alone, in the model's dtype
(`check_layout`); the verdict is cached per process by model class, attention, transformers version, dtype and
sliding window, and logged once. `rlhfkit/pairwise.py` (its docstring) says what the layouts are."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from .pairwise import (ENCODER_FIRST_TOKEN_MODULE, PAIRWISE_FORWARDS, device_of, is_encoder, plan, position_offset,
                       sequence_rewards, token_logprobs, unwrap)

logger = logging.getLogger(__name__)


_MASKABLE = ("sdpa", "eager", "flex_attention")


_VARLEN = ("flash_attention_2", "flash_attention_3")


# (atol, rtol) of the layout check per parameter dtype: |ours − per-sequence| ≤ atol + rtol·|per-sequence| for every
# reward / token log-prob. fp32 is reduction-order noise (~1e-6 on 2-layer models); half precision keeps ~3 digits.
# A wrong layout (a mask ignored, positions counted along the row) is off by the size of the values themselves.
CHECK_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-8, 1e-8), torch.float16: (2e-2, 2e-2),
                   torch.bfloat16: (6e-2, 3e-2)}


def _model_name(inner) -> str:
    return f"{type(inner).__name__} ({inner.config.model_type})"


def _uses_alibi(config) -> bool:
    """ALiBi biases attention by distance computed from the 2D attention mask (`build_alibi_tensor`), not from
    position ids: Bloom always, Falcon with `alibi=True`, MPT with `attn_config.alibi`."""
    if config.model_type == "bloom" or getattr(config, "position_embedding_type", None) == "alibi":
        return True
    if getattr(config, "alibi", False) is True:
        return True
    attn_config = getattr(config, "attn_config", None)
    alibi = attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", False)
    return bool(alibi)


def _takes_position_ids(module) -> bool:
    import inspect

    return "position_ids" in inspect.signature(module.forward).parameters


def layout_refusal(model) -> str | None:
    """Why no packed layout can hold for this model, known before running it (None: it may, the check decides).

    - encoder–decoder models: the decoder's causal mask and the encoder's are not ours to build;
    - ALiBi (Bloom, MPT, Falcon with alibi=True): the bias is built from the 2D mask along the row;
    - a forward without `position_ids` in its signature (the model's or its base model's): `**kwargs` swallow them
      and the transformer counts positions along the packed row (FalconForSequenceClassification: rewards off by
      0.2 on a 2-layer model, no error).
    """
    inner = unwrap(model)
    config = inner.config
    if getattr(config, "is_encoder_decoder", False):
        return f"{_model_name(inner)} is an encoder-decoder model"
    if _uses_alibi(config):
        return (f"{_model_name(inner)} uses ALiBi, whose position bias comes from the attention mask along the row, "
                "not from position ids")
    base = getattr(inner, "base_model", inner)
    for module in (inner, base):
        if not _takes_position_ids(module):
            return (f"{type(module).__name__}.forward takes no position_ids (its positions would count along the "
                    "packed row)")
    return None


def _candidates(config, impl: str, requested: str) -> tuple[list[str], str | None]:
    """The layouts worth checking, fastest first, and why a faster one is out (None when the first is the request)."""
    model_type = config.model_type
    if is_encoder(config):
        if model_type not in ENCODER_FIRST_TOKEN_MODULE:
            return [], f"encoder {model_type} has no known first-token head to read packed rewards from"
        if impl not in _MASKABLE:
            return [], f"attention '{impl}' cannot take a block-diagonal mask"
        if requested == "prefix_shared":
            return ["packed"], "bidirectional attention: a shared prefix would see its suffixes"
        return ["packed"], None
    if impl in _VARLEN:
        return ["varlen"], None if requested != "prefix_shared" else f"{impl} takes no custom mask (varlen packing only)"
    if impl not in _MASKABLE:
        return [], f"attention implementation '{impl}' cannot take a custom 4D mask"
    if requested == "packed":
        return ["packed"], None
    if requested == "prefix_shared":
        return ["prefix_shared"], None
    return ["prefix_shared", "packed"], None


@dataclass(frozen=True)
class LayoutVerdict:
    """What the check found for one kind of model: the layout to use and why (what is logged and recorded)."""

    layout: str
    reason: str
    max_difference: float | None = None  # the chosen layout's largest difference / tolerance (None: not checked)


_CHECKS: dict[tuple, tuple[float, str]] = {}  # (model kind, layout) → check_layout's result, once per process


_LOGGED: set[tuple] = set()


def _model_key(inner, impl: str) -> tuple:
    """What a check's verdict holds for: model class, attention implementation, transformers version, dtype, and the
    config fields that change what the mask must do (one class may or may not slide, e.g. Phi3)."""
    import transformers

    config = inner.config
    sliding = (getattr(config, "sliding_window", None), str(getattr(config, "layer_types", None)),
               getattr(config, "use_sliding_window", None))
    return (type(inner).__module__ + "." + type(inner).__qualname__, impl, transformers.__version__,
            str(next(inner.parameters()).dtype), sliding)


def forget_verdicts() -> None:
    """Clear the per-process cache of layout checks (for tests that change a model class in place)."""
    _CHECKS.clear()
    _LOGGED.clear()


def choose_layout(model, requested: str = "auto") -> str:
    """The layout to use for `model`: the fastest one that gives the per-sequence results on this very model.

    Returns one of "prefix_shared", "packed", "varlen" (packed for flash-attention: one row, no mask), "padded".
    Structural refusals (`layout_refusal`) come first; then each candidate, fastest first, is run on a small synthetic
    batch and compared with a per-sequence forward (`check_layout`). Check results are cached per process by model
    class, attention implementation, transformers version and dtype; the choice is logged once per model with its
    reason. A layout the user forced (`prefix_shared`, `packed`) that is refused or fails the check is a UserError,
    never a silent downgrade; `auto` falls back to `padded` (TRL's layout, exact by construction) and says why.
    """
    return layout_verdict(model, requested).layout


def layout_verdict(model, requested: str = "auto") -> LayoutVerdict:
    """`choose_layout` with its reason and the measured difference."""
    from rlhfkit.errors import UserError

    if requested not in PAIRWISE_FORWARDS:
        raise ValueError(f"--pairwise_forward must be one of {', '.join(PAIRWISE_FORWARDS)}, not '{requested}'")
    inner = unwrap(model)
    impl = getattr(inner.config, "_attn_implementation", None) or "eager"
    if requested == "padded":
        verdict = LayoutVerdict("padded", "requested (--pairwise_forward padded)")
    else:
        verdict = _decide(model, inner, impl, requested)
        if requested != "auto" and verdict.layout == "padded":
            raise UserError(f"--pairwise_forward {requested} cannot run {_model_name(inner)} exactly: "
                            f"{verdict.reason}; use --pairwise_forward auto (or padded)")
    log_key = (id(inner), requested, verdict)
    if log_key not in _LOGGED:
        _LOGGED.add(log_key)
        logger.info("pairwise forward: %s for %s (attention %s, %s; requested %s): %s", verdict.layout,
                    type(inner).__name__, impl, str(next(inner.parameters()).dtype).replace("torch.", ""),
                    requested, verdict.reason)
    return verdict


def _decide(model, inner, impl: str, requested: str) -> LayoutVerdict:
    refusal = layout_refusal(inner)
    if refusal:
        return LayoutVerdict("padded", refusal)
    candidates, why_not_faster = _candidates(inner.config, impl, requested)
    if not candidates:
        return LayoutVerdict("padded", why_not_faster)
    model_key = _model_key(inner, impl)
    failures = []
    for kind in candidates:
        if (model_key, kind) not in _CHECKS:
            _CHECKS[(model_key, kind)] = check_layout(model, kind)
        ratio, worst = _CHECKS[(model_key, kind)]
        if ratio <= 1.0:
            reason = (f"checked on this model: equal to each sequence run alone (largest difference {ratio:.2g}× "
                      "the tolerance)")
            return LayoutVerdict(kind, "; ".join([*failures, *filter(None, [why_not_faster]), reason]), ratio)
        failures.append(f"{kind} differs from each sequence run alone by {worst}")
    return LayoutVerdict("padded", "; ".join(failures))


# (prompt length, response lengths): a 1-token response, an identical pair (the shared-prefix cap), responses of
# different lengths, and groups packed into one row with a second, padded row
_CHECK_GROUPS = ((7, (1, 4, 9)), (2, (1, 1)), (3, (2, 5)))


_CHECK_ROW_TOKENS = 25


def check_sequences(config) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(sequences, groups, score_from) of the synthetic check: token ids drawn with a fixed seed, avoiding the
    model's special tokens (a pad id inside a sequence would move HF's own last-token pooling)."""
    vocab = int(getattr(config, "vocab_size", None) or 0)
    specials = {getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    specials |= set(getattr(config, "eos_token_id", None) or []) if isinstance(
        getattr(config, "eos_token_id", None), list) else set()
    pool = [t for t in range(min(vocab, 1000)) if t not in specials and t >= min(3, vocab - 1)]
    if len(pool) < 2:
        pool = [t for t in range(vocab) if t not in specials] or [0]
    generator = torch.Generator().manual_seed(1234)
    draw = lambda n: [pool[i] for i in torch.randint(len(pool), (n,), generator=generator).tolist()]  # noqa: E731
    sequences, groups, score_from = [], [], []
    for prompt_length, response_lengths in _CHECK_GROUPS:
        prompt = draw(prompt_length)
        members = []
        identical = len(set(response_lengths)) == 1
        first = draw(response_lengths[0]) if identical else None
        for length in response_lengths:
            members.append(len(sequences))
            sequences.append(prompt + (list(first) if identical else draw(length)))
            score_from.append(prompt_length)
        groups.append(members)
    return sequences, groups, score_from


def _reads_rewards(inner) -> bool:
    if is_encoder(inner.config):
        return True
    names = {name.split(".")[-1] for name, _ in inner.named_modules()}
    return bool(names & {"score", "v_head", "classifier"})


@contextlib.contextmanager
def _gathered(inner):
    """ZeRO-3 partitions parameters at load time (zero.Init): gather them for the check's few forwards."""
    partitioned = [p for p in inner.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def check_layout(model, kind: str) -> tuple[float, str]:
    """Run the synthetic check groups through `kind` and through a per-sequence forward of the model (no padding,
    its own 2D mask and positions), in the model's dtype and on its device, in eval mode without grad.

    Compares rewards (a model with a reward head) or every scored token's log-prob (a causal LM). Returns (the
    largest |difference| / (atol + rtol·|reference|), a description of the largest difference).
    """
    inner = unwrap(model)
    config = inner.config
    dtype = next(inner.parameters()).dtype
    atol, rtol = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.float16])
    sequences, groups, score_from = check_sequences(config)
    rewards = _reads_rewards(inner)
    offset = position_offset(inner)
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    device = device_of(inner)
    was_training = inner.training
    inner.eval()
    try:
        return _compare(inner, kind, sequences, groups, score_from, rewards, offset, pad, device, atol, rtol, dtype)
    except Exception as error:  # noqa: BLE001 - a layout the model cannot run fails the check, with the reason
        return float("inf"), f"raising {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        inner.train(was_training)


def _compare(inner, kind, sequences, groups, score_from, rewards, offset, pad, device, atol, rtol, dtype):
    def run(plan_):
        plan_ = plan_.to(device)
        if rewards:
            return sequence_rewards(inner, plan_).float().cpu()
        return token_logprobs(inner, plan_).log_probs.float().cpu()

    with torch.no_grad(), _gathered(inner):
        layout = plan(sequences, groups, kind=kind, pad_token_id=pad, position_offset=offset,
                      score_from=None if rewards else score_from, row_tokens=_CHECK_ROW_TOKENS)
        ours = run(layout)
        # each sequence alone: one row, no padding, the model's own 2D mask and positions
        alone = [run(plan([s], kind="padded", pad_token_id=pad, position_offset=offset,
                          score_from=None if rewards else [b]))
                 for s, b in zip(sequences, score_from)]
    if rewards:
        alone = torch.cat(alone)
    else:  # scored tokens come in the layout's order (rows, first-fit decreasing), not the sequences'
        alone = torch.stack([alone[i][j] for i, j in zip(layout.token_sequence.tolist(), layout.token_order.tolist())])
    if ours.shape != alone.shape:
        return float("inf"), f"{ours.numel()} values instead of {alone.numel()}"
    difference = (ours - alone).abs()
    if not torch.isfinite(ours).all():
        return float("inf"), "non-finite values"
    ratio = difference / (atol + rtol * alone.abs())
    worst = int(ratio.argmax())
    what = "reward" if rewards else "token log-prob"
    return float(ratio.max()), (f"{float(difference[worst]):.3g} on a {what} ({float(ours[worst]):.5g} vs "
                                f"{float(alone[worst]):.5g} alone; tolerance {atol:g} + {rtol:g}·|value| in "
                                f"{str(dtype).replace('torch.', '')})")

