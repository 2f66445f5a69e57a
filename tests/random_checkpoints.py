"""Tiny random Qwen2 / Qwen3 checkpoints saved by transformers itself, and how tests compare against them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM


def make_hf_checkpoint(
    path: str | Path,
    *,
    model_type: str = "qwen2",
    vocab_size: int = 200,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    tie: bool = False,
    attention_bias: bool = False,
    rope_theta: float = 1_000_000.0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    seed: int = 0,
) -> Path:
    """Save a random transformers Qwen2ForCausalLM / Qwen3ForCausalLM at `path` and return `path`.

    Norm weights and biases are moved away from ones and zeros so that a loader that drops them is caught.
    `attention_bias` only applies to qwen3 (qwen2 always has q/k/v biases).
    """
    path = Path(path)
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "tie_word_embeddings": tie,
        "rope_theta": rope_theta,
        "max_position_embeddings": 512,
        "initializer_range": 0.1,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if head_dim is not None:
        common["head_dim"] = head_dim
    if model_type == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif model_type == "qwen3":
        common.setdefault("head_dim", hidden_size // heads)
        model = Qwen3ForCausalLM(Qwen3Config(attention_bias=attention_bias, **common))
    else:
        raise ValueError(f"model_type {model_type!r}: qwen2 or qwen3")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| in fp32: the error measure the tolerance tables of the tests refer to."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def our_logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits [B, T, V] of an ncal_core QwenModel for ids [B, T], without gradients."""
    with torch.no_grad():
        return model.lm_head(model(ids, **kwargs))


def randomise_lora_b(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA B factor non-zero values (normal, `std`) so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
