"""`python -m ncal_core.analyze`: neural-collapse figures and pictures of a model on labelled rows."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ncal_core.cli import flag, parse_config
from ncal_core.data import rows
from ncal_core.data.rows import check_class_names, check_labels, label_set, load_examples
from ncal_core.errors import NCALError, run_cli
from ncal_core.evaluation.evaluate import evaluate, write_report
from ncal_core.evaluation.plots import training_curves
from ncal_core.evaluation.predictor import (
    check_device,
    load_folder,
    model_labels,
    open_model_folder,
    pick_device,
    pick_dtype,
    progress,
    run_tau,
    say_tau,
    training_log_prior,
)
from ncal_core.loss.tc import TCConfig
from ncal_core.outputs import check_output_dir
from ncal_core.train.summary import outputs_summary

WRITES = ("eval.json", "sphere.png", "per_class_f1.png", "training_curves.png")


@dataclass
class AnalyzeConfig:
    """Flags of `python -m ncal_core.analyze`."""

    model_path: str | None = flag(None, "a training output, checkpoint or model: a folder or a hub id (as for "
                                        "ncal_core.infer)")
    base_model_path: str | None = flag(None, "the base checkpoint under an adapter, a folder or a hub id")
    revision: str | None = flag(None, "the hub revision of a --model_path that is a hub id; default: main")
    prompts_file: str | None = flag(None, "labelled rows, in any format training reads (data/README.md)")
    text_column: str = rows.text_column_flag()
    label_column: str = rows.label_column_flag()
    dataset_split: str = rows.prompts_split_flag()
    output_dir: str | None = flag(None, "where eval.json, sphere.png, per_class_f1.png and training_curves.png go: "
                                        "not the --model_path folder, nor another run's or model's (unless "
                                        "--overwrite_output_dir)")
    labels: list[str] | None = flag(None, "class names when the model folder records none (default: a classification "
                                        "head's id2label, in the order of its outputs; else the sorted gold labels)")
    pooling: str | None = flag(None, "feature pooling: last, seq_last or mean (default: the training run's; a "
                                   "classification head model: last, its head's input)")
    instruction: str | None = flag(None, "system turn before each prompt (default: the training run's)")
    logit_adjust_tau: float | None = flag(None, "post-hoc logit adjustment: label scores - tau * log training prior "
                                             "(default: the tau of the training run's evaluation, else 0)")
    batch_size: int = flag(16, "rows per forward pass")
    overwrite_output_dir: bool = flag(False, "write into an --output_dir that holds a training run's or a model's "
                                             "files (never the --model_path folder itself)")
    dtype: str = flag("auto", "auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16")
    device: str | None = flag(None, "where the model runs: cpu, cuda, cuda:1, ... (default: cuda when there is a "
                                    "GPU, else cpu)")

    def check(self) -> None:
        """Refuse missing or out-of-range flags with one line naming the flag."""
        for name in ("model_path", "prompts_file", "output_dir"):
            if not getattr(self, name):
                raise NCALError(f"--{name} is required")
        if self.pooling is not None:
            TCConfig(pooling=self.pooling).check()
        if self.batch_size < 1:
            raise NCALError(f"--batch_size: must be >= 1, not {self.batch_size}")
        check_device(self.device, self.dtype)
        check_class_names("--labels", self.labels)
        check_output_dir("--output_dir", self.output_dir,
                         [("--model_path", self.model_path), ("--prompts_file", self.prompts_file)],
                         writes=WRITES, overwrite=self.overwrite_output_dir)


def main(argv: list[str] | None = None) -> int:
    """Score the rows as the training run's evaluation does, compute NC1/NC2 on the pooled features and draw the
    pictures."""
    cfg = parse_config(AnalyzeConfig, argv, description=__doc__.splitlines()[0], prog="python -m ncal_core.analyze")
    cfg.check()
    folder = open_model_folder(cfg.model_path, cfg.base_model_path, cfg.revision)
    if folder.num_classes is not None and cfg.pooling not in (None, "last"):
        raise NCALError(f"--pooling {cfg.pooling}: {cfg.model_path} is a classification head model, whose features "
                        "are its head's input, the last token's hidden state; drop --pooling")
    run = folder.run
    rows = load_examples(cfg.prompts_file, text_column=cfg.text_column, label_column=cfg.label_column,
                         dataset_split=cfg.dataset_split)
    labels = model_labels(folder, cfg.labels) or label_set(rows, cfg.prompts_file)
    check_labels(rows, labels, cfg.prompts_file)
    tau = run_tau(run, cfg.logit_adjust_tau)
    prior = training_log_prior(cfg.model_path, run, labels) if tau else None
    device = pick_device(cfg.device)
    predictor = load_folder(folder, dtype=pick_dtype(cfg.dtype, device), device=device)
    say_tau([tau], given=cfg.logit_adjust_tau is not None)
    builder = predictor.prompt_builder(labels, cfg.instruction)
    # evaluate reads every row twice: to score the labels, then to pool its features (a classification head: once
    # for both)
    passes = 1 if predictor.classifier is not None else 2
    with progress(predictor.model, passes * len(rows), "scoring and pooling"):
        tc = replace(predictor.tc, pooling=cfg.pooling) if cfg.pooling else predictor.tc
        report, features = evaluate(predictor.scorer, builder, rows, tc=tc, batch_size=cfg.batch_size, prior_log=prior,
                                    tau=tau)
    output_dir = Path(cfg.output_dir)
    write_report(output_dir, report, features, [labels.index(r.label) for r in rows], labels)
    curves = Path(cfg.model_path) / "metrics.jsonl"
    if curves.is_file():
        training_curves(curves, output_dir / "training_curves.png")
    if "neural_collapse" in report:
        print(json.dumps(report["neural_collapse"], indent=2))
    print(outputs_summary(output_dir))
    return 0


if __name__ == "__main__":
    run_cli(main)
