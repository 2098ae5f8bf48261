"""Pairwise preference model (rlhfkit/preference_model.py, pm_train.py): template, two-order scoring, tournaments,
its eval rules and RL reward; one chain on a tiny model (train → eval_benchmark → annotate tournament → PPO)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhfkit.cli import parse_args
from rlhfkit.errors import UserError
from rlhfkit.preference_model import (PairTemplate, both_orders, label_token_ids, log_odds, outcome, render_context,
                                      tournament_scores, training_examples, win_probabilities)
from tests.conftest import QUIET_RUN, TOPICS, sentiment_pairs, write_jsonl


# ---------------------------------------------------------------------------------------------------------------
# pure rules, checked by hand
# ---------------------------------------------------------------------------------------------------------------
def test_context_is_rlhflow_plain_turns():
    # RLHFlow's tokenizer_plain template: "\n", then "\n\n<turn> user\n {content}" / "<turn> assistant", then "\n\n\n"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "why?"}]
    assert render_context(messages) == "\n\n\n<turn> user\n hi\n\n<turn> assistant\n yo\n\n<turn> user\n why?\n\n\n"
    with_system = [{"role": "system", "content": "be nice"}] + messages[:1]
    assert render_context(with_system) == "\n\n\n<turn> system\n be nice\n\n<turn> user\n hi\n\n\n"


def test_two_order_probability_outcome_and_log_odds():
    assert both_orders(0.8, 0.4) == pytest.approx(0.5 * (0.8 + 0.6))
    assert both_orders(0.9, 0.9) == pytest.approx(0.5)  # pure position bias ("A" always) cancels to a tie
    assert [outcome(p) for p in (0.7, 0.5, 0.2)] == [1.0, 0.5, 0.0]
    assert log_odds(0.75) == pytest.approx(math.log(3))
    assert math.isfinite(log_odds(1.0)) and log_odds(1.0) == pytest.approx(math.log((1 - 1e-6) / 1e-6))


def known_order_compare(strength: dict[str, float]):
    """P(a ≻ b) from hidden strengths (Bradley-Terry), as a PM would answer."""
    def compare(comparisons):
        return [1 / (1 + math.exp(strength[b] - strength[a])) for _, a, b in comparisons]
    return compare


def test_round_robin_recovers_a_known_order():
    responses = ["c", "a", "e", "b", "d"]
    strength = {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0}
    scores = tournament_scores(known_order_compare(strength), [([], responses)], "round_robin")[0]
    assert sorted(responses, key=lambda r: -scores[responses.index(r)]) == ["a", "b", "c", "d", "e"]
    assert scores == [2.0, 4.0, 0.0, 3.0, 1.0]  # wins: K−1 for the best, 0 for the worst


def test_knockout_crowns_the_best_in_k_minus_1_comparisons_with_a_bye():
    responses = ["c", "a", "e", "b", "d"]
    calls = []
    compare = known_order_compare({"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0})
    scores = tournament_scores(lambda cs: calls.append(len(cs)) or compare(cs), [([], responses)], "knockout")[0]
    assert sum(calls) == len(responses) - 1
    assert max(range(5), key=lambda i: scores[i]) == responses.index("a")
    # round 1: c v a → a, e v b → b, d has a bye; round 2: a v b → a, d advances; round 3: a v d → a
    assert scores == [0.0, 3.0, 0.0, 1.0, 0.0]


def test_tie_rules_round_robin_half_and_knockout_earlier():
    tie = lambda comparisons: [0.5] * len(comparisons)  # noqa: E731
    assert tournament_scores(tie, [([], ["x", "y", "z"])], "round_robin") == [[1.0, 1.0, 1.0]]
    assert tournament_scores(tie, [([], ["x", "y"])], "knockout") == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="tournament"):
        tournament_scores(tie, [([], ["x"])], "swiss")


def test_pm_eval_credits():
    from rlhfkit.eval.preference_model import best_of_n_credit, credit_accuracies

    assert best_of_n_credit([0.9, 0.7, 0.6]) == 1.0
    assert best_of_n_credit([0.9, 0.5, 0.6]) == 0.5  # one exact tie: shares the top with one other
    assert best_of_n_credit([0.9, 0.5, 0.4]) == 0.0  # a loss anywhere loses the row
    per = credit_accuracies(["s", "s", None], [1.0, 0.5, 0.0])
    assert per["s"]["accuracy"] == 0.75 and per["all"]["n"] == 1


def test_template_errors_are_one_line():
    with pytest.raises(UserError, match="has no \\{response_B\\}"):
        PairTemplate.from_dict({"template": "{context} {response_A}"})
    with pytest.raises(UserError, match="unknown keys"):
        PairTemplate.from_dict({"template": "x", "colour": 1})


# ---------------------------------------------------------------------------------------------------------------
# the pairwise forward equals a plain forward per order (tiny random causal LM, no training)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from rlhfkit.models import ensure_pad_token, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    torch.manual_seed(0)
    model = load_causal_lm(str(tiny_llama_dir)).eval()
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def test_win_probabilities_equal_plain_forward_of_each_order(tiny_lm):
    from rlhfkit.preference_model import comparison_ids

    model, tokenizer = tiny_lm
    template = PairTemplate()
    ids = label_token_ids(tokenizer, template)
    rows = sentiment_pairs(5, seed=3)
    comparisons = [(r["prompt"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
    comparisons.append((rows[0]["prompt"], "another answer", rows[0]["chosen"][0]["content"]))  # shares a prompt
    ours, _ = win_probabilities(model, tokenizer, template, comparisons, batch_size=4)
    expected = []
    with torch.no_grad():
        for prompt, a, b in comparisons:
            p = []
            for first, second in ((a, b), (b, a)):
                seq = comparison_ids(tokenizer, template, prompt, first, second)
                logits = model(torch.tensor([seq])).logits[0, -1, ids]
                p.append(torch.softmax(logits, -1)[0].item())
            expected.append(0.5 * (p[0] + 1 - p[1]))
    assert ours == pytest.approx(expected, abs=1e-5)
    swapped, _ = win_probabilities(model, tokenizer, template, [(p, b, a) for p, a, b in comparisons])
    assert [x + y for x, y in zip(ours, swapped)] == pytest.approx([1.0] * len(ours), abs=1e-5)


def test_training_examples_are_both_orders_with_answer_targets(tiny_lm):
    _, tokenizer = tiny_lm
    rows = sentiment_pairs(3, seed=4)
    records, counts = training_examples(rows, tokenizer, PairTemplate(), max_length=None)
    id_a, id_b = label_token_ids(tokenizer, PairTemplate())
    assert counts == {"pairs": 3, "dropped_too_long": 0, "kept": 3}
    for record in records:
        forward, backward = record["sequences"]
        assert record["targets"] == [[id_a], [id_b]]
        assert record["positions"] == [[len(forward) - 1], [len(backward) - 1]]
        assert forward != backward and len(forward) == len(backward)
    _, short = training_examples(rows, tokenizer, PairTemplate(), max_length=10)
    assert short["dropped_too_long"] == 3 and short["kept"] == 0


def test_pm_reward_groups_are_antisymmetric_and_baseline_is_cached():
    from rlhfkit.rl.model_rewards import PreferenceReward

    reward = object.__new__(PreferenceReward)
    reward.how, reward.baselines, reward.group_size = "log_odds", {}, 3
    strength = {"good": 2.0, "ok": 1.0, "bad": 0.0, "greedy": 1.0}
    reward.scorer = type("S", (), {"compare": staticmethod(known_order_compare(strength))})()
    prompt = [{"role": "user", "content": "q"}]
    values = reward([prompt] * 3, ["good", "ok", "bad"])
    # log-odds of a BT model are strength differences: r_i − mean of the others'
    assert values == pytest.approx([2.0 - 0.5, 1.0 - 1.0, 0.0 - 1.5])
    generated = []
    reward.baseline_fn = lambda prompts: generated.extend(prompts) or ["greedy"] * len(prompts)
    other = [{"role": "user", "content": "r"}]
    assert reward([prompt, other], ["good", "bad"]) == pytest.approx([1.0, -1.0])
    assert reward([prompt], ["ok"]) == pytest.approx([0.0]) and len(generated) == 2  # cached per prompt
    # K = 1: a prompt drawn twice in one batch is compared with the baseline twice, not with itself
    reward.group_size = 1
    assert reward([prompt, prompt], ["good", "bad"]) == pytest.approx([1.0, -1.0]) and len(generated) == 2
    reward.group_size = 2  # K = 2: groups are K consecutive rows, so 4 rows of one prompt are two groups
    assert reward([prompt] * 4, ["good", "bad", "ok", "ok"]) == pytest.approx([2.0, -2.0, 0.0, 0.0])
    reward.how = "win_rate"
    assert reward([prompt], ["good"]) == pytest.approx([1 / (1 + math.exp(-1.0))])


# ---------------------------------------------------------------------------------------------------------------
# the chain on a tiny model: train → eval_benchmark → annotate (tournament) → PPO reward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pm_chain_train_eval_annotate_ppo(tmp_path):
    import eval_benchmark
    import pm_train
    import ppo_train
    from annotate import get_rewards

    train = write_jsonl(tmp_path / "train.jsonl", sentiment_pairs(64, seed=1, topics=TOPICS[:10]))
    heldout_rows = sentiment_pairs(16, seed=2, topics=TOPICS[10:])
    heldout = write_jsonl(tmp_path / "heldout.jsonl", heldout_rows)
    out = tmp_path / "pm"
    metrics = pm_train.main(*parse_args(pm_train.ARGUMENTS, [
        "--model_name_or_path", "tiny-random-llama", "--dataset_path", str(train), "--eval_dataset_path", str(heldout),
        "--output_dir", str(out), "--num_train_epochs", "6", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "8", *QUIET_RUN]))
    # both orders of every held-out pair (topics never seen in training) pick the chosen response
    assert metrics["eval_accuracy_before"] < 1.0
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_order_agreement"] == 1.0
    info = json.loads((out / "run_info.json").read_text())
    assert info["stage"] == "pm" and info["preference_model"]["template"].startswith("[CONTEXT] {context}")

    # RewardBench v1 rows: every held-out pair correct, sections weighted as for an RM
    v1 = write_jsonl(tmp_path / "v1.jsonl", [
        {"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
         "rejected": r["rejected"][0]["content"], "subset": ("alpacaeval-easy", "refusals-dangerous")[i % 2],
         "id": str(i)} for i, r in enumerate(heldout_rows)])
    (args,) = parse_args(eval_benchmark.ARGUMENTS, ["--reward_model_path", str(out), "--dataset_path", str(v1),
                                                    "--output_dir", str(tmp_path / "eval")])
    results = eval_benchmark.main(args)
    assert results["scoring"] == "pairwise_preference_model" and results["accuracy"] == 1.0
    assert results["rewardbench"]["sections"]["Chat"] == 100.0
    assert len((tmp_path / "eval" / "scores.jsonl").read_text().splitlines()) == 16

    # annotation ranks K = 4 samples per prompt by a round robin: all-positive above all-negative
    generations = tmp_path / "generations.jsonl"
    distinct = list({json.dumps(r["prompt"]): r for r in heldout_rows}.values())[:4]
    write_jsonl(generations, [{"id": str(i), "prompt": r["prompt"], "meta": {},
                               "responses": [r["rejected"][0]["content"], r["chosen"][0]["content"],
                                             heldout_rows[(i + 1) % 16]["rejected"][0]["content"],
                                             heldout_rows[(i + 1) % 16]["chosen"][0]["content"]]}
                              for i, r in enumerate(distinct)])
    get_rewards.main(*parse_args(get_rewards.ARGUMENTS, [
        "--dataset_path", str(generations), "--labeler", str(out), "--tournament", "round_robin",
        "--output_dir", str(tmp_path / "ann"), "--pair_strategy", "max_min"]))
    for line in (tmp_path / "ann" / "rewards.jsonl").read_text().splitlines():
        rewards = json.loads(line)["rewards"]
        assert min(rewards[1], rewards[3]) > max(rewards[0], rewards[2]) and sum(rewards) == 6.0
    pair = json.loads((tmp_path / "ann" / "pairs.jsonl").read_text().splitlines()[0])
    assert any(w in pair["chosen"][0]["content"] for w in ("good", "great", "happy", "kind", "wonderful", "nice",
                                                           "joy", "love", "bright", "warm"))

    # PPO with the PM as reward: one sample per prompt, so against the reference policy's greedy response
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {t}.", "id": str(i)}
                                                       for i, t in enumerate(TOPICS[:4])])
    ppo_metrics = ppo_train.main(*parse_args(ppo_train.ARGUMENTS, [
        "--model_name_or_path", "tiny-random-llama", "--reward_model_path", str(out), "--dataset_path", str(prompts),
        "--output_dir", str(tmp_path / "ppo"), "--max_steps", "2", "--max_new_tokens", "8", "--rollout_batch_size",
        "4", "--per_device_train_batch_size", "4", "--ppo_epochs", "1", "--save_strategy", "no", "--disable_tqdm",
        "true", "--report_to", "none", "--seed", "0"]))
    assert ppo_metrics["steps"] == 2
    described = json.loads((tmp_path / "ppo" / "run_info.json").read_text())["reward"]
    described = described[0] if isinstance(described, list) else described  # one source, or the list of sources
    assert described["pm_reward"] == "log_odds"


@pytest.mark.slow
def test_ppo_against_the_reference_greedy_response_raises_the_pm_reward(tmp_path, tiny_llama_dir):
    """The PM as PPO's reward with one sample per prompt (log-odds against the reference policy's greedy response):
    the policy learns what the PM prefers. The PM is trained on pairs that differ only in positive words inserted into
    the same random token soup (what a tiny random policy writes), so its preference reaches the policy's samples."""
    import random

    import pm_train
    import ppo_train
    from transformers import AutoTokenizer

    from tests.conftest import POSITIVE

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    rng = random.Random(0)
    rows = []
    for i in range(160):
        words = tokenizer.decode([rng.randrange(len(tokenizer)) for _ in range(8)], skip_special_tokens=True).split()
        chosen = list(words)
        for word in rng.sample(POSITIVE, 3):
            chosen.insert(rng.randrange(len(chosen) + 1), word)
        prompt = [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}]
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": " ".join(chosen)}],
                     "rejected": [{"role": "assistant", "content": " ".join(words)}]})
    pm = tmp_path / "pm"
    metrics = pm_train.main(*parse_args(pm_train.ARGUMENTS, [
        "--model_name_or_path", "tiny-random-llama", "--dataset_path", str(write_jsonl(tmp_path / "p.jsonl", rows[:128])),
        "--eval_dataset_path", str(write_jsonl(tmp_path / "e.jsonl", rows[128:])), "--output_dir", str(pm),
        "--num_train_epochs", "4", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true"]))
    assert metrics["eval_accuracy"] >= 0.9

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about {t}.", "id": str(i)}
                                                       for i, t in enumerate(TOPICS)])
    ppo_train.main(*parse_args(ppo_train.ARGUMENTS, [
        "--model_name_or_path", "tiny-random-llama", "--reward_model_path", str(pm), "--dataset_path", str(prompts),
        "--output_dir", str(tmp_path / "ppo"), "--max_steps", "30", "--max_new_tokens", "12", "--rollout_batch_size",
        "32", "--per_device_train_batch_size", "16", "--ppo_epochs", "4", "--learning_rate", "3e-3", "--kl_coef",
        "0.01", "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none", "--seed", "1"]))
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "log_history.jsonl").read_text().splitlines()]
    start = sum(row["reward/raw"] for row in rows[:10]) / 10
    end = sum(row["reward/raw"] for row in rows[-10:]) / 10
    # measured: −0.03 → +0.18 (steps 1–10 → 21–30); a step's mean over its 32 samples varies by about ±0.2
    assert end > start + 0.15, f"PM reward (log-odds against the reference's greedy response) {start:.2f} → {end:.2f}"
