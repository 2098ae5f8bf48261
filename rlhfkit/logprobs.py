"""Sequence log-probabilities of responses, and a DPO policy read as an implicit reward model.

DPO's implicit reward of a response y to a prompt x is β·(log π(y|x) − log π_ref(y|x)) (Rafailov et al. 2023,
https://arxiv.org/abs/2305.18290, eq. 5); RewardBench ranks a pair by the unscaled difference
Σ_t log π(y_t|x, y_<t) − Σ_t log π_ref(y_t|x, y_<t) over the response tokens (β > 0 does not change a ranking).

Written here rather than taken from TRL: `DPOTrainer` computes these sums inside its loss with its own collator and a
fused LM head patched onto the model; evaluating an arbitrary saved policy against an arbitrary reference on
conversations (not tokenised DPO rows) needs the plain function.

Response tokens are those after the prompt rendered with `add_generation_prompt=True`: for ChatML that is the
reply, its `<|im_end|>` and the template's trailing newline, the same span `DPOTrainer` trains on, so the reward
read here is the one DPO optimised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .errors import UserError
from .scoring import prompt_groups

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# pure tensor functions
# ---------------------------------------------------------------------------------------------------------------
def shifted_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the tokens before it.

    logits: [B, T, V] (position t predicts token t+1); input_ids: [B, T] → [B, T] where column 0 is 0 (the first
    token has no prediction) and column t is log p(input_ids[:, t] | input_ids[:, :t]).
    """
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    # gather − logsumexp avoids materialising the full [B, T, V] log_softmax a second time
    picked = torch.gather(shifted, -1, targets).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
    return torch.cat([picked.new_zeros(picked.shape[0], 1), picked], dim=1)


def response_logprob_sums(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Σ log p over the tokens marked in `response_mask`.

    logits: [B, T, V]; input_ids: [B, T]; response_mask: [B, T] (1 where the token *in input_ids* belongs to the
    response; padding and prompt are 0; position 0 must be 0, it has no prediction) → [B] float32.
    """
    if response_mask.shape != input_ids.shape:
        raise ValueError(f"response_mask {tuple(response_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask marks position 0, which no logit predicts")
    per_token = shifted_token_logprobs(logits, input_ids)
    return (per_token * response_mask.to(per_token.dtype)).sum(dim=1)


def implicit_reward_margins(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
) -> torch.Tensor:
    """Chosen-minus-rejected log-ratio margin per pair (all inputs [B] sequence log-prob sums) → [B].

    (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)): positive when the policy moved towards the chosen
    response relative to the reference; the argument of DPO's sigmoid loss before β.
    """
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


# ---------------------------------------------------------------------------------------------------------------
# tokenisation of conversations
# ---------------------------------------------------------------------------------------------------------------
def split_conversation(messages: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """prompt (up to the last non-assistant message), response (the trailing assistant messages)."""
    messages = list(messages)
    cut = len(messages)
    while cut > 0 and messages[cut - 1].get("role") == "assistant":
        cut -= 1
    if cut == len(messages):
        raise UserError("conversation does not end with an assistant response")
    if cut == 0:
        raise UserError("conversation has no prompt before the assistant response")
    return messages[:cut], messages[cut:]


def conversation_ids(tokenizer, messages: Sequence[dict]) -> tuple[list[int], int]:
    """Token ids of the whole conversation and the index where the response starts.

    Tokenised once with the chat template (no second BOS). The response starts where the prompt rendered with the
    generation prompt stops matching the full rendering, which equals the prompt length for prefix-consistent
    templates and stays correct for the few that render a prompt differently alone.
    """
    from .tokenization import render_ids

    prompt, _ = split_conversation(messages)
    full = render_ids(tokenizer, list(messages))
    prompt_ids = render_ids(tokenizer, prompt, add_generation_prompt=True)
    start = 0
    for a, b in zip(prompt_ids, full):
        if a != b:
            break
        start += 1
    if start >= len(full):
        raise UserError("the response renders to no tokens under this chat template")
    return full, max(start, 1)


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def sequence_logprobs(model, tokenizer, conversations: Sequence[Sequence[dict]], batch_size: int = 8,
                      progress: bool = False, desc: str = "log-probs", layout: str = "auto") -> list[float]:
    """Σ log π(response | prompt) for each conversation (prompt messages + trailing assistant response)."""
    encoded = [conversation_ids(tokenizer, conv) for conv in conversations]
    return _scores_for(model, tokenizer, encoded, batch_size, progress, desc, prompt_groups(conversations), layout)


def _scores_for(model, tokenizer, encoded, batch_size, progress, desc, groups=None, layout="auto") -> list[float]:
    """Response log-prob sums through the packed pairwise forward (rlhfkit.pairwise): responses to one prompt
    compute it once, and the LM head runs only where a response token is predicted."""
    from .scoring import sequence_logprob_sums

    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, not {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("the tokenizer has neither a pad nor an eos token to pad batches with")
    was_training = model.training
    model.eval()
    try:
        return sequence_logprob_sums(model, [ids for ids, _ in encoded], [start for _, start in encoded], pad_id,
                                     batch_size, groups, layout, progress, desc)
    finally:
        model.train(was_training)


def implicit_rewards(policy, reference, tokenizer, conversations: Sequence[Sequence[dict]], batch_size: int = 8,
                     progress: bool = True) -> list[float]:
    """Implicit DPO reward of each conversation: Σ log π(y|x) − Σ log π_ref(y|x) over the response tokens.

    `conversations`: lists of messages, a prompt then one assistant response. Policy and reference share
    `tokenizer` (a DPO policy keeps its reference's tokenizer); a vocabulary mismatch is refused.
    """
    vocab_policy = policy.get_input_embeddings().num_embeddings
    vocab_reference = reference.get_input_embeddings().num_embeddings
    if vocab_policy != vocab_reference:
        raise UserError(
            f"policy and reference have different vocabularies ({vocab_policy} vs {vocab_reference} embeddings); "
            "the implicit reward needs the reference the policy was trained from"
        )
    encoded = [conversation_ids(tokenizer, conv) for conv in conversations]
    groups = prompt_groups(conversations)
    policy_scores = _scores_for(policy, tokenizer, encoded, batch_size, progress, "policy log-probs", groups)
    reference_scores = _scores_for(reference, tokenizer, encoded, batch_size, progress, "reference log-probs", groups)
    return [p - r for p, r in zip(policy_scores, reference_scores)]
