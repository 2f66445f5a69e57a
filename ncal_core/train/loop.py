"""`python -m ncal_core.train`: LoRA (or full) fine-tuning with the label-only LM loss and the TC loss.

The loop reads top to bottom in three phases: `setup` (flags -> data -> model -> optimizer -> plan),
`train_step` over each group of micro-batches (a device-resident StepRecord), and at log steps one line of
metrics.jsonl (train.log). Epochs end with the development split's evaluation, which picks the best checkpoint,
and checkpoints; the run ends with the weights that split chose scored once on the test rows.
`accelerate launch -m ncal_core.train ...` runs it data-parallel.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ncal_core.cli import parse_config
from ncal_core.durable import add_files, write_json, write_text
from ncal_core.errors import NCALError
from ncal_core.evaluation.evaluate import evaluate, write_report
from ncal_core.model.classifier import QwenClassifier, save_classifier
from ncal_core.model.hub import is_hub_id
from ncal_core.model.lora import load_adapter_weights, save_adapter
from ncal_core.model.qwen import QwenModel, load_weights_into, save_model
from ncal_core.train import fsdp
from ncal_core.train.checkpoint import prune_checkpoints, save_checkpoint
from ncal_core.train.config import TrainConfig
from ncal_core.train.heads import restore_classifier
from ncal_core.train.log import FlopModel, MetricsLog, device_peak_flops, step_line
from ncal_core.train.resume import rng_state
from ncal_core.train.setup import Run, setup
from ncal_core.train.step import StepRecord, host_values, train_step
from ncal_core.train.stop import StopRequests
from ncal_core.train.summary import outputs_summary, plan_summary

ERROR_FILE = "after_training_error.txt"  # the traceback of a failure after training, beside the saved weights


def main(argv: list[str] | None = None) -> int:
    """Parse flags and train."""
    cfg = parse_config(TrainConfig, argv, description=__doc__.splitlines()[0], prog="python -m ncal_core.train")
    train(cfg)
    return 0


def gathered_weights(run: Run) -> dict[str, torch.Tensor] | None:
    """Every rank of a sharded run: the trained weights consolidated on the main process (None unsharded)."""
    return fsdp.full_weights(run.model, only_trainable=run.use_lora) if run.sharded else None


def save_weights(run: Run, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The trained weights (the adapter, or the whole model), the tokenizer and the run record, into folder.

    weights: a sharded run's, from gathered_weights; default: the model's own."""
    cfg, scorer = run.cfg, run_scorer(run)
    if run.use_lora:
        # a hub id stays a hub id (the adapter loads on any machine with that model), a folder is recorded absolute
        base = cfg.model_name_or_path if is_hub_id(cfg.model_name_or_path) else str(run.base)
        save_adapter(run.model, folder, base_model_name_or_path=base, r=cfg.lora_r, alpha=cfg.lora_alpha,
                     dropout=cfg.lora_dropout, target_modules=cfg.target_modules, weights=weights,
                     head=scorer.score.weight if isinstance(scorer, QwenClassifier) else None)
    elif isinstance(scorer, QwenClassifier):
        save_classifier(scorer, folder, run.data.labels, run.tokenizer.pad_token_id)
    else:
        save_model(run.model, folder, weights=weights)
    run.tokenizer.save_pretrained(folder)
    run.record.write(folder)


def run_scorer(run: Run) -> QwenModel | QwenClassifier:
    """What predicts the class: the decoder with its LM head (label scoring), or a classifier (--head)."""
    return run.accelerator.unwrap_model(run.parts.objective).scorer


def checkpoint(run: Run) -> Path | None:
    """checkpoint-<step> with weights, optimizer, every rank's RNG and the state; the main process writes it."""
    state, accelerator = run.state, run.accelerator
    state.scheduler = run.parts.scheduler.state_dict()
    if accelerator.scaler is not None:  # a resumed fp16 run continues at the loss scale it had reached
        state.scaler = accelerator.scaler.state_dict()
    rng = rng_state()
    if accelerator.num_processes > 1:  # each rank draws dropout from its own stream: the main process saves all
        for r, theirs in enumerate(gather_object([rng])):
            rng.update({f"{name}.rank{r}": value for name, value in theirs.items()})
    weights, objective, optimizer = gathered_weights(run), run.parts.objective, run.parts.optimizer

    def save_optimizer(folder: Path | None) -> None:
        if run.sharded:  # every rank writes its shard of the optimizer state into the main process's folder
            fsdp.save_optimizer(objective, optimizer, folder)
        elif folder is not None:
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    if not run.main_proc:
        save_optimizer(None)
        return None
    folder = save_checkpoint(run.output_dir, save_weights=lambda f: save_weights(run, f, weights),
                             save_optimizer=save_optimizer, rng=rng, state=state)
    best = Path(state.best_checkpoint) if state.best_checkpoint else None
    prune_checkpoints(run.output_dir, run.cfg.save_total_limit, protect=best)
    return folder


def run_eval(run: Run, log: MetricsLog, rows: list, split: str, tag: str, tau: float | None
             ) -> tuple[dict[str, Any], torch.Tensor]:
    """Score labelled rows (sharded over ranks) with post-hoc adjustment by tau (None: chosen on these rows, the
    development split) and log the figures."""
    cfg, acc = run.cfg, run.accelerator
    with fsdp.unsharded_root(run.parts.objective):
        report, features = evaluate(run_scorer(run), run.builder, rows, tc=run.tc or cfg.tc,
                                    batch_size=cfg.per_device_eval_batch_size, prior_log=run.parts.prior_log,
                                    tau=tau, weighting=cfg.dev_weighting if split == "dev" else None,
                                    rank=acc.process_index, world=acc.num_processes)
    line = {"step": run.state.step, "epoch": run.state.epoch, "eval": tag, "split": split, "rows": len(rows),
            "eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"],
            "logit_adjust_tau": report["logit_adjust_tau"]}
    if "weighted_macro_f1" in report:
        line["eval_weighted_macro_f1"] = report["weighted_macro_f1"]
    log(line)
    return report, features


def score_dev(run: Run, log: MetricsLog, tag: str) -> dict[str, Any]:
    """Evaluate the development split (tau chosen there unless fixed) and record its tau in the run record, which
    every checkpoint and the final weights carry. The test rows are never looked at here."""
    report = run_eval(run, log, run.data.dev_rows, "dev", tag, run.cfg.logit_adjust_tau)[0]
    run.record.logit_adjust_tau = report["logit_adjust_tau"]
    return report


def choose_on_dev(run: Run, log: MetricsLog, tag: str) -> bool:
    """Evaluate the development split; whether this step's weights are the best so far (by its weighted
    macro-F1, --dev_weighting)."""
    state = run.state
    score = score_dev(run, log, tag)["weighted_macro_f1"]
    if state.best_macro_f1 is not None and score <= state.best_macro_f1:
        return False
    state.best_macro_f1 = score
    state.best_checkpoint = str(run.output_dir / f"checkpoint-{state.step}")
    return True


def after_step(run: Run, log: MetricsLog) -> None:
    """--eval_strategy steps: the development split every --eval_steps steps (not at the last: the final
    evaluation follows), a checkpoint when it found a new best; --save_strategy steps: a checkpoint."""
    cfg, step = run.cfg, run.state.step
    new_best = run.data.dev_rows and cfg.eval_strategy == "steps" and step % cfg.eval_steps == 0 \
        and step < run.total_steps and choose_on_dev(run, log, f"step {step}")
    if (cfg.save_strategy == "steps" and step % cfg.save_steps == 0) or (new_best and cfg.save_strategy != "no"):
        checkpoint(run)


def end_of_epoch(run: Run, log: MetricsLog) -> None:
    """--eval_strategy epoch: the development split (not at the last step: the final evaluation follows), a
    checkpoint when it found a new best; --save_strategy epoch: a checkpoint."""
    cfg, state = run.cfg, run.state
    state.epoch += 1
    state.micro_batch = 0
    new_best = run.data.dev_rows and cfg.eval_strategy == "epoch" and state.step < run.total_steps \
        and choose_on_dev(run, log, f"epoch {state.epoch}")
    if cfg.save_strategy == "epoch" or (new_best and cfg.save_strategy != "no"):
        checkpoint(run)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the final evaluation report (empty without an eval set)."""
    run = setup(cfg)
    acc, state, data = run.accelerator, run.state, run.data
    if run.main_proc:
        print(plan_summary(train_path=data.train_path, labels=data.labels, counts=data.counts,
                           dev_rows=len(data.dev_rows), eval_path=data.eval_path, eval_rows=len(data.eval_rows),
                           model_name=cfg.model_name_or_path, model=run_scorer(run), use_lora=run.use_lora,
                           total_steps=run.total_steps, per_device=cfg.per_device_train_batch_size,
                           world=acc.num_processes, accumulation=cfg.gradient_accumulation_steps,
                           output_dir=run.output_dir, tau=cfg.logit_adjust_tau), flush=True)
    log = MetricsLog(run.output_dir / "metrics.jsonl", state, write=run.main_proc,
                     trackers=acc if cfg.report_to != "none" else None)
    flops, peak = FlopModel.of(run.model), device_peak_flops(acc.device, cfg.bf16)
    accum = cfg.gradient_accumulation_steps
    run.parts.objective.train()
    bar = tqdm(total=run.total_steps, initial=state.step, disable=not run.main_proc, dynamic_ncols=True)
    stop = StopRequests(acc)

    def stop_here() -> None:
        bar.close()
        folder = checkpoint(run)
        if run.main_proc:
            print(f"interrupted: saved {folder}; continue with --resume_from_checkpoint latest", flush=True)
        raise SystemExit(stop.exit_code())

    sums, clock = StepRecord.zero(acc.device), time.perf_counter()  # since the last log line
    with stop.installed():
        while state.step < run.total_steps:
            run.sampler.set_epoch(state.epoch)
            batches = list(run.sampler)[: run.steps_per_epoch * accum]
            while state.micro_batch < len(batches) and state.step < run.total_steps:
                sums = train_step(run.parts, batches[state.micro_batch: state.micro_batch + accum], sums)
                state.step += 1
                state.micro_batch += accum
                bar.update(1)
                log_step = state.step % cfg.logging_steps == 0 or state.step == run.total_steps
                if log_step:
                    line = step_line(host_values(acc.reduce(sums.packed(), "sum")), step=state.step,
                                     epoch=state.epoch + state.micro_batch / len(batches),
                                     lr=run.parts.scheduler.get_last_lr()[0], seconds=time.perf_counter() - clock,
                                     world=acc.num_processes, tc_weight=run.tc.weight if run.tc else None,
                                     flops=flops, peak_flops=peak)
                    bar.set_postfix(loss=f"{line['loss']:.4f}", lm=f"{line['lm_loss']:.4f}",
                                    tc=f"{line['tc_loss']:.4f}", lr=f"{line['lr']:.2e}",
                                    sps=f"{line['samples_per_s']:.1f}")
                    log(line)
                    sums, clock = StepRecord.zero(acc.device), time.perf_counter()
                    if not math.isfinite(line["loss"]):
                        folder = checkpoint(run)
                        raise NCALError(f"step {state.step}: the loss is {line['loss']}; stopped "
                                        f"(state saved in {folder})")
                after_step(run, log)
                if stop.requested(log_step):
                    stop_here()
            if state.micro_batch >= len(batches):
                end_of_epoch(run, log)
                if stop.requested(True):
                    stop_here()
    bar.close()
    return finish(run, log)


def restore_best(run: Run) -> bool:
    """Load the weights of the checkpoint the development split chose back into the model; False (and a line
    saying so) when that checkpoint was not written (--save_strategy no) or is gone."""
    folder = Path(run.state.best_checkpoint)
    run.accelerator.wait_for_everyone()  # every rank reads the folder the main process wrote
    if not folder.is_dir():
        if run.main_proc:
            print(f"the development split chose {folder.name} (weighted macro-F1 {run.state.best_macro_f1:.4f}), "
                  "which was not kept (--save_strategy no, or deleted): the final weights are scored and saved",
                  flush=True)
        return False
    scorer = run_scorer(run)
    if run.sharded:
        fsdp.load_full_weights(run.model, fsdp.read_weights(run.model, folder, run.use_lora))
    elif isinstance(scorer, QwenClassifier):
        restore_classifier(scorer, folder, run.use_lora)
    elif run.use_lora:
        load_adapter_weights(run.model, folder)
    else:
        load_weights_into(run.model, folder)
    return True


def finish(run: Run, log: MetricsLog) -> dict[str, Any]:
    """The weights the development split chose (the final ones, or with --load_best_model_at_end an earlier
    checkpoint that beat them) scored once on the test rows, with that split's figures beside them; the weights and
    the report; what the run wrote.

    The final weights are written first: anything after training that fails (an evaluation, a picture, a tracker)
    leaves them, the run record and one line saying what failed and how to do only that part again.
    """
    # the tau recorded so far was chosen for a checkpoint's weights: the final ones carry the flag's (None: chosen on
    # the development split) until evaluate_trained records the one chosen for them
    run.record.logit_adjust_tau = run.cfg.logit_adjust_tau
    weights = gathered_weights(run)
    if run.main_proc:
        (run.output_dir / ERROR_FILE).unlink(missing_ok=True)  # an earlier run's failure, not this one's
        add_files(run.output_dir, lambda folder: save_weights(run, folder, weights))
    phase = AfterTraining(run)
    try:
        report = evaluate_trained(run, log, phase)
        phase.now = "ending the trackers"
        run.accelerator.wait_for_everyone()
        run.accelerator.end_training()
    except Exception as err:  # noqa: BLE001 (the weights are saved: the failure becomes one line on how to go on)
        raise NCALError(phase.failed(err)) from err
    return report


class AfterTraining:
    """What a run is doing after its last step, for the line that says what failed and how to redo it."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.now = "scoring the development split"

    def failed(self, err: Exception) -> str:
        out, data = self.run.output_dir, self.run.data
        redo = f"python -m ncal_core.infer --model_path {out} --prompts_file ROWS"
        if data.eval_rows:
            redo = (f"python -m ncal_core.analyze --model_path {out} --prompts_file {data.eval_path} --output_dir "
                    f"{out / 'analysis'}")
        return (f"{self.now} failed after training ({type(err).__name__}: {err}{self.keep_traceback(err)}); the "
                f"trained weights and run record are saved in {out}; redo only that part with: {redo}")

    def keep_traceback(self, err: Exception) -> str:
        """Write the traceback of anything but a user's mistake beside the weights (a bug's, for its report); where
        it is, for the one line. Printed to stderr instead when the folder cannot take it."""
        if isinstance(err, NCALError):
            return ""
        rank = self.run.accelerator.process_index
        path = self.run.output_dir / (ERROR_FILE if rank == 0 else f"after_training_error.rank{rank}.txt")
        text = "".join(traceback.format_exception(err))
        try:
            write_text(path, text)
        except OSError:
            print(text, file=sys.stderr, end="", flush=True)
            return ""
        return f"; its traceback is in {path}"


def evaluate_trained(run: Run, log: MetricsLog, phase: AfterTraining) -> dict[str, Any]:
    """finish's scoring: the development split's choice of weights and tau, then the test rows; their report."""
    data, state = run.data, run.state
    report: dict[str, Any] = {}
    dev = score_dev(run, log, "final") if data.dev_rows else None
    weights_from = "final"
    if dev and (state.best_macro_f1 is None or dev["weighted_macro_f1"] > state.best_macro_f1):
        # the final weights beat every epoch's checkpoint: the best model is the output folder itself
        state.best_macro_f1, state.best_checkpoint = dev["weighted_macro_f1"], str(run.output_dir)
    elif dev and run.cfg.load_best_model_at_end and restore_best(run):
        weights_from = state.best_checkpoint
        dev = score_dev(run, log, f"best: {Path(weights_from).name}")  # its figures and tau, for these weights
    if not dev:
        run.record.logit_adjust_tau = run.cfg.logit_adjust_tau or 0.0
    weights = gathered_weights(run) if weights_from != "final" else None
    if run.main_proc:  # the chosen weights, and the tau chosen for them, replace what was written at the end
        if weights_from == "final":
            run.record.write(run.output_dir)
        else:
            add_files(run.output_dir, lambda folder: save_weights(run, folder, weights))
    if data.eval_rows:  # with the tau the development split chose for these weights
        phase.now = f"scoring the test rows of {data.eval_path}"
        report, features = run_eval(run, log, data.eval_rows, "test", "final", run.record.logit_adjust_tau)
    if dev and report:  # the test figures, with the development split's beside them
        report["dev"] = {key: dev[key] for key in ("accuracy", "macro_f1", "weighted_macro_f1", "dev_weighting",
                                                   "logit_adjust_tau", "unadjusted", "tau_chosen_on_these_rows")
                         if key in dev}
        report["dev"]["rows"] = len(data.dev_rows)
        report["dev"]["weights_from"] = weights_from
        if state.best_checkpoint:
            report["dev"]["best_checkpoint"] = {"path": state.best_checkpoint, "macro_f1": state.best_macro_f1}
    if run.main_proc:
        phase.now = "writing the report"
        if data.dev_rows:
            write_json(run.output_dir / "dev_ids.json", [r.id for r in data.dev_rows])
        if data.eval_rows:
            gold = [data.labels.index(row.label) for row in data.eval_rows]
            write_report(run.output_dir, report, features, gold, data.labels)
        print(outputs_summary(run.output_dir), flush=True)
    return report
