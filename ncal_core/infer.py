"""`python -m ncal_core.infer`: predict labels by constrained label scoring, and report against gold labels."""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ncal_core.cli import flag, parse_config
from ncal_core.data.rows import (
    Example,
    check_class_names,
    check_labels,
    label_column_flag,
    label_set,
    load_examples,
    prompts_split_flag,
    table_delimiter,
    text_column_flag,
)
from ncal_core.durable import write_json
from ncal_core.errors import NCALError, run_cli
from ncal_core.evaluation.generate import greedy_generate
from ncal_core.evaluation.metrics import classification_report, format_report
from ncal_core.evaluation.predictor import (
    ModelFolder,
    check_device,
    label_scorer,
    load_folder,
    model_labels,
    open_model_folder,
    pick_device,
    pick_dtype,
    progress,
    run_tau,
    say_tau,
    tau_offset,
)
from ncal_core.evaluation.scoring import ensemble_log_probs
from ncal_core.outputs import check_output_file


@dataclass
class InferConfig:
    """Flags of `python -m ncal_core.infer`."""

    model_path: list[str] | None = flag(None, "a training output, checkpoint, merged/full checkpoint, base "
                                            "checkpoint or PEFT adapter: a folder or a hub id; several, "
                                            "comma-separated, score as "
                                            "an ensemble (the mean of their label log-probabilities), one model in "
                                            "memory at a time")
    base_model_path: str | None = flag(None, "the base checkpoint under an adapter, a folder or a hub id (default: "
                                           "the one its run or adapter_config.json names)")
    revision: str | None = flag(None, "the hub revision of a --model_path that is a hub id; default: main")
    prompt: str | None = flag(None, "one text to classify")
    prompts_file: str | None = flag(None, "rows to classify, in any format training reads (data/README.md); gold labels "
                                          "optional")
    text_column: str = text_column_flag()
    label_column: str = label_column_flag()
    dataset_split: str = prompts_split_flag()
    interactive: bool = flag(False, "read texts from stdin, one per line, and print label and probability")
    output_file: str | None = flag(None, "write the predictions: JSONL, one line per row (id, prediction, scores, "
                                         "label), or CSV/TSV by a .csv/.tsv suffix, a header row and the columns "
                                         "id, prediction, score:<label> for each label, label (--generate: valid in "
                                         "place of the scores; no gold label: an empty cell)")
    metrics_file: str | None = flag(None, "write the report (accuracy, macro_f1, per class, confusion, and "
                                          "predict_seconds: the time the predictions took, loading the model(s) not "
                                          "counted) as JSON")
    labels: list[str] | None = flag(None, "the class names, when the model folder does not record them (default: a "
                                        "classification head's id2label, in the order of its outputs; else the "
                                        "sorted gold labels of --prompts_file)")
    instruction: str | None = flag(None, "system turn before each prompt (default: the training run's)")
    batch_size: int = flag(16, "prompts scored per forward pass")
    logit_adjust_tau: float | None = flag(None, "post-hoc logit adjustment: label scores - tau * log training prior "
                                             "(needs a training output, which records the class counts; default: "
                                             "the tau of the training run's evaluation, else 0)")
    generate: bool = flag(False, "decode greedily instead of scoring labels, and count invalid outputs")
    max_new_tokens: int = flag(16, "token limit of --generate")
    dtype: str = flag("auto", "auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16")
    device: str | None = flag(None, "where the model runs: cpu, cuda, cuda:1, ... (default: cuda when there is a "
                                    "GPU, else cpu)")

    def check(self) -> None:
        """Refuse missing, contradictory or out-of-range flags with one line naming the flag."""
        if not self.model_path:
            raise NCALError("--model_path is required")
        if sum([self.prompt is not None, self.prompts_file is not None, self.interactive]) != 1:
            raise NCALError("give exactly one of --prompt, --prompts_file and --interactive")
        if len(self.model_path) > 1 and (self.interactive or self.generate):
            raise NCALError("--model_path: several models score --prompt or --prompts_file as an ensemble; "
                            "--interactive and --generate take one model")
        if self.batch_size < 1:
            raise NCALError(f"--batch_size: must be >= 1, not {self.batch_size}")
        if self.max_new_tokens < 1:
            raise NCALError(f"--max_new_tokens: must be >= 1, not {self.max_new_tokens}")
        if self.logit_adjust_tau is not None and self.generate:
            raise NCALError("--logit_adjust_tau: adjusts label scores, which --generate does not compute")
        check_device(self.device, self.dtype)
        check_class_names("--labels", self.labels)

    def check_outputs(self) -> None:
        """The files infer writes are neither its inputs nor a run's records, and can be written."""
        inputs = [("--prompts_file", self.prompts_file), *(("--model_path", path) for path in self.model_path)]
        if self.output_file:
            check_output_file("--output_file", self.output_file, inputs)
        if self.metrics_file:
            check_output_file("--metrics_file", self.metrics_file, [*inputs, ("--output_file", self.output_file)])


def _rows(cfg: InferConfig) -> list[Example]:
    if cfg.prompts_file:
        return load_examples(cfg.prompts_file, require_labels=False, text_column=cfg.text_column,
                             label_column=cfg.label_column, dataset_split=cfg.dataset_split)
    if cfg.prompt is not None:
        return [Example(id="prompt", messages=[{"role": "user", "content": cfg.prompt}], label=None,
                        where="--prompt")]
    return []


def _check_ensemble(paths: list[str], folders: list[ModelFolder], own_labels: list[list[str] | None],
                    labels: list[str]) -> None:
    """The models of an ensemble score one label set: each that records its labels was trained on it, and a head
    model's outputs are those classes in that order."""
    if len(paths) == 1:
        return
    for path, folder, own in zip(paths, folders, own_labels):
        if own and set(own) != set(labels):
            raise NCALError(f"--model_path {path}: trained on the labels {','.join(own)}, not "
                            f"{','.join(labels)}; the models of an ensemble score one label set")
        if folder.num_classes is not None and own != labels:
            raise NCALError(f"--model_path {path}: its classification head's outputs are the classes "
                            f"{','.join(own)} in that order, not {','.join(labels)}; the models of an ensemble "
                            "score one label set")


def _table_row(output: dict) -> dict:
    """One prediction as table cells: a `score:<label>` column per label where its scores were."""
    cells = {}
    for key, value in output.items():
        if key == "scores":
            cells.update({f"score:{label}": prob for label, prob in value.items()})
        else:
            cells[key] = value
    return cells


def _write_predictions(path: Path, outputs: list[dict]) -> None:
    """Write the predictions as CSV or TSV by path's suffix (UTF-8, a header row), else as JSON lines."""
    delimiter = table_delimiter(path)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        if delimiter is None:
            handle.writelines(json.dumps(output, ensure_ascii=False) + "\n" for output in outputs)
            return
        rows = [_table_row(output) for output in outputs]
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the model(s), predict and report."""
    cfg = parse_config(InferConfig, argv, description=__doc__.splitlines()[0], prog="python -m ncal_core.infer")
    cfg.check()
    cfg.check_outputs()
    rows = _rows(cfg)
    if cfg.metrics_file and (cfg.interactive or any(row.label is None for row in rows)):
        raise NCALError(f"--metrics_file: {cfg.prompts_file or '--prompt'} has rows without a gold label")
    # every model's folder and records are checked before the first is read
    folders = [open_model_folder(path, cfg.base_model_path, cfg.revision) for path in cfg.model_path]
    runs = [folder.run for folder in folders]
    own_labels = [model_labels(folder, cfg.labels) for folder in folders]
    # a plain checkpoint or a foreign adapter records none: the sorted gold labels of the rows
    labels = own_labels[0] or label_set(rows, f"{cfg.prompts_file or '--prompt'} (the model records no labels: "
                                              "--labels)")
    gold_rows = [row for row in rows if row.label is not None]
    if gold_rows:
        check_labels(gold_rows, labels, cfg.prompts_file or "--prompt")
    _check_ensemble(cfg.model_path, folders, own_labels, labels)
    # --generate computes no label scores to adjust
    taus = [0.0 if cfg.generate else run_tau(run, cfg.logit_adjust_tau) for run in runs]
    offsets = [tau_offset(tau, path, run, labels) for tau, path, run in zip(taus, cfg.model_path, runs)]
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    predictor = load_folder(folders[0], dtype=dtype, device=device)
    if cfg.generate and predictor.classifier is not None:
        raise NCALError(f"--generate: {cfg.model_path[0]} is a classification head model, which generates no text; "
                        "drop --generate")
    if not cfg.generate:  # said once the model is read: a model that cannot be read gets its error line alone
        say_tau(taus, given=cfg.logit_adjust_tau is not None)

    if cfg.interactive:
        score = label_scorer(predictor, labels, offsets[0], cfg.instruction, cfg.batch_size)
        for line in sys.stdin:
            if line.strip():
                example = Example(id="stdin", messages=[{"role": "user", "content": line.strip()}], label=None,
                                  where="stdin")
                probs = score([example])[0].exp().cpu()
                best = int(probs.argmax())
                print(f"{labels[best]}\t{probs[best]:.4f}", flush=True)
        return 0

    predict_seconds = 0.0
    if cfg.generate:
        started = time.perf_counter()
        builder = predictor.prompt_builder(labels, cfg.instruction)
        texts = [predictor.tokenizer.decode(greedy_generate(predictor.model, builder.prompt_ids(row),
                                                            predictor.eos_ids, cfg.max_new_tokens),
                                            skip_special_tokens=True).strip()
                 for row in tqdm(rows, desc="generating", unit="row", dynamic_ncols=True)]
        predict_seconds = time.perf_counter() - started
        predictions = texts
        invalid = sum(text not in labels for text in texts)
        print(f"generated {len(texts)} outputs, {invalid} not a valid label")
        outputs = [{"id": row.id, "prediction": text, "valid": text in labels, "label": row.label}
                   for row, text in zip(rows, texts)]
    else:
        log_probs = []
        for i, (path, offset) in enumerate(zip(cfg.model_path, offsets)):
            if i:
                predictor = None  # freed before the next model is read
                predictor = load_folder(folders[i], dtype=dtype, device=device)
            started = time.perf_counter()
            with progress(predictor.model, len(rows), f"scoring with {path}"):
                # on the host before the clock stops, so that the time holds the device's work
                log_probs.append(label_scorer(predictor, labels, offset, cfg.instruction, cfg.batch_size)(rows).cpu())
            predict_seconds += time.perf_counter() - started
        probs = ensemble_log_probs(log_probs).exp()
        predictions = [labels[i] for i in probs.argmax(dim=1).tolist()]
        outputs = [{"id": row.id, "prediction": pred,
                    "scores": {label: float(p) for label, p in zip(labels, row_probs.tolist())}, "label": row.label}
                   for row, pred, row_probs in zip(rows, predictions, probs)]
        invalid = 0
    if cfg.output_file:
        _write_predictions(Path(cfg.output_file), outputs)
        print(f"wrote {len(outputs)} predictions to {cfg.output_file}", file=sys.stderr)
    elif cfg.prompt is not None:
        best = outputs[0]
        print(f"{best['prediction']}\t{best['scores'][best['prediction']]:.4f}" if not cfg.generate
              else best["prediction"])
    if gold_rows and len(gold_rows) == len(rows):
        # an invalid generated output counts as wrong: it is mapped to no class index
        pred_index = [labels.index(p) if p in labels else -1 for p in predictions]
        report = classification_report([labels.index(r.label) for r in rows], pred_index, labels)
        report["predict_seconds"] = predict_seconds
        if cfg.generate:
            report["invalid_outputs"] = invalid
        else:
            report["logit_adjust_tau"] = taus[0] if len(taus) == 1 else taus
        print(format_report(report))
        if cfg.metrics_file:
            write_json(Path(cfg.metrics_file), report)
            print(f"wrote the report to {cfg.metrics_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
