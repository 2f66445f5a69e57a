"""A small byte-level BPE tokenizer with Qwen's ChatML turns, trained offline and deterministically, for tiny models."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from ncal_core.durable import write_json

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]

# ChatML as Qwen2.5 writes it, but without a default system turn when the messages bring none.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Bumped whenever a change here changes what training writes; it is part of the tiny checkpoint's cache key.
TOKENIZER_VERSION = 2

# The chat roles are in every prompt; shown to the trainer this often they become one token each
# instead of one token per letter.
_ROLES = ("system", "user", "assistant")
_ROLE_WEIGHT = 1000


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4096) -> None:
    """Train a byte-level BPE on texts and write tokenizer.json + tokenizer_config.json loadable by AutoTokenizer."""
    tokenizer = Tokenizer(models.BPE())
    # Qwen's own normalizer and pre-split, as transformers' Qwen2Tokenizer sets them: the checkpoint says qwen2, so
    # AutoTokenizer loads the folder as Qwen2Tokenizer, which replaces these two with its own whatever the file says.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(itertools.chain(texts, _ROLES * _ROLE_WEIGHT), trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out_dir / "tokenizer_config.json", config)
