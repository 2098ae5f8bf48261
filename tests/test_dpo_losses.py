"""rlhfkit/train/dpo_losses.py against TRL 1.16's own DPOTrainer as the oracle, through its public API only.

For every `loss_type` (and ld_alpha, WPO, f-divergences, label smoothing, several types with weights) a real TRL
`DPOTrainer` is built on a tiny Llama policy and a perturbed copy as reference; its public `compute_loss` on a
batch from its own collator gives the reference loss, and its public `log` the metrics. Our side:
- the pure functions, fed per-token log-probs computed here by a plain forward and log_softmax;
- `PackedDPOTrainer` (packed forward + our losses) on the same examples, its public `compute_loss` and `log`
  (for the cases that exercise each input the trainer supplies).
Plus properties of the functions that hold whatever TRL does.
"""

from __future__ import annotations

import pytest
import torch

from rlhfkit.train.dpo_losses import (DPOBatch, DPOLossConfig, DPOLossType, dpo_loss, sequence_logps,
                                      token_metric_sums, wpo_weights)

torch.set_num_threads(1)

CASES = {
    "sigmoid": {},
    "hinge": {"beta": 2.0},  # large enough that some pairs sit past the hinge
    "ipo": {},
    "exo_pair": {"label_smoothing": 1e-3},
    "nca_pair": {},
    "robust": {"label_smoothing": 0.1},
    "bco_pair": {},
    "sppo_hard": {},
    "aot": {"label_smoothing": 0.1},
    "aot_unpaired": {"label_smoothing": 0.1},
    "apo_zero": {},
    "apo_down": {},
    "discopop": {"discopop_tau": 0.2},
    "sft": {},
    "sigmoid_norm": {},
    "sigmoid+ld_alpha": {"loss_type": ["sigmoid"], "ld_alpha": 0.3},
    "ipo+ld_alpha": {"loss_type": ["ipo"], "ld_alpha": 0.0},
    "sigmoid+wpo": {"loss_type": ["sigmoid"], "use_weighting": True},
    "hinge+forward_kl": {"loss_type": ["hinge"], "f_divergence_type": "forward_kl"},
    "ipo+js_divergence": {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
    "sigmoid_norm+alpha_divergence": {"loss_type": ["sigmoid_norm"], "f_divergence_type": "alpha_divergence",
                                      "f_alpha_divergence_coef": 0.3},
    "mpo (sigmoid+bco_pair+sft, weighted)": {"loss_type": ["sigmoid", "bco_pair", "sft"],
                                             "loss_weights": [0.8, 0.2, 1.0]},
    # (TRL 1.16 cannot weight sft: `per_sequence_loss *= ...` writes into its expanded scalar and raises)
    "sigmoid+bco_pair+wpo": {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [1.0, 0.5], "use_weighting": True},
}
# the packed trainer reads the same functions for every type; these cases cover each input it has to supply
# (lengths, LD-DPO sums, WPO weights, chosen token log-probs, batch-sorting types) and the f-divergence scores
PACKED_CASES = {"sigmoid", "hinge+forward_kl", "ipo+ld_alpha", "sigmoid_norm+alpha_divergence", "aot",
                "sigmoid+bco_pair+wpo", "mpo (sigmoid+bco_pair+sft, weighted)"}
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")
TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens")


@pytest.fixture(scope="module")
def world(tiny_llama_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a reference that differs, so log-ratios are far from 0 and of both signs
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    words = ["good", "sad", "the sea", "a river", "bright", "cold", "kind"]
    rows = [{"prompt": [{"role": "user", "content": "Tell me about " + " and ".join(words[: i + 1])}],
             "chosen": [{"role": "assistant", "content": " ".join(words[i:] * (1 + i % 2))}],
             "rejected": [{"role": "assistant", "content": " ".join(reversed(words[: 6 - i]))}]}
             for i in range(6)]  # chosen longer or shorter than rejected, prompts of several lengths
    return tokenizer, policy, reference, datasets.Dataset.from_list(rows)


def _config(tmp_path, case: str, **overrides):
    from trl import DPOConfig

    kwargs = dict(CASES[case])
    kwargs.setdefault("loss_type", [case])
    return DPOConfig(output_dir=str(tmp_path), bf16=False, gradient_checkpointing=False, report_to="none",
                     use_cpu=True, logging_steps=1, max_length=48, disable_tqdm=True, **kwargs, **overrides)


def _loss_and_logged(trainer, model, batch):
    """A trainer's public compute_loss on one batch, and what its public log then records."""
    model.train()  # TRL logs train-mode metrics (num_tokens only in train mode); no dropout in this model
    loss = trainer.compute_loss(model, batch)
    trainer.log({})
    return loss, trainer.state.log_history[-1]


def _our_inputs(policy, reference, batch, config: DPOLossConfig) -> tuple[DPOBatch, torch.Tensor, dict]:
    """Per-token log-probs from a plain forward + log_softmax (not TRL's fused head, not our packed forward)."""
    input_ids, attention = batch["input_ids"], batch["attention_mask"]
    mask = batch["completion_mask"][:, 1:]
    targets = input_ids[:, 1:].unsqueeze(-1)

    def per_token(model):
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        logp = logits.log_softmax(-1)
        return logp.gather(-1, targets).squeeze(-1) * mask, logp, logits

    token_logps, logp, logits = per_token(policy)
    with torch.no_grad():
        ref_token_logps, _, _ = per_token(reference)
    chosen, rejected = sequence_logps(token_logps, mask, config.ld_alpha).chunk(2)
    ref_chosen, ref_rejected = sequence_logps(ref_token_logps, mask, config.ld_alpha).chunk(2)
    lengths = batch["completion_mask"].sum(dim=1)
    weights = wpo_weights(token_logps, torch.logsumexp(2 * logp, dim=-1), mask) if config.use_weighting else None
    inputs = DPOBatch(chosen, rejected, ref_chosen, ref_rejected, *lengths.chunk(2),
                      chosen_token_logps=token_logps.chunk(2)[0], chosen_mask=mask.chunk(2)[0], pair_weights=weights)
    with torch.no_grad():
        sums = token_metric_sums(mask, -(logp.exp() * logp).sum(-1), logits.mean(-1),
                                 logits.argmax(-1) == targets.squeeze(-1))
    return inputs, mask, {name: (total / count).item() for name, (total, count) in sums.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_metrics_match_trl(tmp_path, world, case):
    from trl import DPOTrainer

    from rlhfkit.train.dpo_trainer import PackedDPOTrainer

    tokenizer, policy, reference, dataset = world
    args = _config(tmp_path / "trl", case)
    trl_trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    examples = [trl_trainer.train_dataset[i] for i in range(len(trl_trainer.train_dataset))]
    padded = trl_trainer.data_collator(examples)
    trl_loss, trl_logged = _loss_and_logged(trl_trainer, policy, padded)

    # the pure functions on log-probs computed here
    config = DPOLossConfig.from_args(args)
    inputs, _, token_metrics = _our_inputs(policy, reference, padded, config)
    loss, pair_metrics = dpo_loss(config, inputs)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-5)
    for name in PAIR_METRICS:
        assert pair_metrics[name].mean().item() == pytest.approx(trl_logged[name], rel=1e-4, abs=1e-5), name
    for name, value in token_metrics.items():
        assert value == pytest.approx(trl_logged[name], rel=1e-4, abs=1e-5), name

    if case not in PACKED_CASES:
        return
    # the packed trainer (our forward, our losses) on the same examples
    ours = PackedDPOTrainer(pairwise_forward="prefix_shared", model=policy, ref_model=reference,
                            args=_config(tmp_path / "ours", case), train_dataset=dataset, processing_class=tokenizer)
    our_loss, our_logged = _loss_and_logged(ours, policy, ours.data_collator(examples))
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-5)
    for name in PAIR_METRICS + TOKEN_METRICS:
        assert our_logged[name] == pytest.approx(trl_logged[name], rel=1e-4, abs=1e-5), name
    our_loss.backward()  # a real graph back to the weights
    assert policy.get_input_embeddings().weight.grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)


def test_every_trl_loss_type_is_covered_and_has_a_case():
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = {part.split("'")[1] for part in help_text.split("`") if part.startswith("'")}
    assert listed == {t.value for t in DPOLossType}
    assert {t.value for t in DPOLossType} <= set(CASES)


# ---------------------------------------------------------------------------------------------------------------
# properties, independent of TRL
# ---------------------------------------------------------------------------------------------------------------
def _batch(chosen, rejected, ref_chosen=(0.0, 0.0), ref_rejected=(0.0, 0.0), **extra) -> DPOBatch:
    t = lambda values: torch.tensor(values, dtype=torch.float32, requires_grad=True)  # noqa: E731
    return DPOBatch(t(chosen), t(rejected), torch.tensor(ref_chosen), torch.tensor(ref_rejected), **extra)


def test_sigmoid_is_log2_at_zero_margin_and_pushes_chosen_up():
    batch = _batch([-3.0, -5.0], [-3.0, -5.0])
    loss, metrics = dpo_loss(DPOLossConfig(beta=0.5), batch)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    loss.backward()
    assert (batch.chosen_logps.grad < 0).all() and (batch.rejected_logps.grad > 0).all()
    assert metrics["rewards/accuracies"].tolist() == [0.0, 0.0]  # a tie is not correct


def test_loss_depends_on_log_ratios_not_on_shared_offsets():
    config = DPOLossConfig(loss_types=("sigmoid", "ipo", "nca_pair"), beta=0.2)
    lengths = dict(chosen_lengths=torch.tensor([3, 5]), rejected_lengths=torch.tensor([4, 2]))
    base = dpo_loss(config, _batch([-4.0, -6.0], [-5.0, -7.0], [-4.5, -6.5], [-4.0, -6.0], **lengths))[0]
    shifted = dpo_loss(config, _batch([-14.0, -16.0], [-15.0, -17.0], [-14.5, -16.5], [-14.0, -16.0],
                                      **lengths))[0]
    assert shifted.item() == pytest.approx(base.item(), abs=1e-5)


def test_ld_alpha_one_is_the_plain_sum_and_zero_keeps_the_shared_length():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])  # chosen 3 tokens, rejected 2
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert sequence_logps(token_logps, mask, 1.0).tolist() == sequence_logps(token_logps, mask).tolist()
    assert sequence_logps(token_logps, mask, 0.0).tolist() == [-3.0, -2.0]
    assert sequence_logps(token_logps, mask, 0.5).tolist() == [-4.5, -2.0]


def test_wpo_weight_is_one_for_a_deterministic_policy():
    # π(y_k) = 1 at every token: log π − log Σπ² = 0, so the weight is exp(0) = 1
    token_logps, mask = torch.zeros(2, 3), torch.ones(2, 3)
    assert wpo_weights(token_logps, torch.zeros(2, 3), mask).tolist() == [1.0]


def test_missing_inputs_and_bad_options_are_errors_naming_the_fix():
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(DPOLossConfig(loss_types=("ipo",)), _batch([-1.0], [-2.0], [0.0], [0.0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOLossConfig(loss_types=("exo_pair",))
    with pytest.raises(ValueError, match="f_divergence_type"):
        DPOLossConfig(loss_types=("bco_pair",), f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="aot"):
        DPOLossConfig(loss_types=("aot",), use_weighting=True)
    with pytest.raises(ValueError, match="one weight per loss type"):
        DPOLossConfig(loss_types=("sigmoid", "sft"), loss_weights=(1.0,))
    with pytest.raises(ValueError, match="Unknown loss type: simpo"):
        DPOLossConfig(loss_types=("simpo",))


def test_what_each_type_needs():
    assert not DPOLossType.sft.needs_reference_model and DPOLossType.sigmoid.needs_reference_model
    assert {t for t in DPOLossType if t.needs_lengths} == {DPOLossType.ipo, DPOLossType.sigmoid_norm}
    assert {t for t in DPOLossType if t.couples_pairs} == {DPOLossType.aot, DPOLossType.aot_unpaired,
                                                           DPOLossType.sft}
