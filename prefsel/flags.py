"""One definition of each command-line flag, and one args -> config step.

Flags come in groups shared by the commands (models, data + tokenization, scoring, actors,
output). A flag's default is read from the config dataclass the command builds, so a default
lives in one place: the dataclass. `config_from_args` fills a config (nested dataclasses
included) from the parsed flags by field name. Flag names follow OpenRLHF / TRL where they
exist (--beta, --max-length, --chat-template, --ref-model / --pretrain aliases).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
from typing import Any

from prefsel.formats import FORMATS
from prefsel.packing import ATTN_CHOICES


def default_of(cls: type, name: str) -> Any:
    """The default of dataclass field `name` of `cls` (dotted for nested: "scoring.beta")."""
    head, _, rest = name.partition(".")
    f = {f.name: f for f in dataclasses.fields(cls)}[head]
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        raise KeyError(f"{cls.__name__}.{head} has no default")
    return getattr(value, rest) if rest else value


_SAYS_DEFAULT = re.compile(r"\bdefault\b", re.IGNORECASE)  # a help text giving its default ("default_rng" does not)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` with each flag's default, where a flag's help does not already give it: every
    value flag with a default other than None (a switch's False, or a None the config resolves
    later, e.g. train's per-task learning rate, says nothing and is left out)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        d = action.default
        return (bool(action.option_strings) and action.nargs != 0 and d is not None and d is not argparse.SUPPRESS
                and not isinstance(d, bool) and not _SAYS_DEFAULT.search(action.help or ""))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):  # argparse prints no help line for None
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


def _help(text: str, value: Any) -> str:
    return f"{text} (default: {value})" if value not in (None, False) else text


def add_model_flags(p: argparse.ArgumentParser, cfg: type, *, roles: tuple[str, ...] = ("policy", "reference"),
                    required: bool = True, model_flags: tuple[str, ...] = ("--model", "--policy"),
                    model_help: str = "policy: local folder or hub name") -> None:
    """The models a command loads, their tokenizer, dtype and loading options."""
    names = {f.name for f in dataclasses.fields(cfg)}
    g = p.add_argument_group("models")
    if "policy" in roles:
        g.add_argument("--policy", required=required, help="DPO policy: local folder or hub name")
    if "reference" in roles:
        g.add_argument("--reference", "--ref-model", dest="reference", required=required,
                       help="reference (SFT) model: local folder or hub name")
    if "reward_model" in roles:
        g.add_argument("--reward-model", "--rm", dest="reward_model", required=required,
                       help="AutoModelForSequenceClassification with one output (e.g. from `prefsel train rm`)")
    if "model" in roles:
        g.add_argument(*model_flags, dest="model", required=required, help=model_help)
    g.add_argument("--tokenizer", default=None, help="tokenizer (default: the first model's)")
    if "dtype" in names:
        g.add_argument("--dtype", default=default_of(cfg, "dtype"),
                       help=_help("auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32", default_of(cfg, "dtype")))
    if "attn_implementation" in names:
        g.add_argument("--attn", "--attn-implementation", dest="attn_implementation", choices=ATTN_CHOICES,
                       default=default_of(cfg, "attn_implementation"),
                       help=_help("attention backend the models load with; packed rows get the mask it needs "
                                  "(auto: sdpa where the model supports it, else eager)",
                                  default_of(cfg, "attn_implementation")))
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub")


def add_data_flags(p: argparse.ArgumentParser, cfg: type, *, data_dest: str = "data",
                   data_flags: tuple[str, ...] = ("--data", "--dataset"), required: bool = True,
                   data_help: str = "file, folder, glob, datasets save_to_disk folder, hub dataset, or s3:// URI",
                   formats: tuple[str, ...] | None = ("pairs", "conversation", "hh"),
                   max_length_help: str = "max tokens of prompt + response") -> None:
    """Where the rows come from and how they are tokenized."""
    names = {f.name for f in dataclasses.fields(cfg)}
    g = p.add_argument_group("data")
    g.add_argument(*data_flags, dest=data_dest, required=required, help=data_help)
    g.add_argument("--split", default=default_of(cfg, "split"), help="split of a hub / save_to_disk dataset")
    if formats and "format" in names:
        g.add_argument("--format", default=None, choices=[f for f in FORMATS if f in formats],
                       help="force the data format (default: detected)")
    g.add_argument("--chat-template", default=default_of(cfg, "chat_template"),
                   help="auto, none, or a Jinja template file")
    if "max_length" in names:
        g.add_argument("--max-length", "--max-len", dest="max_length", type=int, default=default_of(cfg, "max_length"),
                       help=_help(max_length_help, default_of(cfg, "max_length")))
    if "truncation" in names:
        g.add_argument("--truncation", default=default_of(cfg, "truncation"), choices=["reject", "prompt-left"],
                       help="over-long rows: reject them, or drop prompt tokens from the left")
    add_response_flags(g, names)
    if "allow_all_rejected" in names:
        g.add_argument("--allow-all-rejected", action="store_true",
                       help="accept a run in which every row is rejected (default: exit non-zero)")
    if "chunk_rows" in names:
        g.add_argument("--chunk-rows", type=int, default=default_of(cfg, "chunk_rows"),
                       help=_help("rows per read chunk / output shard", default_of(cfg, "chunk_rows")))
    if "hash_inputs" in names:
        g.add_argument("--hash-inputs", action="store_true",
                       help="fingerprint input files by content (SHA-256) for resume, not by size + mtime")


RESPONSE_FIELDS = ("strip_responses", "exact_continuation")  # the fields add_response_flags sets


def add_response_flags(g, names: set[str], *, unset: bool = False) -> None:
    """How responses are tokenized (prefsel.tokenization.PairTokenizer), for the fields of `names`
    among strip_responses and exact_continuation (both on by default; each flag turns one off).
    `unset`: a flag not given leaves None instead of True, so a command that merges its flags over
    a config file (`prefsel serve --config`) keeps the file's value."""
    unset_default = {"default": None} if unset else {}
    if "strip_responses" in names:
        g.add_argument("--keep-response-whitespace", dest="strip_responses", action="store_false",
                       help="keep chat responses' leading/trailing whitespace verbatim (as TRL does)",
                       **unset_default)
    if "exact_continuation" in names:
        g.add_argument("--tokenize-responses-alone", dest="exact_continuation", action="store_false",
                       help="tokenize each response on its own (as TRL does) instead of as the continuation "
                            "of the rendered text (SentencePiece: a leading word-start mark)",
                       **unset_default)


def add_scoring_flags(p: argparse.ArgumentParser, cfg: type) -> None:
    """How pairs are scored (prefsel.scoring.ScoreConfig, nested in the job config as `scoring`)."""
    g = p.add_argument_group("scoring")
    g.add_argument("--beta", type=float, default=default_of(cfg, "scoring.beta"),
                   help=_help("implicit reward scale (selection paper)", default_of(cfg, "scoring.beta")))
    add_layout_flags(g, cfg, "scoring.", "max_tokens_per_batch")
    g.add_argument("--padding-side", default=default_of(cfg, "scoring.padding_side"), choices=["left", "right"],
                   help="where pads go (--no-packing; packed rows pad at their tail)")


def add_layout_flags(g, cfg: type, prefix: str = "", budget_field: str | None = None) -> None:
    """How sequences are laid out for the forward (prefsel.packing): packing, prompt sharing, the
    token budget of one forward. `prefix` is the nested config's dotted path ("scoring.")."""
    if budget_field:
        g.add_argument("--max-tokens-per-batch", dest=budget_field.rpartition(".")[2], type=int,
                       default=default_of(cfg, prefix + budget_field),
                       help=_help("token slots (rows x row width, pads included) per forward",
                                  default_of(cfg, prefix + budget_field)))
    g.add_argument("--no-packing", dest="packing", action="store_false", default=default_of(cfg, prefix + "packing"),
                   help="one sequence per padded row (default: several sequences per row, no pads inside)")
    g.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                   default=default_of(cfg, prefix + "share_prompt"),
                   help="run the prompt once per response (default: once per row, its responses in one segment)")


def add_actor_flags(p: argparse.ArgumentParser, cfg: type) -> None:
    """The Ray Data actor pool (prefsel.jobs.ActorResources, nested as `resources`)."""
    g = p.add_argument_group("actors")
    g.add_argument("--num-actors", type=int, default=default_of(cfg, "resources.num_actors"),
                   help="model replicas (actors)")
    g.add_argument("--gpus-per-actor", type=float, default=default_of(cfg, "resources.gpus_per_actor"),
                   help="GPUs per actor; fractional allowed")
    g.add_argument("--cpus-per-actor", type=float, default=default_of(cfg, "resources.cpus_per_actor"),
                   help="CPUs per actor")
    g.add_argument("--rows-per-actor-call", type=int, default=default_of(cfg, "resources.rows_per_actor_call"),
                   help=_help("rows handed to an actor at once", default_of(cfg, "resources.rows_per_actor_call")))


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="output folder or s3:// URI")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def add_console_flags(p: argparse.ArgumentParser) -> None:
    """What a long command prints (prefsel.console): stages, results and warnings; --verbose adds
    Ray's INFO lines, workers' output and library reports (always in OUTPUT/prefsel.log)."""
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print Ray's and the libraries' INFO lines and workers' output too "
                        "(default: they go to OUTPUT/prefsel.log)")


def config_from_args(cls: type, args: argparse.Namespace | dict, **overrides: Any):
    """Build dataclass `cls` from parsed flags by field name; nested dataclass fields are built
    the same way from the same flags. Fields without a flag keep their defaults."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    values = {**values, **overrides}
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides or (f.name in values and not _is_dataclass_field(f)):
            kw[f.name] = values[f.name]
        elif _is_dataclass_field(f):
            kw[f.name] = config_from_args(type(default_of(cls, f.name)), values)
    return cls(**kw)


def _is_dataclass_field(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory())


def flag_error(message: str, parser: argparse.ArgumentParser) -> str:
    """A library error that names a config field ("beta: ...") names the flag instead."""
    m = re.match(r"^([a-z_]+): ", message)
    if not m:
        return message
    dests = {a.dest: a.option_strings[0] for a in _actions(parser) if a.option_strings}
    flag = dests.get(m.group(1))
    return f"{flag}: {message[m.end():]}" if flag else message


def _actions(parser: argparse.ArgumentParser):
    for a in parser._actions:
        yield a
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _actions(sub)
