"""Tokenisation pitfalls: double BOS, pad == EOS, truncation that keeps responses whole."""

from tokenizers import processors

from rlhfkit.builtin_models import train_tiny_tokenizer
from rlhfkit.models import ensure_pad_token
from rlhfkit.tokenization import render_ids, set_chat_template, tokenize_pair

CONVERSATION = [{"role": "user", "content": "Tell me about the sea."}, {"role": "assistant", "content": "The sea is kind."}]


def bos_adding_tokenizer():
    """A Llama-like tokenizer: its template prints BOS *and* its post-processor adds one when encoding text."""
    tokenizer = train_tiny_tokenizer()
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)])
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    return tokenizer


def test_render_ids_has_one_bos_where_text_round_trip_has_two():
    tokenizer = bos_adding_tokenizer()
    ids = render_ids(tokenizer, CONVERSATION)
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    naive = tokenizer(text)["input_ids"]
    assert naive[:2] == [tokenizer.bos_token_id] * 2  # the pitfall we avoid


def test_default_template_is_prefix_consistent_and_used_when_missing():
    tokenizer = train_tiny_tokenizer()
    tokenizer.chat_template = None
    assert set_chat_template(tokenizer) == "default"
    prompt = render_ids(tokenizer, CONVERSATION[:1], add_generation_prompt=True)
    full = render_ids(tokenizer, CONVERSATION)
    assert full[: len(prompt)] == prompt
    assert tokenizer.decode(full[len(prompt):], skip_special_tokens=True).strip() == "The sea is kind."


def test_pad_equal_to_eos_is_replaced_and_config_updated(tiny_llama_dir):
    from transformers import AutoModelForSequenceClassification

    tokenizer = train_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1)
    model.config.pad_token_id = None
    action = ensure_pad_token(tokenizer, model)
    assert tokenizer.pad_token != tokenizer.eos_token and "reused" in action
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_pad_added_when_vocab_has_no_candidate(tiny_llama_dir):
    from transformers import AutoModelForSequenceClassification

    tokenizer = train_tiny_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir, num_labels=1)
    vocab_before = len(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    # make every candidate unavailable: only the added pad is left
    import rlhfkit.models as models

    saved = models._PAD_CANDIDATES
    models._PAD_CANDIDATES = ("<|not-in-vocab|>",)
    try:
        action = ensure_pad_token(tokenizer, model)
    finally:
        models._PAD_CANDIDATES = saved
    assert action.startswith("added") and tokenizer.pad_token != tokenizer.eos_token
    assert len(tokenizer) >= vocab_before
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_left_prompt_truncation_keeps_both_responses_and_same_prompt_cut():
    tokenizer = train_tiny_tokenizer()
    row = {"prompt": [{"role": "user", "content": "the sea " * 40 + "why?"}],
           "chosen": [{"role": "assistant", "content": "good kind warm"}],
           "rejected": [{"role": "assistant", "content": "bad"}]}
    full_chosen = render_ids(tokenizer, row["prompt"] + row["chosen"])
    pair = tokenize_pair(tokenizer, row, max_length=30, truncation="left_prompt")
    assert pair.truncated and len(pair.chosen_ids) <= 30 and len(pair.rejected_ids) <= 30
    prefix_len = len(render_ids(tokenizer, row["prompt"], add_generation_prompt=True))
    chosen_response = full_chosen[prefix_len:]
    assert pair.chosen_ids[-len(chosen_response):] == chosen_response
    prompt_chosen = pair.chosen_ids[: len(pair.chosen_ids) - len(chosen_response)]
    rejected_response_len = len(render_ids(tokenizer, row["prompt"] + row["rejected"])) - prefix_len
    prompt_rejected = pair.rejected_ids[: len(pair.rejected_ids) - rejected_response_len]
    assert prompt_chosen == prompt_rejected  # the same cut on both sides
    dropped = tokenize_pair(tokenizer, row, max_length=30, truncation="drop")
    assert dropped.dropped == "too_long"
    impossible = tokenize_pair(tokenizer, row, max_length=5, truncation="left_prompt")
    assert impossible.dropped == "response_too_long"
