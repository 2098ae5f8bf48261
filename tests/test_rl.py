"""rlhfkit.rl.estimators against values computed by hand (the arithmetic is spelled out beside each expectation)."""

import math

import pytest
import torch

from rlhfkit.rl import estimators as rl

EOS = 2


def close(actual, expected, atol=1e-5):
    actual, expected = torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------------------
def test_response_mask_stops_at_first_eos_and_ignores_what_follows():
    ids = torch.tensor(
        [
            [5, 7, EOS, 9, EOS],  # EOS generated at index 2; what follows is padding
            [5, 6, 7, 8, 9],  # no EOS: truncated at max_new_tokens, all 5 count
            [3, 3, 3, 3, 3],  # generated only 3 tokens, the rest is padding that happens to be a real id
            [EOS, 4, 4, 4, 4],  # stopped immediately: only the EOS counts
        ]
    )
    mask, has_stop = rl.response_mask(ids, [EOS], lengths=torch.tensor([5, 5, 3, 5]))
    close(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    assert has_stop.tolist() == [True, False, False, True]
    assert rl.last_token_index(mask).tolist() == [2, 4, 2, 0]


def test_response_mask_any_of_several_stop_ids():
    mask, has_stop = rl.response_mask(torch.tensor([[4, 8, 6, 7]]), [7, 8])
    close(mask, [[1, 1, 0, 0]])
    assert has_stop.tolist() == [True]


def test_masked_statistics_ignore_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    close(rl.masked_mean(values, mask), 2.0)
    close(rl.masked_var(values, mask), 1.0)  # ((−1)² + 0² + 1²) / (3 − 1)
    close(rl.masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-4)
    close(rl.masked_whiten(values, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], atol=1e-4)  # −1+2, 0+2, 1+2
    close(rl.masked_mean(values, torch.zeros_like(mask)), 0.0)  # an empty mask is 0, not NaN


# ---------------------------------------------------------------------------------------------------------------
# log-probs, entropy, KL
# ---------------------------------------------------------------------------------------------------------------
def test_entropy_and_logprobs_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 5.0]]])  # p = (1/4, 3/4) and (1/2, 1/2)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.5623
    close(rl.entropy_from_logits(logits), [[expected, math.log(2.0)]])
    close(rl.logprobs_from_logits(logits, torch.tensor([[1, 0]])), [[math.log(0.75), math.log(0.5)]])


def test_kl_estimators_match_hand_values():
    logprobs = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.2)])
    # k1 = log(0.5/0.25) = ln 2; k2 = ½ ln²2; k3 = (r − 1) − ln r with r = 0.25/0.5 → −0.5 + ln 2 = 0.193147
    close(rl.kl_per_token(logprobs, ref, "k1"), [math.log(2), 0.0])
    close(rl.kl_per_token(logprobs, ref, "k2"), [0.5 * math.log(2) ** 2, 0.0])
    close(rl.kl_per_token(logprobs, ref, "k3"), [-0.5 + math.log(2), 0.0])
    with pytest.raises(ValueError):
        rl.kl_per_token(logprobs, ref, "k9")


def test_k3_is_nonnegative_and_unbiased_in_expectation():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    exact = (p * (p.log() - q.log())).sum()
    # expectation under p of the per-sample estimates, computed exactly over the 6 outcomes
    k1 = (p * rl.kl_per_token(p.log(), q.log(), "k1")).sum()
    k3_each = rl.kl_per_token(p.log(), q.log(), "k3")
    assert (k3_each >= 0).all()
    close(k1, exact)
    close((p * k3_each).sum(), exact)


# ---------------------------------------------------------------------------------------------------------------
# rewards
# ---------------------------------------------------------------------------------------------------------------
def test_reward_lands_on_the_last_response_token():
    ids = torch.tensor([[5, 7, EOS, 9, 9], [5, 6, 7, 8, 9]])
    mask, _ = rl.response_mask(ids, [EOS])
    rewards, kl_rewards = rl.token_rewards(torch.tensor([2.0, 3.0]), torch.zeros(2, 5), mask, kl_coef=0.1)
    # row 0: on the EOS (index 2), not on index 3 (first padding) nor 1; row 1 (truncated): on index 4
    close(rewards, [[0, 0, 2.0, 0, 0], [0, 0, 0, 0, 3.0]])
    close(kl_rewards, torch.zeros(2, 5))


def test_token_rewards_kl_penalty_only_on_response_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = torch.tensor([[0.5, -0.25, 7.0]])  # 7.0 sits on padding
    rewards, kl_rewards = rl.token_rewards(torch.tensor([1.0]), kl, mask, kl_coef=0.2)
    close(kl_rewards, [[-0.1, 0.05, 0.0]])
    close(rewards, [[-0.1, 1.05, 0.0]])
    close(rl.kl_penalized_scores(torch.tensor([1.0]), kl, mask, 0.2), [1.0 - 0.2 * 0.25])


def test_shape_scores_normalise_then_penalise_then_clip():
    raw = torch.tensor([1.0, 3.0])
    has_stop = torch.tensor([True, False])
    close(rl.shape_scores(raw, has_stop, mean=1.0, std=2.0), [0.0, 1.0])
    close(rl.shape_scores(raw, has_stop, mean=1.0, std=2.0, missing_eos_penalty=0.5), [0.0, 0.5])
    close(rl.shape_scores(raw, has_stop, mean=1.0, std=2.0, missing_eos_penalty=0.5, clip=0.25), [0.0, 0.25])
    close(rl.shape_scores(raw, has_stop), [1.0, 3.0])


# ---------------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------------
def test_gae_matches_hand_computation_and_ignores_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])  # 5.0 and 9.0 sit on padding and must not leak
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    advantages, returns = rl.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: δ = 1 + 0.9·0 − 0.3 = 0.7                       A2 = 0.7
    # t=1: δ = 0 + 0.9·0.3 − 0.4 = −0.13                    A1 = −0.13 + 0.72·0.7 = 0.374
    # t=0: δ = 0 + 0.9·0.4 − 0.5 = −0.14                    A0 = −0.14 + 0.72·0.374 = 0.12928
    close(advantages, [[0.12928, 0.374, 0.7, 0.0]])
    close(returns, [[0.62928, 0.774, 1.0, 0.0]])


def test_gae_with_gamma_lam_one_is_return_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 2.0]])
    values = torch.tensor([[0.3, 0.6, 0.9]])
    mask = torch.ones(1, 3)
    advantages, returns = rl.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    close(returns, [[1.9, 1.8, 2.0]])  # undiscounted reward-to-go
    close(advantages, [[1.6, 1.2, 1.1]])


def test_discounted_returns_and_reinforce_pp():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    returns = rl.discounted_returns(rewards, mask, gamma=0.5)
    close(returns, [[2.0, 2.0, 0.0], [1.5, 3.0, 0.0]])  # 1 + 0.5·2; 0 + 0.5·3
    advantages = rl.reinforce_pp_advantages(rewards, mask, gamma=0.5)
    counted = torch.tensor([2.0, 2.0, 1.5, 3.0, 0.0])  # mean 1.7; var (.09+.09+.04+1.69+2.89)/4 = 1.2
    close(advantages[mask.bool()], (counted - 1.7) / math.sqrt(1.2), atol=1e-4)
    assert advantages[0, 2] == 0


def test_rloo_and_grpo_group_baselines():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])  # two prompts, K=3, prompt-major
    # leave-one-out baselines of group 1: (2+3)/2, (1+3)/2, (1+2)/2
    close(rl.rloo_advantages(scores, 3), [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # group 1: mean 2, std 1; group 2: std 0 → 0 / eps = 0
    close(rl.grpo_advantages(scores, 3), [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0])
    close(rl.grpo_advantages(scores, 3, scale=False), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        rl.rloo_advantages(scores, 4)
    with pytest.raises(ValueError):
        rl.grpo_advantages(scores, 1)
    close(rl.broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])),
          [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------------
def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 30.0]])).requires_grad_()
    advantages = torch.tensor([[1.0, 1.0, -2.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = rl.policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # tok 0: ρ=1.5, A=1 → max(−1.5, −1.2) = −1.2 (clipped); tok 1: ρ=0.5, A=1 → max(−0.5, −0.8) = −0.5;
    # tok 2: ρ=1, A=−2 → 2; tok 3 is padding. mean = (−1.2 − 0.5 + 2) / 3 = 0.1
    close(loss, 0.1)
    close(metrics["clipfrac"], 1 / 3)
    close(metrics["approx_kl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    close(metrics["ratio"], 1.0)
    loss.backward()
    # the clipped token and the padding token get no gradient; tok 1: d(−A·ρ)/dlogπ = −A·ρ/3 = −0.5/3
    close(logprobs.grad, [[0.0, -0.5 / 3, 2.0 / 3, 0.0]])


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.0, 42.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = rl.value_loss(values, old_values, returns, mask, clip_range=0.2)
    # tok 0: (1−2)² = 1 vs (0.7−2)² = 1.69 → 1.69; tok 1: 0 vs (0.3−0)² = 0.09 → 0.09; ½·mean = 0.445
    close(loss, 0.445)
    close(metrics["vf_clipfrac"], 1.0)
    unclipped, _ = rl.value_loss(values, old_values, returns, mask, clip_range=None)
    close(unclipped, 0.5 * (1.0 + 0.0) / 2)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    close(rl.explained_variance(returns.clone(), returns, mask), 1.0)
    close(rl.explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# controllers
# ---------------------------------------------------------------------------------------------------------------
def test_adaptive_kl_controller_and_state_round_trip():
    controller = rl.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=256)  # error clipped to +0.2 → ×(1 + 0.2·256/10000)
    close(controller.value, 0.1 * 1.00512)
    controller.update(current_kl=5.4, n_steps=1000)  # error −0.1 → ×(1 − 0.01)
    close(controller.value, 0.1 * 1.00512 * 0.99)
    restored = rl.AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict()
    fixed = rl.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_running_moments_merge_batches():
    moments = rl.RunningMoments()
    moments.update(torch.tensor([1.0, 2.0]))
    moments.update(torch.tensor([3.0, 4.0, 5.0]))
    close(moments.mean, 3.0)
    close(moments.std, math.sqrt(2.0))  # population std of 1..5
    copy = rl.RunningMoments()
    copy.load_state_dict(moments.state_dict())
    assert copy.state_dict() == moments.state_dict()


def test_advantage_estimators_know_their_needs_and_unknown_names_raise():
    from rlhfkit.rl.estimators import ADVANTAGE_ESTIMATORS, AdvantageEstimator, compute_advantages

    assert ADVANTAGE_ESTIMATORS == ("gae", "rloo", "grpo", "reinforce_pp")
    assert [e.needs_critic for e in AdvantageEstimator] == [True, False, False, False]
    assert [e.min_samples_per_prompt for e in AdvantageEstimator] == [1, 2, 2, 1]
    scores, kl, mask = torch.tensor([1.0, 0.0, 3.0, 1.0]), torch.zeros(4, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="unknown advantage estimator 'grpo2'"):  # no silent GRPO fallback
        compute_advantages("grpo2", scores, kl, mask, None, 0.1, group_size=2)
    with pytest.raises(ValueError, match="value model"):
        compute_advantages("gae", scores, kl, mask, None, 0.1)
    # the dispatch gives each estimator's own math (unwhitened here so the values are the hand-checkable ones)
    rloo, returns = compute_advantages("rloo", scores, kl, mask, None, 0.0, group_size=2, whiten_advantages=False)
    assert returns is None and rloo[:, 0].tolist() == [1.0, -1.0, 2.0, -2.0]
    grpo, _ = compute_advantages("grpo", scores, kl, mask, None, 0.0, group_size=2, whiten_advantages=False,
                                 grpo_scale_by_std=False)
    assert grpo[:, 0].tolist() == [0.5, -0.5, 1.0, -1.0]


# ---------------------------------------------------------------------------------------------------------------
# the GRPO-family objectives (rlhfkit.rl.objectives), by hand
# ---------------------------------------------------------------------------------------------------------------
from rlhfkit.rl import objectives  # noqa: E402
from rlhfkit.rl import rewards  # noqa: E402


def test_importance_weights_token_and_sequence_by_hand():
    logprobs = torch.log(torch.tensor([[2.0, 0.5, 7.0], [1.0, 4.0, 1.0]]))
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    close(objectives.importance_log_weights(logprobs, old, mask, "token"), logprobs)
    # GSPO: exp(mean log ρ) over counted tokens: row 0 √(2·0.5) = 1 (the 7 is padding), row 1 ∛4
    sequence = objectives.importance_log_weights(logprobs, old, mask, "sequence")
    assert sequence.shape == (2, 1)
    close(torch.exp(sequence), [[1.0], [4.0 ** (1 / 3)]])
    with pytest.raises(ValueError, match="importance sampling level"):
        objectives.importance_log_weights(logprobs, old, mask, "tokens")


def test_clip_higher_is_asymmetric_by_hand():
    weights = torch.tensor([[1.25, 1.25, 0.75, 0.75]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss = objectives.clipped_surrogate(torch.log(weights), advantages, clip_low=0.2, clip_high=0.28)
    # ρ=1.25 < 1.28: not clipped for A>0 → −1.25; A<0: −min(−1.25, −1.25) = 1.25;
    # ρ=0.75 < 0.8: A>0 → −min(0.75, 0.8) = −0.75; A<0 → −min(−0.75, −0.8) = 0.8 (clipped from below)
    close(loss, [[-1.25, 1.25, -0.75, 0.8]])
    symmetric = objectives.clipped_surrogate(torch.log(weights), advantages, clip_low=0.2, clip_high=0.2)
    close(symmetric, [[-1.2, 1.25, -0.75, 0.8]])  # with ε_high = 0.2, ρ = 1.25 is clipped to 1.2 for A > 0


def test_cispo_keeps_every_gradient_and_detaches_the_weight():
    old = torch.zeros(1, 3)
    logprobs = torch.log(torch.tensor([[3.0, 1.0, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, 2.0, -1.0]])
    log_weights = objectives.importance_log_weights(logprobs, old, torch.ones(1, 3))
    loss = objectives.cispo_loss(log_weights, logprobs, advantages, clip_low=1.0, clip_high=1.0)
    # weights clipped to [0, 2]: 3 → 2, 1, 0.5; loss_t = −w·A·log π
    close(loss, [[-2.0 * math.log(3.0), -2.0 * 0.0, -0.5 * -1.0 * math.log(0.5)]])
    loss.sum().backward()
    close(logprobs.grad, [[-2.0, -2.0, 0.5]])  # −sg(w)·A: the clipped token keeps its gradient (PPO's would be 0)


def test_loss_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # token / bnpo: (1+2+3+4)/4; sequence: mean(2, 4) = 3; dr_grpo: 10 / (2 rows · L=5)
    close(objectives.aggregate_loss(per_token, mask, "token"), 2.5)
    close(objectives.aggregate_loss(per_token, mask, "bnpo"), 2.5)
    close(objectives.aggregate_loss(per_token, mask, "sequence"), 3.0)
    close(objectives.aggregate_loss(per_token, mask, "dr_grpo", max_completion_length=5), 1.0)
    close(objectives.aggregate_loss(per_token, mask, "token", num_tokens=8), 10 / 8)
    with pytest.raises(ValueError, match="max_completion_length"):
        objectives.aggregate_loss(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        objectives.aggregate_loss(per_token, mask, "dapo")


def test_token_aggregation_over_accumulation_steps_is_the_minibatch_token_mean():
    # two micro-batches of one accumulation window with 3 and 1 counted tokens: accelerate divides each micro
    # loss by G = 2, so each must divide its sum by N / G = 4 / 2 for the step to see Σ / N
    micro = [(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0]])),
             (torch.tensor([[10.0, 50.0, 50.0]]), torch.tensor([[1.0, 0.0, 0.0]]))]
    normalizer = objectives.token_normalizer(window_tokens=4.0, accumulation_steps=2)
    step = sum(objectives.aggregate_loss(loss, mask, "token", num_tokens=normalizer) / 2 for loss, mask in micro)
    close(step, (1 + 2 + 3 + 10) / 4)
    bnpo = sum(objectives.aggregate_loss(loss, mask, "bnpo") / 2 for loss, mask in micro)
    close(bnpo, (6 / 3 + 10 / 1) / 2)  # bnpo: each micro-batch's own mean


def test_policy_objective_adds_the_kl_term_before_aggregating():
    logprobs = torch.zeros(2, 2, requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    ref_kl = torch.tensor([[0.5, 0.1], [0.3, 9.0]])
    loss, metrics = objectives.policy_objective(logprobs, torch.zeros(2, 2), advantages, mask, clip_low=0.2,
                                                clip_high=0.2, aggregation="sequence", ref_kl=ref_kl, kl_coef=0.1)
    # ρ = 1 everywhere: per-token −A + 0.1·KL; sequence means: row 0 (−1+0.05 −1+0.01)/2, row 1 (2 + 0.03)
    close(loss, ((-0.95 - 0.99) / 2 + 2.03) / 2)
    close(metrics["pg_loss"], (-1.0 + 2.0) / 2)
    close(metrics["ratio"], 1.0)
    close(metrics["clipfrac"], 0.0)


def test_mask_truncated_and_informative_groups():
    mask = torch.ones(3, 2)
    close(objectives.mask_truncated(mask, torch.tensor([True, False, True])), [[1, 1], [0, 0], [1, 1]])
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 2.0])
    assert objectives.informative_groups(scores, 3).tolist() == [False, True, False]


# ---------------------------------------------------------------------------------------------------------------
# reward sources (rlhfkit.rl.rewards)
# ---------------------------------------------------------------------------------------------------------------
def test_overlong_penalty_by_hand_and_against_trl():
    lengths = torch.tensor([10, 80, 90, 100])
    # L_max 100, buffer 20: no penalty up to 80, then −(len − 80)/20 · factor
    close(rewards.overlong_penalty(lengths, 100, 20), [0.0, 0.0, -0.5, -1.0])
    close(rewards.overlong_penalty(lengths, 100, 20, factor=0.5), [0.0, 0.0, -0.25, -0.5])
    trl_rewards = pytest.importorskip("trl.rewards")
    trl_penalty = trl_rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    close(rewards.overlong_penalty(lengths, 100, 20), trl_penalty([[1] * int(n) for n in lengths]))


@pytest.mark.parametrize("response, expected", [
    ("The sum is \\boxed{42}. Maybe 7.", "42"),
    ("5 + 7 = 12\nAnswer: 12", "12"),
    ("I think the answer is 1,250 apples, not 3", "1,250"),
    ("Answer: Paris.", "Paris"),
    ("61 + 58 = 119.", "119"),
    ("no digits here", None),
])
def test_extract_final_answer_rule(response, expected):
    assert rewards.extract_final_answer(response) == expected


def test_answers_compare_numbers_as_numbers():
    assert rewards.answers_match("85.0", "85") and rewards.answers_match("+85", 85)
    assert rewards.answers_match("1,000", "1000") and rewards.answers_match("3/4", "0.75")
    assert rewards.answers_match("$12.", "12")
    assert not rewards.answers_match("85.1", "85") and not rewards.answers_match(None, "85")
    assert rewards.answers_match(" paris ", "Paris") and not rewards.answers_match("Lyon", "Paris")


def _inputs(responses, rows=None):
    rows = rows or [{"id": f"p{i}", "answer": "12"} for i in range(len(responses))]
    return rewards.RewardInputs(prompts=[[{"role": "user", "content": "q"}]] * len(responses), responses=responses,
                                rows=rows, lengths=[5] * len(responses), truncated=[False] * len(responses))


def test_builtin_rewards_and_weighted_sum():
    class Options:
        reward_model_path, reward_fn, reward_weights = None, ["exact_answer", "format"], [1.0, 0.5]
        format_regex = rewards.DEFAULT_FORMAT_REGEX

    sources = rewards.build_reward_sources(Options())
    inputs = _inputs(["5 + 7 = 12\nAnswer: 12", "Answer: 13", "it is 12"])
    components = rewards.score_components(sources, inputs)
    close(components["exact_answer"], [1.0, 0.0, 1.0])
    close(components["format"], [1.0, 1.0, 0.0])
    close(rewards.combine(sources, components, normalize_by_stats=True), [1.5, 0.5, 1.0])
    Options.reward_weights = [1.0]
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match="1 weights for 2 reward sources"):
        rewards.build_reward_sources(Options())


def test_exact_answer_refuses_rows_without_an_answer():
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match=r"data.jsonl: row 2 \(id 'b'\): field 'answer'"):
        rewards.ExactAnswerReward().check_rows([{"id": "a", "answer": "1"}, {"id": "b"}], "data.jsonl")


@pytest.mark.parametrize("output, message", [
    ([1.0, float("nan")], r"--reward_fn bad: row 1 of the batch \(prompt id 'p1'\): score is nan"),
    ([1.0, "high"], r"row 1 of the batch \(prompt id 'p1'\): score 'high' is not a number"),
    ([1.0, None], r"row 1 .*score None is not a number"),
    ([1.0], r"--reward_fn bad: returned 1 scores for 2 responses"),
    (0.5, r"--reward_fn bad: must return a list of numbers"),
])
def test_bad_reward_output_is_one_line_naming_the_function_and_row(output, message):
    from rlhfkit.errors import UserError

    with pytest.raises(UserError, match=message):
        rewards.checked_component(output, _inputs(["a", "b"]), "--reward_fn bad")


def test_kl_term_weighted_by_the_importance_ratio_as_trl_does():
    logprobs = torch.log(torch.tensor([[2.0, 0.5]]))
    ref_kl = torch.tensor([[0.3, 0.1]])
    common = dict(clip_low=10.0, clip_high=10.0, ref_kl=ref_kl, kl_coef=1.0)  # no clip: −A·ρ + KL terms
    plain, _ = objectives.policy_objective(logprobs, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), **common)
    weighted, _ = objectives.policy_objective(logprobs, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2),
                                              kl_importance_weighted=True, **common)
    close(plain, (0.3 + 0.1) / 2)
    close(weighted, (2.0 * 0.3 + 0.5 * 0.1) / 2)  # KL_t · ρ_t
