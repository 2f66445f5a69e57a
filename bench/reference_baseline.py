"""The reference's way of training, as the baseline of bench/bench_train.py: HF Trainer + PEFT LoRA + TC at position -1.

    python -m bench.reference_baseline --model DIR --rows ROWS.jsonl --num_classes 7 --batch 8 --steps 30 \
        --output_dir DIR --out OUT.json [--longest_first] [--dtype float32|bfloat16]

Rebuilt from the behaviour of the paper's public code (code/trainer.py, code/dataset.py, code/model.py),
not copied from it: `AutoModelForCausalLM` + `get_peft_model`, a `Trainer` whose `compute_loss` runs the
model with its own `labels` (prompt positions -100, so the [B, T, V] logits and their loss are computed in
full) and `output_hidden_states=True`, then adds lambda * TC on `hidden_states[-1][:, -1, :]` of the
right-padded batch. Trainer's random sampler, fused AdamW and linear schedule are left at their defaults,
as the reference leaves them. --dtype is the base weights' dtype; PEFT keeps the LoRA weights in fp32.

With --longest_first the random order is kept except that the longest row moves into the first batch:
the reference meets that batch (padded to the longest row, with its full logits) at some random step of
every epoch, and a short benchmark run would otherwise miss it and under-state its peak memory.

ROWS.jsonl holds the ids ncal_core.data.prompts.PromptBuilder gives (one `{"input_ids", "prompt_len",
"class_index"}` a line), so both sides of the benchmark see the same sequences. Written to OUT.json:
the time at the end of every optimizer step and, per step, the rows, real tokens, squared row lengths,
target tokens and padded width of its batch. Peak RSS is measured by the parent from outside.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# before the heavy imports, so that the start-up they cost shows in the log
STARTED = time.perf_counter()

import torch  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402
from torch.utils.data import Dataset, Sampler  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class EncodedRows(Dataset):
    """The reference's per-row dict: input_ids, attention_mask, labels (-100 on the prompt) and class_indices."""

    def __init__(self, path: Path) -> None:
        self.rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        ids, prompt_len = row["input_ids"], row["prompt_len"]
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.ones(len(ids), dtype=torch.long),
            "labels": torch.tensor([-100] * prompt_len + ids[prompt_len:]),
            "class_indices": torch.tensor(row["class_index"]),
        }


def right_pad_collator(pad_id: int):
    """Stack rows padded on the right to the longest: pad_id for ids, 0 for the mask, -100 for labels."""

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.stack(
                [torch.cat([r[key], torch.full((width - len(r[key]),), value, dtype=torch.long)]) for r in rows]
            )

        return {
            "input_ids": pad("input_ids", pad_id),
            "attention_mask": pad("attention_mask", 0),
            "labels": pad("labels", -100),
            "class_indices": torch.stack([r["class_indices"] for r in rows]),
        }

    return collate


class LongestFirst(Sampler):
    """Another sampler's order with one index swapped to the front."""

    def __init__(self, inner: Sampler, first: int) -> None:
        self.inner, self.first = inner, first

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        order = list(self.inner)
        at = order.index(self.first)
        order[0], order[at] = order[at], order[0]
        return iter(order)


class StepLog:
    """What each optimizer step saw (filled in compute_loss) and when it ended (filled by the callback)."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.batches: list[dict[str, int]] = []
        self.train_begin: float | None = None

    def see(self, inputs: dict[str, torch.Tensor]) -> None:
        lengths = inputs["attention_mask"].sum(1)
        self.batches.append(
            {
                "rows": int(lengths.numel()),
                "tokens": int(lengths.sum()),
                "sq_tokens": int((lengths * lengths).sum()),
                "targets": int((inputs["labels"] != -100).sum()),
                "width": int(inputs["input_ids"].shape[1]),
            }
        )


class StepClock(TrainerCallback):
    """Records the wall time at the start of training and at the end of every optimizer step."""

    def __init__(self, log: StepLog) -> None:
        self.log = log

    def on_train_begin(self, args, state, control, **kwargs):
        self.log.train_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.log.ends.append(time.perf_counter())


class ReferenceTCTrainer(Trainer):
    """Trainer whose loss is the model's own LM loss (full logits) + lambda * TC at position -1, as the reference."""

    def __init__(self, *, num_classes: int, lambda_lc: float, e_w: float, step_log: StepLog,
                 longest_first: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mu = -1.0 / (num_classes - 1)
        self.lambda_lc, self.e_w, self.step_log, self.longest_first = lambda_lc, e_w, step_log, longest_first

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if not self.longest_first:
            return sampler
        rows = self.train_dataset.rows
        return LongestFirst(sampler, max(range(len(rows)), key=lambda i: len(rows[i]["input_ids"])))

    def tc_at_last_position(self, hidden: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """TC on hidden[:, -1, :] (a padding position for all but the longest row), different-class pairs."""
        feats = hidden[:, -1, :]
        norms = feats.norm(dim=1, keepdim=True)
        z = feats * norms.clamp_max(self.e_w) / (norms + 1e-8)
        gram = z @ z.T
        pairs = torch.ones_like(gram).triu(1) * (class_ids[:, None] != class_ids[None, :]).float()
        count = pairs.sum()
        if count > 0:  # a host sync every step, as in the reference
            return ((gram * pairs - self.mu * pairs) ** 2).sum() / count
        return torch.zeros((), device=hidden.device, requires_grad=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        class_ids = inputs.pop("class_indices")
        self.step_log.see(inputs)
        outputs = model(**inputs, output_hidden_states=True)
        loss = outputs.loss + self.lambda_lc * self.tc_at_last_position(outputs.hidden_states[-1], class_ids)
        return (loss, outputs) if return_outputs else loss


def main(argv: list[str] | None = None) -> int:
    """Train for --steps steps and write the step log to --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="HF checkpoint folder (with its tokenizer)")
    parser.add_argument("--rows", type=Path, required=True, help="encoded rows, JSON lines")
    parser.add_argument("--num_classes", type=int, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lambda_lc", type=float, default=1.0)
    parser.add_argument("--e_w", type=float, default=1.0)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--longest_first", action="store_true", help="put the longest row into the first batch")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the base weights")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where the step log goes (JSON)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=8,
            lora_alpha=32,
            lora_dropout=0.1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            bias="none",
        ),
    )
    loaded = time.perf_counter()
    step_log = StepLog()
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        gradient_accumulation_steps=1,
        learning_rate=2e-4,
        warmup_steps=0.05,
        lr_scheduler_type="linear",
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_drop_last=True,
        dataloader_pin_memory=False,
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = ReferenceTCTrainer(
        model=model,
        args=training_args,
        train_dataset=EncodedRows(args.rows),
        data_collator=right_pad_collator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[StepClock(step_log)],
        num_classes=args.num_classes,
        lambda_lc=args.lambda_lc,
        e_w=args.e_w,
        step_log=step_log,
        longest_first=args.longest_first,
    )
    trainer.train()
    args.out.write_text(
        json.dumps(
            {
                "started": STARTED,
                "loaded": loaded,
                "train_begin": step_log.train_begin,
                "step_ends": step_log.ends,
                "batches": step_log.batches,
                "threads": torch.get_num_threads(),
            }
        ),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
