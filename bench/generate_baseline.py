"""transformers' greedy `generate` over prompt ids, as the baselines of bench/bench_infer.py.

    python -m bench.generate_baseline --model DIR --prompts IDS.jsonl --batch 16 --max_new_tokens 4 --out OUT.json

`AutoModelForCausalLM` in fp32 decodes each prompt greedily (do_sample off, one beam, the KV cache on) for
at most --max_new_tokens new tokens, stopping at the model's eos. --batch 1 runs one prompt at a time; a
larger batch pads on the left and takes the prompts in order of length, as our scoring batches them.

IDS.jsonl holds the prompt ids ncal_core.data.prompts.PromptBuilder gives (one `{"id", "input_ids"}` a
line), so this side reads exactly the sequences ours does. Written to OUT.json: the decoded text of each
prompt (special tokens skipped, stripped, in the file's order), the seconds of the prediction loop
(`predict_s`: building the batches, generating and decoding, loading not counted) and of loading (`load_s`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] of prompts padded on the left to the longest."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def generate_all(model: torch.nn.Module, tokenizer, prompts: list[list[int]], batch: int,
                 max_new_tokens: int) -> list[str]:
    """Each prompt's greedy continuation as text, in the order of `prompts`."""
    pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for first in range(0, len(order), batch):
        rows = order[first:first + batch]
        ids, mask = left_padded([prompts[i] for i in rows], pad_id)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id)
        # finished rows are filled with pad, which skip_special_tokens drops with the eos
        for i, new in zip(rows, out[:, ids.shape[1]:].tolist()):
            texts[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--max_new_tokens", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    loaded = time.perf_counter()
    texts = generate_all(model, tokenizer, [r["input_ids"] for r in rows], args.batch, args.max_new_tokens)
    done = time.perf_counter()
    args.out.write_text(json.dumps({"load_s": loaded - started, "predict_s": done - loaded, "batch": args.batch,
                                    "ids": [r["id"] for r in rows], "texts": texts}, ensure_ascii=False),
                        encoding="utf-8")


if __name__ == "__main__":
    main()
