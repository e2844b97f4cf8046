"""`prefsel train rm|dpo|hps`: flag names follow OpenRLHF / TRL (hyphenated, with their aliases)."""

from __future__ import annotations

import argparse

from prefsel.losses import DPO_LOSS_TYPES

HELP = {
    "rm": "Bradley-Terry reward model (sequence classifier, one output)",
    "dpo": "DPO-family preference optimisation on pairs",
    "hps": "HPS (Hard Preference Sampling) on multi-response data",
    "sft": "supervised fine-tuning on the chosen responses of pairs (mean NLL per response token)",
}


def _shared(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", "--pretrain", dest="model", required=True, help="model to train: folder or hub name")
    g.add_argument("--data", "--dataset", dest="data", required=True,
                   help="file, folder (a `prefsel select` output works), hub dataset or s3:// URI")
    g.add_argument("--output", "--save-path", dest="output", required=True,
                   help="output folder: final/ (the model), tensorboard/, checkpoints, summary.json")
    g.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--split", default="train")
    g.add_argument("--eval-data", "--eval-dataset", dest="eval_data", default=None, help="held-out data, same format")
    g.add_argument("--eval-split", default="test")
    g.add_argument("--format", default=None, choices=["pairs", "conversation", "hh", "multi"])
    g.add_argument("--chat-template", default="auto", help="auto, none, or a Jinja template file")
    g.add_argument("--max-length", "--max-len", dest="max_length", type=int, default=2048,
                   help="max tokens of prompt + response")
    g.add_argument("--truncation", default="reject", choices=["reject", "prompt-left"])
    o = p.add_argument_group("optimisation")
    o.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, default=None,
                   help="default 5e-7 (dpo, hps), 9e-6 (rm)")
    o.add_argument("--epochs", "--max-epochs", "--num-train-epochs", dest="epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps (schedules still span --epochs)")
    o.add_argument("--train-batch-size", type=int, default=128, help="global batch per optimizer step")
    o.add_argument("--micro-train-batch-size", "--per-device-train-batch-size", dest="micro_train_batch_size",
                   type=int, default=1, help="per worker per forward; accumulation is derived")
    o.add_argument("--weight-decay", "--l2", dest="weight_decay", type=float, default=0.0)
    o.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.95))
    o.add_argument("--lr-scheduler", default="cosine", choices=["constant", "linear", "cosine"])
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, as a fraction of the lr")
    o.add_argument("--lr-warmup-ratio", type=float, default=0.03)
    o.add_argument("--max-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    o.add_argument("--seed", type=int, default=42)
    o.add_argument("--bf16", action="store_true")
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (0: full fine-tuning; needs peft)")
    o.add_argument("--lora-alpha", type=int, default=16)
    o.add_argument("--lora-dropout", type=float, default=0.0)
    o.add_argument("--target-modules", nargs="*", default=None)
    d = p.add_argument_group("distributed (Ray Train)")
    d.add_argument("--strategy", default="deepspeed", choices=["deepspeed", "ddp"])
    d.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    d.add_argument("--offload-optimizer", "--adam-offload", dest="offload_optimizer", action="store_true")
    d.add_argument("--offload-param", action="store_true", help="ZeRO-3 parameter offload to CPU")
    d.add_argument("--num-workers", type=int, default=1)
    d.add_argument("--use-gpu", action="store_true")
    d.add_argument("--cpus-per-worker", type=float, default=1.0)
    d.add_argument("--local-mode", action="store_true",
                   help="Ray Train local mode: run the loop in this process (one worker, --strategy ddp, "
                        "no checkpoints kept); for debugging and tiny runs")
    d.add_argument("--storage-path", default=None, help="Ray Train storage (default: OUTPUT); s3:// works")
    d.add_argument("--run-name", default="train")
    d.add_argument("--max-failures", type=int, default=0, help="restarts from the last checkpoint")
    d.add_argument("--resume", action="store_true", help="continue OUTPUT's run from its latest checkpoint")
    d.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    d.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)
    lg = p.add_argument_group("logging and checkpoints")
    lg.add_argument("--logging-steps", type=int, default=1)
    lg.add_argument("--eval-steps", type=int, default=None, help="default: at the end only")
    lg.add_argument("--save-steps", type=int, default=None, help="default: at the end only")
    lg.add_argument("--keep-checkpoints", type=int, default=2)
    lg.add_argument("--no-tensorboard", dest="use_tensorboard", action="store_false")
    lg.add_argument("--use-wandb", action="store_true")
    lg.add_argument("--wandb-project", default="prefsel")
    lg.add_argument("--no-progress", dest="progress", action="store_false")
    if task in ("dpo", "hps"):
        x = p.add_argument_group("objective")
        x.add_argument("--beta", type=float, default=None, help=f"default {0.1 if task == 'dpo' else 0.25}")
        x.add_argument("--loss", "--loss-type", dest="loss_type", default="sigmoid", choices=list(DPO_LOSS_TYPES))
        x.add_argument("--label-smoothing", type=float, default=0.0)
        x.add_argument("--ref-model", "--reference", dest="ref_model", default=None,
                       help="reference model (default: --model)")
        x.add_argument("--ref-mode", default="precompute", choices=["precompute", "online"])
        x.add_argument("--ref-actors", type=int, default=1, help="Ray Data actors for the precompute")
        x.add_argument("--ref-batch-tokens", type=int, default=16384)
    if task == "hps":
        h = p.add_argument_group("HPS")
        h.add_argument("--hps-mode", default="sample", choices=["sample", "loss"])
        h.add_argument("--gamma", type=float, default=None,
                       help="constant hardness (default: sample mode schedules -5 -> 5; loss mode 5)")
        h.add_argument("--gamma-start", type=float, default=None)
        h.add_argument("--gamma-end", type=float, default=None)
        h.add_argument("--hps-negatives", type=int, default=None, help="loss mode: Monte Carlo subset of M negatives")
        h.add_argument("--no-n-minus-1-scale", dest="hps_scale_n_minus_1", action="store_false")
    if task == "rm":
        r = p.add_argument_group("reward model")
        r.add_argument("--margin-column", default=None, help="per-pair margin column of the data")
        r.add_argument("--center-coef", "--center-rewards-coefficient", dest="center_coef", type=float, default=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="task", required=True)
    for task in ("rm", "dpo", "hps", "sft"):
        _shared(sub.add_parser(task, help=HELP[task], description=HELP[task]), task)


def config_from_args(args: argparse.Namespace):
    import dataclasses

    from prefsel.train.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    if "adam_betas" in kw and kw["adam_betas"] is not None:
        kw["adam_betas"] = tuple(kw["adam_betas"])
    return TrainConfig(**kw)


def print_train_summary(s: dict) -> None:
    fm = s.get("final_metrics") or {}
    keys = ("loss", "reward_accuracy", "margin", "eval_loss", "eval_reward_accuracy")
    print(f"prefsel train {s['task']}: {s['steps']} steps ({s.get('resumed_from_step') or 0} resumed), "
          f"{s.get('samples')} samples, rows used {s['rows_used']}/{s['rows_in']} "
          f"(rejected {s['rows_rejected']})")
    tps = s.get("tokens_per_s")
    print(f"  tokens/s {tps:.1f}" if tps else "  tokens/s n/a", f" wall {s['wall_s']:.1f}s")
    print("  final: " + ", ".join(f"{k} {fm[k]:.4f}" for k in keys if isinstance(fm.get(k), (int, float))))
    print(f"  model: {s['final_model']}")


def run(args: argparse.Namespace) -> dict:
    from prefsel.train.job import run_train

    summary = run_train(config_from_args(args))
    print_train_summary(summary)
    return summary
