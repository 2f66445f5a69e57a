"""Every flag of `python -m ncal_core.train`, its default and its checks, in one dataclass.

Flag names and meanings follow the paper's reference code so its users switch without relearning.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ncal_core.cli import flag
from ncal_core.data.batching import RESAMPLING
from ncal_core.data.rows import check_class_names, label_column_flag, text_column_flag
from ncal_core.errors import NCALError
from ncal_core.evaluation.tau_choice import DEV_WEIGHTINGS, TAU_GRID
from ncal_core.loss.tc import TCConfig
from ncal_core.model.classifier import HEADS

BUILTIN_TINY = "tiny"
TRACKERS = ("none", "tensorboard", "wandb", "all")
QUANTIZATIONS = ("none", "nf4")


def uses_lora(use_lora: bool | None, model_name_or_path: str) -> bool:
    """--use_lora as given; unset, LoRA for a real checkpoint and full fine-tuning for the built-in tiny model."""
    return use_lora if use_lora is not None else model_name_or_path != BUILTIN_TINY


def uses_tc(use_etf_loss: bool, lambda_lc: float) -> bool:
    """Whether the TC loss is part of training: asked for, at a positive weight."""
    return use_etf_loss and lambda_lc > 0


@dataclass
class TrainConfig:
    """The configuration of one training run."""

    # data
    dataset_path: str = flag("tmwpl", "training rows: a .jsonl/.json/.csv/.tsv file (TMWPL, PMTD, the reference's "
                                     "conversations, chat messages, alpaca, sharegpt or text/label columns: "
                                     "data/README.md), a datasets folder or cached dataset id, or a dataset name "
                                     "(tmwpl, pmtd)")
    eval_dataset_path: str | None = flag(None, "test rows, scored once, by the weights the run ends with "
                                             "(--load_best_model_at_end); default: the test split when --dataset_path "
                                             "is a dataset name; 'none' for no test")
    text_column: str = text_column_flag()
    label_column: str = label_column_flag()
    dataset_split: str = flag("train", "the split trained on, of a datasets folder (save_to_disk) or a dataset id in "
                                       "the datasets cache; --eval_dataset_path reads its test split")
    label_types: list[str] | None = flag(None, "the class names in order; default: the sorted labels of the training file")
    instruction: str | None = flag(None, "optional system turn put before every row's prompt")
    cutoff_len: int = flag(2048, "maximum tokens of prompt + label; the prompt's content is cut, never the label")
    truncation: str = flag("left", "where a too-long prompt is cut: left or middle")
    val_size: float = flag(0.1, "a development split held out of training, stratified by class: a fraction of the "
                                "rows (< 1) or a number of them (>= 1), at least one row of each class; evaluated each "
                                "epoch to choose the best checkpoint and tau (ids written to OUTPUT_DIR/dev_ids.json); "
                                "0 = none")
    dev_per_class: int = flag(0, "instead of --val_size, a balanced development split of this many rows per class")
    dev_seed: int = flag(0, "seed of the development split (kept fixed across --seed values)")
    # model
    model_name_or_path: str = flag(BUILTIN_TINY, "a Qwen2/Qwen2.5/Qwen3 checkpoint: a folder (HF layout, safetensors), "
                                               "a hub id such as Qwen/Qwen2.5-7B-Instruct (through the Hugging Face "
                                               "cache; HF_HUB_OFFLINE=1 uses the cache alone), or 'tiny': a small Qwen2 "
                                               "built offline and trained from scratch")
    revision: str | None = flag(None, "the hub revision (branch, tag or commit) of a hub id; default: main")
    torch_dtype: str = flag("float32", "dtype the weights are loaded in: float32, bfloat16 or float16")
    tiny_hidden_size: int = flag(256, "hidden size of the built-in tiny model")
    tiny_num_layers: int = flag(4, "decoder layers of the built-in tiny model")
    tiny_vocab_size: int = flag(4096, "BPE vocabulary of the built-in tiny model, trained on the training texts")
    tiny_tied_embeddings: bool = flag(True, "the built-in tiny model's LM head shares the input embedding's weights")
    head: str = flag("lm", "what predicts the class: lm (label scoring with the LM head: the label's tokens are "
                           "trained and scored), linear (a K-way linear layer `score` on the last prompt token, as "
                           "transformers' Qwen2ForSequenceClassification) or etf (that layer fixed to a simplex ETF "
                           "times a learned temperature); a head's TC feature is its own input: docs/heads.md")
    # LoRA
    use_lora: bool | None = flag(None, "train LoRA adapters instead of every weight; default: true, except for "
                                     "the tiny model trained from scratch")
    lora_r: int = flag(8, "LoRA rank")
    lora_alpha: float = flag(32.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = flag(0.1, "dropout on the LoRA path")
    target_modules: list[str] = flag(["q_proj", "k_proj", "v_proj", "o_proj"], "linear layers that get LoRA")
    # TC loss
    use_etf_loss: bool = flag(True, "add the Text-modality Collapse (TC) loss")
    lambda_lc: float = flag(TCConfig.weight, "weight of the TC loss")
    e_w: float = flag(TCConfig.e_w, "norm bound of the features in the TC loss")
    class_diff: bool = flag(TCConfig.class_diff, "TC over pairs of different classes only (else all pairs)")
    pooling: str = flag(TCConfig.pooling, "TC feature: last (last prompt token), seq_last (last real token) or mean "
                                          "(prompt mean); with --head linear or etf, always the head's input (the "
                                          "last prompt token)")
    tc_backend: str = flag(TCConfig.backend, "TC loss implementation: auto (Triton on CUDA GPUs of sm_80 or newer with triton "
                                   "installed, else PyTorch with one warning on a GPU), triton or torch")
    tc_variant: str = flag(TCConfig.variant, "pairs: the paper's batch Gram loss; etf_target: dot regression of every row to "
                                  "fixed simplex-ETF class directions (every class in play at every step)")
    # long-tail baselines
    resample: str = flag("sqrt", "re-sample training rows: none, balanced (1/n_c) or sqrt (1/sqrt(n_c))")
    resample_epochs: int = flag(0, "re-sample only in the last N epochs (deferred re-balancing); 0 = every epoch")
    la_loss_tau: float = flag(0.0, "tau of a logit-adjusted cross-entropy over the labels (Menon et al. 2021), added "
                                   "to the LM loss: at each token where labels sharing a prefix part (the first, for "
                                   "labels whose first tokens differ), over their continuations; 0 = off")
    logit_adjust_tau: float | None = flag(None, "post-hoc logit adjustment at evaluation: label scores - tau * log "
                                             "training prior (Menon et al. 2021); 0 = plain argmax of the label "
                                             "scores; unset: chosen on the development split from "
                                             f"{', '.join(f'{t:g}' for t in TAU_GRID)} (0 without one)")
    dev_weighting: str = flag("balanced", "how development rows count when tau and the best checkpoint are chosen: "
                                          "balanced (each class equally, as on a balanced test split) or none (as "
                                          "drawn, for a test split with the training prior)")
    # optimisation
    output_dir: str = flag("outputs/ncal-tiny-tmwpl", "where checkpoints, metrics.jsonl, eval.json and pictures go")
    overwrite_output_dir: bool = flag(False, "allow writing into a non-empty folder that is not this run's")
    num_train_epochs: float = flag(3.0, "epochs over the training rows")
    max_steps: int = flag(-1, "optimizer steps to run; overrides --num_train_epochs when > 0")
    per_device_train_batch_size: int = flag(32, "rows per micro-batch and process")
    per_device_eval_batch_size: int = flag(32, "rows per scoring batch")
    group_by_length: bool = flag(False, "batch rows of similar length together (less padding, faster); false = "
                                     "random batches")
    padding_free: bool = flag(True, "run the decoder on each micro-batch's real tokens only, attention in blocks of "
                                    "rows of similar length (the same loss up to rounding, less work; LoRA dropout "
                                    "draws differ); false = every row padded to the batch's longest")
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimizer step")
    learning_rate: float | None = flag(None, "peak learning rate; default: 2e-4 with LoRA, 1e-3 for full fine-tuning")
    warmup_ratio: float = flag(0.05, "fraction of the steps with linear warm-up")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    lr_scheduler_type: str = flag("linear", "decay after warm-up: linear or cosine")
    max_grad_norm: float = flag(1.0, "gradient-norm clipping; 0 disables it")
    seed: int = flag(42, "seed for weights init, LoRA init, data order and dropout")
    bf16: bool = flag(False, "bfloat16 autocast (CPU or GPU); with LoRA, load the frozen base in bf16 too "
                             "(--torch_dtype bfloat16), or every frozen weight is cast again at every use")
    fp16: bool = flag(False, "float16 autocast with a gradient scaler (GPU only)")
    gradient_checkpointing: bool = flag(False, "recompute each decoder layer in the backward pass to save memory")
    fsdp: bool = flag(False, "shard weights, gradients and optimizer state over the processes (PyTorch FSDP2: each "
                             "decoder layer, then the rest) instead of a whole copy on each; under torchrun or "
                             "accelerate launch --multi_gpu (docs/scale.md)")
    quantization: str = flag("none", "the frozen base's decoder linears stored in 4 bits: none or nf4 (QLoRA, "
                                     "torchao's NF4; needs --use_lora true and pip install 'ncal[qlora]')")
    torch_compile: bool = flag(False, "compile the decoder layers with torch.compile")
    ddp_timeout: int = flag(1800, "seconds a process waits for the others (NCCL/gloo timeout) before failing; rank 0 "
                                  "writes checkpoints alone, so a large full fine-tune may need more")
    # output
    logging_steps: int = flag(10, "optimizer steps between log lines")
    report_to: str = flag("none", "experiment trackers, through accelerate's: none, tensorboard (under OUTPUT_DIR/runs), "
                                  "wandb or all; every log line and evaluation, and the flags (metrics.jsonl is written "
                                  "either way)")
    eval_strategy: str = flag("epoch", "when to evaluate the development split (choosing the best checkpoint): epoch, "
                                       "steps (every --eval_steps) or no")
    eval_steps: int = flag(500, "optimizer steps between evaluations with --eval_strategy steps")
    save_strategy: str = flag("epoch", "when to write checkpoints: no, epoch or steps")
    save_steps: int = flag(500, "optimizer steps between checkpoints with --save_strategy steps")
    save_total_limit: int = flag(2, "checkpoints kept (oldest deleted first; the best by dev macro-F1 is kept too)")
    load_best_model_at_end: bool = flag(True, "end with the weights the development split chose: a checkpoint that "
                                              "beat the final weights there is loaded back, scored on the test rows "
                                              "and saved as the output (with --save_strategy no none is kept, and the "
                                              "final weights stay); false: always the final weights")
    resume_from_checkpoint: str | None = flag(None, "a checkpoint folder, or 'latest' for the newest in --output_dir")

    @property
    def tc(self) -> TCConfig:
        """The TC loss's settings among these flags."""
        return TCConfig(pooling=self.pooling, e_w=self.e_w, class_diff=self.class_diff, variant=self.tc_variant,
                        weight=self.lambda_lc, backend=self.tc_backend)

    def check(self) -> None:
        """Refuse contradictory or out-of-range flags with one line naming the flag."""
        def bad(flag: str, why: str) -> None:
            raise NCALError(f"--{flag}: {why}")

        if self.truncation not in ("left", "middle"):
            bad("truncation", f"must be left or middle, not {self.truncation!r}")
        self.tc.check()
        if self.head not in HEADS:
            bad("head", f"must be {', '.join(HEADS[:-1])} or {HEADS[-1]}, not {self.head!r}")
        if self.resample not in RESAMPLING:
            bad("resample", f"must be none, balanced or sqrt, not {self.resample!r}")
        if self.val_size < 0 or (self.val_size >= 1 and self.val_size != int(self.val_size)):
            bad("val_size", f"must be a fraction in [0, 1) or a whole number of rows, not {self.val_size}")
        for name in ("dev_per_class", "resample_epochs"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, not {getattr(self, name)}")
        if self.la_loss_tau < 0:
            bad("la_loss_tau", f"must be >= 0, not {self.la_loss_tau}")
        if self.logit_adjust_tau is not None and self.logit_adjust_tau < 0:
            bad("logit_adjust_tau", f"must be >= 0, not {self.logit_adjust_tau}")
        if self.dev_weighting not in DEV_WEIGHTINGS:
            bad("dev_weighting", f"must be {' or '.join(DEV_WEIGHTINGS)}, not {self.dev_weighting!r}")
        if self.lr_scheduler_type not in ("linear", "cosine"):
            bad("lr_scheduler_type", f"must be linear or cosine, not {self.lr_scheduler_type!r}")
        if self.save_strategy not in ("no", "epoch", "steps"):
            bad("save_strategy", f"must be no, epoch or steps, not {self.save_strategy!r}")
        if self.report_to not in TRACKERS:
            bad("report_to", f"must be {', '.join(TRACKERS[:-1])} or {TRACKERS[-1]}, not {self.report_to!r}")
        for tracker, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if self.report_to == tracker and importlib.util.find_spec(package) is None:
                bad("report_to", f"{tracker} is not installed (pip install {package})")
        if self.eval_strategy not in ("no", "epoch", "steps"):
            bad("eval_strategy", f"must be no, epoch or steps, not {self.eval_strategy!r}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            bad("torch_dtype", f"must be float32, bfloat16 or float16, not {self.torch_dtype!r}")
        if self.bf16 and self.fp16:
            bad("fp16", "--bf16 and --fp16 are exclusive")
        if not uses_lora(self.use_lora, self.model_name_or_path) and self.torch_dtype != "float32":
            # AdamW on half-precision weights loses small updates, and the fp16 scaler refuses fp16 gradients
            bad("torch_dtype", f"{self.torch_dtype} weights cannot be fully fine-tuned (no fp32 master copy); use "
                               "--torch_dtype float32 with --bf16 true (or --fp16 true on a GPU) for mixed precision, "
                               "or --use_lora true")
        if self.fsdp and self.head != "lm":
            bad("fsdp", f"shards label scoring's objective only, not --head {self.head}; use --head lm, or train the "
                        "head without --fsdp")
        if self.quantization not in QUANTIZATIONS:
            bad("quantization", f"must be {' or '.join(QUANTIZATIONS)}, not {self.quantization!r}")
        if self.quantization != "none" and not uses_lora(self.use_lora, self.model_name_or_path):
            bad("quantization", "a quantized base is frozen: it trains only with --use_lora true")
        if self.quantization == "nf4" and importlib.util.find_spec("torchao") is None:
            bad("quantization", "nf4 needs torchao (pip install 'ncal[qlora]')")
        if self.ddp_timeout < 1:
            bad("ddp_timeout", f"must be >= 1 second, not {self.ddp_timeout}")
        if self.use_lora and self.lora_r < 1:
            bad("lora_r", f"must be >= 1 with --use_lora true, not {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), not {self.lora_dropout}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, not {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), not {self.warmup_ratio}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "eval_steps", "cutoff_len", "save_total_limit"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, not {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            bad("num_train_epochs", "must be > 0 unless --max_steps is set")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", f"must be >= 0, not {self.max_grad_norm}")
        check_class_names("--label_types", self.label_types)
