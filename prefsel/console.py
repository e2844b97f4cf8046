"""A clean console for the long commands (demo, score, select, train, generate, annotate).

What the user sees: one progress display per stage, a one-line result per stage, the final
summary or table, and the path of the log file. What goes to the log file instead
(`OUTPUT/prefsel.log`): Ray's INFO lines, other libraries' INFO/DEBUG lines, the lines Ray
workers print (actors, Ray Train workers: they reach the driver through `log_to_driver`), and
a few known warnings that are expected and say nothing about the run (listed in `NOISE`, e.g.
transformers' load report for a reward model's freshly initialised `score` head). A real warning
(WARNING or above from any logger, a Python warning, a worker line that says Warning / Error /
Traceback) still reaches the console, and is in the log too. `--verbose` keeps today's console
(everything printed as the libraries print it); the log file is written all the same.

Used once per command: `with console.session(command, output, verbose): ...` (prefsel.cli.main).
Every change it makes (handler filters, the log handler, Ray's worker-log printer, environment
variables, warnings capture) is undone when the session ends, so in-process callers (tests)
see no lasting effect. The log is written under the temp folder while the command runs (commands
replace or rename their output folder) and moved to OUTPUT/prefsel.log at the end (appended
when one is there already, as after a resumed run); an object-storage output gets a copy.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.config
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator

LONG_COMMANDS = ("demo", "score", "select", "train", "generate", "annotate")
LOG_NAME = "prefsel.log"

# Expected warnings that say nothing about the run: they go to the log file only.
NOISE = (
    re.compile(r"Setting accelerator to CPU"),  # DeepSpeed, imported by accelerate on a CPU machine
    re.compile(r"Progress bars disabled\. To enable"),  # Ray Data, when RAY_DATA_DISABLE_PROGRESS_BARS is set
    re.compile(r"The maximum number of concurrent tasks for '\w+' is set to"),  # Ray Data: fewer read units
    # than the read concurrency (a small input)
)
# transformers' load report lists keys that were MISSING (freshly initialised) or UNEXPECTED (left
# out); building a sequence classifier from a causal LM (`prefsel train rm`) always gives exactly
# these two kinds, for the new `score` head and the dropped `lm_head`. Any other key is reported.
_REPORT_ROW = re.compile(r"^\s*([\w.\-*{}\[\], ]+?)\s*\|\s*([A-Z_]+)\s*(\||$)", re.M)
_EXPECTED_REPORT = {"MISSING": ("score.",), "UNEXPECTED": ("lm_head.",)}
_WORKER_WARNING = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL|Traceback)\b|\w*(Error|Warning|Exception)\b")


def is_expected_load_report(message: str) -> bool:
    """True for a transformers LOAD REPORT whose rows are all the head swap of a causal LM turned
    into a sequence classifier (MISSING score.*, UNEXPECTED lm_head.*)."""
    if "LOAD REPORT" not in message:
        return False
    rows = [(k.strip(), s) for k, s, _ in _REPORT_ROW.findall(message) if s not in ("Status",) and k.strip() != "Key"]
    rows = [(k, s) for k, s in rows if not set(k) <= set("-+")]
    return bool(rows) and all(s in _EXPECTED_REPORT and k.startswith(_EXPECTED_REPORT[s]) for k, s in rows)


def is_noise(message: str) -> bool:
    return any(p.search(message) for p in NOISE) or is_expected_load_report(message)


class _ConsoleFilter(logging.Filter):
    """On a console handler: WARNING and above, except NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        try:
            return not is_noise(record.getMessage())
        except Exception:  # a record whose message cannot be built: let the handler deal with it
            return True


class _OncePerRecord(logging.Filter):
    """The log handler sits on several loggers; a record reaching two of them is written once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_prefsel_logged", False):
            return False
        record._prefsel_logged = True
        return True


class _LogFile(logging.FileHandler):
    """The log file's handler keeps its own format (ray.init re-formats every handler of the `ray`
    logger, this one included once it sits there)."""

    def __init__(self, path: str, encoding: str) -> None:
        super().__init__(path, encoding=encoding)
        self.formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def setFormatter(self, fmt) -> None:  # noqa: N802 (logging's name)
        pass


def _is_console_handler(h: logging.Handler) -> bool:
    """A handler that prints (not a file, not an in-memory capture such as pytest's caplog)."""
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and not isinstance(getattr(h, "stream", None), io.StringIO))


class Session:
    """One command's console: see the module docstring."""

    def __init__(self, command: str, output: str | None, verbose: bool) -> None:
        from rich.console import Console

        self.command, self.output, self.verbose = command, output, verbose
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        fd, self.tmp_log = tempfile.mkstemp(prefix=f"prefsel-{command}-", suffix=".log")
        os.close(fd)
        self.log_path = self.tmp_log
        self.handler = _LogFile(self.tmp_log, encoding="utf-8")
        self.handler.setLevel(logging.INFO)
        self.handler.addFilter(_OncePerRecord())
        self.filter = _ConsoleFilter()
        self.log = logging.getLogger("prefsel")
        self._touched: list[tuple[logging.Logger | logging.Handler, str]] = []  # (object, "handler"|"filter")
        self._env: dict[str, str | None] = {}
        self._dict_config = None
        self._worker_printer = None
        self._captured_warnings = False
        self._log_level = None
        self._hf_bars = None

    # ---- start / stop --------------------------------------------------------------------------------
    def start(self) -> None:
        self._log_level = self.log.level
        if self.log.level == logging.NOTSET or self.log.level > logging.INFO:
            self.log.setLevel(logging.INFO)
        self._add_handler(self.log)
        import ray  # noqa: F401  (its logger and handler exist from here on)
        import ray.data  # noqa: F401  (Ray Data makes its loggers' handlers when imported, without dictConfig)
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers")  # transformers' own handler exists from here on
        self._add_handler(logging.getLogger())
        self._wrap_dict_config()
        if self.verbose:  # today's console; the log file gets the same records
            self.refresh()
            return
        self._setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars, here and in workers
        self._setenv("TOKENIZERS_PARALLELISM", "false")
        if hf_logging.is_progress_bar_enabled():  # "Loading weights" / "Writing model shards" bars
            hf_logging.disable_progress_bar()
            self._hf_bars = hf_logging
        self._pre_create_deepspeed_logger()
        logging.captureWarnings(True)  # Python warnings become py.warnings records: filtered, logged
        self._captured_warnings = True
        if not any(_is_console_handler(h) for h in logging.getLogger().handlers):
            root_console = logging.StreamHandler(sys.stderr)
            root_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(root_console)
            self._touched.append((logging.getLogger(), "root_console"))
            self._root_console = root_console
        self.refresh()

    def stop(self, ok: bool) -> None:
        self._restore_worker_printer()
        if self._dict_config is not None:
            logging.config.dictConfig = self._dict_config
            self._dict_config = None
        if self._captured_warnings:
            logging.captureWarnings(False)
        if self._hf_bars is not None:
            self._hf_bars.enable_progress_bar()
        for obj, kind in reversed(self._touched):
            if kind == "handler":
                obj.removeHandler(self.handler)
            elif kind == "filter":
                obj.removeFilter(self.filter)
            elif kind == "root_console":
                obj.removeHandler(self._root_console)
            elif kind == "deepspeed":
                obj.removeFilter(self._ds_filter)
        self._touched.clear()
        self.log.setLevel(self._log_level or logging.NOTSET)
        self.handler.close()
        for k, v in self._env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if ok:  # a failed run leaves its log in the temp folder, and the output as it was
            self.log_path = self._place_log()
        elif os.path.exists(self.tmp_log) and os.path.getsize(self.tmp_log) == 0:
            os.unlink(self.tmp_log)  # failed before anything was logged (a bad flag): nothing to keep
            return
        stream = sys.stdout if ok else sys.stderr
        print(f"log: {self.log_path}", file=stream, flush=True)

    # ---- loggers ---------------------------------------------------------------------------------------
    def _add_handler(self, logger: logging.Logger) -> None:
        if self.handler not in logger.handlers:
            logger.addHandler(self.handler)
            self._touched.append((logger, "handler"))

    def refresh(self) -> None:
        """Filter every console handler of every logger (prefsel's own excepted) and log what their
        loggers get. Called at the start, after each logging.config.dictConfig (Ray Data and Ray
        Train configure their loggers with it, per run) and after ray.init. With --verbose, only
        the log handler is added."""
        loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                          if isinstance(l, logging.Logger)]
        for logger in loggers:
            if logger.name == "prefsel" or logger.name.startswith("prefsel."):
                continue
            consoles = [h for h in logger.handlers if _is_console_handler(h)]
            for h in consoles if not self.verbose else ():
                if self.filter not in h.filters:
                    h.addFilter(self.filter)
                    self._touched.append((h, "filter"))
            if logger.handlers and (not logger.propagate or logger is logging.getLogger()):
                self._add_handler(logger)

    def _wrap_dict_config(self) -> None:
        original = logging.config.dictConfig
        session = self

        def dict_config(config):
            original(config)
            session.refresh()

        self._dict_config = original
        logging.config.dictConfig = dict_config

    def _pre_create_deepspeed_logger(self) -> None:
        """DeepSpeed makes its logger and warns "Setting accelerator to CPU" while it is imported
        (accelerate imports it with transformers' model code): a filter on the logger itself, set
        before, routes those records to the log file only."""
        session = self

        class _Route(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                session.handler.handle(record)
                return session.filter.filter(record)

        self._ds_filter = _Route()
        for name in ("DeepSpeed",):
            lg = logging.getLogger(name)
            lg.addFilter(self._ds_filter)
            self._touched.append((lg, "deepspeed"))

    def _setenv(self, key: str, value: str) -> None:
        if key not in self._env:
            self._env[key] = os.environ.get(key)
        os.environ.setdefault(key, value)

    # ---- Ray workers' output ---------------------------------------------------------------------------
    def on_ray_init(self) -> None:
        """After ray.init: Ray's own logger may have been set up again, and the lines workers print
        (log_to_driver) get a router: all to the log file, warnings and errors to the console."""
        self.refresh()
        if self.verbose:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        with dispatcher._lock:
            printers = [h for n, h in dispatcher.handlers if n == "ray_print_logs"]
        if not printers or self._worker_printer is not None:
            return
        original = printers[0]
        if getattr(original, "_prefsel_router", False):
            return
        session = self

        def route(data: dict) -> None:
            lines = data.get("lines") or []
            who = data.get("actor_name") or data.get("task_name") or ""
            prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}) "
            try:
                with open(session.tmp_log, "a", encoding="utf-8") as f:
                    f.writelines(prefix + line + "\n" for line in lines)
            except OSError:
                pass
            shown = [line for line in lines if "__ray_tqdm_magic_token__" in line
                     or (_WORKER_WARNING.search(line) and not is_noise(line))]
            if shown:
                original({**data, "lines": shown})

        route._prefsel_router = True
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", route)
        self._worker_printer = (dispatcher, original, route)

    def _restore_worker_printer(self) -> None:
        if self._worker_printer is None:
            return
        dispatcher, original, route = self._worker_printer
        self._worker_printer = None
        with dispatcher._lock:
            ours = any(h is route for _, h in dispatcher.handlers)
        if ours:  # not removed by ray.shutdown meanwhile
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", original)

    # ---- the log's final place -------------------------------------------------------------------------
    def _place_log(self) -> str:
        if not self.output:
            return self.tmp_log
        out = self.output.rstrip("/")
        try:
            if "://" not in out:
                if not os.path.isdir(out):
                    return self.tmp_log
                dest = os.path.join(out, LOG_NAME)
                with open(self.tmp_log, "rb") as src, open(dest, "ab") as dst:
                    shutil.copyfileobj(src, dst)
                os.unlink(self.tmp_log)
                return os.path.abspath(dest)
            from prefsel.sources import filesystem_for

            fs, path = filesystem_for(out)
            from pyarrow import fs as pafs

            if fs.get_file_info(path).type != pafs.FileType.Directory and \
                    fs.get_file_info(path + "/manifest.json").type != pafs.FileType.File:
                return self.tmp_log
            with open(self.tmp_log, "rb") as src, fs.open_output_stream(path + "/" + LOG_NAME) as dst:
                dst.write(src.read())
            os.unlink(self.tmp_log)
            return out + "/" + LOG_NAME
        except Exception:  # the log stays where it is; its path is printed
            return self.tmp_log

    # ---- what commands print ---------------------------------------------------------------------------
    def info(self, message: str) -> None:
        """A detail line: in the log; on the console only with --verbose."""
        self.log.info(message)
        if self.verbose:
            self.console.print(message, markup=False, highlight=False)

    def result(self, message: str) -> None:
        """A line the user always sees (and the log keeps)."""
        self.log.info(message)
        self.console.print(message, markup=False, highlight=False)


_CURRENT: Session | None = None


def current() -> Session | None:
    return _CURRENT


@contextlib.contextmanager
def session(command: str, output: str | None = None, verbose: bool = False) -> Iterator[Session | None]:
    """The console of one long command; a no-op for the others (and when one is already open)."""
    global _CURRENT
    if command not in LONG_COMMANDS or _CURRENT is not None:
        yield _CURRENT
        return
    s = Session(command, output, verbose)
    _CURRENT = s
    ok = False
    try:
        s.start()
        yield s
        ok = True
    finally:
        _CURRENT = None
        s.stop(ok)


def on_ray_init() -> None:
    if _CURRENT is not None:
        _CURRENT.on_ray_init()


def info(message: str) -> None:
    """A detail line (prefsel's logger; on the console only with --verbose or outside a session)."""
    if _CURRENT is not None:
        _CURRENT.info(message)
    else:
        print(message, flush=True)


def result(message: str) -> None:
    if _CURRENT is not None:
        _CURRENT.result(message)
    else:
        print(message, flush=True)


@contextlib.contextmanager
def stage(name: str, total: int | None = None, description: str | None = None) -> Iterator:
    """One stage's progress display (rich, on a terminal; nothing in a pipe) for `total` steps or a
    spinner; yields `advance(n=1)`. The caller prints the stage's one-line result afterwards."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = _CURRENT.console if _CURRENT is not None else None
    if not (console or Console()).is_terminal:  # a pipe or a file: no live display, not even a blank line
        yield lambda n=1: None
        return
    cols = [SpinnerColumn(), TextColumn(f"[bold]{name}[/bold] {description or ''}")]
    if total:
        cols += [BarColumn(), MofNCompleteColumn()]
    cols.append(TimeElapsedColumn())
    kwargs = {"console": console} if console is not None else {}
    with Progress(*cols, transient=True, **kwargs) as progress:
        task = progress.add_task(name, total=total)
        yield lambda n=1: progress.advance(task, n)


def elapsed(t0: float) -> str:
    return f"{time.time() - t0:.1f}s"

