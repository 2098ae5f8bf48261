"""annotate/: RM scoring with another tokenizer and template than the policy, the --labeler hook, pair and SFT files
that the training stages read, statistics, histogram, errors."""

from __future__ import annotations

import json

import pytest
import torch

from annotate import build_pairs, get_rewards
from rlhfkit.errors import UserError

RM_TEMPLATE = (  # deliberately unlike the policy's ChatML: different markers, a BOS, no end-of-turn token
    "{{ bos_token }}{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
)

ROWS = [
    {"id": "p1", "prompt": [{"role": "user", "content": "tell me about the sea"}],
     "responses": ["the sea is warm and bright", "bad", "the sea is cold"], "meta": {}},
    {"id": "p2", "prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "a poem?"}],
     "responses": ["roses are red", "no"], "meta": {}},
    {"id": "p3", "prompt": [{"role": "user", "content": "same"}], "responses": ["x y", "y x"], "meta": {}},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A Llama reward model with its own 300-token tokenizer and template (the policy has 512 tokens, ChatML)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhfkit.builtin_models import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("rm")
    tokenizer = train_tiny_tokenizer(vocab_size=300)
    tokenizer.chat_template = RM_TEMPLATE
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # spread the scores so distinct texts get distinct rewards
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def score_text_directly(rm_dir, conversation):
    """The reference: render with the RM's template to text, tokenize without extra specials, score one by one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0]), text


def run(tmp_path, name, **overrides):
    values = dict(dataset_path=overrides.pop("dataset_path", None), output_dir=str(tmp_path / name))
    pair_values = {k: overrides.pop(k) for k in list(overrides) if k in ("pair_strategy", "min_margin", "pair_seed")}
    values.update(overrides)
    return get_rewards.main(get_rewards.ScriptArguments(**values), build_pairs.PairArguments(**pair_values))


@pytest.mark.slow
def test_rm_with_other_tokenizer_scores_like_rendered_text(tmp_path, reward_model_dir, tiny_llama_dir):
    from transformers import AutoTokenizer

    source = write_rows(tmp_path / "gen.jsonl", ROWS)
    run(tmp_path, "ann", dataset_path=source, reward_model_path=str(reward_model_dir), batch_size=2)
    annotated = [json.loads(line) for line in open(tmp_path / "ann" / "rewards.jsonl")]
    policy_tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert len(policy_tokenizer) != len(AutoTokenizer.from_pretrained(reward_model_dir))
    for row in annotated:
        assert len(row["rewards"]) == len(row["responses"])
        for response, reward in zip(row["responses"], row["rewards"]):
            conversation = row["prompt"] + [{"role": "assistant", "content": response}]
            expected, text = score_text_directly(reward_model_dir, conversation)
            assert text.startswith("<|endoftext|>### ")  # the RM's own template, not the policy's ChatML
            assert reward == pytest.approx(expected, abs=1e-4)
            # rendering with the policy's template would have given another score
            policy_text = policy_tokenizer.apply_chat_template(conversation, tokenize=False)
            assert "<|im_start|>" in policy_text and "<|im_start|>" not in text
    info = json.loads((tmp_path / "ann" / "run_info.json").read_text())
    assert info["complete"] and info["stage"] == "annotate" and info["labeler"]["kind"] == "reward_model"
    assert set(info["reward_stats"]) == {"mean", "std"}


LABELER = '''
def length_reward(prompts, responses):
    """Reward = number of words: a rule-based labeler plugged in by import path."""
    assert all(p[-1]["role"] == "user" for p in prompts)
    return [float(len(r.split())) for r in responses]
'''


@pytest.mark.slow
def test_labeler_hook_pairs_sft_stats_histogram(tmp_path, capsys):
    from rlhfkit.data import load_preferences

    (tmp_path / "mylabels.py").write_text(LABELER)
    source = write_rows(tmp_path / "gen.jsonl", ROWS)
    metrics = run(tmp_path, "ann", dataset_path=source, labeler=f"{tmp_path}/mylabels.py:length_reward")
    out = tmp_path / "ann"
    annotated = [json.loads(line) for line in open(out / "rewards.jsonl")]
    assert [r["rewards"] for r in annotated] == [[6.0, 1.0, 4.0], [3.0, 1.0], [2.0, 2.0]]

    pairs = load_preferences([str(out / "pairs.jsonl")]).rows  # what dpo_train.py reads
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["margin"]) for p in pairs] == [
        ("p1", "the sea is warm and bright", "bad", 5.0), ("p2", "roses are red", "no", 2.0)]
    assert pairs[1]["prompt"] == ROWS[1]["prompt"]
    assert metrics["pairs_dropped"] == {"ties": 1}

    sft = [json.loads(line) for line in open(out / "sft.jsonl")]
    assert [s["messages"][-1] for s in sft] == [{"role": "assistant", "content": "the sea is warm and bright"},
                                                {"role": "assistant", "content": "roses are red"}]
    assert sft[1]["messages"][:-1] == ROWS[1]["prompt"]

    assert metrics["reward"]["mean"] == pytest.approx(19 / 7) and metrics["reward"]["all_tied_prompts"] == 1
    printed = capsys.readouterr().out
    assert "rewards: 7 responses over 3 prompts" in printed and "1 kept" not in printed
    assert (out / "reward_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the SFT file is what sft_train.py reads
    from rlhfkit.train import sft_data

    loaded = sft_data.load_sft([str(out / "sft.jsonl")])
    assert len(getattr(loaded, "rows", loaded)) == 2


@pytest.mark.slow
def test_build_pairs_rerun_with_other_strategy(tmp_path):
    (tmp_path / "mylabels.py").write_text(LABELER)
    source = write_rows(tmp_path / "gen.jsonl", ROWS)
    run(tmp_path, "ann", dataset_path=source, labeler=f"{tmp_path}/mylabels.py:length_reward")
    metrics = build_pairs.main(
        build_pairs.ScriptArguments(dataset_path=str(tmp_path / "ann"), output_dir=str(tmp_path / "bok")),
        build_pairs.PairArguments(pair_strategy="best_of_k", min_margin=2.5),
    )
    assert not (tmp_path / "bok" / "pairs.jsonl").exists()
    sft = [json.loads(line) for line in open(tmp_path / "bok" / "sft.jsonl")]
    assert [s["id"] for s in sft] == ["p1"]  # p2's spread 2 < 2.5; p3 tied
    assert metrics["sft_dropped"] == {"below_min_margin": 1, "ties": 1}


def test_input_errors(tmp_path):
    bad = write_rows(tmp_path / "bad.jsonl", [ROWS[0], {"id": "q", "prompt": ROWS[0]["prompt"], "responses": "one"}])
    with pytest.raises(UserError, match=r"bad\.jsonl: row 2: field 'responses'"):
        run(tmp_path, "a", dataset_path=bad, labeler="vader")
    with pytest.raises(UserError, match="incomplete"):
        (tmp_path / "gen.partial").mkdir()
        run(tmp_path, "b", dataset_path=str(tmp_path / "gen.partial"), labeler="vader")
    with pytest.raises(ValueError, match="exactly one of"):
        get_rewards.ScriptArguments(dataset_path="x", output_dir="y")
    with pytest.raises(ValueError, match="pair_strategy"):
        build_pairs.PairArguments(pair_strategy="best")
    (tmp_path / "wrong.py").write_text("def short(prompts, responses):\n    return [1.0]\n")
    good = write_rows(tmp_path / "good.jsonl", ROWS)
    with pytest.raises(UserError, match="returned 1 scores for 7 responses"):
        run(tmp_path, "c", dataset_path=good, labeler=f"{tmp_path}/wrong.py:short")
