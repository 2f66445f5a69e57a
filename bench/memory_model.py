"""Training memory of LoRA fine-tuning, computed (not measured) for Qwen2.5-0.5B, -1.5B and -7B at a batch and length.

    python -m bench.memory_model --batch 8 --seq 512 [--lora_r 8] [--label_tokens 3] [--json PATH] [--scale]

--scale: per GPU instead, for Qwen2.5-0.5B to -72B x {LoRA, QLoRA, full} x {DDP, FSDP2} x {1, 2, 4, 8} GPUs
(per_gpu(): the terms below for the weights in their trained form, sharded by FSDP2, plus what FSDP2 gathers).

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

from ncal_core.durable import write_json
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


# The larger sizes docs/scale.md plans for, from their config.json on the Hugging Face Hub.
QWEN25_LARGE = {
    "Qwen2.5-14B": qwen25(5120, 48, 40, 8, 13824, 152064, False),
    "Qwen2.5-32B": qwen25(5120, 64, 40, 8, 27648, 152064, False),
    "Qwen2.5-72B": qwen25(8192, 80, 64, 8, 29568, 152064, False),
}
SCALE_ARCHS = {name: {**QWEN25, **QWEN25_LARGE}[name]
               for name in ("Qwen2.5-0.5B", "Qwen2.5-7B", "Qwen2.5-14B", "Qwen2.5-32B", "Qwen2.5-72B")}
METHODS = ("lora", "qlora", "full")
STRATEGIES = ("ddp", "fsdp2")
GPU_COUNTS = (1, 2, 4, 8)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # a 4-bit code, an 8-bit scale per 64 codes, an fp32 scale per 256 scales
GPU_BYTES = 80 * 10**9  # an 80 GB H100
FIT_SHARE = 0.9  # of it for the terms counted here: the CUDA context, NCCL buffers and fragmentation take the rest


def parameter_count(a: ModelConfig) -> int:
    """Every parameter: embedding, head (if untied), per layer q/k/v (with biases), o, MLP, two norms; final norm."""
    H, q, kv = a.hidden_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    per_layer = (H * q + q) + 2 * (H * kv + kv) + q * H + 3 * H * a.intermediate_size + 2 * H
    return a.vocab_size * H * (1 if a.tie_word_embeddings else 2) + a.num_hidden_layers * per_layer + H


def lora_parameter_count(a: ModelConfig, r: int) -> int:
    """r * (in + out) for q, k, v and o of every layer."""
    H, q, kv = a.hidden_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    return a.num_hidden_layers * r * ((H + q) + 2 * (H + kv) + (q + H))


def layer_parameter_count(a: ModelConfig) -> int:
    """One decoder layer's parameters: q/k/v with biases, o, the MLP, two norms."""
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    H = a.hidden_size
    return (H * q + q) + 2 * (H * kv + kv) + q * H + 3 * H * a.intermediate_size + 2 * H


def layer_linear_count(a: ModelConfig) -> int:
    """One decoder layer's linear weights (what NF4 stores in 4 bits): q, k, v, o, gate, up, down."""
    q, kv = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
    H = a.hidden_size
    return H * q + 2 * H * kv + q * H + 3 * H * a.intermediate_size


def per_gpu(a: ModelConfig, method: str, strategy: str, gpus: int, batch: int, seq: int, r: int = 8,
            label_tokens: int = 3, checkpointed: bool = True) -> dict[str, Any]:
    """Bytes one GPU holds at the peak of a step of ncal_core.train, term by term (see scale_terms_doc()).

    batch is per GPU; bf16 compute (--bf16 true, and --torch_dtype bfloat16 for LoRA/QLoRA); one process
    shards nothing (--fsdp true has nothing to split), so fsdp2 on 1 GPU is ddp on 1 GPU.
    """
    P, P_layer, P_lin = parameter_count(a), layer_parameter_count(a), a.num_hidden_layers * layer_linear_count(a)
    P_root = P - a.num_hidden_layers * P_layer  # embeddings, head, final norm: FSDP2's root unit
    lora = lora_parameter_count(a, r)
    trainable = P if method == "full" else lora
    # fp32 master weights for full fine-tuning; the frozen base in bf16 (NF4 for QLoRA's linears) + fp32 factors
    base = {"full": 4 * P, "lora": 2 * P + 4 * lora, "qlora": NF4_BYTES * P_lin + 2 * (P - P_lin) + 4 * lora}[method]
    sharded = strategy == "fsdp2" and gpus > 1
    act = memory(a, batch, seq, r, label_tokens)
    terms = {
        "weights": base / gpus if sharded else base,
        # fp32 gradients + AdamW's two fp32 moments of what trains
        "grads_and_adamw": 12 * trainable / gpus if sharded else 12 * trainable,
        # DDP's fp32 gradient buckets beside the gradients (several processes only)
        "ddp_buckets": 4 * trainable if strategy == "ddp" and gpus > 1 else 0,
        # autocast's bf16 copies of fp32 weights that train, kept for the step (FSDP2 gathers bf16 already)
        "autocast_copies": 2 * P if method == "full" and not sharded else 0,
        # FSDP2: the root gathered for the whole step, two layers gathered at once (one computing, the next
        # prefetched), in bf16 (NF4 for QLoRA's linears); full fine-tuning's unsharded fp32 gradients of the
        # root and one layer before they are reduce-scattered
        "fsdp_gathered": 0,
        "activations": act["activations_checkpointed" if checkpointed else "activations"]
        + act["label_only_logits_and_grad"],
        # QLoRA: one linear dequantized to bf16 at a time
        "dequantized_linear": 2 * a.hidden_size * a.intermediate_size if method == "qlora" else 0,
    }
    if sharded:
        layer_bytes = 2 * P_layer if method != "qlora" else \
            NF4_BYTES * layer_linear_count(a) + 2 * (P_layer - layer_linear_count(a))
        terms["fsdp_gathered"] = 2 * P_root + 2 * layer_bytes + (4 * (P_root + P_layer) if method == "full" else 0)
    total = sum(terms.values())
    return {"method": method, "strategy": strategy, "gpus": gpus, "batch": batch, "seq": seq,
            "lora_r": r, "checkpointed": checkpointed, "parameters": P, "trainable": trainable,
            **{k: int(v) for k, v in terms.items()}, "total": int(total), "fits_80gb": total <= FIT_SHARE * GPU_BYTES}


def scale_rows(batch: int, seq: int, r: int, label_tokens: int) -> list[dict[str, Any]]:
    """per_gpu for every size x method x strategy x GPU count."""
    return [{"model": name, **per_gpu(a, method, strategy, gpus, batch, seq, r, label_tokens)}
            for name, a in SCALE_ARCHS.items() for method in METHODS for strategy in STRATEGIES for gpus in GPU_COUNTS]


def scale_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table: one line per size and method, GB per GPU for DDP and FSDP2 at 1-8 GPUs."""
    first = rows[0]
    cell = {(r["model"], r["method"], r["strategy"], r["gpus"]): r for r in rows}
    head = ["model", "method", *(f"DDP x{n}" for n in GPU_COUNTS), *(f"FSDP2 x{n}" for n in GPU_COUNTS[1:])]
    lines = [f"Predicted GB per GPU (computed, not measured): {first['batch']} rows x {first['seq']} tokens per GPU, "
             f"gradient checkpointing, bf16 compute, LoRA r={first['lora_r']} on q/k/v/o; "
             f"* = over {FIT_SHARE:.0%} of an 80 GB GPU", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in SCALE_ARCHS:
        for method in METHODS:
            keys = [(model, method, "ddp", n) for n in GPU_COUNTS] + \
                [(model, method, "fsdp2", n) for n in GPU_COUNTS[1:]]
            values = [f"{cell[k]['total'] / 1e9:.1f}" + ("" if cell[k]["fits_80gb"] else "*") for k in keys]
            lines.append(f"| {model} | {method} | " + " | ".join(values) + " |")
    return "\n".join(lines)


PLAN_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)  # past 8: several nodes of 8
HUB_IDS = {name: f"Qwen/{name}-Instruct" for name in SCALE_ARCHS}
METHOD_FLAGS = {"lora": "--use_lora true --torch_dtype bfloat16", "qlora": "--use_lora true --torch_dtype bfloat16 "
                "--quantization nf4", "full": "--use_lora false"}


def plan(name: str, method: str, batch: int, seq: int, r: int, label_tokens: int) -> dict[str, Any]:
    """The fewest 80 GB GPUs that fit a method on SCALE_ARCHS[name] (one GPU, then FSDP2 over more), with that
    prediction."""
    for gpus in PLAN_GPU_COUNTS:
        row = per_gpu(SCALE_ARCHS[name], method, "fsdp2" if gpus > 1 else "ddp", gpus, batch, seq, r, label_tokens)
        if row["fits_80gb"]:
            return {"model": name, **row}
    raise ValueError(f"{name} {method}: does not fit {PLAN_GPU_COUNTS[-1]} GPUs at this batch")


def launch_command(row: dict[str, Any]) -> str:
    """The command that runs a plan's row: python on one GPU, torchrun on one node, torchrun on every node."""
    train = f"-m ncal_core.train --model_name_or_path {HUB_IDS[row['model']]} {METHOD_FLAGS[row['method']]} " \
        f"--bf16 true --gradient_checkpointing true --per_device_train_batch_size {row['batch']}"
    if row["gpus"] == 1:
        return f"python {train} --output_dir OUT"
    if row["gpus"] <= 8:
        return f"torchrun --nproc_per_node {row['gpus']} {train} --fsdp true --output_dir OUT"
    return (f"torchrun --nnodes {row['gpus'] // 8} --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_backend c10d "
            f"--rdzv_endpoint $MAIN_HOST:29500 {train} --fsdp true --output_dir /shared/OUT")


def scale_doc(batch: int, seq: int, r: int, label_tokens: int) -> str:
    """docs/scale.md's generated part: the table, and each size's plan with its launch command."""
    lines = [scale_table(scale_rows(batch, seq, r, label_tokens)), "",
             "| model | method | GPUs | GB per GPU | command |", "|---|---|---|---|---|"]
    for name in SCALE_ARCHS:
        for method in METHODS:
            row = plan(name, method, batch, seq, r, label_tokens)
            lines.append(f"| {name} | {method} | {row['gpus']} | {row['total'] / 1e9:.1f} | "
                         f"`{launch_command(row)}` |")
    return "\n".join(lines)


def _gpus(row: dict[str, Any]) -> str:
    n = row["gpus"]
    return "1 GPU" if n == 1 else f"{n} GPUs, FSDP2" if n <= 8 else f"{n // 8} nodes of 8, FSDP2"


def plan_summary(batch: int, seq: int, r: int, label_tokens: int) -> str:
    """The README's table: for each size and method, the fewest 80 GB GPUs it fits on and the GB each holds."""
    lines = [f"| model ({batch} rows x {seq} tokens per GPU) | " + " | ".join(METHODS) + " |",
             "|---" * (len(METHODS) + 1) + "|"]
    for name in SCALE_ARCHS:
        rows = [plan(name, method, batch, seq, r, label_tokens) for method in METHODS]
        lines.append(f"| {name} | " + " | ".join(f"{_gpus(row)}: {row['total'] / 1e9:.1f} GB" for row in rows) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--plan", action="store_true", help="instead: the fewest 80 GB GPUs each size and method fits "
                        "on (the README's table)")
    parser.add_argument("--scale", action="store_true", help="instead: per-GPU memory of Qwen2.5-0.5B to -72B x "
                        "LoRA/QLoRA/full x DDP/FSDP2 x 1-8 GPUs, and the fewest GPUs each fits with its launch "
                        "command (docs/scale.md's generated part), as markdown")
    args = parser.parse_args(argv)
    if min(args.batch, args.seq, args.lora_r, args.label_tokens) < 1:
        parser.error("--batch, --seq, --lora_r and --label_tokens must be >= 1")
    if args.plan:
        print(plan_summary(args.batch, args.seq, args.lora_r, args.label_tokens))
        return 0
    if args.scale:
        rows = scale_rows(args.batch, args.seq, args.lora_r, args.label_tokens)
        print(scale_doc(args.batch, args.seq, args.lora_r, args.label_tokens))
        if args.json:
            write_json(args.json, {"computed_not_measured": True, "gpu_bytes": GPU_BYTES, "fit_share": FIT_SHARE,
                                   "rows": rows})
        return 0
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
