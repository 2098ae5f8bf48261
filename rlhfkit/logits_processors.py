"""Logits processors of our decoding loop: none by default (on-policy), the checkpoint's when asked (plain
generation), and `suppress_tokens`, the one processor PPO can ask for by flag.

`rlhfkit/sampling.py` applies them between the forward and the sampling rule; PPO's log-prob forwards apply
`suppress_tokens` the same way (rlhfkit/rl/networks.py, rlhfkit/pairwise.py). The checkpoint's processors are
transformers' own classes, applied per row group; `checkpoint_processor_settings` says which ones a checkpoint's
`generation_config.json` would switch on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import UserError

# generation_config.json fields that change the distribution `generate` samples from before any sampling knob
# (transformers fills every field a caller leaves unset from the checkpoint's file). Decoder-only fields only:
# the encoder_* ones need encoder inputs, which a causal LM never has. Sampling knobs (temperature, top_p, top_k,
# do_sample) are not here: they always come from our own flags.
SUPPORTED_PROCESSOR_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "min_length", "min_new_tokens",
                              "suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "sequence_bias")
UNSUPPORTED_PROCESSOR_FIELDS = ("forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
                                "guidance_scale", "remove_invalid_values", "watermarking_config")


def _is_neutral(field: str, value) -> bool:
    if value is None:
        return True
    if field in ("repetition_penalty", "guidance_scale"):
        return float(value) == 1.0
    if field in ("no_repeat_ngram_size", "min_length", "min_new_tokens", "remove_invalid_values"):
        return not value
    if field in ("suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "sequence_bias"):
        return len(value) == 0
    return False


def checkpoint_processor_settings(model) -> dict:
    """The non-neutral logits-processor fields of the model's `generation_config` (`{}` when it has none; a
    `GenerationConfig` may be passed instead of the model).

    These are what `model.generate` would apply silently; `generate_batch` applies them only when asked
    (`checkpoint_processors=True`). Unsupported fields are included too (see `SUPPORTED_PROCESSOR_FIELDS`).
    """
    config = getattr(model, "generation_config", model)  # a model, or a GenerationConfig itself
    if config is None:
        return {}
    fields = SUPPORTED_PROCESSOR_FIELDS + UNSUPPORTED_PROCESSOR_FIELDS
    return {field: getattr(config, field, None) for field in fields if not _is_neutral(field, getattr(config, field, None))}


def suppress_tokens(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Logits with `token_ids` made impossible ([..., V] → [..., V]); the one processor PPO can ask for by flag.

    The most negative finite float, not −inf: probabilities become exactly 0 while entropy (Σ p·logit) and
    log-softmax stay finite. The same function runs in the sampler and where PPO computes log-probs.
    """
    if not token_ids:
        return logits
    index = torch.as_tensor(list(token_ids), device=logits.device, dtype=torch.long)
    return logits.index_fill(-1, index, torch.finfo(logits.dtype).min)


class CheckpointProcessors:
    """The checkpoint's logits processors (transformers' own classes), for the rows still being generated."""

    def __init__(self, settings: dict, prompt_width: int, pad_lengths: torch.Tensor, stop_ids: Sequence[int]):
        unsupported = sorted(set(settings) - set(SUPPORTED_PROCESSOR_FIELDS))
        if unsupported:
            raise UserError(
                f"generation_config.json sets {', '.join(unsupported)}, which this sampler does not apply; "
                f"sample without the checkpoint's processors (--checkpoint_processors false) or remove them"
            )
        self.settings, self.prompt_width, self.pad_lengths = settings, prompt_width, pad_lengths
        self.stop_ids = torch.tensor(list(stop_ids), dtype=torch.long)

    def _repetition_penalty(self, lp, penalty: float, sequences, scores, rows):
        # transformers' processor takes one integer `prompt_ignore_length` for the whole batch (5.19), so rows are
        # penalised in groups that share their left-padding width; the padding (often the EOS id) is never
        # penalised, whatever the batch's other prompts are.
        pads = self.pad_lengths[rows]
        scores = scores.clone()
        for pad in pads.unique().tolist():
            index = (pads == pad).nonzero(as_tuple=True)[0]
            processor = lp.RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=int(pad) or None)
            scores[index] = processor(sequences[index], scores[index])
        return scores

    def __call__(self, sequences: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        from transformers.generation import logits_process as lp

        s, device = self.settings, scores.device
        processors = []
        if "repetition_penalty" in s:  # left padding is not part of the prompt
            scores = self._repetition_penalty(lp, s["repetition_penalty"], sequences, scores, rows)
        if "no_repeat_ngram_size" in s:
            processors.append(lp.NoRepeatNGramLogitsProcessor(s["no_repeat_ngram_size"]))
        if "bad_words_ids" in s:
            processors.append(lp.NoBadWordsLogitsProcessor(s["bad_words_ids"], self.stop_ids))
        if "sequence_bias" in s:
            processors.append(lp.SequenceBiasLogitsProcessor(s["sequence_bias"]))
        if "min_length" in s:
            processors.append(lp.MinLengthLogitsProcessor(s["min_length"], self.stop_ids, device=device))
        if "min_new_tokens" in s:
            processors.append(lp.MinNewTokensLengthLogitsProcessor(self.prompt_width, s["min_new_tokens"],
                                                                   self.stop_ids, device=device))
        if "suppress_tokens" in s:
            processors.append(lp.SuppressTokensLogitsProcessor(s["suppress_tokens"], device=device))
        if "begin_suppress_tokens" in s:
            processors.append(lp.SuppressTokensAtBeginLogitsProcessor(s["begin_suppress_tokens"], self.prompt_width,
                                                                      device=device))
        for processor in processors:
            scores = processor(sequences, scores)
        return scores
