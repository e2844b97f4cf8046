"""The demo's methods and metrics: names, labels and order, shared by the runner and the report.

A module of constants only (no imports from the demo), so runner.py and report.py both import it
and neither imports the other at module level.
"""

from __future__ import annotations

# Table / figure order. Every method but "full" trains on the same k = floor(N x ratio) pairs.
METHODS = ("smallest-gap", "smallest-positive-gap", "middle-band", "random", "largest-gap", "full")
METHOD_LABELS = {
    "smallest-gap": "smallest-gap 10%",
    "smallest-positive-gap": "smallest gap > 0, 10%",
    "middle-band": "middle band q45-q55",
    "random": "random 10%",
    "largest-gap": "largest-gap 10%",
    "full": "all 100%",
}
# The gap selections (scored once, the same for every seed); "random" is drawn per seed.
GAP_SELECTIONS = ("smallest-gap", "smallest-positive-gap", "middle-band", "largest-gap")
METHOD_COLORS = {
    "smallest-gap": "tab:red",
    "smallest-positive-gap": "tab:orange",
    "middle-band": "tab:purple",
    "random": "tab:gray",
    "largest-gap": "tab:blue",
    "full": "tab:green",
}
METRICS = ("rm_accuracy", "dpo_reward_accuracy", "heldout_loglik")
METRIC_LABELS = {
    "rm_accuracy": "RM accuracy",
    "dpo_reward_accuracy": "DPO reward accuracy",
    "heldout_loglik": "held-out log-lik / token",
}
