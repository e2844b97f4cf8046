"""`ray job submit ... -- python ray_jobs/score.py ARGS`: the same flags as `prefsel score`.

Exits non-zero on failure, so `ray job status` tells the truth.
"""

import sys

from prefsel.cli import run_entry

if __name__ == "__main__":
    sys.exit(run_entry("score"))
