"""LoRA layers, injection, merging, and PEFT-format adapters checked against peft itself.

Tolerances (max |ours - ref| / max |ref|): against peft / transformers in fp32 1e-4 (measured 0: same ops);
merge vs unmerged forward 1e-5 in fp32 (the merged weight rounds once); unmerge restores weights to 1e-6.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from random_checkpoints import make_hf_checkpoint, our_logits, randomise_lora_b, rel_err
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from ncal_core.errors import NCALError
from ncal_core.model.lora import LoRALinear, dropout_keep, inject_lora, load_adapter, lora_state_dict, save_adapter
from ncal_core.model.qwen import load_model

TOL = 1e-4
MERGE_TOL = 1e-5


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A qwen2 and a qwen3 base checkpoint saved by transformers."""
    root = tmp_path_factory.mktemp("base")
    return {
        "qwen2": make_hf_checkpoint(root / "qwen2"),
        "qwen3": make_hf_checkpoint(root / "qwen3", model_type="qwen3", head_dim=32, attention_bias=True),
    }


IDS = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))


def test_zero_b_leaves_the_output_unchanged_even_with_dropout(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen2"])
    before = our_logits(model, IDS)
    inject_lora(model, r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj", "down_proj"])
    model.train()  # dropout sits on the LoRA path only, so with B = 0 nothing changes
    assert torch.equal(our_logits(model, IDS), before)


def test_lora_linear_computes_base_plus_scaled_low_rank_update() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    lora = LoRALinear(base, r=3, alpha=6.0, dropout=0.0)
    randomise_lora_b(lora)
    x = torch.randn(4, 8)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)
    assert lora.weight is base.weight and set(dict(lora.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_each_element_independently_with_probability_one_minus_p(p: float, compiled: bool) -> None:
    # compiled: traced by torch.compile (its torch.randint path; the captured graph runs as traced)
    draw = torch.compile(dropout_keep, backend="eager", fullgraph=True) if compiled else dropout_keep
    torch.manual_seed(0)
    keep = draw(torch.empty(1000, 2000), p).double()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    # independent across elements: neighbours agree as often as two independent draws would
    agree = (keep[:, 1:] == keep[:, :-1]).double().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p**2)) < 10 * sigma
    assert not torch.equal(draw(torch.empty(1000, 2000), p), keep.bool())  # a fresh mask per call


def test_lora_dropout_drops_inputs_of_the_update_and_scales_the_kept_ones() -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    lora = LoRALinear(base, r=4, alpha=8.0, dropout=0.25).train()
    randomise_lora_b(lora)
    x = torch.randn(5, 64)
    torch.manual_seed(7)
    out = lora(x)
    torch.manual_seed(7)
    dropped = x * dropout_keep(x, 0.25) / 0.75  # nn.Dropout's definition, with the same mask
    expected = base(x) + 2.0 * (dropped @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(out, expected)
    assert (dropped == 0).any() and not torch.equal(lora(x), out)  # dropout is on, and redrawn each call


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_values_and_gradients_are_autograds_own(dtype: torch.dtype, autocast: bool, dropout: float) -> None:
    # the same ops in the same order: equal to the bit (measured), so no tolerance; autocast: --bf16 on an fp32 base
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(dtype)
    lora = LoRALinear(base, r=4, alpha=8.0, dropout=dropout).train()
    randomise_lora_b(lora)
    source = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    x = source * 1  # an activation, as in a model: autocast would cache its casts of a leaf and share them
    inputs = (source, lora.lora_A, lora.lora_B)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(7)
        out = lora(x)
        torch.manual_seed(7)
        dropped = x.float() * dropout_keep(x, dropout) if dropout else x.float()
        update = F.linear(F.linear(dropped, lora.lora_A), lora.lora_B)
        base_out = F.linear(x, base.weight, base.bias)
        expected = base_out + (lora.scaling / (1 - dropout) * update).to(base_out.dtype)
    grad = torch.randn(out.shape, dtype=out.dtype)
    ours = torch.autograd.grad(out, inputs, grad, retain_graph=True)  # x * 1 is shared with expected
    assert torch.equal(out, expected)
    for a, b in zip(ours, torch.autograd.grad(expected, inputs, grad)):
        assert torch.equal(a, b)


def test_a_single_vector_goes_through_lora_as_through_nn_linear() -> None:
    torch.manual_seed(0)
    lora = LoRALinear(nn.Linear(16, 8), r=2, alpha=4.0, dropout=0.25).train()
    randomise_lora_b(lora)
    x = torch.randn(16, requires_grad=True)
    torch.manual_seed(1)
    grads = torch.autograd.grad(lora(x).sum(), (x, lora.lora_A))
    torch.manual_seed(1)
    batched = torch.autograd.grad(lora(x[None]).sum(), (x, lora.lora_A))
    for a, b in zip(grads, batched):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_sharing_an_input_save_it_once_not_a_dropped_out_copy_each(dtype: torch.dtype) -> None:
    # q, k and v read one input: the graph keeps that input and a bool mask per layer, nothing else its size
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(64, 48).to(dtype), r=4, alpha=8.0, dropout=0.1).train() for _ in range(3)]
    x = torch.randn(40, 64, dtype=dtype, requires_grad=True)
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(layer(x).sum() for layer in layers).backward()
    wide = [t for t in saved.values() if t.numel() == x.numel()]
    assert sorted(str(t.dtype) for t in wide) == sorted([str(dtype)] + ["torch.bool"] * 3)


def test_gradient_checkpointing_redraws_the_same_lora_dropout_masks(bases: dict[str, Path]) -> None:
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = load_model(bases["qwen2"])
        torch.manual_seed(3)  # the same A factors, then the same stream of masks
        inject_lora(model, r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj", "down_proj"])
        randomise_lora_b(model)
        model.train().gradient_checkpointing = checkpointing
        model.lm_head(model(IDS)).logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert len(plain) == 12
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_merge_matches_unmerged_forward_and_unmerge_restores(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen3"])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_lora(model, r=4, alpha=16, dropout=0.0, target_modules=["q_proj", "o_proj", "up_proj"])
    randomise_lora_b(model)
    unmerged = our_logits(model, IDS)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.merge()
    assert rel_err(our_logits(model, IDS), unmerged) < MERGE_TOL
    assert not torch.equal(model.layers[0].self_attn.q_proj.weight, weights["layers.0.self_attn.q_proj.weight"])
    for layer in layers:
        layer.unmerge()
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-6, msg=name)


def test_injected_layers_follow_the_model_mode(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen2"])  # eval mode, as transformers' from_pretrained
    inject_lora(model, r=2, alpha=4, dropout=0.5, target_modules=["q_proj"])
    randomise_lora_b(model)
    assert not model.layers[0].self_attn.q_proj.training
    assert torch.equal(our_logits(model, IDS), our_logits(model, IDS))  # no dropout at inference


def test_only_lora_params_train(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen2"])
    replaced = inject_lora(model, r=2, alpha=4, dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert len(replaced) == 8 and replaced[0] == "layers.0.self_attn.q_proj"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{factor}" for name in replaced for factor in ("lora_A", "lora_B")}
    model.train()
    model.lm_head(model(IDS)).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name


def test_targets_match_module_suffixes_as_peft_does(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen2"])
    replaced = inject_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["layers.1.self_attn.q_proj", "up_proj"])
    assert replaced == ["layers.0.mlp.up_proj", "layers.1.self_attn.q_proj", "layers.1.mlp.up_proj"]


def test_lora_state_dict_uses_peft_key_names(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen2"])
    inject_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    state = lora_state_dict(model)
    assert sorted(state) == [
        f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{f}.weight" for i in range(2) for f in "AB"
    ]
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 2)


def test_bf16_base_keeps_fp32_adapters(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen2"], dtype=torch.bfloat16)
    inject_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["v_proj"])
    randomise_lora_b(model)
    assert model.layers[0].self_attn.v_proj.lora_A.dtype == torch.float32  # as peft's autocast_adapter_dtype
    out = model(IDS)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_peft_loads_our_adapter_and_reproduces_our_logits(
    bases: dict[str, Path], tmp_path: Path, model_type: str
) -> None:
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    model = load_model(bases[model_type])
    inject_lora(model, r=4, alpha=32, dropout=0.1, target_modules=targets)
    randomise_lora_b(model)
    save_adapter(
        model, tmp_path, base_model_name_or_path=str(bases[model_type]), r=4, alpha=32, dropout=0.1,
        target_modules=targets,
    )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(bases[model_type], attn_implementation="eager")
    reference = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        assert rel_err(our_logits(model, IDS), reference(input_ids=IDS).logits) < TOL


@pytest.mark.parametrize("adapter_name_in_keys", [False, True])
def test_adapter_saved_by_peft_loads_and_reproduces_peft_logits(
    bases: dict[str, Path], tmp_path: Path, adapter_name_in_keys: bool
) -> None:
    base = AutoModelForCausalLM.from_pretrained(bases["qwen2"], attn_implementation="eager")
    peft_config = LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["k_proj", "o_proj", "up_proj"], task_type="CAUSAL_LM"
    )
    reference = get_peft_model(base, peft_config)
    randomise_lora_b(reference, seed=1)
    reference.save_pretrained(tmp_path)
    if adapter_name_in_keys:
        file = tmp_path / "adapter_model.safetensors"
        tensors = {k.replace(".weight", ".default.weight"): t for k, t in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
    model = load_model(bases["qwen2"])
    config = load_adapter(model, tmp_path)
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        4,
        16,
        ["k_proj", "o_proj", "up_proj"],
    )
    assert model.layers[1].mlp.up_proj.scaling == 4.0
    with torch.no_grad():
        assert rel_err(our_logits(model, IDS), reference.eval()(input_ids=IDS).logits) < TOL


@pytest.fixture
def adapter_dir(bases: dict[str, Path], tmp_path: Path) -> Path:
    """An adapter folder written by save_adapter, for the refusal tests to corrupt."""
    model = load_model(bases["qwen2"])
    inject_lora(model, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    save_adapter(model, tmp_path, base_model_name_or_path="base", r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    return tmp_path


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_dora", True),
        ("use_rslora", True),
        ("bias", "lora_only"),
        ("modules_to_save", ["lm_head"]),
        ("target_modules", ".*proj"),
        ("init_lora_weights", "pissa"),
        ("rank_pattern", {"q_proj": 8}),
        ("peft_type", "IA3"),
        ("r", 0),
    ],
)
def test_adapter_config_refuses_what_changes_the_math(
    bases: dict[str, Path], adapter_dir: Path, field: str, value: object
) -> None:
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(NCALError, match=re.escape(f"{config_path}: {field}: {value!r} is not supported")):
        load_adapter(load_model(bases["qwen2"]), adapter_dir)


def test_adapter_with_missing_or_unexpected_factor_names_the_key(bases: dict[str, Path], adapter_dir: Path) -> None:
    file = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(file)
    dropped = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    save_file({k: t for k, t in tensors.items() if k != dropped}, file, metadata={"format": "pt"})
    with pytest.raises(NCALError, match=re.escape(f"{file}: {dropped}: weight missing")):
        load_adapter(load_model(bases["qwen2"]), adapter_dir)
    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    save_file(tensors | {extra: torch.zeros(2, 64)}, file, metadata={"format": "pt"})
    with pytest.raises(NCALError, match=re.escape(f"{file}: {extra}: unexpected weight")):
        load_adapter(load_model(bases["qwen2"]), adapter_dir)


def test_inject_refuses_bad_rank_and_unmatched_targets(bases: dict[str, Path]) -> None:
    model = load_model(bases["qwen2"])
    with pytest.raises(ValueError, match="r: must be an integer >= 1"):
        inject_lora(model, r=0, alpha=1, dropout=0.0, target_modules=["q_proj"])
    with pytest.raises(NCALError, match="target_modules.*match no linear layer"):
        inject_lora(model, r=2, alpha=1, dropout=0.0, target_modules=["qproj"])
    # the label-only head and the scorer read lm_head.weight, so an update beside it would be ignored
    with pytest.raises(NCALError, match="target_modules: lm_head cannot be adapted"):
        inject_lora(model, r=2, alpha=1, dropout=0.0, target_modules=["q_proj", "lm_head"])
