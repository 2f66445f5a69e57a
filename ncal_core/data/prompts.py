"""Examples -> token ids: chat-template prompt + label ids + eos, cut to cutoff_len in the prompt (METHOD.md §1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ncal_core.data.rows import Example
from ncal_core.errors import NCALError

TRUNCATIONS = ("left", "middle")
# Stands in for the user's text while rendering, so the framing around it can be found; no data contains NUL bytes.
_PLACEHOLDER = "\x00ncal:text\x00"


@dataclass
class EncodedRow:
    """One example as ids: prompt + label ids + eos (no label part when unlabeled)."""

    input_ids: list[int]  # prompt ids + tok(label) + [eos_id]
    prompt_len: int  # targets are input_ids[prompt_len:]
    label_index: int  # index into labels, -1 when unlabeled
    example_id: str


def _cut(ids: list[int], keep: int, truncation: str) -> list[int]:
    """Keep `keep` of the ids: the last ones ("left" drops the earliest) or both ends ("middle")."""
    if len(ids) <= keep:
        return ids
    head = keep // 2 if truncation == "middle" else 0
    return ids[:head] + ids[len(ids) - (keep - head) :]


class PromptBuilder:
    """Renders examples with the tokenizer's chat template and turns them into training/scoring ids."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        labels: list[str],
        *,
        instruction: str | None = None,
        cutoff_len: int = 2048,
        truncation: str = "left",
    ) -> None:
        if truncation not in TRUNCATIONS:
            raise NCALError(f"truncation: must be one of {list(TRUNCATIONS)}, got {truncation!r}")
        if tokenizer.eos_token_id is None:
            raise NCALError(f"{tokenizer.name_or_path}: the tokenizer has no eos token")
        if not labels:
            raise NCALError("labels: at least one class name is needed")
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.instruction = instruction
        self.cutoff_len = cutoff_len
        self.truncation = truncation
        self.eos_id: int = tokenizer.eos_token_id
        # Labels are tokenised on their own so a class has the same ids whatever prompt precedes it.
        self.label_ids: list[list[int]] = [[*ids, self.eos_id] for ids in self._tokenize(self.labels)]
        self._label_index = {label: i for i, label in enumerate(self.labels)}
        # Every class must fit after the prompt, since scoring appends each of them in turn.
        self._prompt_budget = cutoff_len - max(map(len, self.label_ids))

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without special tokens added (the template writes its own)."""
        # transformers fails on an empty batch instead of returning one.
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def _messages(self, example: Example) -> list[dict]:
        """The turns to render: the instruction as system turn, unless the row brings its own."""
        if self.instruction is None or example.messages[0]["role"] == "system":
            return example.messages
        return [{"role": "system", "content": self.instruction}, *example.messages]

    def _render(self, messages: list[dict]) -> str:
        """Chat-template text of the turns with the generation prompt (thinking off where the template has it)."""
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=False, tokenize=False
        )

    def _truncated(self, messages: list[dict], where: str) -> list[int]:
        """Prompt ids cut to fit: only the last user turn's text loses tokens; framing and generation prompt stay."""
        turn = max(i for i, message in enumerate(messages) if message["role"] == "user")
        shown = [*messages[:turn], {**messages[turn], "content": _PLACEHOLDER}, *messages[turn + 1 :]]
        rendered = self._render(shown)
        if rendered.count(_PLACEHOLDER) != 1:
            raise NCALError(f"{where}: the chat template does not show the user's text verbatim, so it cannot be cut")
        before, after = rendered.split(_PLACEHOLDER)
        head, tail, text = self._tokenize([before, after, messages[turn]["content"]])
        keep = self._prompt_budget - len(head) - len(tail)
        if keep < 1:
            raise NCALError(
                f"{where}: cutoff_len {self.cutoff_len} is too small: the chat framing takes {len(head) + len(tail)} "
                f"tokens and the longest label {self.cutoff_len - self._prompt_budget}"
            )
        return head + _cut(text, keep, self.truncation) + tail

    def prompt_ids_all(self, examples: Sequence[Example]) -> list[list[int]]:
        """Prompt ids of many examples, tokenised in one batch."""
        conversations = [self._messages(example) for example in examples]
        ids = self._tokenize([self._render(messages) for messages in conversations])
        return [
            prompt if len(prompt) <= self._prompt_budget else self._truncated(messages, example.where)
            for example, messages, prompt in zip(examples, conversations, ids, strict=True)
        ]

    def prompt_ids(self, example: Example) -> list[int]:
        """Prompt ids of one example (chat template + generation prompt), cut to fit cutoff_len."""
        return self.prompt_ids_all([example])[0]

    def encode_all(self, examples: Sequence[Example]) -> list[EncodedRow]:
        """Training/scoring rows of many examples: prompt + label ids + eos."""
        return [
            self._row(example, prompt) for example, prompt in zip(examples, self.prompt_ids_all(examples), strict=True)
        ]

    def encode(self, example: Example) -> EncodedRow:
        """The training/scoring row of one example."""
        return self.encode_all([example])[0]

    def _row(self, example: Example, prompt: list[int]) -> EncodedRow:
        """Prompt ids joined with the example's label ids (none when unlabeled)."""
        if example.label is None:
            return EncodedRow(input_ids=prompt, prompt_len=len(prompt), label_index=-1, example_id=example.id)
        index = self._label_index.get(example.label)
        if index is None:
            raise NCALError(f"{example.where}: class {example.label!r} is not one of the labels {self.labels}")
        return EncodedRow(
            input_ids=prompt + self.label_ids[index], prompt_len=len(prompt), label_index=index, example_id=example.id
        )
