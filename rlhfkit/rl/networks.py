"""The models of a PPO run: the policy and value model as one trained module (`PolicyAndValue`), the frozen
reference, the value model built from a reward model, LoRA, token suppression, and dropout-free updates."""

from __future__ import annotations

import logging

import torch
from torch import nn

from rlhfkit.errors import UserError
from rlhfkit.logits_processors import suppress_tokens
from rlhfkit.rl.rewards import ModelReward

logger = logging.getLogger(__name__)


def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def prepare_frozen(model, accelerator):
    """Frozen models: sharded by DeepSpeed under ZeRO-3, else one copy per process on its device."""
    if is_deepspeed(accelerator):
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device)


def value_head(model) -> nn.Module:
    from rlhfkit.models import reward_head_names

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "score"):
        raise UserError(
            f"value model: needs a decoder sequence-classification model with a linear 'score' head, got "
            f"{type(base).__name__} (heads: {reward_head_names(base)})"
        )
    return base.score


def token_values(value_model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Per-position values [B, L]: the RM's head applied to every hidden state, not only the last one."""
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return value_head(value_model)(hidden).squeeze(-1).float()


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so one optimizer and one DeepSpeed engine train both."""

    def __init__(self, policy, value_model=None, suppressed_tokens: list[int] | None = None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.suppressed_tokens = list(suppressed_tokens or [])  # the sampler removes the same ids
        self.config = policy.config  # accelerate reads hidden_size from here to fill DeepSpeed "auto" buckets

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, response_length: int = 0,
                temperature: float = 1.0, plan=None, entropy: bool = False):
        """Response logits [B, T, V] (temperature applied) and values [B, T] (None without a value model).

        Position t of the output predicts response token t, i.e. reads the sequence up to the token before it.
        With `plan` (an `rlhfkit.pairwise.Plan` of the responses, no value model): the policy's
        `pairwise.token_logprobs` of the scored tokens instead ([M] each, with `entropy` when asked), and None.
        """
        if plan is not None:
            from rlhfkit.pairwise import token_logprobs

            return token_logprobs(self.policy, plan, temperature, suppressed=self.suppressed_tokens,
                                  entropy=entropy), None
        output = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=response_length + 1,
            use_cache=False,
        )
        # temperature first: finfo.min / T < 1 would overflow to −inf and make the entropy NaN
        logits = suppress_tokens(output.logits[:, :-1].float() / temperature, self.suppressed_tokens)
        values = None
        if self.value_model is not None:
            values = token_values(self.value_model, input_ids, attention_mask, position_ids)
            values = values[:, -response_length - 1 : -1]
        return logits, values

    # what trl's unwrap_model_for_generation expects from the model it unwraps
    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.policy, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        for model in (self.policy, self.value_model):
            if model is not None:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        for model in (self.policy, self.value_model):
            if model is not None:
                model.gradient_checkpointing_disable()


def suppressed_token_ids(tokenizer, specs: list[str] | None) -> list[int]:
    """`--suppress_tokens` entries (token strings or ids) as ids; an unknown token is a one-line error."""
    ids = []
    for spec in specs or []:
        spec = str(spec)
        if spec.lstrip("-").isdigit():
            token_id = int(spec)
        else:
            token_id = tokenizer.convert_tokens_to_ids(spec)
            if token_id is None or (token_id == tokenizer.unk_token_id and spec != tokenizer.unk_token):
                raise UserError(f"--suppress_tokens: '{spec}' is not one token of the policy's tokenizer")
        if not 0 <= token_id < len(tokenizer):
            raise UserError(f"--suppress_tokens: id {token_id} is outside the vocabulary (0..{len(tokenizer) - 1})")
        ids.append(int(token_id))
    return sorted(set(ids))


def log_ignored_generation_config(policy) -> dict:
    """Say which of the checkpoint's generation_config.json processors RL does not apply (they would make the
    rollouts off-policy); returns them for run_info.json."""
    from rlhfkit.logits_processors import checkpoint_processor_settings

    ignored = {key: value for key, value in checkpoint_processor_settings(policy).items()}
    if ignored:
        logger.warning("rollouts sample softmax(logits / temperature); the checkpoint's generation_config.json "
                       "processors are not applied during RL: %s (ask for suppressed tokens with --suppress_tokens)",
                       ", ".join(f"{key}={value}" for key, value in ignored.items()))
    return {key: value if isinstance(value, (int, float, str, list, bool)) else str(value)
            for key, value in ignored.items()}


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def load_reference(ref_path: str, model_args, policy, vocab_before_pad: int, tokenizer, requested: str):
    """The frozen reference, with the policy's pad-token resize followed (it scores the same ids, pads included)."""
    from rlhfkit.models import load_causal_lm, match_vocabulary

    ref_model = load_causal_lm(ref_path, model_args)
    match_vocabulary(ref_model, policy, vocab_before_pad, requested)
    ref_model.config.pad_token_id = tokenizer.pad_token_id
    return ref_model.requires_grad_(False).eval()


def build_value_model(script_args, model_args, policy_path: str, tokenizer, reward, policy=None,
                      vocab_before_pad: int | None = None) -> tuple[nn.Module, object, str]:
    """The value model, the tokenizer saved beside it, and where it came from ("reward_model" or "policy").

    `reward`: the reward model to initialise from (a `ModelReward`), or None. It reads the policy's token ids, so
    its embeddings follow the policy's pad-token resize (`policy` and
    `vocab_before_pad`, the policy's embedding rows before `ensure_pad_token`).
    """
    from rlhfkit.models import load_reward_model, load_tokenizer, match_vocabulary, model_init_kwargs

    choice = script_args.value_model_init
    if choice == "reward_model" and not isinstance(reward, ModelReward):
        raise UserError("--value_model_init reward_model needs a scalar reward model among --reward_model_path")
    if choice in ("auto", "reward_model") and isinstance(reward, ModelReward):
        if same_vocabulary(reward.tokenizer, tokenizer):
            choice = "reward_model"
        elif choice == "reward_model":
            raise UserError(
                f"{reward.path}: --value_model_init reward_model needs the reward model to share the "
                f"policy's tokenizer (the value model reads the policy's tokens); use --value_model_init policy"
            )
        else:
            logger.info("reward model has another tokenizer than the policy: value model initialised from the policy")
            choice = "policy"
    elif choice == "auto":
        choice = "policy"
    kwargs = model_init_kwargs(model_args)
    if choice == "reward_model":
        model = load_reward_model(reward.path, **kwargs)
        value_tokenizer = load_tokenizer(reward.path)
    else:
        model = load_reward_model(policy_path, new_head=True, **kwargs)
        value_tokenizer = tokenizer
        # A random head gives per-token values of the order of the rewards themselves, and GAE turns that noise
        # into advantages the policy then follows; a zero head starts from Monte-Carlo returns instead.
        with torch.no_grad():
            for parameter in value_head(model).parameters():
                parameter.zero_()
    if policy is not None:
        requested = reward.path if choice == "reward_model" else policy_path
        match_vocabulary(model, policy, vocab_before_pad or policy.get_input_embeddings().num_embeddings, requested)
    model.config.pad_token_id = tokenizer.pad_token_id
    value_head(model)
    return model, value_tokenizer, choice


def apply_lora(model, model_args, task_type: str, modules_to_save=None):
    from peft import get_peft_model

    from rlhfkit.models import peft_config

    config = peft_config(model_args, task_type, modules_to_save)
    return model if config is None else get_peft_model(model, config)


def dropout_free(model: nn.Module) -> nn.Module:
    """Eval mode (no dropout: LoRA's, attention's, hidden), except the flag gradient checkpointing reads.

    transformers checkpoints a decoder layer only when that layer is `training`; setting the flag on those layers
    alone keeps checkpointing on while every dropout module and attention's `dropout_p` see eval mode.
    """
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
    return model

