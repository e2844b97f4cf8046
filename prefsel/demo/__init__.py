"""`prefsel demo`: the paper's experiment end to end at toy scale, on the local Ray, CPU only.

    data     a letter-sorting preference task (prefsel.demo.task), a BPE tokenizer trained on it
    sft      a tiny Llama trained on the chosen responses (`prefsel train sft`)
    dpo      a DPO policy from it (`prefsel train dpo`), the policy that scores the gaps
    score    every training pair's implicit-reward gap (prefsel.score_job.run_score)
    select   smallest-gap, smallest gap > 0, middle quantile band q45-q55, random, largest-gap: each
             10% of the pairs (prefsel.selection.run_select); and 100%
    train    per seed and method: a Bradley-Terry reward model and a DPO policy
    eval     held-out pairs: RM accuracy, DPO reward accuracy, held-out log-likelihood of the answers
    report   results.md / results.json / figure.png

See README.md, "The embedded default".
"""

from prefsel.demo.runner import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
