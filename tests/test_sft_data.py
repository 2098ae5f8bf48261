"""rlhfkit.train.sft_data: each input format, the --text_template split, one-line errors, dropped-row counts."""

import json

import pytest

from rlhfkit.errors import UserError
from rlhfkit.train.sft_data import TextTemplate, load_sft


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def test_messages_rows_pass_through_and_empty_assistant_is_dropped(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "system", "content": "be kind"}, U, A], "id": "x"},
        {"messages": [U]},  # nothing to learn
        {"messages": [U, {"role": "assistant", "content": "  "}]},
    ])
    data = load_sft(path)
    assert data.kind == "messages"
    assert data.rows == [{"messages": [{"role": "system", "content": "be kind"}, U, A]}]
    assert data.report["dropped"] == {"no assistant reply": 2}
    assert data.report["files"][path] == {"read": 3, "kept": 1}


def test_sharegpt_prompt_completion_and_pairs_become_messages(tmp_path):
    path = _jsonl(tmp_path / "mixed_chat.jsonl", [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"prompt": "hi", "completion": "hello"},
        {"prompt": [U], "completion": [A]},
        {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "go away"}]},
    ])
    data = load_sft(path)
    assert data.rows == [{"messages": [U, A]}] * 4


def test_hh_rlhf_raw_uses_the_chosen_dialogue(tmp_path):
    path = _jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: What is a cat?\n\nAssistant: A small animal.\n\nHuman: Thanks\n\nAssistant: You are welcome.",
         "rejected": "\n\nHuman: What is a cat?\n\nAssistant: No."},
        {"chosen": "\n\nHuman: hello\n\nAssistant: hi\n\nHuman: bye", "rejected": "\n\nHuman: hello"},
    ])
    data = load_sft(path)
    assert data.rows == [{"messages": [
        {"role": "user", "content": "What is a cat?"}, {"role": "assistant", "content": "A small animal."},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."},
    ]}]
    assert sum(data.report["dropped"].values()) == 1


def test_every_preference_format_gives_its_chosen_dialogue(tmp_path):
    """rlhfkit.data's format table decides: RLHFlow conversations and LMFlow positive texts are preference rows too,
    and a prompt repeated inside chosen (TRL style) is not doubled."""
    system = {"role": "system", "content": "be kind"}
    path = _jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "no"}]},
        {"positive": "###System: be kind###Human: hi###Assistant: hello", "negative": "###Human: hi###Assistant: no"},
        {"prompt": [U], "chosen": [U, A]},
        {"chosen": [U]},  # RLHFlow-style, with no reply
    ])
    data = load_sft(path)
    assert data.rows == [{"messages": [U, A]}, {"messages": [system, U, A]}, {"messages": [U, A]}]
    assert data.report["dropped"] == {"chosen dialogue does not end with an assistant turn": 1}
    bad = _jsonl(tmp_path / "bad.jsonl", [{"positive": "no tags here"}])
    with pytest.raises(UserError, match=r"row 1: field 'positive': text before the first '###Human:'"):
        load_sft(bad)


def test_plain_text_and_lmflow(tmp_path):
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "a story"}, {"text": ""}])
    data = load_sft(text)
    assert (data.kind, data.rows, data.report["dropped"]) == ("text", [{"text": "a story"}], {"empty text": 1})

    lmflow = tmp_path / "lmflow.json"
    lmflow.write_text(json.dumps({"type": "text_only", "instances": [{"text": "one"}, {"text": "two"}]}))
    assert load_sft(str(lmflow)).rows == [{"text": "one"}, {"text": "two"}]

    t2t = tmp_path / "t2t.json"
    t2t.write_text(json.dumps({"type": "text2text", "instances": [{"input": "hi", "output": "hello"}]}))
    assert load_sft(str(t2t)).rows == [{"messages": [U, A]}]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "image_text", "instances": [{"images": []}]}))
    with pytest.raises(UserError, match=r"bad.json: field 'type': LMFlow type 'image_text' is not SFT data"):
        load_sft(str(bad))


def test_text_template_splits_prompt_and_completion(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [{"question": "Why?", "response": "Because.", "extra": 1},
                                          {"question": "Empty?", "response": " "}])
    data = load_sft(path, text_template="Question: {question}\\n\\nAnswer: {response}")
    assert data.kind == "prompt_completion"
    assert data.rows == [{"prompt": "Question: Why?\n\nAnswer:", "completion": " Because."}]
    assert data.report["dropped"] == {"empty response": 1}

    template = TextTemplate.parse("Q: {q}\nA: {a} [end]")
    assert template.apply({"q": "x", "a": "y"}, "f", 0) == {"prompt": "Q: x\nA:", "completion": " y [end]"}
    with pytest.raises(UserError, match=r"^f: row 3: field 'a': missing"):
        template.apply({"q": "x"}, "f", 3)
    with pytest.raises(UserError, match="names no field"):
        TextTemplate.parse("no fields")
    with pytest.raises(UserError, match="must be named"):
        TextTemplate.parse("Q: {}")


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "bot", "content": "x"}]}, r"row 2: field 'messages': message 0: role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"row 2: field 'messages': message 0: 'content' must be a string"),
    ({"messages": "hi"}, r"row 2: field 'messages': must be a non-empty list"),
    ({"prompt": [U], "completion": [U]}, r"row 2: field 'completion': must contain only assistant"),
    ({"prompt": None, "completion": "x"}, r"row 2: field 'prompt': is missing"),
    ({"text": 5}, r"row 2: field 'text': must be a string"),
    ({"question": "q"}, r"row 2: no SFT fields found"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, r"row 2: field 'conversations': turn 0: speaker 'alien'"),
])
def test_malformed_rows_are_one_line_errors_naming_file_row_field(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"messages": [U, A]}, row])
    with pytest.raises(UserError, match=message) as info:
        load_sft(path)
    assert str(info.value).startswith(path)
    assert "\n" not in str(info.value)


def test_mixing_chat_and_text_is_refused_and_missing_file(tmp_path):
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [U, A]}])
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match=r"text.jsonl: row 1: a plain-text row in data that so far held chat rows"):
        load_sft([chat, text])
    with pytest.raises(UserError, match="not found"):
        load_sft(str(tmp_path / "nope.jsonl"))
    empty = _jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(UserError, match=r"no usable SFT rows \(1 empty text\)"):
        load_sft(empty)


def test_sampled_sources_and_skip_invalid(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(10)])
    sampled = load_sft(f"{path}:3", seed=1)
    assert len(sampled.rows) == 3
    assert sampled.rows == load_sft(f"{path}:3", seed=1).rows
    assert set(r["text"] for r in sampled.rows) <= {f"row {i}" for i in range(10)}
    assert sampled.report["files"][f"{path}:3"] == {"read": 10, "kept": 3}

    mixed = _jsonl(tmp_path / "m.jsonl", [{"messages": [U, A]}, {"messages": [{"role": "bot", "content": "x"}]},
                                          {"messages": [U]}])
    data = load_sft(mixed, skip_invalid=True)
    assert data.rows == [{"messages": [U, A]}]
    assert data.report["dropped"] == {"invalid": 1, "no assistant reply": 1}


# ---------------------------------------------------------------------------------------------------------------
# assistant_token_mask: assistant-only loss by incremental rendering
# ---------------------------------------------------------------------------------------------------------------
def _tokenizer(tiny_llama_dir, template):
    from rlhfkit.models import load_tokenizer

    return load_tokenizer(tiny_llama_dir, template)


def _trained(tokenizer, ids, mask):
    return ["".join(tokenizer.decode([t]) for t, m in zip(ids, mask) if m)]


def test_assistant_mask_takes_a_token_merged_across_the_generation_prompt(tiny_llama_dir):
    from rlhfkit.train.sft_data import assistant_token_mask

    # the generation prompt ends in a space, which BPE merges into the reply's first word (" hello")
    tokenizer = _tokenizer(tiny_llama_dir, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                           "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, mask = assistant_token_mask(tokenizer, [U, A, U, {"role": "assistant", "content": "good day"}])
    assert ids == tokenizer.apply_chat_template([U, A, U, {"role": "assistant", "content": "good day"}],
                                                return_dict=True)["input_ids"]
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    # no EOS in this template: the newline after a reply is how a turn ends, so it is trained
    assert _trained(tokenizer, ids, mask) == [" hello\n good day\n"]


def test_assistant_mask_refuses_templates_that_do_not_render_incrementally(tiny_llama_dir):
    from rlhfkit.train.sft_data import assistant_token_mask, tokenize_assistant_only

    counted = _tokenizer(tiny_llama_dir,
                         "{{ messages | length }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ValueError, match="not a prefix"):
        assistant_token_mask(counted, [U, A])
    with pytest.raises(UserError, match=r"conversation 2: .*not a prefix.*--assistant_only_loss false"):
        tokenize_assistant_only([{"messages": [A]}, {"messages": [U, A]}],
                                _tokenizer(tiny_llama_dir, "{% if messages | length == 2 %}x{% endif %}"
                                                           "{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    silent = _tokenizer(tiny_llama_dir, "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}"
                                        "{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="adds no tokens"):
        assistant_token_mask(silent, [U, A])
    strict = _tokenizer(tiny_llama_dir, "{% if messages[-1]['role'] != 'assistant' %}{{ raise_exception('no') }}"
                                        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match="rendering the turns before message 1 fails"):
        assistant_token_mask(strict, [U, A])
