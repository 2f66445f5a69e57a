"""`python -m ncal_core.analyze`: neural-collapse figures and pictures of a model on labelled rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ncal_core.cli import flag, parse_config
from ncal_core.data import check_labels, label_set, load_examples
from ncal_core.errors import NCALError, run_cli
from ncal_core.evaluate import evaluate, write_report
from ncal_core.plots import training_curves
from ncal_core.predictor import load_predictor
from ncal_core.prompts import PromptBuilder


@dataclass
class AnalyzeConfig:
    """Flags of `python -m ncal_core.analyze`."""

    model_path: str | None = flag(None, "a training output, checkpoint or model folder (as for ncal_core.infer)")
    base_model_path: str | None = flag(None, "the base checkpoint under an adapter")
    prompts_file: str | None = flag(None, "labelled rows (TMWPL, PMTD or conversation format)")
    output_dir: str | None = flag(None, "where eval.json, sphere.png, per_class_f1.png and training_curves.png go")
    labels: list[str] | None = flag(None, "class names when the model folder records none (default: sorted gold labels)")
    pooling: str | None = flag(None, "feature pooling: last, seq_last or mean (default: the training run's)")
    batch_size: int = flag(16, "rows per forward pass")


def main(argv: list[str] | None = None) -> int:
    """Score the rows, compute NC1/NC2 on the pooled features and draw the pictures."""
    cfg = parse_config(AnalyzeConfig, argv, description=__doc__.splitlines()[0], prog="python -m ncal_core.analyze")
    for name in ("model_path", "prompts_file", "output_dir"):
        if not getattr(cfg, name):
            raise NCALError(f"--{name} is required")
    if cfg.pooling not in (None, "last", "seq_last", "mean"):
        raise NCALError(f"--pooling: must be last, seq_last or mean, not {cfg.pooling!r}")
    predictor = load_predictor(cfg.model_path, cfg.base_model_path)
    rows = load_examples(cfg.prompts_file)
    labels = cfg.labels or predictor.labels or label_set(rows, cfg.prompts_file)
    check_labels(rows, labels, cfg.prompts_file)
    builder = PromptBuilder(predictor.tokenizer, labels, instruction=predictor.instruction,
                            cutoff_len=predictor.cutoff_len)
    report, features = evaluate(predictor.model, builder, rows, pooling=cfg.pooling or predictor.pooling,
                                batch_size=cfg.batch_size)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_report(output_dir, report, features, [labels.index(r.label) for r in rows], labels)
    curves = Path(cfg.model_path) / "metrics.jsonl"
    if curves.is_file():
        training_curves(curves, output_dir / "training_curves.png")
    print(json.dumps(report["neural_collapse"], indent=2))
    return 0


if __name__ == "__main__":
    run_cli(main)
