"""The one pairwise forward: packed, prefix-shared scoring of groups of sequences (pairs, K samples, candidates).

Every stage that scores a pair or a group goes through here: rm_train.py (train and eval), dpo_train.py (policy and
reference, precomputed or not), pm_train.py and prm_train.py, eval_benchmark.py (RM scores, DPO implicit rewards),
annotate/get_rewards.py (K samples per prompt), ppo_train.py (its reward model, and its own log-prob forwards over a
prompt's K samples) and eval_winrate.py's RM judge. Choosing a layout for a model is `rlhfkit/layout_check.py`; the
trainers' token-budget micro-batches are `rlhfkit/train/token_budget.py`.

Layout (`--pairwise_forward prefix_shared`, the default for decoders). A group is sequences that share a prefix (a
pair's prompt, a prompt's K samples). It is laid out once as

    [prefix | suffix_1 | suffix_2 | … | suffix_K]

with groups back to back in a few rows (first-fit decreasing into rows as long as the longest group), so no pair
repeats its prompt and almost nothing is padding:
- positions: the prefix and suffix_1 count up from 0; every suffix_k restarts at the end of the prefix, as if the
  other suffixes were absent;
- attention (a boolean [rows, 1, T, T] mask): causal inside a group; suffix_k sees the prefix and its own earlier
  tokens, never another suffix; nothing crosses groups; padding sees only itself (so no row of the softmax is empty);
- a reward is read at each sequence's last token (a forward hook on the reward head captures its per-position
  output); log-probs are read only where the next token is scored: a forward pre-hook on the LM head hands it just
  those hidden states (the prefix's last position twice, once per suffix), so prompt positions cost no LM head.
Because attention is causal, the prefix's hidden states are exactly those each sequence would compute alone, and each
suffix sees exactly its own sequence: results equal the padded forward up to float reduction order — provided the
model takes the 4D mask and the position ids as given. That is checked on the loaded model, not assumed from its name
(`rlhfkit.layout_check.choose_layout`): models that cannot hold it are refused before running (encoder–decoders, ALiBi, a forward without
`position_ids`: Falcon's reward model, Bloom, MPT), and before the first batch a small synthetic set of groups runs
through the candidate layout and through each sequence alone, in the model's dtype; the fastest layout within the
dtype's tolerance is kept (tests: every decoder family of the installed transformers, rewards and log-probs to 1e-4 in
fp32, gradients to 1e-5; a model whose attention drops the mask is caught).

`packed`: sequences back to back without sharing (each its own causal or, for encoders, bidirectional segment,
positions restarting at 0). Encoders (BERT, RoBERTa, DeBERTa) get only this: bidirectional attention would let a
prefix see its suffixes, so sharing would change the result. `padded`: one sequence per row, right-padded, the plain
2D mask: TRL's layout, kept as the reference and the fallback.

Backends (`model.config._attn_implementation`): `sdpa` takes the boolean mask, `eager` an additive float mask,
`flex_attention` a BlockMask built from the same rule, `flash_attention_2/3` only `packed` (varlen: one row, position
ids restarting per sequence, no mask). The flex and flash paths are written and unit-tested on CPU where possible
but have not run on a GPU (the layout check runs there too). Anything else falls back to `padded` with one log line
saying why; a forced layout that cannot hold is a UserError.

Written here because no maintained library does it: TRL's RewardTrainer has no padding-free mode and its DPO
padding_free needs flash-attention and repeats the prompt; OpenRLHF packs without sharing; verl's PrefixGrouper does
not pack.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

PAIRWISE_FORWARDS = ("auto", "prefix_shared", "packed", "padded")
PAIRWISE_FORWARD_HELP = (
    "How sequences that share a prompt are laid out for the forward: prefix_shared (the prompt computed once per "
    "pair/group — a pair, both orders of a comparison, PPO's K samples of a prompt — sequences packed without "
    "padding; decoders), packed (no padding, no sharing; encoders), padded (TRL's layout), auto (the fastest layout "
    "that gives the per-sequence results on the loaded model, checked before the first batch). See "
    "rlhfkit/pairwise.py."
)

# Encoders: the module that reads the first token's hidden state ([B, T, H] → uses [:, 0]) and the offset of their
# absolute position ids (RoBERTa counts from padding_idx + 1).
ENCODER_FIRST_TOKEN_MODULE = {"bert": "pooler", "roberta": "classifier", "xlm-roberta": "classifier",
                              "deberta": "pooler", "deberta-v2": "pooler"}


def _config(model):
    model = unwrap(model)
    return model.config


def unwrap(model):
    for attr in ("module",):  # DDP / DeepSpeed engine
        while hasattr(model, attr) and isinstance(getattr(model, attr), torch.nn.Module):
            model = getattr(model, attr)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def is_encoder(config) -> bool:
    return config.model_type in ENCODER_FIRST_TOKEN_MODULE or (
        not getattr(config, "is_decoder", True) and config.model_type in ("distilbert", "electra", "modernbert"))


# ---------------------------------------------------------------------------------------------------------------
# the layout (built on the host, in the collator)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Where each sequence (and each scored token) lands in the packed rows. All indices are into the flattened rows.

    Tensors (N sequences, M scored tokens):
      input_ids, position_ids [R, T]; segment [R, T] (group number within its row, −1 for padding); branch [R, T]
      (0 for a shared prefix, k ≥ 1 for the k-th suffix of its group);
      last_index [N], first_index [N] (flat index of each sequence's last / first token);
      logit_index [M] (flat index of the position whose logits predict the scored token), target_ids [M],
      token_sequence [M] (which sequence the token belongs to), token_order [M] (its index among that sequence's
      scored tokens).
    """

    kind: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    branch: torch.Tensor
    last_index: torch.Tensor
    first_index: torch.Tensor
    logit_index: torch.Tensor
    target_ids: torch.Tensor
    token_sequence: torch.Tensor
    token_order: torch.Tensor
    sequence_tokens: int  # Σ len(sequence): what a padding-free forward without sharing would compute

    FIELDS = ("input_ids", "position_ids", "segment", "branch", "last_index", "first_index", "logit_index",
              "target_ids", "token_sequence", "token_order")

    @property
    def num_sequences(self) -> int:
        return int(self.last_index.numel())

    @property
    def computed_tokens(self) -> int:
        return int((self.segment >= 0).sum())

    @property
    def layout_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to_inputs(self, prefix: str = "pw_") -> dict:
        """The plan as a flat dict of tensors (what a collator returns; HF Trainer moves them to the device)."""
        out = {prefix + name: getattr(self, name) for name in self.FIELDS}
        out[prefix + "meta"] = torch.tensor([PLAN_KINDS.index(self.kind), self.sequence_tokens])
        return out

    @classmethod
    def from_inputs(cls, inputs: dict, prefix: str = "pw_") -> "Plan":
        meta = inputs[prefix + "meta"].tolist()
        return cls(kind=PLAN_KINDS[int(meta[0])], sequence_tokens=int(meta[1]),
                   **{name: inputs[prefix + name] for name in cls.FIELDS})

    def to(self, device) -> "Plan":
        return Plan(kind=self.kind, sequence_tokens=self.sequence_tokens,
                    **{name: getattr(self, name).to(device) for name in self.FIELDS})


PLAN_KINDS = ("prefix_shared", "packed", "padded", "varlen")


def common_prefix_length(sequences: list[list[int]]) -> int:
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return n


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """The prefix a group shares in the layout: the longest common prefix, capped so that every member keeps at
    least one token of its own (its reward is read there)."""
    return min(common_prefix_length(sequences), min(len(s) for s in sequences) - 1)


def plan(sequences: list[list[int]], groups: list[list[int]] | None = None, *, kind: str = "prefix_shared",
         pad_token_id: int = 0, score_from: list[int] | None = None, position_offset: int = 0,
         row_tokens: int | None = None) -> Plan:
    """Lay out `sequences` for one forward.

    sequences: token ids, N of them. groups: lists of indices into `sequences` that may share a prefix (e.g. each
    pair's [chosen, rejected]); default: each sequence alone. kind: "prefix_shared" | "packed" | "padded" |
    "varlen" (packed into a single row with no mask, for flash-attention). score_from[i]: the first token of
    sequence i whose log-prob is wanted (tokens score_from[i] … end; ≥ 1), or None for rewards only.
    position_offset: added to every position id (RoBERTa-style models count from padding_idx + 1).
    row_tokens: minimum row length for packing (default: the longest group).

    The shared prefix of a group is the longest common prefix of its members, capped so that every member keeps at
    least one token of its own (its reward is read there).
    """
    if kind not in PLAN_KINDS:
        raise ValueError(f"unknown layout kind {kind!r}")
    n = len(sequences)
    if n == 0:
        raise ValueError("nothing to lay out")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("an empty sequence cannot be scored")
    if groups is None or kind != "prefix_shared":
        groups = [[i] for i in range(n)]
    elif sorted(i for members in groups for i in members) != list(range(n)):
        raise ValueError("groups must cover every sequence exactly once")
    # --- each group as (prefix tokens, [(sequence index, suffix tokens)])
    blocks = []
    for members in groups:
        seqs = [sequences[i] for i in members]
        shared = 0
        if kind == "prefix_shared" and len(members) > 1:
            shared = shared_prefix_length(seqs)
        blocks.append((members, shared, shared + sum(len(s) - shared for s in seqs)))
    # --- rows
    if kind == "padded":
        rows = [[b] for b in range(len(blocks))]
    elif kind == "varlen":
        rows = [list(range(len(blocks)))]
    else:
        capacity = max(max(b[2] for b in blocks), row_tokens or 0)
        rows, fill = [], []
        for b in sorted(range(len(blocks)), key=lambda b: -blocks[b][2]):  # first-fit decreasing
            for r in range(len(rows)):
                if fill[r] + blocks[b][2] <= capacity:
                    rows[r].append(b)
                    fill[r] += blocks[b][2]
                    break
            else:
                rows.append([b])
                fill.append(blocks[b][2])
    width = max(sum(blocks[b][2] for b in row) for row in rows)
    num_rows = len(rows)
    input_ids = torch.full((num_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    segment = torch.full((num_rows, width), -1, dtype=torch.long)
    branch = torch.zeros((num_rows, width), dtype=torch.long)
    last_index = torch.empty(n, dtype=torch.long)
    first_index = torch.empty(n, dtype=torch.long)
    logit_index, target_ids, token_sequence, token_order = [], [], [], []
    for r, row in enumerate(rows):
        cursor = 0
        for g, b in enumerate(row):
            members, shared, _ = blocks[b]
            base = r * width
            prefix = sequences[members[0]][:shared]
            prefix_start = cursor
            if shared:
                input_ids[r, cursor:cursor + shared] = torch.tensor(prefix)
                position_ids[r, cursor:cursor + shared] = torch.arange(shared) + position_offset
                segment[r, cursor:cursor + shared] = g
                cursor += shared
            for k, i in enumerate(members, start=1):
                seq = sequences[i]
                suffix = seq[shared:]
                start = cursor
                input_ids[r, start:start + len(suffix)] = torch.tensor(suffix)
                position_ids[r, start:start + len(suffix)] = torch.arange(shared, len(seq)) + position_offset
                segment[r, start:start + len(suffix)] = g
                branch[r, start:start + len(suffix)] = k  # suffixes never see each other, shared prefix or not
                cursor += len(suffix)
                last_index[i] = base + start + len(suffix) - 1
                first_index[i] = base + (prefix_start if shared else start)
                if score_from is not None:
                    begin = score_from[i]
                    if begin < 1:
                        raise ValueError("score_from must be ≥ 1: the first token has no prediction")
                    for order, t in enumerate(range(begin, len(seq))):
                        source = t - 1  # the position whose logits predict token t
                        flat = prefix_start + source if source < shared else start + source - shared
                        logit_index.append(base + flat)
                        target_ids.append(seq[t])
                        token_sequence.append(i)
                        token_order.append(order)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return Plan(kind=kind, input_ids=input_ids, position_ids=position_ids, segment=segment, branch=branch,
                last_index=last_index, first_index=first_index, logit_index=as_long(logit_index),
                target_ids=as_long(target_ids), token_sequence=as_long(token_sequence),
                token_order=as_long(token_order), sequence_tokens=sum(len(s) for s in sequences))


# ---------------------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------------------
def attention_allowed(segment: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor, causal: bool,
                      sliding_window: int | None = None) -> torch.Tensor:
    """[R, T] layout tensors → [R, 1, T, T] bool, True where query q (dim 2) may attend key k (dim 3)."""
    q_seg, k_seg = segment.unsqueeze(2), segment.unsqueeze(1)
    allowed = (q_seg == k_seg) & (q_seg >= 0)
    if causal:
        index = torch.arange(segment.shape[1], device=segment.device)
        allowed &= index.view(1, 1, -1) <= index.view(1, -1, 1)
        k_branch, q_branch = branch.unsqueeze(1), branch.unsqueeze(2)
        allowed &= (k_branch == 0) | (k_branch == q_branch)
        if sliding_window:
            allowed &= (position_ids.unsqueeze(2) - position_ids.unsqueeze(1)) < sliding_window
    pad = segment < 0
    allowed |= torch.diag_embed(pad)  # padding attends to itself only: no empty softmax row, no NaN
    return allowed.unsqueeze(1)


def _sliding_window(config) -> tuple[int | None, bool]:
    """(window, hybrid): the window of sliding layers, and whether only some layers slide (a dict of masks)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None, False
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        if "sliding_attention" not in layer_types:
            return None, False
        return window, any(t != "sliding_attention" for t in layer_types)
    return window, False


def model_inputs(model, plan_: Plan, causal: bool = True) -> dict:
    """Keyword arguments for `model(**kwargs)` that run the plan's layout with the model's attention backend."""
    if plan_.kind == "padded":
        return {"input_ids": plan_.input_ids, "attention_mask": (plan_.segment >= 0).long()}
    if plan_.kind == "varlen":  # flash-attention reads sequence boundaries from restarting position ids
        return {"input_ids": plan_.input_ids, "position_ids": plan_.position_ids}
    config = _config(model)
    impl = getattr(config, "_attn_implementation", None) or "eager"
    window, hybrid = _sliding_window(config) if causal else (None, False)
    kwargs = {"input_ids": plan_.input_ids, "position_ids": plan_.position_ids}
    if is_encoder(config):
        kwargs["token_type_ids"] = torch.zeros_like(plan_.input_ids)  # the buffered default is only max_positions long

    def build(w):
        if impl == "flex_attention":  # the BlockMask applies the same rule; no dense mask needed
            return flex_block_mask(plan_, causal, w)
        allowed = attention_allowed(plan_.segment, plan_.branch, plan_.position_ids, causal, w)
        if impl == "eager":
            dtype = next(unwrap(model).parameters()).dtype
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    if hybrid:
        kwargs["attention_mask"] = {"full_attention": build(None), "sliding_attention": build(window)}
    else:
        kwargs["attention_mask"] = build(window)
    return kwargs


def flex_block_mask(plan_: Plan, causal: bool, sliding_window: int | None = None):
    """A flex-attention BlockMask with the same rule as `attention_allowed` (GPU path; not run on hardware here)."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment, branch, position = plan_.segment, plan_.branch, plan_.position_ids
    rows, width = segment.shape

    def mask_mod(b, h, q, k):
        same = (segment[b, q] == segment[b, k]) & (segment[b, q] >= 0)
        if causal:
            same = same & (k <= q) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
            if sliding_window:
                same = same & (position[b, q] - position[b, k] < sliding_window)
        return same | ((segment[b, q] < 0) & (q == k))

    return create_block_mask(mask_mod, rows, None, width, width, device=str(segment.device))


# ---------------------------------------------------------------------------------------------------------------
# reading rewards and log-probs out of one forward
# ---------------------------------------------------------------------------------------------------------------
def _find_module(model, names: tuple[str, ...]):
    """The outermost submodule whose last name component is one of `names` (a PEFT ModulesToSaveWrapper included)."""
    best = None
    for name, module in model.named_modules():
        if name.split(".")[-1] in names and (best is None or name.count(".") < best[0].count(".")):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no module named {' or '.join(names)}")
    return best[1]


@contextlib.contextmanager
def _hook(module, pre=None, post=None):
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(pre))
    if post is not None:
        handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def sequence_rewards(model, plan_: Plan) -> torch.Tensor:
    """One forward of a sequence-classification reward model over the plan → [N] rewards (label 0), with grad.

    Decoders: the reward head's per-position output is captured by a forward hook and read at each sequence's last
    token (the same token the padded forward pools). Encoders: a pre-hook hands the first-token head (BERT's pooler,
    RoBERTa's classifier) the hidden state of each sequence's first token, so the model's own logits are the rewards.
    """
    inner = unwrap(model)
    config = inner.config
    if is_encoder(config):
        head = _find_module(inner, (ENCODER_FIRST_TOKEN_MODULE[config.model_type],))

        def pre(module, args):
            hidden = args[0]
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, plan_.first_index).unsqueeze(1)
            return (picked,) + tuple(args[1:])

        with _hook(head, pre=pre):
            out = model(**model_inputs(model, plan_, causal=False))
        return out.logits[:, 0]
    head = _find_module(inner, ("score", "v_head", "classifier"))
    captured = {}

    def post(module, args, output):
        captured["per_position"] = output

    with _hook(head, post=post):
        model(**model_inputs(model, plan_, causal=True), use_cache=False)
    per_position = captured["per_position"]
    return per_position.reshape(-1, per_position.shape[-1]).index_select(0, plan_.last_index)[:, 0]


@dataclass
class TokenScores:
    """Per scored token, in the plan's order ([M] each): log-prob of the target; and, when asked, entropy, mean
    logit, whether the target is the argmax, log Σ p² (TRL's WPO weights)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


def token_logprobs(model, plan_: Plan, temperature: float = 1.0, extras: bool = False,
                   suppressed: Sequence[int] = (), entropy: bool = False) -> TokenScores:
    """One forward of a causal LM over the plan → log p(target | context) for each scored token, with grad.

    The LM head runs only at the plan's `logit_index` positions (a forward pre-hook gathers those hidden states into
    one [1, M, H] row), so prompt positions cost no LM head; the model's own forward still applies whatever follows
    the head (e.g. Gemma2's final logit soft-capping).
    suppressed: token ids given probability 0 before the temperature (PPO's `--suppress_tokens`, as its sampler).
    entropy: also the entropy of each position's distribution, with grad (PPO's entropy bonus); `extras` gives it
    without grad, with the other diagnostics.
    """
    logits = logits_at(model, plan_, plan_.logit_index).float()
    if temperature != 1.0:
        logits = logits / temperature
    if len(suppressed):  # after the temperature, as PPO's padded forward (`PolicyAndValue.forward`)
        from rlhfkit.logits_processors import suppress_tokens

        logits = suppress_tokens(logits, suppressed)
    log_norm = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, plan_.target_ids.unsqueeze(-1)).squeeze(-1) - log_norm
    scores = TokenScores(log_probs=picked)
    if entropy:  # as `rlhfkit.rl.estimators.entropy_from_logits`
        scores.entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    if extras:
        with torch.no_grad():
            logp = logits - log_norm.unsqueeze(-1)
            scores.entropy = -(logp.exp() * logp).sum(-1)
            scores.mean_logits = logits.mean(-1)
            scores.is_top1 = logits.argmax(-1) == plan_.target_ids
            scores.log_sum_sq_probs = torch.logsumexp(2 * logp, dim=-1)
    return scores


def logits_at(model, plan_: Plan, flat_index: torch.Tensor, token_ids: list[int] | None = None) -> torch.Tensor:
    """One forward of a causal LM over the plan → its logits at the flat positions `flat_index` [M] (e.g. each
    sequence's `last_index`), restricted to the vocabulary columns `token_ids` when given: [M, len(token_ids)] or
    [M, V], with grad. As in `token_logprobs`, the LM head runs only at those positions (the pairwise preference
    model reads "A"/"B" at each comparison's last token, the process reward model "+"/"-" at each step's end)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no LM head")

    def pre(module, args):
        hidden = args[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index).unsqueeze(0)
        return (picked,) + tuple(args[1:])

    with _hook(head, pre=pre):
        logits = model(**model_inputs(model, plan_, causal=True), use_cache=False).logits[0]
    if token_ids is not None:
        logits = logits[:, torch.as_tensor(token_ids, device=logits.device)]
    return logits.float()


def flat_positions(plan_: Plan, sequences: list[list[int]], groups: list[list[int]] | None,
                   positions: list[list[int]]) -> torch.Tensor:
    """Flat index (into the plan's rows, what `logits_at` takes) of token positions[i][n] of sequence i, for every
    i and n in order. `sequences` and `groups` are what the plan was built from (local indices)."""
    shared = [0] * len(sequences)
    if plan_.kind == "prefix_shared":
        for members in groups or []:
            if len(members) > 1:
                length = shared_prefix_length([sequences[i] for i in members])
                for i in members:
                    shared[i] = length
    out = []
    for i, seq in enumerate(sequences):
        last, first = int(plan_.last_index[i]), int(plan_.first_index[i])
        for t in positions[i]:
            out.append(last - (len(seq) - 1 - t) if t >= shared[i] else first + t)
    return torch.tensor(out, dtype=torch.long)


def sum_per_sequence(values: torch.Tensor, plan_: Plan) -> torch.Tensor:
    """[M] per-token values → [N] sums per sequence (differentiable)."""
    out = values.new_zeros(plan_.num_sequences)
    return out.index_add(0, plan_.token_sequence, values)


def scatter_padded(values: torch.Tensor, plan_: Plan, fill=0) -> torch.Tensor:
    """[M] per-token values → [N, L] right-padded by each sequence's scored-token order (L = most scored tokens)."""
    width = int(plan_.token_order.max()) + 1 if plan_.token_order.numel() else 1
    out = values.new_full((plan_.num_sequences, width), fill)
    return out.index_put((plan_.token_sequence, plan_.token_order), values)


def padded_scored_mask(plan_: Plan) -> torch.Tensor:
    """[N, L] long mask of the scored tokens in `scatter_padded`'s layout."""
    ones = torch.ones_like(plan_.token_order)
    return scatter_padded(ones, plan_, fill=0)


def position_offset(model) -> int:
    """Where a model's absolute position ids start: RoBERTa-family models count from padding_idx + 1."""
    config = _config(model)
    if config.model_type in ("roberta", "xlm-roberta"):
        return int(config.pad_token_id) + 1
    return 0


def device_of(model):
    return next(unwrap(model).parameters()).device
