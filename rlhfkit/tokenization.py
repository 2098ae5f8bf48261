"""Chat templates and tokenisation of conversations, done once and the same way in every stage.

Conversations are tokenised with `apply_chat_template(tokenize=True)`: rendering to text and tokenising again adds
a second BOS on templates that print one (worth ~1 RewardBench point).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# For tokenizers without a template (encoders such as BERT/MiniLM, base LMs). Prefix-consistent: the rendering of a
# prompt with add_generation_prompt=True is a prefix of the rendering of prompt + response, which truncation and
# response masks rely on. `{% generation %}` marks assistant tokens for TRL's assistant-only loss.
DEFAULT_CHAT_TEMPLATE = (
    "{%- if cls_token is defined and cls_token %}{{ cls_token }}"
    "{%- elif bos_token is defined and bos_token %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] }}"
    "{%- if eos_token is defined and eos_token %}{{ eos_token }}{% endif %}{% endgeneration %}{{ '\n\n' }}"
    "{%- else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ 'Assistant: ' }}{% endif -%}"
)


def set_chat_template(tokenizer, chat_template: str | None = None) -> str:
    """Give the tokenizer a template: `chat_template` (string or file) if given, else keep its own, else the default.

    Returns where the template came from ("argument", "tokenizer" or "default"), recorded in run_info.json.
    """
    if chat_template:
        if os.path.isfile(chat_template):
            with open(chat_template, encoding="utf-8") as handle:
                chat_template = handle.read()
        tokenizer.chat_template = chat_template
        return "argument"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    logger.info("tokenizer has no chat template: using rlhfkit's default 'User:/Assistant:' template")
    return "default"


def render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a conversation under the tokenizer's chat template (tokenised once, no double BOS)."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    ids = list(encoded["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:  # a template that adds BOS twice
        ids = ids[1:]
    return ids


def render_text(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@dataclass
class TokenizedPair:
    chosen_ids: list[int] | None
    rejected_ids: list[int] | None
    truncated: bool = False
    dropped: str | None = None  # why the pair was dropped, or None


def tokenize_pair(tokenizer, row: dict, max_length: int | None, truncation: str = "left_prompt") -> TokenizedPair:
    """Tokenise a canonical preference row (prompt/chosen/rejected message lists).

    `truncation`: "left_prompt" keeps both responses whole and cuts the shared prompt from the left, by the same
    amount for both, so the pair still differs only in the response; "drop" drops pairs longer than `max_length`.
    """
    chosen = render_ids(tokenizer, row["prompt"] + row["chosen"])
    rejected = render_ids(tokenizer, row["prompt"] + row["rejected"])
    if max_length is None or max(len(chosen), len(rejected)) <= max_length:
        return TokenizedPair(chosen, rejected)
    if truncation == "drop":
        return TokenizedPair(None, None, dropped="too_long")
    prefix = render_ids(tokenizer, row["prompt"], add_generation_prompt=True)
    if chosen[: len(prefix)] != prefix or rejected[: len(prefix)] != prefix:
        # the template is not prefix-consistent, so prompt and response tokens cannot be told apart
        return TokenizedPair(None, None, dropped="too_long_unsplittable")
    head = prefix[:1] if prefix and prefix[0] in set(tokenizer.all_special_ids) else []  # keep BOS/CLS first
    chosen_response, rejected_response = chosen[len(prefix):], rejected[len(prefix):]
    room = max_length - len(head) - max(len(chosen_response), len(rejected_response))
    if room <= 0:
        return TokenizedPair(None, None, dropped="response_too_long")
    kept_prompt = prefix[len(head):][-room:]
    return TokenizedPair(head + kept_prompt + chosen_response, head + kept_prompt + rejected_response, truncated=True)
