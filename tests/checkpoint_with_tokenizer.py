"""A random transformers Qwen2 checkpoint with a small trained tokenizer beside it: what infer/train tests load."""

from __future__ import annotations

from pathlib import Path

from random_checkpoints import make_hf_checkpoint

from ncal_core.model.tiny_tokenizer import train_tokenizer
from ncal_core.model.tokenizer import load_tokenizer

TEXTS = ["三角形的内角和是多少度？", "小明有5个苹果，吃了2个，还剩几个？", "读作：三千八百四十八",
         "把一个长方形分成两个正方形", "判断对错：钝角三角形", "比较大小：0.5和二分之一"] * 20
LABELS = ["回忆", "识别", "推断"]


def make_checkpoint_with_tokenizer(path: Path, *, seed: int = 0, **model_kwargs) -> Path:
    """Tokenizer (trained on TEXTS + LABELS) and a random HF Qwen2 whose vocabulary matches it, in `path`."""
    path.mkdir(parents=True, exist_ok=True)
    train_tokenizer(TEXTS + LABELS * 10, path, vocab_size=300)
    vocab = len(load_tokenizer(path))
    make_hf_checkpoint(path, vocab_size=vocab, seed=seed, **model_kwargs)
    return path
