"""The demo pipeline: data -> SFT -> DPO scorer -> gaps -> selections -> RM + DPO per method -> eval.

Everything runs on the local Ray (or RAY_ADDRESS), on CPU, with the library's own jobs:
prefsel.train.run_train (tasks sft, dpo, rm), prefsel.score_job.run_score,
prefsel.selection.run_select. Evaluation runs in this process with prefsel.scoring.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefsel.demo.methods import GAP_SELECTIONS, METHOD_LABELS, METHODS, METRIC_LABELS, METRICS
from prefsel.demo.report import write_report

__all__ = ["DemoConfig", "Demo", "run_demo", "METHODS", "METHOD_LABELS", "METRICS", "METRIC_LABELS"]

DATA_SEED = 0  # training pairs
EVAL_SEED = 1000  # held-out pairs (never mislabeled)
MODEL_SEED = 0  # tiny model init, SFT and the DPO scorer (shared by all seeds)


@dataclass
class DemoConfig:
    output: str = "runs/demo"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    ratio: float = 0.1
    n_train: int = 2000
    n_eval: int = 500
    mislabeled: float = 0.02
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    vocab_size: int = 512
    batch_size: int = 16
    sft_epochs: int = 1
    scorer_epochs: int = 2
    epochs: int = 2  # RM and DPO on each selection (same epochs for every method)
    lr_sft: float = 3e-3
    lr_dpo: float = 1e-3
    lr_rm: float = 1e-3
    beta: float = 0.1
    # Ray Train local mode: each run executes in this process, one after another. At this scale
    # a run is a few seconds of optimisation; a worker group's start-up would cost 10-30 s more.
    local_mode: bool = True
    parallel: int = 2  # concurrent Ray Train runs for the per-method models (worker mode only)
    overwrite: bool = True

    def __post_init__(self) -> None:
        from prefsel.checks import require
        from prefsel.selection import floor_share

        # checked before the first stage: a selection of no pairs fails only at its training run
        require((bool(self.seeds), "seeds: give at least one"),
                (self.n_train >= 1 and self.n_eval >= 1, "n_train, n_eval: must be positive"),
                (0 < self.ratio <= 1, f"ratio: must be in (0, 1], got {self.ratio}"),
                (not 0 < self.ratio <= 1 or floor_share(self.n_train, self.ratio) >= 1,
                 f"ratio: {self.ratio} of {self.n_train} training pairs selects none (floor(N x ratio) = 0)"))

    @classmethod
    def quick_config(cls, **kw) -> DemoConfig:
        base = dict(seeds=[0], n_train=200, n_eval=64, hidden_size=32, intermediate_size=64,
                    vocab_size=384, batch_size=8, sft_epochs=2, scorer_epochs=1, epochs=1)
        base.update(kw)
        return cls(**base)


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _log(msg: str) -> None:
    """A detail line (each training run, each evaluation): in OUTPUT/prefsel.log; on the console with
    --verbose. Each stage's one-line result goes through _stage_done."""
    from prefsel import console

    console.info(f"[prefsel demo] {msg}")


STAGES = ("data", "sft", "scorer", "score", "select", "train", "eval", "report")


def _stage_done(name: str, t0: float, text: str) -> None:
    from prefsel import console

    i = STAGES.index(name) + 1
    console.result(f"[{i}/{len(STAGES)}] {name:<7} {text} ({time.time() - t0:.1f}s)")


class Demo:
    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output).absolute()
        self.timings: dict[str, float] = {}

    # ---- stages ------------------------------------------------------------------------------
    def prepare(self) -> None:
        from prefsel.demo.task import make_sort_pairs
        from prefsel.tiny import build_tiny_llama, build_tiny_tokenizer

        c = self.cfg
        if self.out.exists() and any(self.out.iterdir()):
            if not c.overwrite:
                raise FileExistsError(f"--output {self.out} is not empty: pass --overwrite or another folder")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        train = make_sort_pairs(c.n_train, seed=DATA_SEED, mislabeled=c.mislabeled)
        held = make_sort_pairs(c.n_eval, seed=EVAL_SEED, mislabeled=0.0)
        self.train_rows, self.eval_rows = train, held
        self.train_path = _write_jsonl(self.out / "data" / "train.jsonl", train)
        self.eval_path = _write_jsonl(self.out / "data" / "eval.jsonl", held)
        texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in train]
        tok = build_tiny_tokenizer(texts, vocab_size=c.vocab_size, chat_template=False)
        import torch

        model = build_tiny_llama(len(tok), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                 num_layers=c.num_layers, seed=MODEL_SEED, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with torch.no_grad():  # calm init (as tests/test_train.py) so training is smooth
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.05)
        self.init_path = str(self.out / "models" / "init")
        model.save_pretrained(self.init_path)
        tok.save_pretrained(self.init_path)

    def train(self, task: str, model: str, data: str, output: Path, seed: int, epochs: int, n_rows: int) -> dict:
        from prefsel.train.config import TrainConfig
        from prefsel.train.job import run_train

        c = self.cfg
        lr = {"sft": c.lr_sft, "dpo": c.lr_dpo, "rm": c.lr_rm}[task]
        bs = max(1, min(c.batch_size, n_rows))
        cfg = TrainConfig(
            task=task, model=model, data=data, output=str(output), chat_template="none",
            learning_rate=lr, lr_warmup_ratio=0.0, epochs=epochs, train_batch_size=bs,
            micro_train_batch_size=bs, seed=seed, beta=c.beta if task == "dpo" else None,
            strategy="ddp", num_workers=1, local_mode=c.local_mode, cpus_per_worker=1.0, ref_mode="online",
            use_tensorboard=False, progress=False, overwrite=True, keep_checkpoints=1,
            run_name=f"demo-{task}",
        )
        t0 = time.time()
        s = run_train(cfg)
        s["demo_wall_s"] = time.time() - t0
        fm = s.get("final_metrics") or {}
        _log(f"train {task} on {s['rows_used']} pairs -> {output.relative_to(self.out)}: {s['steps']} steps, "
             f"loss {fm.get('loss', float('nan')):.4f}, {s['demo_wall_s']:.1f}s")
        return s

    def score(self) -> dict:
        from prefsel.score_job import ScoreJobConfig, run_score
        from prefsel.scoring import ScoreConfig

        t0 = time.time()
        self.scores_path = str(self.out / "scores")
        s = run_score(ScoreJobConfig(policy=self.scorer_path, reference=self.sft_path, data=self.train_path,
                                     output=self.scores_path, chat_template="none", chunk_rows=256, overwrite=True,
                                     scoring=ScoreConfig(beta=self.cfg.beta)))
        self.timings["score_s"] = time.time() - t0
        return s

    def select(self) -> dict[str, str]:
        from prefsel.selection import SelectConfig, run_select

        sel = {}
        self.select_summaries = {}
        for method in GAP_SELECTIONS:
            out = str(self.out / "selections" / method)
            self.select_summaries[method] = run_select(SelectConfig(
                scores=self.scores_path, output=out, overwrite=True, **self.selection_args(method)))
            sel[method] = out
            _log(f"selected {method}: {self.select_summaries[method]['rows_selected']} pairs -> selections/{method}")
        return sel

    def score_and_select(self) -> dict[str, str]:
        self.score()
        return self.select()

    def selection_args(self, method: str) -> dict:
        """SelectConfig arguments of a gap selection. Every one keeps k = floor(N x ratio) pairs (N = all
        training pairs), so the 10% methods train on the same number of pairs."""
        r = self.cfg.ratio
        k = math.floor(len(self.train_rows) * r + 1e-9)
        if method in ("smallest-gap", "largest-gap"):
            return {"strategy": method, "ratio": r}
        if method == "smallest-positive-gap":  # hardest pairs the scorer does not contradict (gap > 0)
            return {"strategy": "smallest-gap", "min_gap": 0.0, "top_k": k}
        if method == "middle-band":  # positions floor(N(0.5 - r/2)) .. floor(N(0.5 + r/2)) - 1: k or k + 1 rows,
            # capped at k (the band's k hardest)
            return {"strategy": "quantile-band", "band": (0.5 - r / 2, 0.5 + r / 2), "top_k": k}
        raise ValueError(f"not a gap selection: {method}")

    def select_random(self, seed: int) -> str:
        from prefsel.selection import SelectConfig, run_select

        out = str(self.out / "selections" / f"random-seed{seed}")
        self.select_summaries[f"random-seed{seed}"] = run_select(SelectConfig(
            scores=self.scores_path, output=out, ratio=self.cfg.ratio, strategy="random", seed=seed,
            overwrite=True))
        return out

    # ---- evaluation ----------------------------------------------------------------------------
    def tokenized_eval(self):
        from prefsel.formats import to_example
        from prefsel.models import load_tokenizer
        from prefsel.tokenization import PairTokenizer

        tok = load_tokenizer(self.sft_path)
        pt = PairTokenizer(tok, "none")
        self.pad_id = tok.pad_token_id
        self.eval_tok = [pt.encode(to_example(r, "pairs")) for r in self.eval_rows]

    def eval_rm(self, path: str) -> float:
        import torch
        from transformers import AutoModelForSequenceClassification

        from prefsel.generation.rewards import score_groups

        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
        r = score_groups(model, [(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in self.eval_tok], self.pad_id)
        correct = sum(int(r[2 * k] > r[2 * k + 1]) for k in range(len(self.eval_tok)))
        return correct / len(self.eval_tok)

    def eval_policy(self, path: str) -> tuple[float, float]:
        """(reward accuracy vs the SFT reference, mean per-token log-prob of the chosen answers)."""
        from prefsel.models import load_causal_lm
        from prefsel.scoring import PairScorer, ScoreConfig

        policy = load_causal_lm(path, dtype="fp32", device="cpu")
        scorer = PairScorer(policy, self.sft_model, self.pad_id, ScoreConfig(beta=self.cfg.beta), "cpu")
        res = scorer.score(self.eval_tok)
        acc = sum(r["gap"] > 0 for r in res) / len(res)
        return acc, self.loglik(policy)

    def loglik(self, model) -> float:
        from prefsel.scoring import ScoreConfig, groups_logprobs

        (lp,) = groups_logprobs([model], [(p.prompt_ids, [p.chosen_ids]) for p in self.eval_tok], self.pad_id,
                                ScoreConfig(), "cpu")
        per_tok = [v / len(p.chosen_ids) for v, p in zip(lp, self.eval_tok)]
        return sum(per_tok) / len(per_tok)

    # ---- the whole run -------------------------------------------------------------------------
    def run(self) -> dict:
        """The stages in order (STAGES), each with one progress display and one result line."""
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load; the demo shows its stages
        from prefsel.console import result, stage
        from prefsel.jobs import init_ray
        from prefsel.models import load_causal_lm

        c = self.cfg
        t_all = time.time()
        result(f"prefsel demo -> {self.out} ({len(c.seeds)} seed(s), {len(METHODS)} methods, "
               f"{2 + 2 * len(c.seeds) * len(METHODS)} training runs)")
        with stage("data", description="task, tokenizer, tiny model, local Ray"):
            self.prepare()
            init_ray()
        n = len(self.train_rows)
        self.timings["setup_s"] = time.time() - t_all
        _stage_done("data", t_all, f"{n} training pairs ({sum(r['mislabeled'] for r in self.train_rows)} flipped), "
                    f"{len(self.eval_rows)} held-out")
        t0 = time.time()
        with stage("sft", description="reference model on the chosen answers"):
            sft = self.train("sft", self.init_path, self.train_path, self.out / "models" / "sft", MODEL_SEED,
                             c.sft_epochs, n)
        self.sft_path = sft["final_model"]
        _stage_done("sft", t0, _train_line(sft, self.out))
        t1 = time.time()
        with stage("scorer", description="DPO policy on all pairs"):
            scorer = self.train("dpo", self.sft_path, self.train_path, self.out / "models" / "dpo", MODEL_SEED,
                                c.scorer_epochs, n)
        self.scorer_path = scorer["final_model"]
        self.timings["sft_and_scorer_s"] = time.time() - t0
        _stage_done("scorer", t1, _train_line(scorer, self.out))
        t0 = time.time()
        with stage("score", description="implicit-reward gap of every pair (Ray Data)"):
            sc = self.score()
        _stage_done("score", t0, f"{sc['rows_scored']} pairs scored, {sc['rows_rejected']} rejected -> scores/")
        t0 = time.time()
        with stage("select", description=", ".join(GAP_SELECTIONS)):
            sel = self.select()
            self.tokenized_eval()
            self.sft_model = load_causal_lm(self.sft_path, dtype="fp32", device="cpu")
            baseline = {"sft_heldout_loglik": self.loglik(self.sft_model)}
            scorer_acc, scorer_ll = self.eval_policy(self.scorer_path)
            baseline.update(scorer_dpo_reward_accuracy=scorer_acc, scorer_heldout_loglik=scorer_ll)
            # every (seed, method, task) run, `parallel` Ray Train runs at a time (Ray Train's per-run
            # start-up, not the few optimizer steps, is what costs time at this scale)
            jobs = []
            for seed in c.seeds:
                data = {**sel, "random": self.select_random(seed), "full": self.train_path}
                for method in METHODS:
                    k = n if method == "full" else self.select_summaries[
                        f"random-seed{seed}" if method == "random" else method]["rows_selected"]
                    for task in ("rm", "dpo"):
                        jobs.append((seed, method, task, data[method], k))
        k10 = math.floor(n * c.ratio)
        neg = self.select_summaries[GAP_SELECTIONS[0]].get("negative_gaps")
        _stage_done("select", t0, f"{len(self.select_summaries)} selections of {k10} pairs; {neg} of {n} pairs "
                    f"have a negative gap; scorer held-out reward accuracy {scorer_acc:.3f}")
        t0 = time.time()
        done = {}
        with stage("train", total=len(jobs), description="a reward model and a DPO policy per method and seed") \
                as advance:
            if c.parallel > 1 and not c.local_mode:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=c.parallel) as pool:
                    futs = {(s, m, t): pool.submit(self.train, t, self.sft_path, d,
                                                   self.out / "runs" / f"seed{s}" / m / t, s, c.epochs, k)
                            for s, m, t, d, k in jobs}
                    for key, f in futs.items():
                        done[key] = f.result()
                        advance()
            else:
                for s, m, t, d, k in jobs:
                    done[(s, m, t)] = self.train(t, self.sft_path, d, self.out / "runs" / f"seed{s}" / m / t, s,
                                                 c.epochs, k)
                    advance()
        self.timings["methods_train_s"] = time.time() - t0
        _stage_done("train", t0, f"{len(jobs)} runs ({sum(r['steps'] or 0 for r in done.values())} optimizer steps) "
                    f"-> runs/")
        t1 = time.time()
        runs = []
        with stage("eval", total=len(c.seeds) * len(METHODS), description="held-out pairs") as advance:
            for seed in c.seeds:
                for method in METHODS:
                    rm, dpo = done[(seed, method, "rm")], done[(seed, method, "dpo")]
                    rm_acc = self.eval_rm(rm["final_model"])
                    dpo_acc, ll = self.eval_policy(dpo["final_model"])
                    run = {"seed": seed, "method": method, "pairs": rm["rows_used"], "dpo_pairs": dpo["rows_used"],
                           "rm_accuracy": rm_acc, "dpo_reward_accuracy": dpo_acc, "heldout_loglik": ll,
                           "rm_steps": rm["steps"], "dpo_steps": dpo["steps"],
                           "rm_train_s": rm["demo_wall_s"], "dpo_train_s": dpo["demo_wall_s"],
                           "rm_model": rm["final_model"], "dpo_model": dpo["final_model"]}
                    _log(f"seed {seed} {METHOD_LABELS[method]}: RM acc {rm_acc:.3f}, DPO reward acc {dpo_acc:.3f}, "
                         f"log-lik {ll:.4f}")
                    runs.append(run)
                    advance()
        _stage_done("eval", t1, f"{len(runs)} reward models and {len(runs)} DPO policies on "
                    f"{len(self.eval_rows)} held-out pairs")
        self.timings["methods_s"] = time.time() - t0
        self.timings["total_s"] = time.time() - t_all
        result = {
            "config": asdict(c),
            "seeds": {"data": DATA_SEED, "eval": EVAL_SEED, "model_sft_scorer": MODEL_SEED,
                      "methods": list(c.seeds)},
            "data": {"train_pairs": n, "eval_pairs": len(self.eval_rows), "mislabeled_train":
                     sum(r["mislabeled"] for r in self.train_rows), "selected_pairs": math.floor(n * c.ratio)},
            "baseline": baseline,
            "selection": {k: {kk: v.get(kk) for kk in ("rows_selected", "rows_after_filter", "cutoff_gap",
                                                          "selected_gap_mean", "negative_gaps",
                                                          "selected_negative_gaps")}
                          for k, v in self.select_summaries.items()},
            "selection_composition": self.composition(sel),
            "runs": runs,
            "models": {"init": self.init_path, "sft": self.sft_path, "scorer_dpo": self.scorer_path},
            "timings_s": {k: round(v, 1) for k, v in self.timings.items()},
        }
        t0 = time.time()
        with stage("report", description="results.md, results.json, figure.png"):
            out = write_report(result, self.out)
        _stage_done("report", t0, f"results.md, results.json, figure.png in {self.out}; "
                    f"the whole demo {time.time() - t_all:.0f}s")
        print()
        print((self.out / "results.md").read_text(), end="", flush=True)
        return out

    def composition(self, sel: dict[str, str]) -> dict:
        """How many mislabeled pairs, and which error sizes, each gap selection holds."""
        from collections import Counter

        out = {}
        for name, folder in sel.items():
            with open(os.path.join(folder, "selected.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            out[name] = {"mislabeled": sum(bool(r.get("mislabeled")) for r in rows),
                         "error_counts": dict(sorted(Counter(int(r["error"]) for r in rows).items()))}
        return out


def _train_line(s: dict, out: Path) -> str:
    fm = s.get("final_metrics") or {}
    return (f"{s['rows_used']} pairs, {s['steps']} steps, loss {fm.get('loss', float('nan')):.4f} "
            f"-> {Path(s['final_model']).relative_to(out)}")


def run_demo(cfg: DemoConfig) -> dict:
    return Demo(cfg).run()
