"""A training run's setup: flags -> data -> model -> optimizer -> plan -> state, every part the loop needs.

Every rank builds the same list of global batches from the seed and takes its own slice of each, so the
TC loss and the token count of every step are those of the global batch.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs
from transformers import PreTrainedTokenizerBase

from ncal_core.cli import DTYPES
from ncal_core.data.batching import MEGABATCH_BATCHES, LengthGroupedBatches, row_weights
from ncal_core.data.prompts import EncodedRow, PromptBuilder
from ncal_core.data.registry import resolve_dataset
from ncal_core.data.rows import Example, check_labels, class_counts, dev_split, label_set, load_examples
from ncal_core.errors import NCALError
from ncal_core.loss.classifier_objective import prompt_rows
from ncal_core.loss.logit_adjustment import label_decisions, log_prior
from ncal_core.loss.objective import TrainingObjective, compile_layers
from ncal_core.loss.tc import TCConfig, resolve_backend, simplex_etf
from ncal_core.model.hub import checkpoint_folder
from ncal_core.model.lora import inject_lora, load_adapter
from ncal_core.model.quantize import quantize_base
from ncal_core.model.qwen import QwenModel, load_model
from ncal_core.model.tiny import tiny_checkpoint
from ncal_core.model.tokenizer import load_tokenizer
from ncal_core.run_record import RunRecord
from ncal_core.train import fsdp
from ncal_core.train.checkpoint import read_optimizer_state, read_rng, read_state, resolve_checkpoint
from ncal_core.train.config import BUILTIN_TINY, TrainConfig, uses_lora, uses_tc
from ncal_core.train.heads import head_objective
from ncal_core.train.resume import check_resume, rank_rng, resume_settings, set_rng_state
from ncal_core.train.run_folder import prepare_output_dir, truncate_log
from ncal_core.train.schedule import make_optimizer, make_scheduler, set_peak_lr
from ncal_core.train.state import TrainState
from ncal_core.train.step import StepParts


@dataclass
class Data:
    """The rows of a run, read and checked against its labels."""

    train_path: Path
    labels: list[str]
    train_rows: list[Example]
    dev_rows: list[Example]
    counts: list[int]          # training rows per class
    eval_path: Path | None
    eval_rows: list[Example]


@dataclass
class Run:
    """Everything set up before the first step; the flags, the accelerator and the TC loss are the step's (parts)."""

    parts: StepParts
    data: Data
    base: Path                 # the base checkpoint, absolute
    tokenizer: PreTrainedTokenizerBase
    builder: PromptBuilder
    record: RunRecord
    sampler: LengthGroupedBatches
    steps_per_epoch: int
    total_steps: int
    state: TrainState

    @property
    def cfg(self) -> TrainConfig:
        return self.parts.cfg

    @property
    def accelerator(self) -> Accelerator:
        return self.parts.accelerator

    @property
    def tc(self) -> TCConfig | None:
        """None without the TC loss; its backend resolved for the device."""
        return self.parts.tc

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def use_lora(self) -> bool:
        return uses_lora(self.cfg.use_lora, self.cfg.model_name_or_path)

    @property
    def main_proc(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 shards the weights over the processes (ours, or accelerate's FSDP plugin)."""
        return fsdp.is_sharded(self.parts.objective)

    @property
    def model(self) -> QwenModel:
        return self.accelerator.unwrap_model(self.parts.objective).model


def learning_rate(cfg: TrainConfig) -> float:
    """--learning_rate, or its default for the kind of training."""
    return cfg.learning_rate or (2e-4 if uses_lora(cfg.use_lora, cfg.model_name_or_path) else 1e-3)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's accelerate state: mixed precision, and the process group's timeout (--ddp_timeout)."""
    # launched as several processes (accelerate launch --multi_gpu, torchrun) on a machine without CUDA:
    # without cpu=True accelerate starts every process as a lone rank 0, all writing the same folder
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no", cpu=multi_cpu,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))],
                       log_with=None if cfg.report_to == "none" else cfg.report_to,
                       project_dir=Path(cfg.output_dir) / "runs")


def start_trackers(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """--report_to: the trackers' run, named after the output folder, with every flag as its configuration."""
    if cfg.report_to == "none":
        return
    flags = {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in asdict(cfg).items()}
    accelerator.init_trackers(Path(cfg.output_dir).resolve().name, config=flags)


def _eval_path(cfg: TrainConfig) -> Path | None:
    """The evaluation file: the flag, or the test split of a named dataset, or none."""
    if cfg.eval_dataset_path is not None:
        return None if cfg.eval_dataset_path.lower() == "none" else resolve_dataset(cfg.eval_dataset_path, "test")
    if Path(cfg.dataset_path).exists():
        return None
    return resolve_dataset(cfg.dataset_path, "test")


def read_data(cfg: TrainConfig) -> Data:
    train_path = resolve_dataset(cfg.dataset_path, "train")
    columns = {"text_column": cfg.text_column, "label_column": cfg.label_column}
    train_rows = load_examples(train_path, **columns, dataset_split=cfg.dataset_split)
    labels = cfg.label_types or label_set(train_rows, train_path)
    check_labels(train_rows, labels, train_path)
    dev_rows: list[Example] = []
    if cfg.dev_per_class or cfg.val_size:
        train_rows, dev_rows = dev_split(train_rows, cfg.dev_seed, train_path, per_class=cfg.dev_per_class,
                                         size=cfg.val_size)
    counts = class_counts([labels.index(r.label) for r in train_rows], len(labels))
    eval_path = _eval_path(cfg)
    eval_rows = load_examples(eval_path, **columns, dataset_split="test") if eval_path else []
    if eval_path:
        check_labels(eval_rows, labels, eval_path)
    return Data(train_path, labels, train_rows, dev_rows, counts, eval_path, eval_rows)


def _meant_a_real_model(cfg: TrainConfig) -> bool:
    """Flags that make sense for a pretrained checkpoint, given without --model_name_or_path."""
    return bool(cfg.use_lora or cfg.bf16 or cfg.fp16 or "tmwpl" not in cfg.dataset_path.lower())


def _base_model(cfg: TrainConfig, texts: list[str]) -> Path:
    """The base checkpoint folder: the user's, or the built-in tiny one (built on first use, its tokenizer
    trained on `texts`)."""
    if cfg.model_name_or_path == BUILTIN_TINY:
        return tiny_checkpoint(texts, seed=cfg.seed, vocab_size=cfg.tiny_vocab_size,
                               hidden_size=cfg.tiny_hidden_size, num_layers=cfg.tiny_num_layers,
                               tied=cfg.tiny_tied_embeddings)
    return checkpoint_folder(cfg.model_name_or_path, cfg.revision, what="--model_name_or_path")


def _read_resume(cfg: TrainConfig, resume: Path, world: int, main_proc: bool
                 ) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """A checkpoint's trainer state and RNG states, refused in one line when this run cannot continue it."""
    state = read_state(resume)
    rng = read_rng(resume)
    for line in check_resume(cfg, world, learning_rate(cfg), state, rng, resume):
        if main_proc:
            print(line, flush=True)
    return state, rng


def _load_model(cfg: TrainConfig, base: Path, resume: Path | None, use_lora: bool, device: torch.device,
                world: int) -> QwenModel:
    """The model to train: the base (or a full checkpoint to resume), with new or resumed LoRA adapters, its
    frozen base quantized with --quantization (splittable over the processes with --fsdp)."""
    torch.manual_seed(cfg.seed)
    # a head run's checkpoint is a sequence classifier: heads.head_objective loads it onto the base
    full_resume = resume and not use_lora and cfg.head == "lm"
    # sharded: read into host memory, and fully_shard moves each unit's shard to the GPU (a whole copy of a
    # large model would not fit on one)
    load_device = torch.device("cpu") if cfg.fsdp and world > 1 else device
    model = load_model(resume if full_resume else base, dtype=DTYPES[cfg.torch_dtype], device=load_device)
    if use_lora:
        if resume:
            load_adapter(model, resume)
        else:
            inject_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    if cfg.quantization == "nf4":
        quantize_base(model, shards=world if cfg.fsdp else 1)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.torch_compile:
        compile_layers(model)
    return model


def _sampler(cfg: TrainConfig, encoded: list[EncodedRow], num_classes: int, world: int) -> LengthGroupedBatches:
    """The global batches of every epoch, the same on every rank."""
    global_batch = cfg.per_device_train_batch_size * world
    return LengthGroupedBatches([len(r.input_ids) for r in encoded], global_batch, seed=cfg.seed,
                                drop_last=len(encoded) >= global_batch,
                                weights=row_weights([r.label_index for r in encoded], num_classes, cfg.resample),
                                weighted_from_epoch=max(0, math.ceil(cfg.num_train_epochs) - cfg.resample_epochs)
                                if cfg.resample_epochs else 0,
                                megabatch_batches=MEGABATCH_BATCHES if cfg.group_by_length else 1)


def _restore(accelerator: Accelerator, objective, optimizer, scheduler, resume: Path, state: TrainState,
             rng: dict[str, torch.Tensor], lr: float, output_dir: Path) -> None:
    """Continue a checkpoint: optimizer, schedule (at this run's peak rate), loss scale, RNG and the log."""
    try:
        if fsdp.is_sharded(objective):
            fsdp.load_optimizer(objective, optimizer, resume)
        else:
            optimizer.load_state_dict(read_optimizer_state(resume))
    except ValueError as err:
        raise NCALError(f"{resume / 'optimizer.pt'}: does not fit the model being trained ({err})") from None
    scheduler.load_state_dict(state.scheduler)
    set_peak_lr(scheduler, lr)  # a changed --learning_rate is honoured
    if accelerator.scaler is not None and state.scaler is not None:
        accelerator.scaler.load_state_dict(state.scaler)
    set_rng_state(rank_rng(rng, accelerator.process_index, accelerator.num_processes))
    if accelerator.is_main_process and resume.parent.resolve() == output_dir.resolve():
        # what the interrupted run logged after this checkpoint is logged again by this run
        truncate_log(output_dir / "metrics.jsonl", state.log_lines)


def setup(cfg: TrainConfig) -> Run:
    """Check the flags, read the data, build the model, plan the steps and restore a checkpoint to resume."""
    cfg.check()
    if cfg.fp16 and not torch.cuda.is_available():
        raise NCALError("--fp16: float16 mixed precision needs a CUDA GPU; use --bf16 true on CPU")
    accelerator = make_accelerator(cfg)
    main_proc, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    output_dir = Path(cfg.output_dir)
    resume = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir) if cfg.resume_from_checkpoint else None
    if resume:  # checked before anything is loaded: a resume that cannot continue the run is refused at once
        saved_state, rng = _read_resume(cfg, resume, world, main_proc)
    if main_proc:
        prepare_output_dir(output_dir, cfg, resuming=resume is not None)
    accelerator.wait_for_everyone()
    start_trackers(accelerator, cfg)
    data = read_data(cfg)

    use_lora, lr = uses_lora(cfg.use_lora, cfg.model_name_or_path), learning_rate(cfg)
    if main_proc and cfg.model_name_or_path == BUILTIN_TINY and _meant_a_real_model(cfg):
        print("note: training the built-in tiny model from scratch (no --model_name_or_path given); pass "
              "--model_name_or_path DIR to fine-tune a Qwen checkpoint", flush=True)
    with accelerator.main_process_first():  # the tiny model is built once, by the main process
        # the tiny tokenizer learns the texts only: a label is ordinary text to it, as to a real Qwen tokenizer
        texts = [m["content"] for row in data.train_rows for m in row.messages]
        base = _base_model(cfg, texts).resolve()  # absolute: adapters and records name it from anywhere
    tokenizer = load_tokenizer(base)
    builder = PromptBuilder(tokenizer, data.labels, instruction=cfg.instruction, cutoff_len=cfg.cutoff_len,
                            truncation=cfg.truncation)
    encoded = builder.encode_all(data.train_rows)
    if cfg.head != "lm":
        encoded = prompt_rows(encoded)
    model = _load_model(cfg, base, resume, use_lora, device, world)
    K = len(data.labels)
    decisions = label_decisions(builder.label_ids, data.counts).to(device) \
        if cfg.la_loss_tau > 0 and cfg.head == "lm" else None
    tc = replace(cfg.tc, backend=resolve_backend(cfg.tc_backend, device)) \
        if uses_tc(cfg.use_etf_loss, cfg.lambda_lc) else None
    prior_log = log_prior(data.counts).to(device)
    if cfg.head == "lm":
        objective = TrainingObjective(model, tc=tc, padding_free=cfg.padding_free, decisions=decisions)
    else:
        objective = head_objective(cfg, model, K, prior_log, tc, resume, use_lora)
    etf_targets = simplex_etf(K, model.config.hidden_size, cfg.seed).to(device) \
        if tc and tc.variant == "etf_target" else None
    # accelerate's own FSDP plugin (accelerate config, on GPUs) shards in prepare(); otherwise --fsdp shards here
    accelerate_shards = accelerator.distributed_type == DistributedType.FSDP
    if cfg.fsdp and world > 1 and not accelerate_shards:
        fsdp.shard_objective(objective, device, cfg.bf16)  # before the optimizer: it takes the sharded parameters
    elif cfg.fsdp and world == 1 and main_proc:
        print("note: --fsdp true with one process: nothing to shard, the model trains whole", flush=True)
    optimizer = make_optimizer(objective, lr, cfg.weight_decay)  # the model's weights and a head's

    sampler = _sampler(cfg, encoded, K, world)
    steps_per_epoch = len(sampler) // cfg.gradient_accumulation_steps
    global_batch = cfg.per_device_train_batch_size * world
    if steps_per_epoch == 0 or (world > 1 and len(encoded) < global_batch):  # each rank needs rows of its own
        raise NCALError(f"{data.train_path}: {len(encoded)} rows are fewer than one optimizer step needs "
                        f"({global_batch} x {cfg.gradient_accumulation_steps})")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    scheduler = make_scheduler(optimizer, cfg.lr_scheduler_type, math.ceil(cfg.warmup_ratio * total_steps),
                               total_steps)
    if fsdp.is_sharded(objective):
        optimizer = accelerator.prepare(optimizer)  # not the objective: that would wrap it in DDP as well
    else:
        objective, optimizer = accelerator.prepare(objective, optimizer)

    if resume:
        state = saved_state
        _restore(accelerator, objective, optimizer, scheduler, resume, state, rng, lr, output_dir)
    else:
        state = TrainState()
        torch.manual_seed(cfg.seed + rank)
    state.run = resume_settings(cfg, world, lr)
    record = RunRecord(config=asdict(cfg), labels=data.labels, label_counts=data.counts, base_model=str(base),
                       use_lora=use_lora, learning_rate=lr)
    parts = StepParts(accelerator=accelerator, objective=objective, optimizer=optimizer, scheduler=scheduler,
                      encoded=encoded, pad_id=tokenizer.pad_token_id, cfg=cfg,
                      prior_log=prior_log, etf_targets=etf_targets, tc=tc,
                      decisions=decisions)
    return Run(parts=parts, data=data, base=base, tokenizer=tokenizer, builder=builder, record=record, sampler=sampler,
               steps_per_epoch=steps_per_epoch, total_steps=total_steps, state=state)
