"""A checkpoint folder's tokenizer, loaded without running code from the folder."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ncal_core.errors import NCALError, at

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A local tokenizer with a chat template and an eos token (never runs code from the folder)."""
    path = Path(path)
    if not path.is_dir() or not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise NCALError(f"{at(path)}: no tokenizer here (expected a folder with one of {', '.join(_TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NCALError(f"{at(path)}: cannot load the tokenizer: {reason}") from None
    if not tokenizer.chat_template:
        raise NCALError(f"{at(path, field='chat_template')}: the tokenizer has no chat template")
    if tokenizer.eos_token_id is None:
        raise NCALError(f"{at(path, field='eos_token')}: the tokenizer has no eos token")
    return tokenizer
