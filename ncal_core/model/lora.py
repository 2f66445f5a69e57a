"""LoRA: a linear layer with a low-rank update, injection by module name, merging, and PEFT-format adapters."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ncal_core.durable import read_json, write_json
from ncal_core.errors import NCALError, at
from ncal_core.model.weights import assign_parameters, hf_name, read_tensors, tensor_shapes, write_safetensors

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_PARAMS = ("lora_A", "lora_B")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# a sequence-classification adapter's head, saved whole (modules_to_save), as PEFT writes it
HEAD_KEY = f"{PEFT_PREFIX}score.weight"
# the heads PEFT itself puts in modules_to_save for task_type SEQ_CLS; of them, Qwen has `score`
SEQ_CLS_MODULES = ("classifier", "score", "pre_classifier")

# adapter_config.json keys whose non-empty / true value changes the math in a way this module does not implement
UNSUPPORTED_IF_SET = (
    "use_rslora",
    "use_dora",
    "lora_bias",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "exclude_modules",
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
)
# dropout keeps an element when a uniform 31-bit draw falls below round((1 - p) * 2^31)
DROPOUT_BITS = 31
# Initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ, ...) make the adapter meaningless on the
# untouched base model; only these leave the base alone.
PLAIN_INITS = (True, False, "gaussian")


def dropout_keep(x: Tensor, p: float) -> Tensor:
    """A bool mask the shape of x, each element True with probability 1 - p (to within 2^-32), independently.

    One 31-bit integer per element: on the CPU, forward + backward take 0.29 ms where nn.Dropout's
    Bernoulli draws (a double per element) take 0.46 ms on a [360, 256] input (2 threads); 16 such masks a
    step were 7% of the bench's LoRA step. Drawn from the default generator, so gradient checkpointing's
    RNG replay redraws the same mask.
    Under torch.compile the bits come from torch.randint instead: Tensor.random_ is a graph break (one a mask:
    three in attention_in, for q, k and v, one in attention_out, for o), randint is traced. It is another stream
    than random_'s, which eager runs keep.
    """
    if torch.compiler.is_compiling():
        bits = torch.randint(0, 2**DROPOUT_BITS, x.shape, dtype=torch.int32, device=x.device)
    else:
        bits = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # uniform on [0, 2^31)
    return bits < round((1.0 - p) * 2**DROPOUT_BITS)


class _LoRADown(torch.autograd.Function):
    """F.linear(x.to(A's dtype) * keep, A), the LoRA path's first factor, saving x as it came and the bool mask
    for the backward, not the dropped-out copy (keep None: no dropout).

    q, k and v read one input: autograd's own graph kept three dropped-out fp32 copies of it a layer (on a
    bf16 base, three fp32 casts even without dropout), where this keeps the shared input and a byte an
    element a mask. The backward recomputes the copy with the same ops, so values and gradients are autograd's
    (bitwise on the CPU, tested; a GPU's matmuls may sum in another order).
    Under autocast the forward's matmul runs in the autocast dtype, which the incoming gradient has; the
    backward, which autocast does not reach, runs its matmuls in that dtype too, casting back where autograd's
    graph would.
    """

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor | None, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, keep, weight)
        return F.linear(_dropped(x, keep, weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        x, keep, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight.to(grad.dtype)).to(weight.dtype)
            grad_x = (grad_x if keep is None else grad_x * keep).to(x.dtype)
        if ctx.needs_input_grad[2]:
            dropped = _dropped(x, keep, weight.dtype).to(grad.dtype)
            grad_weight = grad.reshape(-1, grad.shape[-1]).T.mm(dropped.reshape(-1, dropped.shape[-1])).to(weight.dtype)
        return grad_x, None, grad_weight


def _dropped(x: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x in dtype, zeroed where keep is False."""
    x = x.to(dtype)
    return x if keep is None else x * keep


class LoRALinear(nn.Module):
    """y = x W^T + b + scaling * B(A(dropout(x))), keeping the base layer's `weight` and `bias` parameters.

    Dropout (training mode only) zeroes elements of x with probability `dropout` and scales the kept ones
    by 1 / (1 - dropout), as nn.Dropout; the scale is folded into `scaling` (B A is linear), saving a pass.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # the same Parameter objects: base state-dict keys and memory are unchanged
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        if not 0 <= dropout < 1:
            raise ValueError(f"lora dropout: must be in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        # Adapters train in at least fp32 even on a bf16 base, as PEFT does by default.
        factory = {"device": base.weight.device, "dtype": torch.promote_types(base.weight.dtype, torch.float32)}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default, so B = 0 starts at the base model
        self.merged = False
        self.train(base.training)  # a new module starts in train mode; follow the model it is injected into

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out]"""
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        keep, scaling = None, self.scaling
        if self.training and self.dropout > 0:
            keep, scaling = dropout_keep(x, self.dropout), scaling / (1.0 - self.dropout)
        update = F.linear(_LoRADown.apply(x, keep, self.lora_A), self.lora_B)
        return y + (scaling * update).to(y.dtype)

    def delta(self) -> Tensor:
        """scaling * B A [out, in] in the base weight's dtype."""
        return (self.scaling * (self.lora_B @ self.lora_A)).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (no-op if already merged)."""
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of `weight` (no-op if not merged)."""
        if self.merged:
            self.weight -= self.delta()
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, dropout={self.dropout}"


def is_lora_param(name: str) -> bool:
    """Whether a parameter name is a LoRA factor."""
    return name.rsplit(".", 1)[-1] in LORA_PARAMS


def inject_lora(
    model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str] | None = None
) -> list[str]:
    """Wrap every nn.Linear named by `target_modules` in a LoRALinear and freeze every other parameter.

    A target names a module as PEFT reads it: the module's last name component (`q_proj`) or a dotted
    suffix of its Hugging Face name (`self_attn.q_proj`). Returns our names of the wrapped modules.
    """
    targets = set(DEFAULT_TARGETS if target_modules is None else target_modules)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora r: must be an integer >= 1, got {r!r}")

    def targeted(name: str) -> bool:
        full = hf_name(name)
        return any(full == t or full.endswith(f".{t}") for t in targets)

    replaced = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and targeted(name)]
    if not replaced:
        raise NCALError(f"lora target_modules: {sorted(targets)} match no linear layer of the model")
    if "lm_head" in replaced:
        raise NCALError("lora target_modules: lm_head cannot be adapted (the label-only head and the scorer read "
                        "its weight directly); adapt the decoder's projections")
    for name in replaced:
        owner, _, leaf = name.rpartition(".")
        parent = model.get_submodule(owner)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(is_lora_param(name))
    return replaced


def peft_key(name: str) -> str:
    """Our LoRA parameter name -> PEFT's saved key, e.g. layers.0.self_attn.q_proj.lora_A ->
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"{PEFT_PREFIX}{hf_name(name)}.weight"


def lora_state_dict(model: nn.Module, weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Only the LoRA factors, under PEFT's key names; of `weights` by parameter name where given."""
    params = dict(model.named_parameters()) if weights is None else weights
    return {peft_key(name): p.detach() for name, p in params.items() if is_lora_param(name)}


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    weights: dict[str, Tensor] | None = None,
    head: Tensor | None = None,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors that peft's PeftModel.from_pretrained loads.

    weights: the LoRA factors by parameter name (a sharded model's, consolidated); default: the model's own.
    head: a classifier's score.weight [K, H]; given, the adapter is a SEQ_CLS one with `score` in modules_to_save,
    which PeftModel.from_pretrained(AutoModelForSequenceClassification...) loads.
    """
    out_dir = Path(out_dir)
    tensors = lora_state_dict(model, weights)
    if not tensors:
        raise ValueError("the model has no LoRA layers to save (call inject_lora first)")
    if head is not None:
        tensors[HEAD_KEY] = head.detach()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if head is None else "SEQ_CLS",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None if head is None else ["score"],
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / CONFIG_FILE, config)
    write_safetensors(tensors, out_dir, stem=WEIGHTS_FILE.removesuffix(".safetensors"))


def read_adapter_config(path: Path) -> dict:
    """Parse a PEFT adapter_config.json, refusing (naming the field) what would change the math."""
    config = read_json(path)

    def refuse(key: str, why: str) -> NCALError:
        return NCALError(f"{at(path, None, key)}: {config.get(key)!r} is not supported ({why})")

    if config.get("peft_type", "LORA") != "LORA":
        raise refuse("peft_type", "only LORA adapters")
    for key in UNSUPPORTED_IF_SET:
        if config.get(key):
            raise refuse(key, "it changes the LoRA update")
    modules = config.get("modules_to_save")
    if modules and (config.get("task_type") != "SEQ_CLS" or not isinstance(modules, list)
                    or not set(modules) <= set(SEQ_CLS_MODULES)):
        raise refuse("modules_to_save", "only a SEQ_CLS adapter's classification head")
    if config.get("bias", "none") != "none":
        raise refuse("bias", "only 'none': trained biases are not loaded")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise refuse("init_lora_weights", "this initialisation rewrites the base weights")
    r, alpha, dropout = config.get("r"), config.get("lora_alpha"), config.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise refuse("r", "must be an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise refuse("lora_alpha", "must be a number")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise refuse("lora_dropout", "must be a number in [0, 1)")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise refuse("target_modules", "only a non-empty list of module names; regex strings are not read")
    return config


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Inject LoRA as a PEFT adapter folder describes and load its factors; returns the parsed adapter config."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir / CONFIG_FILE)
    inject_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), config["target_modules"])
    load_adapter_weights(model, adapter_dir)
    return config


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy a PEFT adapter folder's factors into the LoRA layers the model already has (same r and targets)."""
    weights = Path(adapter_dir) / WEIGHTS_FILE
    # peft saves without the adapter name, but some tools keep it: ...q_proj.lora_A.default.weight
    tensors = ((file, key.replace(".default.", "."), t) for file, key, t in read_tensors([weights])
               if key != HEAD_KEY)
    assign_parameters(model, tensors, peft_key, source=weights, select=is_lora_param, in_place=True)


def adapter_head_size(adapter_dir: str | Path) -> int | None:
    """K of the head a SEQ_CLS adapter saved (read from the file's header), None for a causal-LM adapter; a SEQ_CLS
    adapter without one (its head a module Qwen lacks) is refused rather than read as a causal-LM adapter."""
    weights = Path(adapter_dir) / WEIGHTS_FILE
    shape = tensor_shapes(weights).get(HEAD_KEY)
    if shape is None and read_json(Path(adapter_dir) / CONFIG_FILE).get("task_type") == "SEQ_CLS":
        raise NCALError(f"{at(weights, None, HEAD_KEY)}: missing; a SEQ_CLS adapter of a Qwen model saves its "
                        "classification head `score`")
    return None if shape is None else shape[0]


def adapter_head(adapter_dir: str | Path) -> Tensor | None:
    """The score.weight [K, H] a SEQ_CLS adapter saved, None for a causal-LM adapter (see adapter_head_size)."""
    if adapter_head_size(adapter_dir) is None:
        return None
    return next(t for _, key, t in read_tensors([Path(adapter_dir) / WEIGHTS_FILE]) if key == HEAD_KEY)


def merge_lora_weights(base: dict[str, Tensor], adapter: dict[str, Tensor], scaling: float,
                       dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A base checkpoint's tensors (Hugging Face keys) with a PEFT adapter's updates folded in: W + scaling * B A,
    computed in fp32 and stored in `dtype` (default: each weight's own; a float32 export of a bf16 base must not
    round the sum back to bf16). A pure function: neither input is changed."""
    merged = dict(base)
    factors = {key.replace(".default.", "."): t for key, t in adapter.items()}
    if HEAD_KEY in factors:  # a SEQ_CLS adapter's head, saved whole
        merged["score.weight"] = factors[HEAD_KEY]
    for key, lora_a in factors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        weight_key = f"{module}.weight"
        lora_b = factors.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
        if weight_key not in base or lora_b is None:
            raise ValueError(f"{key}: no {weight_key} in the base or no lora_B beside it")
        weight = base[weight_key]
        merged[weight_key] = (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(dtype or weight.dtype)
    return merged
