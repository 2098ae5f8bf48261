"""RewardBench scoring against a hand computation: ties, several sections, a missing section, Prior."""

import pytest

from rlhfkit.eval.rewardbench import rewardbench_summary, subset_accuracies


def test_sections_weighted_by_official_counts_with_missing_section_and_prior():
    # alpacaeval-easy: 3/4, mt-bench-easy: 1/2 (one tie, wrong), hep-python 1/1, math-prm 0/2, shp 1/2.
    subsets = (["alpacaeval-easy"] * 4 + ["mt-bench-easy"] * 2 + ["hep-python"] + ["math-prm"] * 2
               + ["shp"] * 2 + ["my-own-set"])
    chosen = [1, 1, 1, 0, 1, 0.5, 2, 0, 0, 1, 0, 3]
    rejected = [0, 0, 0, 1, 0, 0.5, 1, 1, 1, 0, 1, 0]
    correct = [c > r for c, r in zip(chosen, rejected)]
    per_subset = subset_accuracies(subsets, correct)
    assert per_subset["mt-bench-easy"]["accuracy"] == 0.5  # the tie counted wrong
    summary = rewardbench_summary(per_subset)
    chat = 100 * (0.75 * 100 + 0.5 * 28) / (100 + 28)
    reasoning = 100 * (1.0 * 164 + 0.0 * 984) / (164 + 984)
    assert summary["sections"]["Chat"] == pytest.approx(chat)
    assert summary["sections"]["Reasoning"] == pytest.approx(reasoning)
    assert summary["missing_sections"] == ["Chat Hard", "Safety"]
    assert summary["sections"]["Safety"] == 0.0
    assert summary["score"] == pytest.approx((chat + 0 + 0 + reasoning) / 4)  # RewardBench counts missing as 0
    assert summary["score_present_sections"] == pytest.approx((chat + reasoning) / 2)
    assert summary["prior"] == pytest.approx(50.0)
    assert summary["legacy_score"] == pytest.approx((2 * chat + 2 * reasoning + 1 * 50.0) / 9)
    assert summary["other_subsets"] == ["my-own-set"]


def test_legacy_without_prior_masks_it_out():
    per_subset = subset_accuracies(["alpacaeval-easy", "refusals-dangerous"], [True, False])
    summary = rewardbench_summary(per_subset)
    assert summary["prior"] is None
    assert summary["legacy_score"] == pytest.approx((2 * 100 + 2 * 0) / 8)


# ---------------------------------------------------------------------------------------------------------------
# weights, rows, truncation, DPO tokenization (rlhfkit/rewardbench.py) and eval_benchmark.py v1 end to end
# ---------------------------------------------------------------------------------------------------------------
import json  # noqa: E402

import torch  # noqa: E402

from rlhfkit.errors import UserError  # noqa: E402
from rlhfkit.eval.dpo_scoring import dpo_reduce, dpo_tokenize_pair  # noqa: E402
from rlhfkit.eval.rewardbench import (  # noqa: E402
    EXAMPLE_COUNTS, TruncationPlan, load_rewardbench_rows, model_position_limit, rewardbench_prompt,
    truncate_like_tokenizer,
)
from tests.conftest import write_jsonl  # noqa: E402


def run_eval(argv):
    import eval_benchmark
    from rlhfkit.cli import parse_args

    (args,) = parse_args((eval_benchmark.ScriptArguments,), argv)
    return eval_benchmark.main(args)


def test_xstest_weights_are_rewardbench_example_counts():
    # allenai/reward-bench rewardbench/constants.py EXAMPLE_COUNTS on main since 6552e93 and in rewardbench 0.1.4:
    # refuse 154, respond 250 (weights, not row counts; tests/test_rewardbench_oracle.py checks against the package)
    assert EXAMPLE_COUNTS["xstest-should-refuse"] == 154
    assert EXAMPLE_COUNTS["xstest-should-respond"] == 250
    per_subset = {s: {"accuracy": a, "n": 1} for s, a in [("refusals-dangerous", 0.9), ("refusals-offensive", 0.9),
                  ("xstest-should-refuse", 0.95), ("xstest-should-respond", 0.5), ("donotanswer", 0.6)]}
    safety = rewardbench_summary(per_subset)["sections"]["Safety"]
    assert safety == pytest.approx(100 * (90 + 90 + 0.95 * 154 + 0.5 * 250 + 0.6 * 136) / 740)  # 72.01
    assert round(safety, 2) == 72.01


def test_prompt_roles_by_position_as_rewardbench():
    assert rewardbench_prompt("hi", "f: row 1") == [{"role": "user", "content": "hi"}]
    turns = [{"role": "x", "content": "a"}, {"role": "x", "content": "b"}, {"role": "x", "content": "c"}]
    assert [m["role"] for m in rewardbench_prompt(turns, "f: row 1")] == ["user", "assistant", "user"]
    with pytest.raises(UserError, match="odd number"):
        rewardbench_prompt(turns[:2], "f: row 1")


def test_loader_keeps_identical_and_empty_rows_and_counts_them(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a", "subset": "hep-go", "id": 1},
            {"prompt": "p", "chosen": "", "rejected": "b", "subset": "hep-go", "id": 2},
            {"prompt": "p", "chosen": "c", "rejected": "", "subset": "hep-go", "id": 3}]
    data = load_rewardbench_rows([str(write_jsonl(tmp_path / "rb.jsonl", rows))])
    assert len(data.rows) == 3
    totals = data.totals()
    assert (totals["identical_pairs"], totals["empty_chosen"], totals["empty_rejected"], totals["scored"]) == (1, 1, 1, 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "x"}])
    with pytest.raises(UserError, match="row 1: field 'chosen'"):
        load_rewardbench_rows([str(bad)])
    assert load_rewardbench_rows([str(bad)], skip_invalid=True).totals()["skipped_invalid"] == 1


def test_truncation_keeps_the_tokenizer_specials_and_the_end():
    ids = [101, 1, 2, 3, 4, 5, 6, 102]
    # BERT-like: [CLS] … [SEP] are re-added by the tokenizer after cutting the text from the left
    assert truncate_like_tokenizer(ids, 5, "left", [101], [102]) == [101, 4, 5, 6, 102]
    assert truncate_like_tokenizer(ids, 5, "right", [101], [102]) == [101, 1, 2, 3, 102]
    assert truncate_like_tokenizer([7, 1, 2, 3], 2, "left", [], []) == [2, 3]  # a tokenizer adding nothing (Qwen)
    assert truncate_like_tokenizer([1, 2, 3], 2, "left", [101], []) == [2, 3]  # no BOS in the ids: none kept
    assert truncate_like_tokenizer(ids, 8, "left", [101], [102]) == ids  # fits: unchanged
    plan = TruncationPlan(requested=2048, model_limit=512, side="left")
    assert plan.max_length == 512 and plan.capped_by_model
    assert TruncationPlan(requested=2048, model_limit=4096, side="left").max_length == 2048


def test_model_position_limit():
    from types import SimpleNamespace

    assert model_position_limit(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512))) == 512
    roberta = SimpleNamespace(model_type="roberta", max_position_embeddings=514, pad_token_id=1)
    assert model_position_limit(SimpleNamespace(config=roberta)) == 512
    assert model_position_limit(SimpleNamespace(config=SimpleNamespace(n_positions=1024))) == 1024


def test_dpo_tokenization_follows_rewardbench_dpo_py(tiny_llama_dir):
    from transformers import AutoTokenizer

    from rlhfkit.tokenization import render_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = [{"role": "user", "content": "tell me a long story " * 6}]
    chosen = [{"role": "assistant", "content": "once upon a time " * 5}]
    rejected = [{"role": "assistant", "content": "no"}]
    pair = dpo_tokenize_pair(tokenizer, prompt, chosen, rejected)  # 2048 tokens: nothing cut
    prompt_text = render_text(tokenizer, prompt)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert pair.chosen_ids[: pair.chosen_start] == [bos] + prompt_ids
    answer = render_text(tokenizer, prompt + chosen).replace(prompt_text, "")
    assert pair.chosen_ids[pair.chosen_start:] == tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert not pair.prompt_truncated
    # small limits: prompt keeps its last 5 tokens (keep_end); then both responses their first 20 - 5
    cut = dpo_tokenize_pair(tokenizer, prompt, chosen, rejected, max_length=20, max_prompt_length=5)
    assert cut.prompt_truncated and cut.response_truncated
    assert cut.chosen_ids[: cut.chosen_start] == ([bos] + prompt_ids)[-5:]
    assert cut.chosen_ids[cut.chosen_start:] == pair.chosen_ids[pair.chosen_start:][:15]
    assert cut.rejected_ids[cut.rejected_start:] == pair.rejected_ids[pair.rejected_start:]  # short: whole


def test_dpo_reductions_by_hand():
    per_token = torch.tensor([[0.0, -1.0, -2.0, -9.0], [0.0, -3.0, -4.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]])
    assert dpo_reduce(per_token, mask, "sum").tolist() == [-3.0, -7.0]
    assert dpo_reduce(per_token, mask, "avg").tolist() == [-1.5, -3.5]
    assert dpo_reduce(per_token, mask, "norm").tolist() == pytest.approx([-(5 ** 0.5), -5.0])


def _rule_scores(model, tokenizer, conversations, *args, **kwargs):
    return [float(conv[-1]["content"].count("good")) for conv in conversations]


def _v1_fixture(tmp_path):
    # (subset, chosen, rejected) with scores = number of "good": every Safety subset, a tie, an identical pair,
    # an empty response
    plan = [
        ("refusals-dangerous", "good", ""), ("refusals-dangerous", "no", "good good"),       # 1/2
        ("refusals-offensive", "good good", "good"),                                          # 1/1
        ("xstest-should-refuse", "good", "no"), ("xstest-should-refuse", "good x", "good y"),  # tie: 1/2
        ("xstest-should-respond", "good", "x"), ("xstest-should-respond", "good", "y"),
        ("xstest-should-respond", "same", "same"),                                            # identical: 2/3
        ("donotanswer", "", "good"),                                                          # empty chosen: 0/1
        ("alpacaeval-easy", "good", "bad"),                                                   # 1/1
    ]
    rows = [{"prompt": f"q{i}", "chosen": c, "rejected": r, "subset": s, "id": str(i)} for i, (s, c, r) in enumerate(plan)]
    return write_jsonl(tmp_path / "rb.jsonl", rows)


@pytest.mark.slow  # runs the stage's main to the end
def test_eval_benchmark_v1_every_row_safety_by_hand(tmp_path, monkeypatch, tiny_rm_dir):
    import rlhfkit.scoring

    monkeypatch.setattr(rlhfkit.scoring, "score_conversations", _rule_scores)
    results = run_eval(["--reward_model_path", str(tiny_rm_dir), "--dataset_path", str(_v1_fixture(tmp_path)),
                        "--output_dir", str(tmp_path / "eval"), "--calibration", "false"])
    assert results["benchmark"] == "v1"
    assert results["pairs"] == 10  # nothing dropped
    assert (results["identical_pairs"], results["empty_chosen"], results["empty_rejected"]) == (1, 1, 1)
    assert results["ties"] == 2
    safety = 100 * (0.5 * 100 + 1.0 * 100 + 0.5 * 154 + (2 / 3) * 250 + 0.0 * 136) / (100 + 100 + 154 + 250 + 136)
    summary = results["rewardbench"]
    assert summary["sections"]["Safety"] == pytest.approx(safety)
    assert summary["sections"]["Chat"] == pytest.approx(100.0)
    assert summary["score"] == pytest.approx((100 + safety) / 4)
    assert summary["legacy_score"] == pytest.approx((2 * 100 + 2 * safety) / 8)
    table = (tmp_path / "eval" / "table.txt").read_text()
    assert "1 identical" in table and "Truncated" in table and "Batch invariance" in table
    lines = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and lines[7]["chosen_score"] == lines[7]["rejected_score"]
    assert results["diagnostics"]["batch_invariance"]["max_abs_diff"] == 0.0


def _short_bert(tmp_path, tiny_bert_dir, positions=24):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_bert_dir)
    config.max_position_embeddings = positions
    config.num_labels = 1
    torch.manual_seed(0)
    out = tmp_path / "short-bert"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow  # runs the stage's main to the end
def test_sequences_beyond_the_position_limit_are_truncated_and_counted_not_a_crash(tmp_path, tiny_bert_dir):
    model_dir = _short_bert(tmp_path, tiny_bert_dir)
    rows = [{"prompt": [{"role": "user", "content": "a long question " * 10}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "and more " * 5}],
             "chosen": [{"role": "assistant", "content": "yes " * 8}], "rejected": [{"role": "assistant", "content": "no"}]},
            {"prompt": "short", "chosen": "a", "rejected": "b"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    results = run_eval(["--reward_model_path", str(model_dir), "--dataset_path", str(path),
                        "--output_dir", str(tmp_path / "eval"), "--batch_size", "2"])
    truncation = results["truncation"]
    assert truncation["model_position_limit"] == 24 and truncation["max_length"] == 24 and truncation["capped_by_model"]
    assert truncation["truncated_sequences"] == 2 and truncation["truncated_pairs"] == 1
    assert "capped from 2048" in (tmp_path / "eval" / "table.txt").read_text()
    assert results["diagnostics"]["batch_invariance"]["max_abs_diff"] < 1e-4


@pytest.mark.slow  # runs the stage's main to the end
def test_dpo_mode_ref_free_and_with_reference(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": f"q{i}", "chosen": "good answer " * (i + 1), "rejected": "bad", "subset": "hep-go", "id": str(i)}
            for i in range(3)]
    path = write_jsonl(tmp_path / "rb.jsonl", rows)
    same = run_eval(["--reward_model_path", str(tiny_llama_dir), "--ref_model_path", str(tiny_llama_dir),
                     "--dataset_path", str(path), "--output_dir", str(tmp_path / "same"), "--calibration", "false"])
    assert same["scoring"] == "implicit_reward" and same["ties"] == 3 and same["accuracy"] == 0.0  # π = π_ref
    free = run_eval(["--reward_model_path", str(tiny_llama_dir), "--ref_free", "true", "--dataset_path", str(path),
                     "--output_dir", str(tmp_path / "free"), "--calibration", "false", "--batch_size", "2"])
    assert free["scoring"] == "implicit_reward_ref_free_avg"
    # the average response log-prob of pair 0's chosen, computed directly
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pair = dpo_tokenize_pair(tokenizer, [{"role": "user", "content": "q0"}],
                             [{"role": "assistant", "content": rows[0]["chosen"]}],
                             [{"role": "assistant", "content": "bad"}])
    ids = torch.tensor([pair.chosen_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    picked = logp[torch.arange(len(pair.chosen_ids) - 1), ids[0, 1:]][pair.chosen_start - 1:]
    first = json.loads((tmp_path / "free" / "scores.jsonl").read_text().splitlines()[0])
    assert first["chosen_score"] == pytest.approx(float(picked.mean()), abs=1e-5)
    assert free["diagnostics"]["batch_invariance"]["max_abs_diff"] < 1e-4


@pytest.mark.slow  # runs the stage's main to the end
def test_identical_pair_is_an_exact_tie_with_a_real_model(tmp_path, tiny_rm_dir):
    # scored once, so batch-padding float noise cannot turn the tie into a win
    rows = [{"prompt": f"question {i} " * (i % 5 + 1), "chosen": "fine " * (i % 4 + 1), "rejected": "no", "subset": "hep-go",
             "id": str(i)} for i in range(9)] + [{"prompt": "same", "chosen": "x", "rejected": "x", "subset": "hep-go", "id": "9"}]
    results = run_eval(["--reward_model_path", str(tiny_rm_dir), "--dataset_path", str(write_jsonl(tmp_path / "rb.jsonl", rows)),
                        "--output_dir", str(tmp_path / "eval"), "--batch_size", "3", "--calibration", "false"])
    last = json.loads((tmp_path / "eval" / "scores.jsonl").read_text().splitlines()[-1])
    assert last["chosen_score"] == last["rejected_score"] and last["correct"] is False
    assert results["ties"] >= 1 and results["identical_pairs"] == 1


def test_truncation_equals_the_hf_tokenizer_rewardbench_uses(tiny_llama_dir):
    """RewardBench: render text, tokenizer(text, truncation=True, max_length, side left), the first of two BOS masked.
    On a tokenizer that adds a BOS and a template that prints one, our ids and cut are the same tokens."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from rlhfkit.eval.rewardbench import special_token_frame
    from rlhfkit.tokenization import render_ids, render_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bos = tokenizer.bos_token
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                             special_tokens=[(bos, bos_id)])
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert special_token_frame(tokenizer) == ([bos_id], [])
    conversation = [{"role": "user", "content": "hello there " * 20}, {"role": "assistant", "content": "hi " * 10}]
    ids, text = render_ids(tokenizer, conversation), render_text(tokenizer, conversation)
    tokenizer.truncation_side = "left"
    for limit in (30, 64, 1000):
        reference = tokenizer(text, truncation=True, max_length=limit)["input_ids"]
        if reference[:2] == [bos_id, bos_id]:
            reference = reference[1:]  # RewardBenchPipeline masks the first of a double BOS
        assert truncate_like_tokenizer(ids, limit, "left", *special_token_frame(tokenizer)) == reference, limit
