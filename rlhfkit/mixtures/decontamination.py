"""Decontamination against an evaluation set: a training prompt sharing an n-gram of words with any evaluation
prompt (RewardBench rows, canonical pairs or prompt rows) is dropped and counted (`prepare_data.py
--decontaminate_against`, `--decontamination_ngram`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhfkit.files import read_records
from rlhfkit.errors import UserError, where
from rlhfkit.mixtures.loading import data_files
from rlhfkit.mixtures.sources import required_field

if TYPE_CHECKING:
    from rlhfkit.mixtures.sources import Pair


# ---------------------------------------------------------------------------------------------------------------
# decontamination against an evaluation set
# ---------------------------------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation and spacing differences must not hide an overlap."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[start:start + n]) for start in range(len(tokens) - n + 1))


def prompt_texts(prompt: Any) -> list[str]:
    """The texts of an evaluation prompt: a string (RewardBench) or a list of messages (canonical)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        return [message["content"] for message in prompt]
    raise ValueError("expected a string or a list of {role, content} messages")


class Decontaminator:
    """Flags a training prompt that shares an n-gram of `n` words with any evaluation prompt.

    N-grams never span two messages. Evaluation prompts shorter than `n` words cannot be matched and are counted
    in `eval_prompts_too_short` so the report says so instead of pretending they were checked.
    """

    def __init__(self, eval_prompts: Iterable[list[str]], n: int = 13):
        if n < 1:
            raise UserError(f"--decontamination_ngram must be >= 1, not {n}")
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.eval_prompts = 0
        self.eval_prompts_too_short = 0
        for texts in eval_prompts:
            self.eval_prompts += 1
            found = False
            for text in texts:
                grams = set(ngrams(words(text), n))
                found = found or bool(grams)
                self.grams |= grams
            if not found:
                self.eval_prompts_too_short += 1
        self._first_words = {gram[0] for gram in self.grams}
        self._memo: dict[tuple, bool] = {}  # all-pairs recipes repeat each prompt up to six times

    def contaminated(self, prompt: list[dict]) -> bool:
        key = tuple((message["role"], message["content"]) for message in prompt)  # str hashes are cached
        if key not in self._memo:
            self._memo[key] = any(self._text_hits(message["content"]) for message in prompt)
        return self._memo[key]

    def _text_hits(self, text: str) -> bool:
        tokens = words(text)
        n = self.n
        return any(tokens[start] in self._first_words and tuple(tokens[start:start + n]) in self.grams
                   for start in range(len(tokens) - n + 1))


def decontaminate(pairs: list[Pair], decontaminator: Decontaminator) -> tuple[list[Pair], int]:
    kept = [pair for pair in pairs if not decontaminator.contaminated(pair.prompt)]
    return kept, len(pairs) - len(kept)


def load_eval_prompts(path: str) -> list[list[str]]:
    """Prompts of an evaluation file (RewardBench rows, canonical pairs or prompt rows): its `prompt` field."""
    file = Path(path)
    if not file.exists():
        raise UserError(f"{path}: --decontaminate_against file not found")
    rows = []
    for data_file in data_files(file, "") if file.is_dir() else [file]:
        rows += [(str(data_file), number, row) for number, row in enumerate(read_records(data_file), start=1)]
    prompts = []
    for file_name, number, row in rows:
        prompt = required_field(row, "prompt", (file_name, number))
        try:
            prompts.append(prompt_texts(prompt))
        except ValueError as exc:
            raise UserError(f"{where(file_name, number, 'prompt')}: {exc}") from None
    return prompts
