"""Training memory of LoRA fine-tuning, computed (not measured) for Qwen2.5-0.5B, -1.5B and -7B at a batch and length.

    python -m bench.memory_model --batch 8 --seq 512 [--lora_r 8] [--label_tokens 3] [--json PATH]

Terms, in bytes (B batch, T tokens per row, L layers, H hidden, nh/nkv heads, D head_dim, I MLP width,
V vocabulary, r LoRA rank on q/k/v/o, s = 2 bytes per bf16 activation):
- weights: every parameter in bf16 (2 bytes); a tied head is counted once.
- LoRA: r*(in+out) per adapted projection; fp32 weight + fp32 grad + AdamW m and v = 16 bytes per parameter.
  The frozen base has no gradients and no optimizer state.
- activations kept for backward, per layer and token (flash/memory-efficient attention: no T x T matrix):
      s * (7H + (2nh + 2nkv)D + 3I + 4r) + 4H + 4nh + 8
  7H: layer input, normed input, its 4 dropped-out copies feeding the LoRA A of q/k/v/o (LoRA dropout > 0;
  their masks are the 4H bool bytes), MLP input; (nh + 2nkv)D: q, k, v after RoPE; nh*D: attention output;
  3I: gate output, up output, silu(gate) (the frozen down_proj needs no copy of its input); 4r: the LoRA A
  outputs; 4nh: the fp32 log-sum-exp of attention; 8: two fp32 RMSNorm reciprocals.
  With gradient checkpointing only each layer's input (s*H per token) is kept, plus one layer recomputed in
  full during its backward: L*B*T*s*H + (one layer's activations).
- full logits, the term the label-only head avoids: B*T*V fp32 logits + their gradient = 8*B*T*V bytes.
  (A lower bound: HF also keeps the log-softmax, and a bf16 copy before the fp32 up-cast.)
- label-only logits: the same at only the target positions, B*label_tokens rows (label + eos).
Not counted: the framework, the allocator's slack, the data, temporary buffers inside one op.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ncal_core.model.qwen import ModelConfig

GIB = 2**30


def qwen25(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
           tied: bool) -> ModelConfig:
    """A Qwen2.5 architecture from the sizes in its config.json (RoPE and the context length enter no term here)."""
    return ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=hidden // heads, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                       attention_bias=True, max_position_embeddings=32768)


# From the models' config.json on the Hugging Face Hub.
QWEN25 = {
    "Qwen2.5-0.5B": qwen25(896, 24, 14, 2, 4864, 151936, True),
    "Qwen2.5-1.5B": qwen25(1536, 28, 12, 2, 8960, 151936, True),
    "Qwen2.5-7B": qwen25(3584, 28, 28, 4, 18944, 152064, False),
}


def parameter_count(a: ModelConfig) -> int:
    """Every parameter: embedding, head (if untied), per layer q/k/v (with biases), o, MLP, two norms; final norm."""
    H, q, kv = a.hidden_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    per_layer = (H * q + q) + 2 * (H * kv + kv) + q * H + 3 * H * a.intermediate_size + 2 * H
    return a.vocab_size * H * (1 if a.tie_word_embeddings else 2) + a.num_hidden_layers * per_layer + H


def lora_parameter_count(a: ModelConfig, r: int) -> int:
    """r * (in + out) for q, k, v and o of every layer."""
    H, q, kv = a.hidden_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    return a.num_hidden_layers * r * ((H + q) + 2 * (H + kv) + (q + H))


def layer_activation_bytes(a: ModelConfig, batch: int, seq: int, r: int, act_bytes: int = 2) -> int:
    """Bytes one decoder layer keeps for its backward (the formula in the module docstring)."""
    H, nh, nkv, D = a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
    per_token = act_bytes * (7 * H + (2 * nh + 2 * nkv) * D + 3 * a.intermediate_size + 4 * r) + 4 * H + 4 * nh + 8
    return batch * seq * per_token


def memory(a: ModelConfig, batch: int, seq: int, r: int = 8, label_tokens: int = 3) -> dict[str, Any]:
    """Every term in bytes, and the totals with full logits (the reference) and with the label-only head."""
    layer = layer_activation_bytes(a, batch, seq, r)
    terms = {
        "weights_bf16": 2 * parameter_count(a),
        "lora_and_adamw_fp32": 16 * lora_parameter_count(a, r),
        "activations": a.num_hidden_layers * layer,
        "activations_checkpointed": a.num_hidden_layers * batch * seq * 2 * a.hidden_size + layer,
        "full_logits_and_grad": 8 * batch * seq * a.vocab_size,
        "label_only_logits_and_grad": 8 * batch * label_tokens * a.vocab_size,
    }
    fixed = terms["weights_bf16"] + terms["lora_and_adamw_fp32"]
    return {
        "batch": batch,
        "seq": seq,
        "lora_r": r,
        "label_tokens": label_tokens,
        "parameters": parameter_count(a),
        "lora_parameters": lora_parameter_count(a, r),
        **terms,
        "total_full_logits": fixed + terms["activations"] + terms["full_logits_and_grad"],
        "total_label_only": fixed + terms["activations"] + terms["label_only_logits_and_grad"],
        "total_label_only_checkpointed": fixed
        + terms["activations_checkpointed"]
        + terms["label_only_logits_and_grad"],
    }


# key -> column heading of the printed table
COLUMNS = {
    "weights_bf16": "weights",
    "lora_and_adamw_fp32": "LoRA+AdamW",
    "activations": "activations",
    "activations_checkpointed": "act. (ckpt)",
    "full_logits_and_grad": "full logits",
    "label_only_logits_and_grad": "label logits",
    "total_full_logits": "total (full logits)",
    "total_label_only": "total (label head)",
    "total_label_only_checkpointed": "total (label head, ckpt)",
}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table in GiB, headed by the words 'computed, not measured'."""
    first = rows[0]
    lines = [
        f"Memory model (computed, not measured): batch {first['batch']} x {first['seq']} tokens, "
        f"LoRA r={first['lora_r']} on q/k/v/o, bf16 weights and activations, fp32 LoRA + AdamW, GiB"
    ]
    cells = [["model", *COLUMNS.values()]] + [[row["model"]] + [f"{row[k] / GIB:.3f}" for k in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the table for every model; write the rows as JSON with --json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--label_tokens", type=int, default=3, help="target tokens per row (label + eos)")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.lora_r, args.label_tokens) < 1:
        parser.error("--batch, --seq, --lora_r and --label_tokens must be >= 1")
    rows = [{"model": name, **memory(a, args.batch, args.seq, args.lora_r, args.label_tokens)}
            for name, a in QWEN25.items()]
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"computed_not_measured": True, "archs": {name: asdict(a) for name, a in QWEN25.items()},
                 "rows": rows}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
