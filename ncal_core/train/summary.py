"""What a training run says before its first step and after its last: the data, the model, the plan, the files."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def _parameters(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def plan_summary(*, train_path: Path, labels: list[str], counts: list[int], dev_rows: int, eval_path: Path | None,
                 eval_rows: int, model_name: str, model: nn.Module, use_lora: bool, total_steps: int,
                 per_device: int, world: int, accumulation: int, output_dir: Path, tau: float | None) -> str:
    """The block printed before the first step."""
    classes = ", ".join(f"{label} {n}" for label, n in zip(labels, counts))
    evaluation = f"{eval_rows} test rows of {eval_path}, scored once by the final weights" if eval_path else \
        "no test (no evaluation file; pass --eval_dataset_path to score one)"
    return "\n".join([
        f"data:       {sum(counts)} training rows of {train_path}, {len(labels)} classes: {classes}",
        f"dev split:  {dev_rows} rows held out of training, evaluated to choose the best checkpoint"
        if dev_rows else "dev split:  none (--val_size 0)",
        f"evaluation: {evaluation}",
        "tau:        post-hoc logit adjustment " + (f"{tau:g} (--logit_adjust_tau)" if tau is not None else
                                                    "chosen on the dev split" if dev_rows else
                                                    "0: no dev split to choose it on (--logit_adjust_tau fixes one)"),
        f"model:      {model_name} ({'LoRA' if use_lora else 'full fine-tuning'}), {_parameters(model)}",
        f"plan:       {total_steps} optimizer steps of {per_device * world * accumulation} rows "
        f"({per_device} per process x {world} process(es) x {accumulation} accumulation)",
        f"outputs:    {output_dir}",
    ])


def outputs_summary(output_dir: Path) -> str:
    """The line printed after the last step: what the run left in its folder."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir() if not p.name.startswith("."))
    return f"wrote {output_dir}: {', '.join(names)}"
