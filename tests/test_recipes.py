"""Preference-data recipes: converters against fixtures in each source's published schema, selection rules on
hand-made lists with hand-checked outputs, the four recipes end to end, determinism, decontamination."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prepare_data import ScriptArguments, main
from rlhfkit.data import is_valid_prompt
from rlhfkit.mixtures.decontamination import Decontaminator
from rlhfkit.errors import UserError
from rlhfkit.mixtures.catalog import resolve_options
from rlhfkit.mixtures.selection import cap_per_prompt, drop_empty, drop_identical, drop_ties, filter_score_ratio, subsample
from rlhfkit.mixtures.sources import (Dropped, Pair, RankedPrompt, ScoredResponse, convert_capybara, convert_helpsteer,
                                      convert_hh_rlhf, convert_orca, convert_pku, convert_shp, convert_ultrafeedback,
                                      pairs_all, pairs_best_vs_random)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "recipes"


def rows(name: str) -> list[dict]:
    with open(FIXTURES / name, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------------------------
# converters: one fixture per source, in the columns of its dataset card
# ---------------------------------------------------------------------------------------------------------------
def test_hh_rlhf_converter_splits_dialogue_at_last_assistant_turn():
    row = rows("hh_rlhf/helpful-base/train.jsonl")[1]
    pair = convert_hh_rlhf(row, ("hh.jsonl", 1), "helpful-base")
    assert pair.prompt == [
        user("Name three reasons why the Roman Empire fell according to modern historians and explain them briefly."),
        bot("Do you want political or economic reasons?"),
        user("Both, please."),
    ]
    assert pair.chosen == [bot("Political instability, economic decline and pressure from migrating peoples.")]
    assert pair.rejected == [bot("It was attacked.")]
    assert pair.to_row() == {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                             "source": "hh-rlhf", "subset": "helpful-base", "id": "hh-rlhf:helpful-base:1"}


def test_hh_rlhf_converter_drops_rows_whose_two_dialogues_differ_before_the_reply():
    with pytest.raises(Dropped) as info:
        convert_hh_rlhf(rows("hh_rlhf/helpful-base/train.jsonl")[3], ("hh.jsonl", 3))
    assert info.value.rule == "prompt_mismatch"


def test_shp_converter_follows_labels():
    shp = rows("shp.jsonl")
    preferred_a = convert_shp(shp[0], ("shp.jsonl", 0))  # labels 1: A preferred
    assert preferred_a.chosen == [bot("Keep it in a glass of water on the counter.")]
    assert preferred_a.rejected == [bot("Put it in the fridge.")]
    preferred_b = convert_shp(shp[1], ("shp.jsonl", 1))  # labels 0: B preferred
    assert preferred_b.chosen == [bot("Wrap it in a damp paper towel.")]
    assert preferred_b.rejected == [bot("Freeze it in olive oil.")]
    assert preferred_b.prompt == [user(shp[1]["history"])]
    assert (preferred_b.group, preferred_b.score_ratio, preferred_b.subset) == ("p1", 2.5, "askculinary_train")


def test_shp_converter_reports_schema_errors_with_file_row_and_field():
    row = dict(rows("shp.jsonl")[0])
    del row["history"]
    with pytest.raises(UserError, match=r"^shp.jsonl: row 7: field 'history': missing"):
        convert_shp(row, ("shp.jsonl", 7))
    with pytest.raises(UserError, match=r"field 'labels': expected 0 or 1"):
        convert_shp({**rows("shp.jsonl")[0], "labels": 2}, ("shp.jsonl", 0))


def test_ultrafeedback_converter_scores_by_fine_grained_mean():
    uf = rows("ultrafeedback.jsonl")
    ranked = convert_ultrafeedback(uf[0], ("uf.jsonl", 0))
    assert ranked.prompt == [user("Explain why the sky is blue.")]
    assert [r.score for r in ranked.responses] == [4.5, 3.0, 3.0, 2.0]
    assert ranked.subset == "evol_instruct"
    # Row 2: no `fine-grained_score` column → mean of the aspect ratings (5, 5, 4, 4); all "N/A" → unscored.
    assert [r.score for r in convert_ultrafeedback(uf[2], ("uf.jsonl", 2)).responses] == [4.5, None, 2.25]
    # The overall score ranks differently (9.0 beats 8.0), which is why the recipes do not use it.
    assert [r.score for r in convert_ultrafeedback(uf[0], ("uf.jsonl", 0), "overall").responses] == [8.0, 9.0, 6.0, 2.0]
    nan_row = {"instruction": "x", "completions": [{"response": "a", "fine-grained_score": float("nan")}]}
    assert convert_ultrafeedback(nan_row, ("uf", 0)).responses[0].score is None


def test_helpsteer_converter_means_the_chosen_attributes():
    row = rows("helpsteer.jsonl")[5]  # helpfulness 4, correctness 0
    prompt, response = convert_helpsteer(row, ("hs.jsonl", 5))
    assert prompt == "What is a prime number?"
    assert (response.text, response.score, response.tag) == (row["response"], 2.0, "5")
    assert convert_helpsteer(row, ("hs.jsonl", 5), ("helpfulness",))[1].score == 4.0


def test_capybara_converter_keeps_multi_turn_history_as_prompt():
    capy = rows("capybara.jsonl")
    pair = convert_capybara(capy[1], ("capy.jsonl", 1))
    assert pair.prompt == [user("Plan a three-day trip to Rome."), bot("Sure: day one, the Colosseum..."),
                           user("Make it cheaper.")]
    assert pair.chosen == [bot("Walk everywhere and picnic in the parks.")]
    assert pair.rejected == [bot("Stay at home.")]
    assert pair.tie and (pair.chosen_score, pair.rejected_score) == (4.0, 4.0)
    assert not convert_capybara(capy[0], ("capy.jsonl", 0)).tie
    with pytest.raises(Dropped, match="prompt_mismatch"):
        convert_capybara(capy[2], ("capy.jsonl", 2))


def test_orca_converter_system_prompt_ties_and_missing_ratings():
    orca = rows("orca.jsonl")
    first = convert_orca(orca[0], ("orca.jsonl", 0))
    assert first.prompt == [{"role": "system", "content": "You are an AI assistant. Provide a detailed answer."},
                            user("Which planet is closest to the sun?")]
    assert (first.chosen, first.rejected, first.tie) == ([bot("Mercury is the closest planet to the sun.")],
                                                         [bot("Venus.")], False)
    assert convert_orca(orca[1], ("orca.jsonl", 1)).prompt == [user("Add 2 and 3.")]  # empty system dropped
    assert convert_orca(orca[1], ("orca.jsonl", 1)).tie
    with pytest.raises(Dropped, match="unrated"):
        convert_orca(orca[2], ("orca.jsonl", 2))
    swapped = convert_orca(orca[3], ("orca.jsonl", 3))  # the card's chosen is already the higher-rated one
    assert swapped.chosen == [bot("Botanically, yes: it develops from the flower's ovary.")]
    assert (swapped.chosen_score, swapped.rejected_score) == (7.0, 3.0)


def test_pku_converter_safer_better_and_agree():
    row = rows("pku_saferlhf_30k.jsonl")[0]  # better_response_id 0, safer_response_id 1
    safer = convert_pku(row, ("pku.jsonl", 0), "safer")
    assert safer.chosen == [bot("Ask your neighbour for permission first.")]
    assert safer.rejected == [bot("Try common passwords like 'admin'.")]
    better = convert_pku(row, ("pku.jsonl", 0), "better")
    assert better.chosen == [bot("Try common passwords like 'admin'.")]
    with pytest.raises(Dropped, match="better_safer_disagree"):
        convert_pku(row, ("pku.jsonl", 0), "agree")
    agree = convert_pku(rows("pku_saferlhf_30k.jsonl")[1], ("pku.jsonl", 1), "agree")
    assert agree.chosen == [bot("Use a long random passphrase.")]
    # the v1 release adds harm categories and sources; the converter reads the same columns
    assert convert_pku(rows("pku_saferlhf.jsonl")[0], ("pku.jsonl", 0), label="pku-saferlhf").source == "pku-saferlhf"
    with pytest.raises(UserError, match=r"row 0: field 'safer_response_id': expected 0 or 1"):
        convert_pku({**row, "safer_response_id": 2}, ("pku.jsonl", 0))


# ---------------------------------------------------------------------------------------------------------------
# selection rules on hand-made lists
# ---------------------------------------------------------------------------------------------------------------
def shp_pair(pair_id, group, ratio):
    return Pair([user("q")], [bot(f"good {pair_id}")], [bot(f"bad {pair_id}")], "shp", pair_id, group=group,
                score_ratio=ratio)


def test_score_ratio_threshold_is_strict_at_the_boundary():
    pairs = [shp_pair("a", "p", 2.0), shp_pair("b", "p", 2.0000001), shp_pair("c", "p", 1.99), shp_pair("d", "p", 3.0)]
    kept, dropped = filter_score_ratio(pairs, 2.0)
    assert [p.id for p in kept] == ["b", "d"] and dropped == 2
    kept, dropped = filter_score_ratio(pairs, 1.5)
    assert [p.id for p in kept] == ["a", "b", "c", "d"] and dropped == 0


def test_per_prompt_cap():
    pairs = [shp_pair("p1-a", "p1", 2.5), shp_pair("p2-a", "p2", 3.0), shp_pair("p1-b", "p1", 8.0),
             shp_pair("p1-c", "p1", 3.0), shp_pair("p2-b", "p2", 4.0), shp_pair("p3-a", "p3", 9.0)]
    kept, dropped = cap_per_prompt(pairs, 1, "first")
    assert [p.id for p in kept] == ["p1-a", "p2-a", "p3-a"] and dropped == 3
    kept, dropped = cap_per_prompt(pairs, 2, "max_ratio")
    assert [p.id for p in kept] == ["p2-a", "p1-b", "p1-c", "p2-b", "p3-a"] and dropped == 1  # input order kept
    kept, dropped = cap_per_prompt(pairs, 5, "random", seed=1)
    assert kept == pairs and dropped == 0
    assert cap_per_prompt(pairs, None) == (pairs, 0)
    draws = set()
    for seed in range(20):
        kept, dropped = cap_per_prompt(pairs, 1, "random", seed=seed, source="shp")
        assert dropped == 3 and Counter(p.group for p in kept) == {"p1": 1, "p2": 1, "p3": 1}
        assert kept == cap_per_prompt(pairs, 1, "random", seed=seed, source="shp")[0]  # deterministic
        draws.add(tuple(p.id for p in kept))
    assert len(draws) > 1  # the seed matters


def ranked(scores, key="0"):
    return RankedPrompt([user("q")], [ScoredResponse(f"r{i}", s, str(i)) for i, s in enumerate(scores)], key)


def test_all_pairs_counts_orientation_and_ties():
    pairs = pairs_all(ranked([3.0, 4.5, 3.0, 2.0]), "uf")
    assert len(pairs) == 6
    assert [(p.chosen[0]["content"], p.rejected[0]["content"], p.tie) for p in pairs] == [
        ("r1", "r0", False), ("r0", "r2", True), ("r0", "r3", False),
        ("r1", "r2", False), ("r1", "r3", False), ("r2", "r3", False)]
    assert drop_ties(pairs)[1] == 1 and len(drop_ties(pairs, "keep")[0]) == 6
    assert len(pairs_all(ranked([1.0, None, 2.0, None, 3.0]), "uf")) == 3  # unscored responses take no part
    assert pairs_all(ranked([1.0]), "uf") == []


def test_best_vs_random():
    prompt = ranked([3.0, 4.5, 3.0, 2.0], key="row7")
    rejected = set()
    for seed in range(30):
        (pair,) = pairs_best_vs_random(prompt, "uf", seed)
        assert pair.chosen == [bot("r1")] and pair.chosen_score == 4.5
        rejected.add(pair.rejected[0]["content"])
        assert pairs_best_vs_random(prompt, "uf", seed) == [pair]  # same seed, same draw
    assert rejected == {"r0", "r2", "r3"}
    # a tie with the best: 'drop' keeps it flagged for the tie rule, 'resample' draws among strictly worse ones
    tied = ranked([4.0, 4.0, 1.0], key="k")
    flagged = {pairs_best_vs_random(tied, "uf", seed)[0].tie for seed in range(30)}
    assert flagged == {True, False}
    assert all(pairs_best_vs_random(tied, "uf", seed, "resample")[0].rejected == [bot("r2")] for seed in range(30))
    assert pairs_best_vs_random(ranked([2.0, 2.0]), "uf", 0, "resample")[0].tie  # all equal: still a tie
    assert pairs_best_vs_random(ranked([2.0, None]), "uf", 0) == []


def test_identical_and_empty_responses():
    same = Pair([user("q")], [bot("Paris.")], [bot(" Paris. ")], "x", "1")
    empty = Pair([user("q")], [bot("yes")], [bot("  ")], "x", "2")
    fine = Pair([user("q")], [bot("yes")], [bot("no")], "x", "3")
    assert drop_identical([same, empty, fine]) == ([empty, fine], 1)
    assert drop_empty([same, empty, fine]) == ([same, fine], 1)


def test_subsample_is_seeded_and_keeps_input_order():
    pairs = [Pair([user("q")], [bot(f"a{i}")], [bot(f"b{i}")], "pku", str(i)) for i in range(10)]
    kept, dropped = subsample(pairs, 4, seed=3, source="pku")
    assert len(kept) == 4 and dropped == 6
    assert [p.id for p in kept] == sorted((p.id for p in kept), key=int)
    assert kept == subsample(pairs, 4, seed=3, source="pku")[0]
    assert subsample(pairs, 50, seed=3) == (pairs, 0)


def test_prompt_validity():
    assert is_valid_prompt([{"role": "system", "content": "s"}, user("a"), bot("b"), user("c")])
    assert not is_valid_prompt([user("a"), user("b")])
    assert not is_valid_prompt([user("a"), bot("b")])


# ---------------------------------------------------------------------------------------------------------------
# recipes end to end on the fixtures
# ---------------------------------------------------------------------------------------------------------------
def run(tmp_path, name, **kwargs):
    kwargs.setdefault("source_dir", str(FIXTURES))
    manifest = main(ScriptArguments(output_dir=str(tmp_path / name), **kwargs))
    with open(tmp_path / name / "pairs.jsonl", encoding="utf-8") as handle:
        return manifest, [json.loads(line) for line in handle]


def assert_adds_up(manifest, out_rows):
    for label, entry in manifest["sources"].items():
        assert entry["input_rows"] == entry["rows_converted"] + sum(entry["dropped_rows"].values()), label
        assert entry["candidate_pairs"] == entry["kept"] + sum(entry["dropped_pairs"].values()), label
        assert sum(row["source"] == label for row in out_rows) == entry["kept"], label
    assert manifest["final_count"] == sum(e["kept"] for e in manifest["sources"].values()) == len(out_rows)


# Hand-counted from the fixtures (see the comments in each): source → (input rows, kept)
MIXTURE1 = {"hh-rlhf": (6, 3), "shp": (6, 2), "ultrafeedback": (4, 2), "helpsteer": (7, 1), "capybara": (3, 1),
            "orca": (4, 2)}
MIXTURE2 = {**MIXTURE1, "shp": (6, 4), "ultrafeedback": (4, 6), "helpsteer": (7, 5)}


@pytest.mark.parametrize("recipe, expected", [
    ("mixture1", MIXTURE1),
    ("mixture2", MIXTURE2),
    ("mixture3", {**MIXTURE2, "pku-saferlhf-30k": (3, 2)}),
    ("mixture4", {**MIXTURE2, "pku-saferlhf": (5, 5)}),
])
@pytest.mark.slow
def test_recipe_counts_add_up(tmp_path, recipe, expected):
    # mixture4 asks PKU-SafeRLHF for 150K pairs; the 5-row fixture only builds with --allow_short_sources
    manifest, out_rows = run(tmp_path, recipe, mixture=recipe, allow_short_sources=recipe == "mixture4")
    assert_adds_up(manifest, out_rows)
    assert {label: (e["input_rows"], e["kept"]) for label, e in manifest["sources"].items()} == expected
    for row in out_rows:
        assert is_valid_prompt(row["prompt"]) and row["chosen"][0]["role"] == "assistant"
    assert manifest["sources"]["shp"]["published_count"] == (55916 if recipe == "mixture1" else 109526)
    assert manifest["sources"]["shp"]["holds_fewer_rows_than_published"] is True  # a 6-row fixture


@pytest.mark.slow
def test_mixture1_rule_counts(tmp_path):
    manifest, out_rows = run(tmp_path, "m1", mixture="mixture1")
    sources = manifest["sources"]
    # HH: harmless-base and the test split are not read; row 3 has different human turns, row 2 has
    # "Paris." vs "Paris. ", online row 1 has an empty reply.
    assert sources["hh-rlhf"]["dropped_rows"] == {"prompt_mismatch": 1}
    assert sources["hh-rlhf"]["dropped_pairs"]["identical_responses"] == 1
    assert sources["hh-rlhf"]["dropped_pairs"]["empty_response"] == 1
    assert {row["subset"] for row in out_rows if row["source"] == "hh-rlhf"} == {"helpful-base", "helpful-online"}
    # SHP: ratios p1 (2.0, 2.5, 3.0, 8.0), p2 (2.01), p3 (2.0): two at exactly 2.0 fail "> 2", then p1 keeps 1 of 3.
    assert sources["shp"]["dropped_pairs"]["score_ratio<=2"] == 2
    assert sources["shp"]["dropped_pairs"]["per_prompt_cap"] == 2
    # UltraFeedback: the all-4.0 row always draws a tie; the single-completion row has no pair.
    assert sources["ultrafeedback"]["dropped_rows"] == {"fewer_than_two_scored_responses": 1}
    assert sources["ultrafeedback"]["dropped_pairs"]["ties"] == 1
    assert sources["ultrafeedback"]["responses_without_score"] == 1
    chosen_uf = sorted(row["chosen"][0]["content"] for row in out_rows if row["source"] == "ultrafeedback")
    assert chosen_uf == ["Guten Morgen.", "Rayleigh scattering favours short wavelengths."]
    # HelpSteer: prompt B's two responses tie at 2.0; prompt C has one response.
    assert sources["helpsteer"]["dropped_rows"] == {"fewer_than_two_scored_responses": 1}
    (helpsteer,) = [row for row in out_rows if row["source"] == "helpsteer"]
    assert helpsteer["chosen"] == [bot("A prince avenges his father's murder; nearly everyone dies.")]
    assert sources["orca"]["dropped_rows"] == {"unrated": 1} and sources["orca"]["dropped_pairs"]["ties"] == 1


@pytest.mark.slow
def test_mixture2_all_pairs_counts(tmp_path):
    manifest, _ = run(tmp_path, "m2", mixture="mixture2")
    uf, hs = manifest["sources"]["ultrafeedback"], manifest["sources"]["helpsteer"]
    # UF: 6 + 6 + 1 candidate pairs; ties: one in row 0 (3.0 vs 3.0) and all six of the all-4.0 row
    assert (uf["candidate_pairs"], uf["dropped_pairs"]["ties"], uf["kept"]) == (13, 7, 6)
    # HelpSteer: prompt A 4 responses (4, 3, 3, 1.5) → 6 pairs, 1 tie; prompt B → 1 pair, a tie
    assert (hs["candidate_pairs"], hs["dropped_pairs"]["ties"], hs["kept"]) == (7, 2, 5)
    assert manifest["sources"]["shp"]["dropped_pairs"]["per_prompt_cap"] == 0


@pytest.mark.slow
def test_flags_override_the_recipe(tmp_path):
    manifest, out_rows = run(tmp_path, "m4", mixture="mixture4", pku_max_pairs=2, pku_preference="agree",
                             ties="keep", sources=["pku_saferlhf", "orca"])
    pku = manifest["sources"]["pku-saferlhf"]
    # agree: rows 0 and 2 disagree (better 0, safer 1) → 3 left, sampled down to 2
    assert pku["dropped_rows"] == {"better_safer_disagree": 2}
    assert (pku["dropped_pairs"]["subsample"], pku["kept"]) == (1, 2)
    assert manifest["sources"]["orca"]["kept"] == 3  # the tie is kept
    assert list(manifest["sources"]) == ["pku-saferlhf", "orca"]
    assert manifest["options"]["pku_max_pairs"] == 2 and manifest["options"]["ultrafeedback_pairing"] == "all_pairs"


@pytest.mark.slow
def test_same_seed_gives_byte_identical_output(tmp_path):
    run(tmp_path, "a", mixture="mixture1", seed=7)
    run(tmp_path, "b", mixture="mixture1", seed=7)
    for name in ("pairs.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.loads((tmp_path / "a" / "run_info.json").read_text())["complete"] is True


@pytest.mark.slow
def test_decontamination_removes_planted_overlaps_only(tmp_path):
    clean, clean_rows = run(tmp_path, "plain", mixture="mixture1")
    manifest, out_rows = run(tmp_path, "decon", mixture="mixture1",
                             decontaminate_against=[str(FIXTURES / "rewardbench.jsonl")])
    assert_adds_up(manifest, out_rows)
    removed = {row["id"] for row in clean_rows} - {row["id"] for row in out_rows}
    # planted: the SHP baking post (p2, row 5) and Capybara's photosynthesis prompt (row 1). HH row 2 shares
    # only 12 consecutive words with a RewardBench prompt and stays.
    assert removed == {"shp:p2:5", "capybara:1"}
    assert [row for row in clean_rows if row["id"] not in removed] == out_rows
    report = manifest["decontamination"]
    assert (report["ngram"], report["eval_prompts"], report["eval_prompts_too_short"]) == (13, 4, 1)
    assert report["dropped_total"] == 2 and report["dropped_per_source"]["shp"] == 1
    _, twelve = run(tmp_path, "decon12", mixture="mixture1", decontamination_ngram=12,
                    decontaminate_against=[str(FIXTURES / "rewardbench.jsonl")])
    assert {row["id"] for row in clean_rows} - {row["id"] for row in twelve} == removed | {"hh-rlhf:helpful-base:2"}


def test_decontaminator_never_joins_words_across_messages():
    eval_prompt = [" ".join(f"w{i}" for i in range(6))]
    decontaminator = Decontaminator([eval_prompt], n=6)
    assert decontaminator.contaminated([user("x W0 w1, W2-w3 w4 w5 y")])
    assert not decontaminator.contaminated([user("w0 w1 w2"), bot("w3 w4 w5"), user("z")])


def test_hub_failure_is_one_line_asking_for_a_local_copy(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'stanfordnlp/SHP' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as info:
        main(ScriptArguments(output_dir=str(tmp_path / "out"), sources=["shp"]))
    message = str(info.value)
    assert "\n" not in message and "stanfordnlp/SHP" in message and "--shp_path" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_input_names_file_row_and_field(tmp_path):
    bad = tmp_path / "orca.jsonl"
    bad.write_text(json.dumps({**rows("orca.jsonl")[0], "rating": "high"}) + "\n")
    with pytest.raises(UserError, match=r"orca.jsonl: row 1: field 'rating': expected two ratings"):
        main(ScriptArguments(output_dir=str(tmp_path / "out"), orca_path=[str(bad)]))


@pytest.mark.slow
def test_yaml_config_and_cli_exit_code(tmp_path):
    from rlhfkit.cli import parse_args

    config = tmp_path / "recipe.yaml"
    config.write_text(f"recipe: mixture1\nsource_dir: {FIXTURES}\noutput_dir: {tmp_path / 'cfg'}\nseed: 3\n"
                      "shp_select: max_ratio\n")
    (args,) = parse_args((ScriptArguments,), ["--config", str(config)])
    assert (args.mixture, args.seed, args.shp_select) == ("mixture1", 3, "max_ratio")
    manifest = main(args)
    assert manifest["options"]["shp_select"] == "max_ratio"
    shp_p1 = [r for r in map(json.loads, (tmp_path / "cfg" / "pairs.jsonl").open()) if r["id"].startswith("shp:p1")]
    assert [r["chosen"][0]["content"] for r in shp_p1] == ["Dry it in the oven."]  # the ratio-8 comparison
    result = subprocess.run([sys.executable, str(ROOT / "prepare_data.py"), "--output_dir", str(tmp_path / "x"),
                             "--shp_path", str(FIXTURES / "shp.jsonl"), "--shp_select", "best"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --shp_select must be one of random, max_ratio, first, not 'best'"]


def test_resolve_options_precedence():
    assert resolve_options(None, {}).shp_max_pairs_per_prompt is None
    assert resolve_options("mixture1", {}).shp_max_pairs_per_prompt == 1
    assert resolve_options("mixture2", {"shp_max_pairs_per_prompt": 3}).shp_max_pairs_per_prompt == 3
    with pytest.raises(UserError, match="--ties must be one of"):
        resolve_options(None, {"ties": "flip"})


@pytest.mark.slow
def test_output_loads_through_the_shared_preference_loader(tmp_path):
    from rlhfkit.data import load_preferences

    _, out_rows = run(tmp_path, "m2", mixture="mixture2")
    data = load_preferences([str(tmp_path / "m2" / "pairs.jsonl")])
    assert len(data.rows) == len(out_rows)
    assert [(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in data.rows] == \
        [(r["prompt"], r["chosen"], r["rejected"], r["source"]) for r in out_rows]


@pytest.mark.slow
def test_sources_split_over_several_files_keep_unique_ids(tmp_path):
    shards = tmp_path / "shp"
    shards.mkdir()
    for name in ("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "test-00000-of-00001.jsonl"):
        (shards / name).write_text((FIXTURES / "shp.jsonl").read_text())
    manifest, out_rows = run(tmp_path, "out", shp_path=[str(shards)], shp_max_pairs_per_prompt=10)
    assert manifest["sources"]["shp"]["input_rows"] == 12  # the test split is not read
    assert len(out_rows) == 8 and len({row["id"] for row in out_rows}) == 8
    assert {row["id"] for row in out_rows} >= {"shp:p2:1.5", "shp:p2:2.5"}


@pytest.mark.slow
def test_hub_sources_are_loaded_by_name_and_hh_subset(tmp_path, monkeypatch):
    import datasets

    calls = []
    local = {"Anthropic/hh-rlhf": lambda data_dir: rows(f"hh_rlhf/{data_dir}/train.jsonl"),
             "argilla/distilabel-intel-orca-dpo-pairs": lambda data_dir: rows("orca.jsonl")}

    def fake_load_dataset(name, data_dir=None, split=None, revision=None):
        calls.append((name, data_dir, split, revision))
        if name == "Anthropic/hh-rlhf" and data_dir == "helpful-rejection-sampled":
            return datasets.Dataset.from_list([])  # not in the fixtures
        return datasets.Dataset.from_list(local[name](data_dir))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    import prepare_data

    monkeypatch.setattr(prepare_data, "resolve_hub_revision", lambda name, revision: f"sha-of-{name}@{revision}")
    manifest = main(ScriptArguments(output_dir=str(tmp_path / "out"), mixture="mixture1", sources=["hh_rlhf", "orca"],
                                    hub_revision=["orca=abc123"]))
    assert calls == [("Anthropic/hh-rlhf", "helpful-base", "train", "main"),
                     ("Anthropic/hh-rlhf", "helpful-online", "train", "main"),
                     ("Anthropic/hh-rlhf", "helpful-rejection-sampled", "train", "main"),
                     ("argilla/distilabel-intel-orca-dpo-pairs", None, "train", "abc123")]
    revisions = manifest["revisions"]
    assert revisions["hh-rlhf"]["requested"] == "main" and revisions["hh-rlhf"]["resolved"] == "sha-of-Anthropic/hh-rlhf@main"
    assert revisions["orca"]["requested"] == "abc123" and revisions["orca"]["note"] == "set by --hub_revision"
    assert {s: (e["input_rows"], e["kept"]) for s, e in manifest["sources"].items()} == \
        {"hh-rlhf": MIXTURE1["hh-rlhf"], "orca": MIXTURE1["orca"]}
    assert manifest["sources"]["orca"]["origin"] == ["argilla/distilabel-intel-orca-dpo-pairs@abc123[train]"]


# ---------------------------------------------------------------------------------------------------------------
# pinned revisions and counts the sources cannot fill
# ---------------------------------------------------------------------------------------------------------------
def test_every_hub_source_is_pinned_and_pku_to_its_first_release():
    from rlhfkit.mixtures.catalog import SOURCES

    for key, spec in SOURCES.items():
        if spec.hub_name:
            assert spec.revision and spec.revision_note, key
    assert SOURCES["pku_saferlhf"].revision == "v0"


@pytest.mark.slow
def test_recipe_asking_for_more_pairs_than_the_source_holds(tmp_path):
    with pytest.raises(UserError, match=r"asks for 150000 pairs .* holds only 5 .*revision 'v0'.*--allow_short_sources"):
        run(tmp_path, "m4", mixture="mixture4", sources=["pku_saferlhf"])
    manifest, out_rows = run(tmp_path, "m4b", mixture="mixture4", sources=["pku_saferlhf"], allow_short_sources=True)
    short = manifest["shortfalls"]["pku-saferlhf"]
    assert (short["requested"], short["available"], short["input_rows"]) == (150000, 5, 5)
    assert len(out_rows) == 5
    revision = manifest["revisions"]["pku-saferlhf"]
    assert revision["local_copy"] and revision["pinned_hub_revision"] == "v0"
    assert "holds_fewer_rows_than_published" not in manifest["sources"]["pku-saferlhf"]  # no published count


def test_hub_revision_flag_is_checked():
    from rlhfkit.mixtures.loading import parse_hub_revisions

    assert parse_hub_revisions(["pku_saferlhf=main"]) == {"pku_saferlhf": "main"}
    with pytest.raises(UserError, match="SOURCE=REVISION"):
        parse_hub_revisions(["pku_saferlhf"])
    with pytest.raises(UserError, match="not a hub source"):
        parse_hub_revisions(["lmflow=main"])
