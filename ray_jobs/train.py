"""`ray job submit ... -- python ray_jobs/train.py ARGS`: the same flags and code as `prefsel train`."""

import os
import runpy
import sys

# Loaded by path: importing a sibling module would need ray_jobs/ on sys.path (see _entry.py).
run = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_entry.py"))["run"]

if __name__ == "__main__":
    sys.exit(run("train"))
