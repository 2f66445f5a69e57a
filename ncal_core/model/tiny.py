"""The built-in tiny Qwen2: a small checkpoint in Hugging Face layout, made offline and deterministically.

Its byte-level BPE is trained on the training texts, its weights are drawn from the seed, and it is
written once into a cache folder named by a hash of everything that went into it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from ncal_core.durable import cache_root, read_json, write_atomically, write_json
from ncal_core.model.qwen import ModelConfig, QwenModel, init_weights, save_model
from ncal_core.model.tiny_tokenizer import TOKENIZER_VERSION, train_tokenizer
from ncal_core.model.tokenizer import load_tokenizer


def tiny_config(vocab_size: int, hidden_size: int = 256, num_layers: int = 4, tied: bool = True) -> ModelConfig:
    """A Qwen2 shaped like the small Qwen2.5 models: GQA with 2 KV heads, head_dim 64, a tied head unless
    `tied` is False."""
    heads = max(1, hidden_size // 64)
    return ModelConfig(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=hidden_size // heads,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied, attention_bias=True,
        max_position_embeddings=4096,
    )


def build_tiny_checkpoint(folder: Path, texts: Sequence[str], *, seed: int, vocab_size: int = 4096,
                          hidden_size: int = 256, num_layers: int = 4, tied: bool = True) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and tokenizer_config.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(texts, folder, vocab_size=vocab_size)
    tokenizer = load_tokenizer(folder)
    model = QwenModel(tiny_config(len(tokenizer), hidden_size, num_layers, tied))
    init_weights(model, seed=seed)
    save_model(model, folder, dtype=torch.float32)
    hf = read_json(folder / "config.json")
    hf.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    write_json(folder / "config.json", hf)
    return folder


def tiny_checkpoint(texts: Sequence[str], *, seed: int, vocab_size: int = 4096, hidden_size: int = 256,
                    num_layers: int = 4, tied: bool = True) -> Path:
    """The cached tiny checkpoint for these texts and sizes, built on first use."""
    digest = hashlib.sha256(f"tokenizer-v{TOKENIZER_VERSION}\0".encode())  # a new tokenizer never reuses old builds
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    digest.update(f"{seed}/{vocab_size}/{hidden_size}/{num_layers}{'' if tied else '/untied'}".encode())
    target = cache_root() / "models" / f"tiny-qwen2-{digest.hexdigest()[:16]}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def fill(folder: Path) -> None:
        build_tiny_checkpoint(folder, texts, seed=seed, vocab_size=vocab_size, hidden_size=hidden_size,
                              num_layers=num_layers, tied=tied)

    return write_atomically(target, fill, replace=False)
