"""The built-in tiny checkpoint: deterministic, cached, and a valid Hugging Face checkpoint transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_with_tokenizer import LABELS, TEXTS
from transformers import AutoModelForCausalLM, AutoTokenizer

from ncal_core.model.qwen import load_model
from ncal_core.model.tiny import build_tiny_checkpoint, tiny_checkpoint

# fp32 logits of the same weights through two implementations
RTOL_FP32 = 1e-4


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_tiny_checkpoint_and_agrees_with_our_model(tmp_path, tied):
    path = build_tiny_checkpoint(tmp_path / "tiny", TEXTS + LABELS, seed=3, vocab_size=400, hidden_size=64,
                                 num_layers=2, tied=tied)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert hf.config.model_type == "qwen2" and hf.config.tie_word_embeddings == tied
    assert torch.equal(hf.lm_head.weight, hf.model.embed_tokens.weight) == tied
    assert hf.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
    ours = load_model(path)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.lm_head(ours(ids))
    assert ((got - expected).abs().max() / expected.abs().max()) < RTOL_FP32


def test_tiny_checkpoint_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NCAL_CACHE_DIR", str(tmp_path / "cache"))
    kwargs = dict(seed=1, vocab_size=300, hidden_size=32, num_layers=1)
    first = tiny_checkpoint(TEXTS, **kwargs)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_checkpoint(TEXTS, **kwargs) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = build_tiny_checkpoint(tmp_path / "again", TEXTS, **kwargs)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (other / name).read_bytes(), name
    assert tiny_checkpoint(TEXTS, **{**kwargs, "seed": 2}) != first
    assert tiny_checkpoint(TEXTS, **{**kwargs, "tied": False}) != first


def test_a_new_tokenizer_version_never_reuses_a_cached_build(tmp_path, monkeypatch):
    monkeypatch.setenv("NCAL_CACHE_DIR", str(tmp_path / "cache"))
    kwargs = dict(seed=1, vocab_size=300, hidden_size=32, num_layers=1)
    first = tiny_checkpoint(TEXTS, **kwargs)
    monkeypatch.setattr("ncal_core.model.tiny.TOKENIZER_VERSION", "next")
    assert tiny_checkpoint(TEXTS, **kwargs) != first


@pytest.mark.parametrize("flag,tied", [("true", True), ("false", False)])
def test_train_builds_the_tiny_model_its_flags_describe(tmp_path, monkeypatch, flag, tied):
    from ncal_core.cli import parse_config
    from ncal_core.train.config import TrainConfig
    from ncal_core.train.setup import _base_model

    monkeypatch.setenv("NCAL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = parse_config(TrainConfig, ["--tiny_hidden_size", "32", "--tiny_num_layers", "1", "--tiny_vocab_size",
                                     "300", "--tiny_tied_embeddings", flag], "", "train")
    config = json.loads((_base_model(cfg, TEXTS) / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["tie_word_embeddings"]) == (32, 1, tied)
