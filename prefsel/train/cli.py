"""`prefsel train rm|dpo|hps|sft`: flag names follow OpenRLHF / TRL (hyphenated, with their aliases).

The model and data flags are the shared groups of prefsel.flags; every default is TrainConfig's."""

from __future__ import annotations

import argparse
from functools import partial

from prefsel.flags import (DefaultsHelpFormatter, add_data_flags, add_layout_flags, add_model_flags, config_from_args,
                           default_of)
from prefsel.losses import DPO_LOSS_TYPES

HELP = {
    "rm": "Bradley-Terry reward model (sequence classifier, one output)",
    "dpo": "DPO-family preference optimisation on pairs",
    "hps": "HPS (Hard Preference Sampling) on multi-response data",
    "sft": "supervised fine-tuning on the chosen responses of pairs (mean NLL per response token)",
}


def _shared(p: argparse.ArgumentParser, task: str) -> None:
    from prefsel.train.config import DEFAULT_BETA, DEFAULT_LR, TrainConfig

    d = partial(default_of, TrainConfig)
    add_model_flags(p, TrainConfig, roles=("model",), model_flags=("--model", "--pretrain"),
                    model_help="model to train: folder or hub name")
    add_data_flags(p, TrainConfig, data_help="file, folder (a `prefsel select` output works), hub dataset or s3:// URI",
                   formats=("pairs", "conversation", "hh", "multi"))
    g = p.add_argument_group("output and held-out data")
    g.add_argument("--output", "--save-path", dest="output", required=True,
                   help="output folder: final/ (the model), tensorboard/, checkpoints, summary.json")
    g.add_argument("--eval-data", "--eval-dataset", dest="eval_data", default=None, help="held-out data, same format")
    g.add_argument("--eval-split", default=d("eval_split"))
    o = p.add_argument_group("optimisation")
    o.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=None,
                   help=f"default {DEFAULT_LR[task]:g}")
    o.add_argument("--epochs", "--max-epochs", "--num-train-epochs", dest="epochs", type=int, default=d("epochs"))
    o.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps (schedules still span --epochs)")
    o.add_argument("--train-batch-size", type=int, default=d("train_batch_size"), help="global batch per optimizer step")
    o.add_argument("--micro-train-batch-size", "--per-device-train-batch-size", dest="micro_train_batch_size",
                   type=int, default=d("micro_train_batch_size"), help="per worker per forward; accumulation is derived")
    o.add_argument("--weight-decay", "--l2", dest="weight_decay", type=float, default=d("weight_decay"))
    o.add_argument("--adam-betas", type=float, nargs=2, default=d("adam_betas"))
    o.add_argument("--lr-scheduler", default=d("lr_scheduler"), choices=["constant", "linear", "cosine"])
    o.add_argument("--min-lr-ratio", type=float, default=d("min_lr_ratio"), help="cosine floor, as a fraction of the lr")
    o.add_argument("--lr-warmup-ratio", type=float, default=d("lr_warmup_ratio"))
    o.add_argument("--max-norm", type=float, default=d("max_norm"), help="gradient clipping (0: off)")
    o.add_argument("--seed", type=int, default=d("seed"))
    o.add_argument("--bf16", action="store_true")
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--lora-rank", type=int, default=d("lora_rank"), help="LoRA rank (0: full fine-tuning; needs peft)")
    o.add_argument("--lora-alpha", type=int, default=d("lora_alpha"))
    o.add_argument("--lora-dropout", type=float, default=d("lora_dropout"))
    o.add_argument("--target-modules", nargs="*", default=None)
    add_layout_flags(p.add_argument_group("forward layout"), TrainConfig)
    dist = p.add_argument_group("distributed (Ray Train)")
    dist.add_argument("--strategy", default=d("strategy"), choices=["deepspeed", "ddp"])
    dist.add_argument("--zero-stage", type=int, default=d("zero_stage"), choices=[0, 1, 2, 3])
    dist.add_argument("--offload-optimizer", "--adam-offload", dest="offload_optimizer", action="store_true")
    dist.add_argument("--offload-param", action="store_true", help="ZeRO-3 parameter offload to CPU")
    dist.add_argument("--num-workers", type=int, default=d("num_workers"))
    dist.add_argument("--use-gpu", action="store_true")
    dist.add_argument("--cpus-per-worker", type=float, default=d("cpus_per_worker"))
    dist.add_argument("--local-mode", action="store_true",
                      help="Ray Train local mode: run the loop in this process (one worker, --strategy ddp, "
                           "no checkpoints kept); for debugging and tiny runs")
    dist.add_argument("--storage-path", default=None, help="Ray Train storage (default: OUTPUT); s3:// works")
    dist.add_argument("--run-name", default=d("run_name"))
    dist.add_argument("--max-failures", type=int, default=d("max_failures"), help="restarts from the last checkpoint")
    dist.add_argument("--resume", action="store_true", help="continue OUTPUT's run from its latest checkpoint")
    dist.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    lg = p.add_argument_group("logging and checkpoints")
    lg.add_argument("--logging-steps", type=int, default=d("logging_steps"))
    lg.add_argument("--eval-steps", type=int, default=None, help="default: at the end only")
    lg.add_argument("--save-steps", type=int, default=None, help="default: at the end only")
    lg.add_argument("--keep-checkpoints", type=int, default=d("keep_checkpoints"))
    lg.add_argument("--no-final-checkpoint", dest="final_checkpoint", action="store_false",
                    help="skip the resumable checkpoint at the last step (weights + optimizer state, about "
                         "14 bytes per parameter in bf16 with Adam); final/ is still written, --save-steps checkpoints too")
    lg.add_argument("--no-tensorboard", dest="use_tensorboard", action="store_false")
    lg.add_argument("--use-wandb", action="store_true")
    lg.add_argument("--wandb-project", default=d("wandb_project"))
    lg.add_argument("--no-progress", dest="progress", action="store_false")
    if task in ("dpo", "hps"):
        x = p.add_argument_group("objective")
        x.add_argument("--beta", type=float, default=None, help=f"default {DEFAULT_BETA[task]}")
        x.add_argument("--loss", "--loss-type", dest="loss_type", default=d("loss_type"), choices=list(DPO_LOSS_TYPES))
        x.add_argument("--label-smoothing", type=float, default=d("label_smoothing"))
        x.add_argument("--ref-model", "--reference", dest="ref_model", default=None,
                       help="reference model (default: --model)")
        x.add_argument("--ref-mode", default=d("ref_mode"), choices=["precompute", "online"])
        x.add_argument("--ref-actors", type=int, default=d("ref_actors"), help="Ray Data actors for the precompute")
        x.add_argument("--ref-batch-tokens", type=int, default=d("ref_batch_tokens"))
    if task == "hps":
        h = p.add_argument_group("HPS")
        h.add_argument("--hps-mode", default=d("hps_mode"), choices=["sample", "loss"])
        h.add_argument("--gamma", type=float, default=None,
                       help="constant hardness (default: sample mode schedules -5 -> 5; loss mode 5)")
        h.add_argument("--gamma-start", type=float, default=None)
        h.add_argument("--gamma-end", type=float, default=None)
        h.add_argument("--hps-negatives", type=int, default=None, help="loss mode: Monte Carlo subset of M negatives")
        h.add_argument("--no-n-minus-1-scale", dest="hps_scale_n_minus_1", action="store_false")
    if task == "rm":
        r = p.add_argument_group("reward model")
        r.add_argument("--margin-column", default=None, help="per-pair margin column of the data")
        r.add_argument("--center-coef", "--center-rewards-coefficient", dest="center_coef", type=float,
                       default=d("center_coef"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", required=True)
    for task in ("rm", "dpo", "hps", "sft"):
        _shared(sub.add_parser(task, help=HELP[task], description=HELP[task], formatter_class=DefaultsHelpFormatter), task)


def config(args: argparse.Namespace):
    from prefsel.train.config import TrainConfig

    return config_from_args(TrainConfig, args)


def print_train_summary(s: dict) -> None:
    fm = s.get("final_metrics") or {}
    keys = ("loss", "reward_accuracy", "margin", "eval_loss", "eval_reward_accuracy")
    print(f"prefsel train {s['task']}: {s['steps']} steps ({s.get('resumed_from_step') or 0} resumed), "
          f"{s.get('samples')} samples, rows used {s['rows_used']}/{s['rows_in']} "
          f"(rejected {s['rows_rejected']}; {s['rows_dropped_per_epoch']} per epoch left out: "
          "the last partial batch)")
    tps = s.get("tokens_per_s")
    peak = ", ".join(f"{k.removeprefix('peak_').removesuffix('_gib')} {s[k]:.2f} GiB"
                     for k in ("peak_gpu_gib", "peak_rss_gib") if s.get(k) is not None)
    print(f"  tokens/s {tps:.1f}" if tps else "  tokens/s n/a", f" wall {s['wall_s']:.1f}s"
          + (f"  peak {peak}" if peak else ""))
    print("  final: " + ", ".join(f"{k} {fm[k]:.4f}" for k in keys if isinstance(fm.get(k), (int, float))))
    print(f"  model: {s['final_model']}")


def run(args: argparse.Namespace) -> dict:
    from prefsel.train.job import run_train

    summary = run_train(config(args))
    print_train_summary(summary)
    return summary
