"""TrainConfig: every training option in one dataclass, validated once in __post_init__.

Defaults follow the papers / reference trainers:
  DPO  beta 0.1, sigmoid loss, lr 5e-7 (OpenRLHF train_dpo), label smoothing 0
  HPS  beta 0.25 (HPS paper / its TRL config), sample mode gamma -5 -> 5 by training step,
       loss mode gamma 5, (n-1) scaling on
  RM   lr 9e-6 (OpenRLHF train_rm), no margin, no centering
  SFT  lr 2e-5 (OpenRLHF train_sft); loss = mean NLL per response token of the CHOSEN response
       (pairs data: the rejected response is ignored); beta unused
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from prefsel.gap import DEFAULT_BETA as DPO_BETA
from prefsel.packing import ATTN_CHOICES, DEFAULT_MAX_TOKENS_PER_BATCH
from prefsel.losses import DPO_LOSS_TYPES

TASKS = ("dpo", "hps", "rm", "sft")
STRATEGIES = ("deepspeed", "ddp")
REF_MODES = ("precompute", "online")
HPS_MODES = ("sample", "loss")
LR_SCHEDULERS = ("constant", "linear", "cosine")

DEFAULT_BETA = {"dpo": DPO_BETA, "hps": 0.25, "rm": DPO_BETA, "sft": DPO_BETA}  # HPS paper: 0.25
DEFAULT_LR = {"dpo": 5e-7, "hps": 5e-7, "rm": 9e-6, "sft": 2e-5}


def is_local_uri(uri: str) -> bool:
    """True for a path on this machine's file system, False for a URI with a scheme (s3://...)."""
    return "://" not in uri


@dataclass
class TrainConfig:
    task: str  # dpo | hps | rm | sft
    model: str
    data: str
    output: str
    # models
    ref_model: str | None = None  # default: --model (the SFT model is its own reference)
    tokenizer: str | None = None
    trust_remote_code: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    attn_implementation: str = "auto"  # prefsel.packing.ATTN_CHOICES
    packing: bool = True  # several sequences per forward row, no pads inside (prefsel.packing)
    share_prompt: bool = True  # a row's responses share one run of its prompt
    # data
    format: str | None = None
    split: str = "train"
    eval_data: str | None = None
    eval_split: str = "test"
    chat_template: str = "auto"
    max_length: int | None = None  # None: the models' context (prefsel.models.model_context_length)
    truncation: str = "reject"
    margin_column: str | None = None  # rm: optional per-pair margin column
    # optimisation
    learning_rate: float | None = None  # None: DEFAULT_LR[task]
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    lr_scheduler: str = "cosine"  # cosine decays to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    lr_warmup_ratio: float = 0.03
    max_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (schedule still from epochs)
    train_batch_size: int = 128  # global, per optimizer step
    micro_train_batch_size: int = 1  # per worker, per forward
    seed: int = 42
    # objective
    beta: float | None = None  # None: DEFAULT_BETA[task]
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    ref_mode: str = "precompute"
    ref_batch_tokens: int = DEFAULT_MAX_TOKENS_PER_BATCH
    ref_actors: int = 1
    center_coef: float = 0.0  # rm: TRL center_rewards_coefficient
    hps_mode: str = "sample"
    gamma: float | None = None  # constant gamma (both HPS modes)
    gamma_start: float | None = None  # schedule start (sample mode default -5)
    gamma_end: float | None = None  # schedule end (sample mode default 5)
    hps_negatives: int | None = None  # loss mode: Monte Carlo subset of M negatives
    hps_scale_n_minus_1: bool = True
    # distributed
    strategy: str = "deepspeed"
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Ray Train local mode (ScalingConfig(num_workers=0)): the loop runs in this process, no
    # worker actors; for debugging and tiny runs. Checkpoints are not persisted, so no resume.
    local_mode: bool = False
    # logging / checkpoints
    logging_steps: int = 1
    eval_steps: int | None = None  # None: only at the end of training (when eval data is given)
    save_steps: int | None = None  # None: only at the end of training
    # the checkpoint at the last step (weights + optimizer state: about 14 bytes per parameter for
    # bf16 with Adam, most of a run's storage); off: OUTPUT/final only, --resume restarts from the
    # last --save-steps checkpoint
    final_checkpoint: bool = True
    keep_checkpoints: int = 2
    use_tensorboard: bool = True
    use_wandb: bool = False
    wandb_project: str = "prefsel"
    progress: bool = True
    storage_path: str | None = None  # Ray RunConfig storage (default: OUTPUT), s3:// allowed
    run_name: str = "train"
    resume: bool = False
    overwrite: bool = False
    max_failures: int = 0

    def __post_init__(self) -> None:
        from prefsel.sources import absolute_local
        from prefsel.tokenization import check_chat_template

        for name in ("model", "data", "ref_model", "tokenizer", "eval_data"):
            setattr(self, name, absolute_local(getattr(self, name)))
        for name in ("output", "storage_path"):
            setattr(self, name, absolute_local(getattr(self, name), output=True))
        self.chat_template = check_chat_template(self.chat_template)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.task]
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.task]
        if self.adam_betas is not None:
            self.adam_betas = tuple(float(b) for b in self.adam_betas)
        checks = [
            (self.strategy in STRATEGIES, f"--strategy must be one of {STRATEGIES}"),
            (self.zero_stage in (0, 1, 2, 3), "--zero-stage must be 0, 1, 2 or 3"),
            (self.ref_mode in REF_MODES, f"--ref-mode must be one of {REF_MODES}"),
            (self.attn_implementation in ATTN_CHOICES, f"--attn must be one of {ATTN_CHOICES}"),
            (self.hps_mode in HPS_MODES, f"--hps-mode must be one of {HPS_MODES}"),
            (self.loss_type in DPO_LOSS_TYPES, f"--loss must be one of {DPO_LOSS_TYPES}"),
            (self.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler must be one of {LR_SCHEDULERS}"),
            (math.isfinite(self.beta) and self.beta > 0, "--beta must be > 0"),
            (all(g is None or math.isfinite(g) for g in (self.gamma, self.gamma_start, self.gamma_end)),
             "--gamma, --gamma-start and --gamma-end must be finite numbers"),
            (self.seed >= 0, "--seed must be >= 0 (numpy seeds the HPS draws and the epoch order with it)"),
            (math.isfinite(self.learning_rate) and self.learning_rate > 0, "--learning-rate must be > 0"),
            # torch's AdamW refuses these too, but only in the workers, after the data and the
            # reference precompute; an LR floor outside [0, 1] gives negative or rising rates
            (self.adam_betas is not None and len(self.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in self.adam_betas),
             "--adam-betas must be two numbers in [0, 1)"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio must be in [0, 1]"),
            (self.train_batch_size >= 1, "--train-batch-size must be >= 1"),
            (self.ref_actors >= 1, "--ref-actors must be >= 1"),
            (self.ref_batch_tokens >= 1, "--ref-batch-tokens must be >= 1"),
            (self.cpus_per_worker > 0, "--cpus-per-worker must be > 0"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.num_workers >= 1, "--num-workers must be >= 1"),
            (self.micro_train_batch_size >= 1, "--micro-train-batch-size must be >= 1"),
            (self.logging_steps >= 1, "--logging-steps must be >= 1"),
            (self.eval_steps is None or self.eval_steps >= 1, "--eval-steps must be >= 1"),
            (self.save_steps is None or self.save_steps >= 1, "--save-steps must be >= 1"),
            (0.0 <= self.label_smoothing < 0.5 or self.loss_type == "exo_pair", "--label-smoothing must be in [0, 0.5)"),
            (0.0 <= self.label_smoothing < 1.0 or self.loss_type != "exo_pair",
             "--label-smoothing must be in [0, 1) for --loss exo_pair (its epsilon; 0: the paper's 1e-3)"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (0.0 <= self.lr_warmup_ratio < 1.0, "--lr-warmup-ratio must be in [0, 1)"),
            (self.max_norm >= 0, "--max-norm must be >= 0 (0: no clipping)"),
            (self.hps_negatives is None or self.hps_negatives >= 1, "--hps-negatives must be >= 1"),
            (self.max_length is None or self.max_length >= 2, "--max-length must be >= 2"),
            (self.max_failures >= 0, "--max-failures must be >= 0"),
            (self.center_coef >= 0, "--center-coef must be >= 0"),
            (self.lora_rank >= 0, "--lora-rank must be >= 0"),
            (not (self.offload_param and self.zero_stage != 3), "--offload-param needs --zero-stage 3"),
            # without ZeRO DeepSpeed keeps the parameters on the GPU, where its CPU Adam refuses them
            (not (self.offload_optimizer and self.zero_stage == 0), "--offload-optimizer needs --zero-stage 1, 2 or 3"),
            (not ((self.offload_optimizer or self.offload_param) and self.strategy != "deepspeed"),
             "--offload-optimizer / --offload-param need --strategy deepspeed (DDP offloads nothing)"),
            (self.hps_negatives is None or self.hps_mode == "loss",
             "--hps-negatives applies to --hps-mode loss (sample mode draws one negative per row)"),
            # DeepSpeed without ZeRO keeps bf16 weights and accumulates in bf16 (no float32 master
            # copy), and refuses the float32 accumulation the other stages get
            (not (self.bf16 and self.strategy == "deepspeed" and self.zero_stage == 0),
             "--bf16 with --strategy deepspeed needs --zero-stage 1, 2 or 3 (stage 0 keeps no float32 "
             "master weights); for bf16 autocast without ZeRO use --strategy ddp"),
            (not self.local_mode or self.num_workers == 1, "--local-mode runs one process: --num-workers must be 1"),
            (not self.local_mode or self.strategy == "ddp", "--local-mode runs without a process group: use --strategy ddp"),
            (not (self.local_mode and self.resume), "--local-mode keeps no checkpoints: --resume is not possible"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        per_step = self.micro_train_batch_size * self.num_workers
        if self.train_batch_size % per_step:
            raise ValueError(
                f"--train-batch-size {self.train_batch_size} must be a multiple of "
                f"--micro-train-batch-size x --num-workers = {per_step}"
            )
        if self.task == "rm" and self.format == "multi":
            raise ValueError("prefsel train rm trains on pairs; turn multi-response data into pairs first")
        if self.task == "dpo" and self.format == "multi":
            raise ValueError("prefsel train dpo trains on pairs; use `prefsel train hps` for multi-response data")
        if self.task == "sft" and self.format == "multi":
            raise ValueError("prefsel train sft trains on the chosen response of pairs; multi-response data is not supported")
        if self.task == "hps" and self.format not in (None, "multi"):
            raise ValueError("prefsel train hps needs multi-response data (prompt, responses, rewards)")
        if self.lora_rank:
            try:
                import peft  # noqa: F401
            except ImportError as e:
                raise ValueError("--lora-rank needs the `peft` package (pip install peft)") from e
        if self.use_wandb:
            try:
                import wandb  # noqa: F401
            except ImportError as e:
                raise ValueError("--use-wandb needs the `wandb` package") from e
        if is_local_uri(self.output):
            self.output = os.path.abspath(self.output)

    # ---- derived values -------------------------------------------------------------------
    @property
    def grad_accum(self) -> int:
        return self.train_batch_size // (self.micro_train_batch_size * self.num_workers)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def reference_path(self) -> str:
        return self.ref_model or self.model

    @property
    def reference_dtype(self) -> str:
        """The reference model's weight dtype (prefsel.models names), the SAME for
        --ref-mode precompute (Ray Data actors) and online (every worker): bf16 with --bf16,
        else fp32 on every device, so the two modes train on the same reference log-probs."""
        return "bf16" if self.bf16 else "fp32"

    @property
    def needs_reference(self) -> bool:
        return self.task in ("dpo", "hps")

    @property
    def resolved_storage_path(self) -> str:
        if self.storage_path:
            return os.path.abspath(self.storage_path) if is_local_uri(self.storage_path) else self.storage_path
        return self.output.rstrip("/")

    @property
    def run_uri(self) -> str:
        """Ray Train's run folder, RunConfig(storage_path, name): where the checkpoints go and
        where Ray Train looks for one to restore."""
        return self.resolved_storage_path.rstrip("/") + "/" + self.run_name

    def gamma_at(self, step: int, total_steps: int) -> float:
        """Hardness gamma for a training step (HPS). See README.md, "What each objective computes"."""
        from prefsel.losses import gamma_schedule

        if self.gamma is not None:
            return float(self.gamma)
        if self.hps_mode == "sample" or self.gamma_start is not None or self.gamma_end is not None:
            start = -5.0 if self.gamma_start is None else self.gamma_start
            end = 5.0 if self.gamma_end is None else self.gamma_end
            return gamma_schedule(step, total_steps, start, end)
        return 5.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        if d.get("adam_betas") is not None:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)
