"""The hand-written Qwen2/Qwen3 decoder against transformers on tiny random checkpoints, plus load/save errors.

Tolerances (max |ours - ref| / max |ref| over the compared logits or hidden states):
  fp32: 1e-4 (measured ~1e-6 against transformers' eager attention).
  bf16 (both sides loaded in bf16, transformers' SDPA attention): 1e-2; measured 0 (same kernels, same order),
       the bound is about one bf16 ulp (7.8e-3) so a change of SDPA kernel does not break the test.
  Identities of our own model (attn_mask vs causal, checkpointing, packed vs separate, ragged vs padded):
  1e-5 in fp32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from random_checkpoints import make_hf_checkpoint, our_logits, rel_err
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM

from ncal_core.data.batching import ragged_layout
from ncal_core.errors import NCALError
from ncal_core.evaluation.scoring import score_labels
from ncal_core.model import qwen as model_module
from ncal_core.model.qwen import ModelConfig, QwenModel, build_mask, init_weights, load_model, save_model, sdpa

FP32_TOL = 1e-4
BF16_TOL = 1e-2
SELF_TOL = 1e-5

CHECKPOINTS = {
    "qwen2_gqa_untied": {},
    "qwen2_mha_tied": {"kv_heads": 4, "tie": True},
    "qwen2_sharded": {"max_shard_size": 150_000},
    "qwen3_head_dim_32": {"model_type": "qwen3", "head_dim": 32},
    "qwen3_attention_bias": {"model_type": "qwen3", "attention_bias": True, "tie": True},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved transformers checkpoint per architecture variant."""
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_checkpoint(root / name, **kwargs) for name, kwargs in CHECKPOINTS.items()}


def hf_logits(path: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32, impl: str = "eager", **kwargs):
    """Reference logits [B, T, V] from transformers' own model class."""
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=impl)
    with torch.no_grad():
        return ref(input_ids=ids, **kwargs).logits


def random_ids(B: int = 2, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 200, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_fp32_logits_match_transformers(checkpoints: dict[str, Path], name: str) -> None:
    ids = random_ids()
    assert rel_err(our_logits(load_model(checkpoints[name]), ids), hf_logits(checkpoints[name], ids)) < FP32_TOL


def test_tied_checkpoint_shares_embedding_and_head(tmp_path: Path) -> None:
    path = make_hf_checkpoint(tmp_path / "ck", tie=True)
    model = load_model(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    # some tied releases still carry a copy of the head; like transformers, it is ignored
    tensors = load_file(path / "model.safetensors")
    save_file(tensors | {"lm_head.weight": torch.zeros(200, 64)}, path / "model.safetensors", metadata={"format": "pt"})
    again = load_model(path)
    assert again.lm_head.weight is again.embed_tokens.weight
    assert torch.equal(again.embed_tokens.weight, model.embed_tokens.weight)


def test_qwen3_attention_bias_covers_o_proj(checkpoints: dict[str, Path]) -> None:
    with_bias = load_model(checkpoints["qwen3_attention_bias"]).layers[0].self_attn
    without = load_model(checkpoints["qwen3_head_dim_32"]).layers[0].self_attn
    assert with_bias.q_proj.bias is not None and with_bias.o_proj.bias is not None
    assert without.q_proj.bias is None and without.o_proj.bias is None
    assert without.q_proj.out_features == 4 * 32


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "qwen3_head_dim_32"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_matches_transformers_on_real_positions(
    checkpoints: dict[str, Path], name: str, side: str
) -> None:
    ids = random_ids(T=10)
    mask = torch.ones_like(ids)
    if side == "right":
        mask[1, 6:] = 0
    else:
        mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generation uses for left padding
    model = load_model(checkpoints[name])
    with torch.no_grad():
        hidden = model(ids, attention_mask=mask, position_ids=positions)
    assert not hidden.isnan().any()  # padding rows that see no real key must not poison anything
    ours = model.lm_head(hidden)
    ref = hf_logits(checkpoints[name], ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert rel_err(ours[real], ref[real]) < FP32_TOL
    # the padded row equals the same tokens run alone, without padding
    alone = our_logits(model, ids[1:, real[1]])
    assert rel_err(ours[1, real[1]], alone[0]) < FP32_TOL


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "qwen3_head_dim_32"])
@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_ragged_batch_matches_transformers_and_the_padded_gradients(
    checkpoints: dict[str, Path], name: str, blocks: int, checkpointing: bool
) -> None:
    lens = [11, 9, 9, 4, 2]  # longest-first, as the training batches come
    ids = random_ids(B=len(lens), T=lens[0], seed=3)
    mask = (torch.arange(lens[0])[None, :] < torch.tensor(lens)[:, None]).long()
    ragged = ragged_layout(lens, lens[0], max_blocks=blocks, block_cost=0)
    assert len(ragged.blocks) == blocks
    model = load_model(checkpoints[name]).train()  # no dropout in the plain model: train() changes nothing here
    model.gradient_checkpointing = checkpointing
    weights = torch.randn(lens[0], model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    def run(**kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        hidden = model(ids, **kwargs)
        (hidden * weights * mask[..., None]).sum().backward()  # a loss on the real positions only
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    hidden, grads = run(ragged=ragged)
    padded, padded_grads = run(attention_mask=mask)
    real = mask.bool()
    assert rel_err(model.lm_head(hidden)[real].detach(), hf_logits(checkpoints[name], ids, attention_mask=mask)[real]) \
        < FP32_TOL
    assert rel_err(hidden[real], padded[real]) < SELF_TOL
    assert hidden[~real].abs().max() == 0  # the pads' hidden states are zeros
    assert grads.keys() == padded_grads.keys() and len(grads) > 20
    for n in grads:
        torch.testing.assert_close(grads[n], padded_grads[n], rtol=SELF_TOL, atol=1e-6, msg=n)


def test_ragged_takes_no_other_mask(checkpoints: dict[str, Path]) -> None:
    model = load_model(checkpoints["qwen2_gqa_untied"])
    ids = random_ids(B=1, T=4)
    with pytest.raises(ValueError, match="ragged describes right padding"):
        model(ids, attention_mask=torch.ones_like(ids), ragged=ragged_layout([4], 4, 1, 0))


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "qwen3_attention_bias"])
def test_bf16_logits_match_transformers_bf16(checkpoints: dict[str, Path], name: str) -> None:
    ids = random_ids(T=16)
    ours = our_logits(load_model(checkpoints[name], dtype=torch.bfloat16), ids)
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours, hf_logits(checkpoints[name], ids, dtype=torch.bfloat16, impl="sdpa")) < BF16_TOL


def test_autocast_bf16_matches_transformers_and_backpropagates(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen3_head_dim_32"]
    ids = random_ids(T=16)
    model = load_model(path)
    for name, param in model.named_parameters():
        param.requires_grad_(".self_attn." in name)  # only some parameters train, as under LoRA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model(ids)
        ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        with torch.no_grad():
            ref_logits = ref(input_ids=ids).logits
        logits = model.lm_head(hidden)
    assert rel_err(logits.detach(), ref_logits) < BF16_TOL
    logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.isfinite().all() for g in grads.values())
    assert model.embed_tokens.weight.grad is None


def test_mask_gives_every_query_row_a_key() -> None:
    # Some SDPA backends return NaN for a query row that may attend to nothing (left padding).
    attention_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = build_mask(attention_mask, None, 2, 4, torch.device("cpu"))[:, 0]
    assert mask.any(-1).all()
    assert torch.equal(mask[0, 2:], torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool))
    assert torch.equal(mask[1], torch.ones(4, 4, dtype=torch.bool).tril())
    assert build_mask(torch.ones(2, 4), None, 2, 4, torch.device("cpu")) is None  # no padding: SDPA's is_causal


def test_causal_attn_mask_equals_default_path(checkpoints: dict[str, Path]) -> None:
    model = load_model(checkpoints["qwen2_gqa_untied"])
    ids = random_ids()
    B, T = ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    with torch.no_grad():
        assert rel_err(model(ids, attn_mask=causal), model(ids)) < SELF_TOL


@pytest.mark.parametrize("name", ["qwen2_gqa_untied", "qwen3_head_dim_32"])
def test_block_mask_scores_continuations_like_separate_runs(checkpoints: dict[str, Path], name: str) -> None:
    model = load_model(checkpoints[name])
    prompt, first, second = random_ids(1, 6, seed=1)[0], random_ids(1, 3, seed=2)[0], random_ids(1, 2, seed=3)[0]
    P, A, C = len(prompt), len(first), len(second)
    packed = torch.cat([prompt, first, second])[None]
    T = P + A + C
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:, :P] = True  # everyone sees the prompt ...
    mask[:P, :P] = torch.ones(P, P, dtype=torch.bool).tril()  # ... causally
    mask[P : P + A, P : P + A] = torch.ones(A, A, dtype=torch.bool).tril()
    mask[P + A :, P + A :] = torch.ones(C, C, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(P), torch.arange(P, P + A), torch.arange(P, P + C)])[None]
    with torch.no_grad():
        hidden = model(packed, position_ids=positions, attn_mask=mask[None])[0]
        alone_first = model(torch.cat([prompt, first])[None])[0]
        alone_second = model(torch.cat([prompt, second])[None])[0]
    assert rel_err(hidden[:P], alone_first[:P]) < SELF_TOL
    assert rel_err(hidden[P : P + A], alone_first[P:]) < SELF_TOL
    assert rel_err(hidden[P + A :], alone_second[P:]) < SELF_TOL


def sdpa_inputs(style: str) -> dict:
    """The model's keyword inputs of each way training and scoring call it, for a [3, 10] batch."""
    lens = [10, 7, 4]
    right = (torch.arange(10)[None, :] < torch.tensor(lens)[:, None]).long()
    left = right.flip(-1)
    return {
        "causal": {},
        "right_padded": {"attention_mask": right},
        "left_padded": {"attention_mask": left, "position_ids": (left.cumsum(-1) - 1).clamp(min=0)},
        "ragged": {"ragged": ragged_layout(lens, 10, max_blocks=2, block_cost=0)},
    }[style]


def forward_backward(model: QwenModel, style: str) -> None:
    """One training-style step (style: a key of sdpa_inputs) or one scoring pass (style "scoring")."""
    if style == "scoring":  # the block attn_mask + position_ids of score_labels, under no_grad
        score_labels(model, [[5, 6, 7, 8], [9, 10]], [[11, 2], [12, 13, 2], [14, 15, 16, 2]], batch_size=2)
        return
    model.train()
    model.lm_head(model(random_ids(B=3, T=10), **sdpa_inputs(style))).float().logsumexp(-1).mean().backward()


def cuda_fused_kernels(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, enable_gqa: bool) -> set:
    """The fused CUDA kernels torch 2.13 would take this SDPA call to (aten/.../cuda/sdp_utils.cpp, sm80+):
    flash takes grouped heads but no attn_mask and fp16/bf16 only; memory-efficient takes masks and fp32 but
    no enable_gqa. An empty set means the math kernel, with its [B, heads, T, T] fp32 scores."""
    kernels = set()
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16):
        kernels.add("flash")
    if not enable_gqa and k.shape[1] == q.shape[1]:
        kernels.add("efficient")
    return kernels


STYLES = ["causal", "right_padded", "left_padded", "ragged", "scoring"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", STYLES)
def test_grouped_attention_runs_without_the_math_kernel(
    checkpoints: dict[str, Path], style: str, dtype: torch.dtype, device: str
) -> None:
    # sdpa_kernel raises "No available kernel" when neither fused kernel may take a call. On CPU flash takes
    # every call (grouped or not, masked or not, fp32 or bf16), so there this only guards CPU; on CUDA it is
    # the real check.
    model = load_model(checkpoints["qwen2_gqa_untied"], dtype=dtype, device=device)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        forward_backward(model, style)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", STYLES)
def test_grouped_attention_calls_suit_cudas_fused_kernels(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, style: str, dtype: torch.dtype
) -> None:
    # The CUDA rules checked on CPU: every SDPA call the model makes must be one a fused kernel takes, and
    # calls flash takes keep k/v grouped (no [B, heads, T, D] copies).
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append((cuda_fused_kernels(q, k, attn_mask, enable_gqa), k.shape[1] < q.shape[1]))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    # the model runs on the CPU, choosing its calls as it would on CUDA
    cuda_rule = model_module.keeps_grouped_heads
    monkeypatch.setattr(model_module, "keeps_grouped_heads", lambda device, *rest: cuda_rule("cuda", *rest))
    forward_backward(load_model(checkpoints["qwen2_gqa_untied"], dtype=dtype), style)
    assert calls and all(kernels for kernels, _ in calls), calls
    assert all(grouped == ("flash" in kernels) for kernels, grouped in calls), calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_repeated_heads_equal_enable_gqa(dtype: torch.dtype, masked: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 9, 16, generator=g).to(dtype) for n in (6, 2, 2))
    mask = (torch.rand(2, 1, 9, 9, generator=g) < 0.7) | torch.eye(9, dtype=torch.bool) if masked else None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not masked,
                                                           enable_gqa=True)
    tol = SELF_TOL if dtype == torch.float32 else BF16_TOL
    assert rel_err(sdpa(q, k, v, mask), ref) < tol


@pytest.mark.parametrize("freeze_embeddings", [False, True])
def test_gradient_checkpointing_gives_same_gradients(checkpoints: dict[str, Path], freeze_embeddings: bool) -> None:
    ids = random_ids()
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = load_model(checkpoints["qwen2_gqa_untied"]).train()
        model.embed_tokens.weight.requires_grad_(not freeze_embeddings)
        model.gradient_checkpointing = checkpointing
        calls = []
        model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))  # recompute stops early: no post-hook
        model.lm_head(model(ids, attention_mask=mask)).logsumexp(-1).mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # checkpointing recomputes the layer in backward
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=SELF_TOL, atol=1e-7, msg=name)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_saved_model_loads_in_transformers_with_same_logits(tmp_path: Path, model_type: str) -> None:
    config = ModelConfig(
        model_type=model_type, vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=model_type == "qwen2", attention_bias=True, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=[2, 3],
    )  # fmt: skip
    model = QwenModel(config)
    init_weights(model, seed=3, std=0.1)
    with torch.no_grad():
        for name, param in model.named_parameters():  # make norms and biases matter
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.rand(param.shape) * 0.5)
    save_model(model, tmp_path, max_shard_bytes=60_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = random_ids()
    ours = our_logits(model, ids)
    assert rel_err(hf_logits(tmp_path, ids), ours) < FP32_TOL
    assert rel_err(our_logits(load_model(tmp_path), ids), ours) == 0.0
    # a second save into the same folder as one file leaves no stale shards behind
    save_model(model, tmp_path, dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path).embed_tokens.weight.dtype == torch.float32  # the caller's dtype wins on load


def test_init_weights_is_deterministic_and_standard() -> None:
    config = ModelConfig.from_hf(make_config("qwen3", attention_bias=True), "config.json")
    first, second, other = QwenModel(config), QwenModel(config, dtype=torch.float64), QwenModel(config)
    init_weights(first, seed=7)
    init_weights(second, seed=7)
    init_weights(other, seed=8)
    for (name, a), b, c in zip(first.named_parameters(), second.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a.double(), b, msg=name)
        if name.endswith("norm.weight"):
            assert (a == 1).all()
        elif name.endswith("bias"):
            assert (a == 0).all()
        else:
            assert not torch.equal(a, c) and abs(a.std().item() - 0.02) < 0.005


def make_config(model_type: str = "qwen2", **overrides) -> dict:
    """A config.json dict shaped like a real small Qwen release."""
    d = {
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "Qwen3ForCausalLM"],
        "model_type": model_type, "vocab_size": 200, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 32768,
        "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "max_position_embeddings": 32768, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True, "initializer_range": 0.02,
    }  # fmt: skip
    d.update(overrides)
    return d


def test_config_reads_qwen25_and_qwen3_fields() -> None:
    qwen25 = ModelConfig.from_hf(make_config(), "config.json")
    assert (qwen25.head_dim, qwen25.rope_theta, qwen25.attention_bias, qwen25.tie_word_embeddings) == (
        16,
        1e6,
        True,
        True,
    )
    qwen3 = ModelConfig.from_hf(make_config("qwen3", head_dim=128, attention_bias=False), "config.json")
    assert (qwen3.head_dim, qwen3.attention_bias, qwen3.qk_norm, qwen3.o_proj_bias) == (128, False, True, False)
    v5 = make_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del v5["rope_theta"], v5["rope_scaling"]
    assert ModelConfig.from_hf(v5, "config.json").rope_theta == 5e5
    for config in (qwen25, qwen3):
        assert ModelConfig.from_hf(config.to_hf(torch.float32), "again.json") == config


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("rope_scaling", {"rope_scaling": {"type": "yarn", "factor": 4.0}}),
        ("rope_parameters", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
        ("use_sliding_window", {"use_sliding_window": True}),
        ("model_type", {"model_type": "llama"}),
        ("hidden_act", {"hidden_act": "gelu"}),
        ("attention_dropout", {"attention_dropout": 0.1}),
        ("num_key_value_heads", {"num_key_value_heads": 3}),
        ("num_key_value_heads", {"num_key_value_heads": 0}),
        ("rms_norm_eps", {"rms_norm_eps": -1e-6}),
        ("hidden_size", {"hidden_size": "64"}),
        ("vocab_size", {"vocab_size": None}),
    ],
)
def test_config_refuses_what_changes_the_math(tmp_path: Path, field: str, overrides: dict) -> None:
    path = make_hf_checkpoint(tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config.update(overrides)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NCALError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and str(path / "config.json") in message and field in message


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return make_hf_checkpoint(tmp_path / "ck", max_shard_size=150_000)


def test_missing_weight_names_the_key(sharded: Path) -> None:
    shard = max(sharded.glob("model-*.safetensors"))
    tensors = load_file(shard)
    dropped = min(tensors)
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(NCALError, match=re.escape(f"{dropped}: weight missing")):
        load_model(sharded)


def test_unexpected_weight_names_the_key_and_file(sharded: Path) -> None:
    shard = min(sharded.glob("model-*.safetensors"))
    tensors = load_file(shard) | {"model.layers.0.self_attn.extra.weight": torch.zeros(2)}
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(NCALError, match=re.escape(f"{shard}: model.layers.0.self_attn.extra.weight: unexpected")):
        load_model(sharded)


def test_wrong_shape_names_the_key(sharded: Path) -> None:
    shard = min(sharded.glob("model-*.safetensors"))
    tensors = load_file(shard)
    key = min(tensors)
    tensors[key] = torch.zeros(3)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(NCALError, match=re.escape(f"{key}: shape (3,)")):
        load_model(sharded)


def test_missing_shard_names_the_file(sharded: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(NCALError, match=re.escape(f"{shard}: shard listed")):
        load_model(sharded)


def test_corrupt_header_names_the_file(sharded: Path) -> None:
    shard = min(sharded.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[8:16] = b"garbage!"
    shard.write_bytes(bytes(data))
    with pytest.raises(NCALError, match=re.escape(f"{shard}: not a readable safetensors file")):
        load_model(sharded)


def test_missing_config_and_pickle_only_checkpoints_are_refused(tmp_path: Path) -> None:
    path = make_hf_checkpoint(tmp_path / "ck")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(NCALError, match="only safetensors"):
        load_model(path)
    (path / "config.json").unlink()
    with pytest.raises(NCALError, match=re.escape(f"{path / 'config.json'}: file not found")):
        load_model(path)
