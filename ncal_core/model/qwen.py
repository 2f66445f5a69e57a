"""Qwen2 / Qwen3 decoder written out by hand, with loading and saving in Hugging Face's layout.

Shapes: B batch, T tokens, H hidden, V vocab, nh query heads, nkv key/value heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ncal_core.durable import read_json, write_json
from ncal_core.errors import NCALError, at
from ncal_core.layout import Ragged
from ncal_core.model.swiglu import silu_mul
from ncal_core.model.weights import assign_parameters, checkpoint_files, hf_name, read_tensors, write_safetensors

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DEFAULT_ROPE_THETA = 10_000.0  # transformers' default when a config names none
QWEN3_DEFAULT_HEAD_DIM = 128  # transformers' Qwen3Config default; Qwen2 derives head_dim from the widths


@dataclass
class ModelConfig:
    """Every architectural knob of a Qwen2 / Qwen3 decoder."""

    model_type: str  # "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # qwen2: q/k/v biases, always; qwen3: q/k/v/o biases when set
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {sorted(ARCHITECTURES)}")
        if self.model_type == "qwen2" and not self.attention_bias:
            raise ValueError("qwen2 always has q/k/v biases (transformers ignores attention_bias for it)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def qk_norm(self) -> bool:
        """Qwen3 RMS-normalises each query and key head before the rotary embedding."""
        return self.model_type == "qwen3"

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2's o_proj never has a bias; Qwen3's follows attention_bias."""
        return self.model_type == "qwen3" and self.attention_bias

    @classmethod
    def from_hf(cls, d: dict, source: str) -> ModelConfig:
        """Read a transformers config.json dict; refuse, naming `source` and the field, what would change the math."""

        def field(key: str, kind: type, default: object = None) -> object:
            value = d.get(key)
            value = default if value is None else value
            if value is None:
                raise NCALError(f"{at(source, None, key)}: missing")
            if kind is float and type(value) is int:
                value = float(value)
            if type(value) is not kind:  # `type is` so that a bool is not taken for an int
                raise NCALError(f"{at(source, None, key)}: expected {kind.__name__}, got {value!r}")
            if kind is not bool and value <= 0:
                raise NCALError(f"{at(source, None, key)}: must be positive, got {value!r}")
            return value

        model_type = d.get("model_type")
        if model_type not in ARCHITECTURES:
            raise NCALError(f"{at(source, None, 'model_type')}: {model_type!r} is not supported (qwen2 or qwen3)")
        if d.get("hidden_act", "silu") != "silu":
            raise NCALError(f"{at(source, None, 'hidden_act')}: {d['hidden_act']!r} is not supported (only silu)")
        if d.get("use_sliding_window"):
            raise NCALError(f"{at(source, None, 'use_sliding_window')}: sliding-window attention is not supported")
        if d.get("attention_dropout"):
            raise NCALError(f"{at(source, None, 'attention_dropout')}: attention dropout is not supported (use 0.0)")
        hidden = field("hidden_size", int)
        heads = field("num_attention_heads", int)
        kv_heads = field("num_key_value_heads", int, heads)
        if heads % kv_heads:
            raise NCALError(f"{at(source, None, 'num_key_value_heads')}: {kv_heads} does not divide {heads} heads")
        if model_type == "qwen2":
            head_dim, bias = field("head_dim", int, hidden // heads), True
        else:
            head_dim, bias = field("head_dim", int, QWEN3_DEFAULT_HEAD_DIM), field("attention_bias", bool, False)
        return cls(
            model_type=model_type,
            vocab_size=field("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=field("intermediate_size", int),
            num_hidden_layers=field("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=_rope_theta(d, source),
            rms_norm_eps=field("rms_norm_eps", float, 1e-6),
            tie_word_embeddings=field("tie_word_embeddings", bool, False),
            attention_bias=bias,
            max_position_embeddings=field("max_position_embeddings", int, 32768),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        """A config.json dict that transformers (4.x and 5.x) loads as the same architecture."""
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            # transformers 4 reads the top-level rope_theta, transformers 5 reads rope_parameters
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if self.model_type == "qwen3":
            d["attention_bias"] = self.attention_bias
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            d["dtype"] = d["torch_dtype"] = name  # transformers 5 reads "dtype", 4.x reads "torch_dtype"
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


def _rope_theta(d: dict, source: str) -> float:
    """The RoPE base (rope_parameters / rope_scaling win over rope_theta, as in transformers 5); scaling is refused."""
    theta, where = d.get("rope_theta", DEFAULT_ROPE_THETA), "rope_theta"
    for key in ("rope_scaling", "rope_parameters"):
        params = d.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise NCALError(f"{at(source, None, key)}: expected an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise NCALError(f"{at(source, None, key)}: rope_type {rope_type!r} is not supported (only default)")
        if "rope_theta" in params:
            theta, where = params["rope_theta"], key
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise NCALError(f"{at(source, None, where)}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in fp32 then cast back before the weight, as transformers."""

    def __init__(self, dim: int, eps: float, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., dim]"""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1), the pairing of Hugging Face's Qwen2 rotary embedding."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions (and Qwen3's per-head q/k RMSNorm)."""

    def __init__(self, c: ModelConfig, **factory) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * c.head_dim, bias=c.attention_bias, **factory)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=c.attention_bias, **factory)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * c.head_dim, bias=c.attention_bias, **factory)
        self.o_proj = nn.Linear(self.n_head * c.head_dim, c.hidden_size, bias=c.o_proj_bias, **factory)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **factory)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **factory)

    def mix(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
            ragged: Ragged | None) -> Tensor:
        """Projected q [B, T, nh*D], k/v [B, T, nkv*D] (or [N, ...] with ragged), cos/sin [B or 1, T, D],
        mask [B, 1, T, T] bool or None (= causal) -> the attention output, q's shape (before o_proj)."""
        if ragged is None:
            return self.attend(q, k, v, cos, sin, mask)
        parts = [p.unpad(self.attend(p.pad(q[a:b]), p.pad(k[a:b]), p.pad(v[a:b]), cos[:, :p.width],
                                     sin[:, :p.width], None)) for a, b, p in ragged.blocks]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        """Projected q [B, T, nh*D], k/v [B, T, nkv*D] -> attention output [B, T, nh*D] (before o_proj)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, nh|nkv, T, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = sdpa(q, k, v, mask)  # [B, nh, T, D]
        return y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)


def keeps_grouped_heads(device_type: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA with grouped k/v (enable_gqa) still reaches a fused kernel on this device.

    On CUDA, with enable_gqa, the memory-efficient kernel is out (it takes no grouped heads) and flash takes no
    attn_mask and no fp32: a masked call (scoring, left padding) or an fp32 one (fp32 training) would be left to
    the math kernel, which materialises the [B, nh, T, T] scores in fp32 (~15 GB per tensor for Qwen2.5-7B at
    batch 32, T 2048). CPU's flash kernel takes every call, grouped or not, so the CPU keeps k/v grouped (and
    its numbers as they were).
    """
    return device_type == "cpu" or (not masked and dtype in (torch.float16, torch.bfloat16))


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """SDPA of q [B, nh, T, D] over k/v [B, nkv, T, D], nh a multiple of nkv; mask [B, 1, T, T] bool or None
    (= causal) -> [B, nh, T, D]. Where grouped k/v would leave only the math kernel, they are repeated to all
    heads ([B, nh, T, D] copies), which the memory-efficient kernel takes, masked or fp32."""
    groups = q.shape[1] // k.shape[1]
    grouped = groups > 1 and keeps_grouped_heads(q.device.type, q.dtype, mask is not None)
    if groups > 1 and not grouped:
        k, v = repeat_heads(k, groups), repeat_heads(v, groups)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=grouped)


def repeat_heads(x: Tensor, groups: int) -> Tensor:
    """[B, nkv, T, D] -> [B, nkv * groups, T, D], each head repeated `groups` times in a row (query head h
    reads kv head h // groups, as enable_gqa and transformers' repeat_kv)."""
    B, n, T, D = x.shape
    return x[:, :, None].expand(B, n, groups, T, D).reshape(B, n * groups, T, D)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig, **factory) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, H] -> [B, T, H]"""
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, c: ModelConfig, **factory) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **factory)
        self.self_attn = Attention(c, **factory)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **factory)
        self.mlp = MLP(c, **factory)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, ragged: Ragged | None = None) -> Tensor:
        """[B, T, H] (or [N, H] with ragged) -> the same shape"""
        return self.attention_out(x, self.self_attn.mix(*self.attention_in(x), cos, sin, mask, ragged))

    def attention_in(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x -> q, k, v of norm(x): the layer's work before attention (compile_layers compiles it)."""
        h = self.input_layernorm(x)
        return self.self_attn.q_proj(h), self.self_attn.k_proj(h), self.self_attn.v_proj(h)

    def attention_out(self, x: Tensor, y: Tensor) -> Tensor:
        """x + o_proj(y), then its MLP residual: the layer's work after attention (compile_layers compiles it)."""
        x = x + self.self_attn.o_proj(y)
        return x + self.mlp(self.post_attention_layernorm(x))


class QwenModel(nn.Module):
    """The decoder plus its LM head; attribute names are Hugging Face's minus the `model.` prefix."""

    def __init__(
        self, config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.gradient_checkpointing = False
        # Parameters are left to load_model (from a checkpoint) or init_weights (from a seed). The embedding
        # skips its own random init: on the meta device that init alone imports ~900 modules (over a second).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size, **factory))
        self.layers = nn.ModuleList(DecoderLayer(config, **factory) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **factory)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, **factory)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._rope_cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        attn_mask: Tensor | None = None,
        ragged: Ragged | None = None,
    ) -> Tensor:
        """input_ids [B, T] -> hidden [B, T, H] after the final RMSNorm.

        attention_mask [B, T]: 1 = real token (right- or left-padded). position_ids [B, T]: default arange(T).
        attn_mask [B, T, T] bool, True = may attend: replaces the causal mask (padded keys stay masked when
        attention_mask is given too), e.g. to score several continuations of one prompt in one pass.
        ragged: input_ids is right-padded as it says; the layers then skip the padding (see Ragged), whose
        hidden states come out as zeros. Takes no other mask, nor position_ids.
        """
        B, T = input_ids.shape
        if ragged is not None:
            if attention_mask is not None or position_ids is not None or attn_mask is not None:
                raise ValueError("ragged describes right padding by itself; pass no mask or position_ids")
            input_ids = ragged.batch.unpad(input_ids)
        x = self.embed_tokens(input_ids)  # [B, T, H] or [N, H]
        cos, sin = self.rope(position_ids, T, x.device, x.dtype)  # [B or 1, T, D]
        mask = build_mask(attention_mask, attn_mask, B, T, x.device)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpoint:
                x = checkpoint(layer, x, cos, sin, mask, ragged, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, ragged)
        x = self.norm(x)
        return x if ragged is None else ragged.batch.pad(x)

    def rope(
        self, position_ids: Tensor | None, T: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """cos, sin [B or 1, T, D] for the positions, from a table cached per device and dtype, grown on demand.

        The table covers max(T, max_position_embeddings) positions, so the positions are not read on the host
        (a device sync per forward): position_ids must stay below that, as packed and padded rows do.
        """
        cached = self._rope_cache.get((device, dtype))
        if cached is None or cached[0].shape[0] < T:
            cached = rope_table(self.config, max(T, self.config.max_position_embeddings), device, dtype)
            self._rope_cache[(device, dtype)] = cached
        cos, sin = cached
        if position_ids is None:
            return cos[None, :T], sin[None, :T]
        return cos[position_ids], sin[position_ids]


def rope_table(c: ModelConfig, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [length, D] for positions 0..length-1; angles in fp32 exactly as transformers computes them."""
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, device=device).float() / c.head_dim))
    angles = torch.arange(length, device=device).float()[:, None] * inv_freq[None, :]  # [length, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [length, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def build_mask(
    attention_mask: Tensor | None, attn_mask: Tensor | None, B: int, T: int, device: torch.device
) -> Tensor | None:
    """The [B, 1, T, T] bool mask for SDPA (True = may attend), or None when plain causal attention is exact."""
    if attn_mask is None:
        # One host sync per forward (not per layer) buys SDPA's faster is_causal path for unpadded batches.
        if attention_mask is None or bool(attention_mask.all()):
            return None
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril().expand(B, T, T)
    else:
        if attn_mask.shape != (B, T, T):
            raise ValueError(f"attn_mask must be [B, T, T] = {[B, T, T]}, got {list(attn_mask.shape)}")
        allowed = attn_mask.bool()
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    # A query row that may attend to nothing (left padding) would make SDPA's softmax NaN; let it see itself.
    eye = torch.eye(T, dtype=torch.bool, device=device)
    allowed = allowed | (eye & ~allowed.any(dim=-1, keepdim=True))
    return allowed[:, None]


def init_weights(model: QwenModel, seed: int, std: float = 0.02) -> None:
    """Deterministic from-scratch init: normal(0, std) matrices, zero biases, ones for norms, on any device/dtype."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights are listed once
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                # drawn on the CPU in fp32 so every device and dtype gets the same numbers
                param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> QwenModel:
    """The model, in eval mode, from a Hugging Face folder (config.json + safetensors), read tensor by tensor."""
    path = Path(path)
    config_path = path / "config.json"
    config = ModelConfig.from_hf(read_json(config_path), str(config_path))
    model = QwenModel(config, device="meta")
    files, source = checkpoint_files(path)
    assign_parameters(model, read_tensors(files), hf_name, source=source, dtype=dtype, device=device)
    return model.eval()  # like transformers: dropout (of LoRA layers added later) is off until .train()


def load_weights_into(model: QwenModel, path: str | Path) -> None:
    """Copy a Hugging Face folder's weights into the model's own parameters (kept in their dtype and device)."""
    files, source = checkpoint_files(Path(path))
    assign_parameters(model, read_tensors(files), hf_name, source=source, in_place=True)


def save_model(
    model: QwenModel, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9,
    weights: dict[str, Tensor] | None = None,
) -> None:
    """Write config.json + model.safetensors (or shards + index) that transformers' AutoModelForCausalLM loads.

    weights: the tensors by parameter name (a sharded model's, consolidated); default: the model's own."""
    path = Path(path)
    plain = set(dict(QwenModel(model.config, device="meta").named_parameters()))
    # tied lm_head.weight is left out, as transformers does
    params = dict(model.named_parameters()) if weights is None else {k: v for k, v in weights.items() if k in plain}
    if set(params) != plain:
        extra = sorted(set(params) ^ plain)
        raise ValueError(f"the model is not a plain QwenModel (merge LoRA first); differing parameters: {extra[:3]}")
    dtype = dtype or params["embed_tokens.weight"].dtype
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", model.config.to_hf(dtype))
    tensors = {hf_name(name): p for name, p in params.items()}
    write_safetensors(tensors, path, dtype=dtype, max_shard_bytes=max_shard_bytes)
