"""Our GRPO-family objectives against TRL's own loss on the same tensors.

TRL 1.16's `GRPOTrainer.compute_loss(model, inputs)` (public; it runs `_compute_loss`) is fed a batch we build:
prompts, completions with their masks, advantages, old and reference log-probs (old ≠ current, so ratios move
and the clips bind). We compute the current log-probs with the same forward and give them, with the same
advantages, old and reference log-probs, to `rlhfkit.rl.objectives.policy_objective`; the losses and the gradients
of every parameter must agree. The model is in eval mode, where TRL divides by no accumulation factor.
"""

from __future__ import annotations

import pytest
import torch

from rlhfkit.rl import estimators as rl
from rlhfkit.rl import objectives

trl = pytest.importorskip("trl")

B, PROMPT, COMPLETION = 4, 5, 6
# (TRL GRPOConfig overrides, our policy_objective overrides)
CASES = {
    "grpo": ({"loss_type": "grpo"}, {"aggregation": "sequence"}),
    "bnpo": ({"loss_type": "bnpo"}, {"aggregation": "bnpo"}),
    # the KL term: verl's plain β·k3 (TRL with use_bias_correction_kl=False), and TRL's default, k3 times the ratio
    "dr_grpo_kl": ({"loss_type": "dr_grpo", "beta": 0.04, "use_bias_correction_kl": False},
                   {"aggregation": "dr_grpo", "kl_coef": 0.04}),
    "dapo_kl_clip_higher": ({"loss_type": "dapo", "beta": 0.1, "epsilon_high": 0.28},
                            {"aggregation": "token", "kl_coef": 0.1, "clip_high": 0.28,
                             "kl_importance_weighted": True}),
    "gspo": ({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4},
             {"aggregation": "sequence", "importance_sampling_level": "sequence", "clip_low": 3e-4,
              "clip_high": 4e-4}),
    # TRL caps CISPO's weight at epsilon_high (absolute); ours clips to [1 − ε_low, 1 + ε_high]: ε_low = 1 and
    # ε_high = cap − 1 is the same function (the weight is positive, so the lower bound 0 never binds)
    "cispo": ({"loss_type": "cispo", "epsilon_high": 1.05},
              {"aggregation": "token", "policy_loss": "cispo", "clip_low": 1.0, "clip_high": 0.05}),
}


@pytest.fixture(scope="module")
def trainer_factory(tiny_llama_dir, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{"prompt": "hello there"}] * 8)

    def make(overrides: dict):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        config = {"epsilon": 0.2, "beta": 0.0, "bf16": False, **overrides}  # TRL defaults to bf16 autocast
        args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("grpo")), per_device_train_batch_size=B,
                          num_generations=B, max_completion_length=COMPLETION, report_to="none", use_cpu=True,
                          logging_strategy="no", save_strategy="no", **config)
        trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                              args=args, train_dataset=dataset, processing_class=tokenizer)
        return trainer, model

    return make


def batch(vocab: int):
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, vocab, (B, PROMPT), generator=generator)
    completion_ids = torch.randint(3, vocab, (B, COMPLETION), generator=generator)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]])
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1])
    return prompt_ids, completion_ids, completion_mask, advantages, generator


def current_logprobs(model, prompt_ids, completion_ids, completion_mask):
    """The forward TRL's `_get_per_token_logps_and_entropies` runs (temperature 1): logits of the completion."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=COMPLETION + 1).logits
    return rl.logprobs_from_logits(logits[:, :-1], completion_ids)


@pytest.mark.slow  # a GRPOTrainer per case: seconds each on a quiet 2-core machine
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradients_equal_trl_grpo_trainer(trainer_factory, case):
    trl_config, ours = CASES[case]
    trainer, model = trainer_factory(trl_config)
    model.eval()  # TRL's eval branch: no gradient-accumulation division, same formulas
    prompt_ids, completion_ids, completion_mask, advantages, generator = batch(model.config.vocab_size)
    with torch.no_grad():
        now = current_logprobs(model, prompt_ids, completion_ids, completion_mask)
    # rollout-time and reference log-probs off the current ones by up to ±0.5 nats, so ratios leave the clip range
    old = now + (torch.rand(now.shape, generator=generator) - 0.5)
    ref = now + (torch.rand(now.shape, generator=generator) - 0.5)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum().float(),
    }
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    logprobs = current_logprobs(model, prompt_ids, completion_ids, completion_mask)
    mask = completion_mask.float()
    kwargs = {"clip_low": 0.2, "clip_high": 0.2, **ours}
    kl_coef = kwargs.pop("kl_coef", 0.0)
    ref_kl = rl.kl_per_token(logprobs, ref, "k3") if kl_coef else None
    loss, metrics = objectives.policy_objective(
        logprobs, old, advantages.unsqueeze(1).expand_as(mask) * mask, mask, ref_kl=ref_kl, kl_coef=kl_coef,
        max_completion_length=COMPLETION, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl_loss.detach(), atol=1e-6, rtol=1e-5)
    assert trl_grads, "TRL's loss produced no gradient"
    for name, parameter in model.named_parameters():
        if name in trl_grads:
            torch.testing.assert_close(parameter.grad, trl_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    if case != "cispo":  # the clip must really have bound somewhere, or the comparison proves little
        assert metrics["clipfrac"] > 0
