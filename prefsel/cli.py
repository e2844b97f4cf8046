"""The `prefsel` command line: score, select, demo.

Flag names follow OpenRLHF / TRL where they exist (--beta, --max-length, --chat-template).
Each subcommand's parser is built by a function that ray_jobs/ reuses, so `ray job submit`
entry points take exactly the same flags.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from prefsel.flags import (
    DefaultsHelpFormatter,
    add_actor_flags,
    add_console_flags,
    add_data_flags,
    add_model_flags,
    add_output_flags,
    add_scoring_flags,
    config_from_args,
    default_of,
    flag_error,
)


def score_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="prefsel score", description="Score pairs by DPO implicit reward gap.")
    _score_flags(p, required=True)
    add_output_flags(p)
    return p


def _score_flags(p: argparse.ArgumentParser, required: bool) -> None:
    from prefsel.score_job import ScoreJobConfig

    add_model_flags(p, ScoreJobConfig, required=required)
    add_data_flags(p, ScoreJobConfig, required=required)
    add_scoring_flags(p, ScoreJobConfig)
    add_actor_flags(p, ScoreJobConfig)


def select_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="prefsel select", description="Keep the hardest pairs.")
    p.add_argument("--scores", default=None, help="a finished `prefsel score` output")
    _score_flags(p, required=False)
    from prefsel.selection import STRATEGIES, SelectConfig

    d = partial(default_of, SelectConfig)
    g = p.add_argument_group("selection")
    g.add_argument("--ratio", type=float, default=d("ratio"),
                   help="fraction kept: k = floor(N' * ratio), N' = rows passing --min-gap/--max-gap")
    g.add_argument("--top-k", type=int, default=None, help="keep exactly K rows instead of a ratio")
    g.add_argument("--strategy", default=d("strategy"), choices=list(STRATEGIES))
    g.add_argument("--gap-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="gap-range: keep LO <= gap <= HI")
    g.add_argument("--band", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="quantile-band: positions floor(N'*LO) .. floor(N'*HI)-1 of the (gap, row_id) order")
    g.add_argument("--min-gap", type=float, default=None, help="filter first: only rows with gap > G (exclusive)")
    g.add_argument("--max-gap", type=float, default=None, help="filter first: only rows with gap < G (exclusive)")
    g.add_argument("--report-rows", type=int, default=d("report_rows"), help="suspect-labels: sample rows in suspect_report")
    g.add_argument("--seed", type=int, default=d("seed"), help="seed of --strategy random")
    p.add_argument("--output", required=True, help="output folder or s3:// URI")
    p.add_argument("--scores-output", default=None,
                   help="where scoring writes when --data is given (default: OUTPUT-scores)")
    p.add_argument("--overwrite", action="store_true")
    return p


def score_config(args: argparse.Namespace, output: str | None = None):
    from prefsel.score_job import ScoreJobConfig

    return config_from_args(ScoreJobConfig, args, **({"output": output} if output else {}))


def cmd_score(args: argparse.Namespace) -> dict:
    from prefsel.score_job import run_score
    from prefsel.summary import print_summary

    summary = run_score(score_config(args))
    print_summary("prefsel score", summary)
    return summary


def cmd_select(args: argparse.Namespace) -> dict:
    from prefsel.selection import SelectConfig, run_select
    from prefsel.summary import print_summary

    if args.scores and args.data:
        raise SystemExit("prefsel select: give either --scores or --data (with --policy/--reference), not both")
    if not args.scores:
        if not (args.data and args.policy and args.reference):
            raise SystemExit("prefsel select: needs --scores, or --data with --policy and --reference")
    scores_out = args.scores or args.scores_output or args.output.rstrip("/") + "-scores"
    cfg = SelectConfig(  # its flags checked before a corpus is scored for it
        scores=scores_out, output=args.output, ratio=args.ratio, top_k=args.top_k, strategy=args.strategy,
        gap_range=tuple(args.gap_range) if args.gap_range else None, seed=args.seed, overwrite=args.overwrite,
        band=tuple(args.band) if args.band else None, min_gap=args.min_gap, max_gap=args.max_gap,
        report_rows=args.report_rows,
    )
    if not args.scores:
        from prefsel.run_output import finished_output
        from prefsel.score_job import run_score

        if finished_output(args.output) and not args.overwrite:  # before a corpus is scored for it
            raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")

        # the same command again (after a failed or changed selection) selects from the scores
        # it made, when inputs, models and settings are unchanged: no second scoring pass
        scored = run_score(score_config(args, output=scores_out), reuse_complete=True)
        if scored.get("reused"):
            print(f"prefsel select: {scores_out} holds the finished scores of these inputs, models and "
                  "settings: selecting from them (to score again, remove it or give another --scores-output)",
                  flush=True)
        else:
            print_summary("prefsel score", scored)
    summary = run_select(cfg)
    print_summary("prefsel select", summary)
    return summary


def demo_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from prefsel.demo import DemoConfig

    d = partial(default_of, DemoConfig)
    p = p or argparse.ArgumentParser(prog="prefsel demo")
    p.add_argument("--output", default=d("output"), help="where data, models, scores, runs and results go")
    p.add_argument("--quick", action="store_true", help="CI size: 1 seed, 200 pairs, smaller model, 14 short training runs")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds of the per-method runs (default: 0 1 2; --quick: 0)")
    p.add_argument("--ratio", type=float, default=d("ratio"), help="fraction kept by the 10%% selections")
    p.add_argument("--mislabeled", type=float, default=d("mislabeled"), help="share of flipped training pairs")
    p.add_argument("--overwrite", dest="overwrite", action="store_true", default=True,
                   help="replace an existing --output (the default)")
    p.add_argument("--no-overwrite", dest="overwrite", action="store_false",
                   help="refuse to run into a non-empty --output")
    p.add_argument("--no-local-mode", dest="local_mode", action="store_false",
                   help="train on Ray Train worker groups (as on a cluster) instead of Ray Train local mode "
                        "in this process; slower at this scale (worker start-up per run)")
    return p


def cmd_demo(args: argparse.Namespace) -> dict:
    """The embedded default: the paper's experiment end to end at toy scale (prefsel.demo)."""
    from prefsel.demo import DemoConfig, run_demo

    kw = {"output": args.output, "ratio": args.ratio, "overwrite": args.overwrite, "local_mode": args.local_mode}
    if args.seeds:
        kw["seeds"] = list(args.seeds)
    if args.mislabeled is not None:
        kw["mislabeled"] = args.mislabeled
    cfg = DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)
    return run_demo(cfg)


COMMANDS = {
    "score": (score_parser, cmd_score, "score pairs by DPO implicit reward gap (Ray Data)"),
    "select": (select_parser, cmd_select, "keep the hardest fraction of scored pairs"),
    "demo": (demo_parser, cmd_demo, "run the embedded default on tiny local models"),
}

# Subcommands that live in their own modules: each module defines
# `add_arguments(parser)` and `run(args) -> dict | None`. Imported only when used.
PLUGIN_COMMANDS = {
    "train": ("prefsel.train.cli", "train DPO / HPS / reward models (Ray Train + DeepSpeed)"),
    "serve": ("serve.run", "serve gap scoring over HTTP (Ray Serve)"),
    "generate": ("prefsel.generation.cli_generate", "generate many responses per prompt (vLLM or HF)"),
    "annotate": ("prefsel.generation.cli_annotate", "score responses with a reward model"),
    "to-pairs": ("prefsel.generation.cli_to_pairs", "turn multi-response rows into preference pairs"),
}


def _plugin(name: str):
    import importlib

    return importlib.import_module(PLUGIN_COMMANDS[name][0])


def _available_plugins() -> list[str]:
    import importlib.util

    out = []
    for name, (module, _) in PLUGIN_COMMANDS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                out.append(name)
        except ModuleNotFoundError:
            pass
    return out


def build_parser() -> argparse.ArgumentParser:
    from prefsel.console import LONG_COMMANDS

    parser = argparse.ArgumentParser(prog="prefsel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (make, _, help_) in COMMANDS.items():
        make(sp := sub.add_parser(name, help=help_, description=help_, formatter_class=DefaultsHelpFormatter))
        if name in LONG_COMMANDS:
            _add_console_flags(sp)
    for name in _available_plugins():
        module = _plugin(name)
        if hasattr(module, "add_arguments"):
            help_ = PLUGIN_COMMANDS[name][1]
            module.add_arguments(sp := sub.add_parser(name, help=help_, description=help_,
                                                      formatter_class=DefaultsHelpFormatter))
            if name in LONG_COMMANDS:
                _add_console_flags(sp)
    return parser


def _add_console_flags(p: argparse.ArgumentParser) -> None:
    """--verbose on a command, or on each of its subcommands (`prefsel train dpo --verbose`)."""
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        add_console_flags(p)
    for a in subs:
        for leaf in a.choices.values():
            _add_console_flags(leaf)


def main(argv: list[str] | None = None) -> int:
    from prefsel import console

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with console.session(args.command, getattr(args, "output", None), getattr(args, "verbose", False)):
            if args.command in COMMANDS:
                COMMANDS[args.command][1](args)
            else:
                _plugin(args.command).run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"prefsel {args.command}: error: {flag_error(str(e), parser)}", file=sys.stderr)
        return 2
    return 0


def run_entry(command: str, argv: list[str] | None = None) -> int:
    """Entry for ray_jobs/: the same parser and code as `prefsel COMMAND`."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
