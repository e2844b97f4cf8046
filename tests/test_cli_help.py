"""`--help` gives every flag's default (README: "Defaults live in the config dataclasses and
`--help` shows them"): before, about half of the value flags printed none, and `generate --help`
read as if the paper's settings (HPS: 100 responses) were the defaults."""

from __future__ import annotations

import argparse
import re

import pytest

from prefsel.cli import build_parser


def _leaves(parser: argparse.ArgumentParser, name: str = "prefsel"):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name, parser
    for a in subs:
        for sub_name, sub in a.choices.items():
            yield from _leaves(sub, f"{name} {sub_name}")


def _shows_its_default(action: argparse.Action) -> bool:
    d = action.default
    return (bool(action.option_strings) and action.nargs != 0 and d is not None and d is not argparse.SUPPRESS
            and not isinstance(d, bool))


def test_every_value_flag_of_every_command_shows_its_default():
    leaves = dict(_leaves(build_parser()))
    assert {"prefsel score", "prefsel select", "prefsel train dpo", "prefsel serve"} <= set(leaves)
    missing = []
    for name, parser in leaves.items():
        for action in parser._actions:
            if _shows_its_default(action):
                line = " ".join(parser._get_formatter()._format_action(action).split())
                if not re.search(r"\bdefault\b", line, re.IGNORECASE):
                    missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing


@pytest.mark.parametrize("argv, shown", [
    (["select"], "--ratio RATIO fraction kept: k = floor(N' * ratio), N' = rows passing --min-gap/--max-gap (default: 0.1)"),
    (["select"], "--num-actors NUM_ACTORS model replicas (actors) (default: 1)"),
    (["generate"], "responses per prompt (HPS: 100) (default: 4)"),
    (["train", "dpo"], "global batch per optimizer step (default: 128)"),
    (["train", "dpo"], "--zero-stage {0,1,2,3} default: 2"),
    (["to-pairs"], "(default: 0)"),  # --seed, whose help names numpy's default_rng
], ids=["ratio", "num-actors", "generate-n", "train-batch", "zero-stage", "to-pairs-seed"])
def test_help_text(argv, shown, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    assert shown in re.sub(r"\s+", " ", capsys.readouterr().out)
