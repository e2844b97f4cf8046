"""The shared start of every ray_jobs/ entry point.

`python ray_jobs/select.py` puts ray_jobs/ first on sys.path, where select.py would shadow the
standard library's `select` (and serve.py the `serve` package): `run` puts the repository root
there instead, which also makes a checkout's prefsel importable where it is not installed.
Then it runs the CLI subcommand with the script's arguments: exit 0 on success, 2 on bad
arguments or input (the message is in `ray job logs`), non-zero with a traceback otherwise, so
`ray job status` tells the truth.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def run(command: str) -> int:
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _HERE:
        sys.path[0] = os.path.dirname(_HERE)
    from prefsel.cli import run_entry

    return run_entry(command)
