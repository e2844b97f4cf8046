"""Aggregate the demo's runs over seeds, write results.md / results.json / figure.png (the runner prints the table)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from prefsel.demo.methods import GAP_SELECTIONS, METHOD_COLORS, METHOD_LABELS, METHODS, METRIC_LABELS, METRICS


def _agg(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def aggregate(runs: list[dict]) -> dict:
    table = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        row = {"method": METHOD_LABELS[m], "pairs": sorted({r["pairs"] for r in rs}),
               "seeds": [r["seed"] for r in rs]}
        for k in METRICS:
            row[k] = _agg([r[k] for r in rs])
        row["train_s"] = _agg([r["rm_train_s"] + r["dpo_train_s"] for r in rs])
        table[m] = row
    return table


def markdown(result: dict) -> str:
    table = result["table"]
    n_seeds = len(result["seeds"]["methods"])
    head = ["method", "pairs", *(METRIC_LABELS[k] for k in METRICS), "train time RM+DPO (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, row in table.items():
        cells = [row["method"], "/".join(str(p) for p in row["pairs"])]
        for k in METRICS:
            a = row[k]
            cells.append(f"{a['mean']:.3f} ± {a['std']:.3f} [{a['min']:.3f}, {a['max']:.3f}]"
                         if n_seeds > 1 else f"{a['mean']:.3f}")
        cells.append(f"{row['train_s']['mean']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    b = result["baseline"]
    d = result["data"]
    notes = [
        "",
        f"Seeds: methods {result['seeds']['methods']} (training + random selection); data {result['seeds']['data']}, "
        f"held-out {result['seeds']['eval']}, tiny-model init / SFT / DPO scorer {result['seeds']['model_sft_scorer']}.",
        f"Cells: mean ± std [min, max] over {n_seeds} seed(s)." if n_seeds > 1 else "Cells: one seed.",
        f"Data: {d['train_pairs']} training pairs ({d['mislabeled_train']} mislabeled), {d['eval_pairs']} held-out "
        f"pairs (none mislabeled); 10% = {d['selected_pairs']} pairs.",
        f"Reference points: SFT held-out log-lik {b['sft_heldout_loglik']:.3f}; the DPO scorer (100% data) "
        f"reward accuracy {b['scorer_dpo_reward_accuracy']:.3f}, log-lik {b['scorer_heldout_loglik']:.3f}.",
        "Selections (mislabeled pairs, pairs by error size): " + "; ".join(
            f"{k}: {v['mislabeled']} mislabeled, {v['error_counts']}" for k, v in result["selection_composition"].items()),
        f"Negative-gap pairs ({next(iter(result['selection'].values()), {}).get('negative_gaps')} of all "
        f"{d['train_pairs']}) per selection: " + "; ".join(
            f"{k}: {v.get('selected_negative_gaps')} of {v.get('rows_selected')}"
            for k, v in result["selection"].items()),
        "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items()),
    ]
    return "\n".join(lines + notes) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from prefsel.selection import _scores_dataset

    ds, _ = _scores_dataset(result["scores"])
    gaps = ds.to_table(columns=["gap"])["gap"].to_numpy(zero_copy_only=False)
    gaps = gaps[np.isfinite(gaps)]
    fig, axes = plt.subplots(1, 1 + len(METRICS), figsize=(4.2 * (1 + len(METRICS)), 3.6))
    ax = axes[0]
    ax.hist(gaps, bins=40, color="#888")
    for name in GAP_SELECTIONS:
        cut = result["selection"].get(name, {}).get("cutoff_gap")
        for i, c in enumerate(cut if isinstance(cut, list) else [] if cut is None else [cut]):
            ax.axvline(c, color=METHOD_COLORS[name], ls="--",
                       label=f"{METHOD_LABELS[name]} cut-off" if i == 0 else None)
    ax.axvline(0.0, color="k", lw=0.5, ls=":")
    ax.set_title(f"reward gap of {len(gaps)} training pairs")
    ax.set_xlabel("gap = r(chosen) - r(rejected)")
    ax.legend(fontsize=7)
    table = result["table"]
    names = [table[m]["method"] for m in table]
    colors = [METHOD_COLORS[m] for m in table]
    for ax, k in zip(axes[1:], METRICS):
        means = [table[m][k]["mean"] for m in table]
        lo = [table[m][k]["mean"] - table[m][k]["min"] for m in table]
        hi = [table[m][k]["max"] - table[m][k]["mean"] for m in table]
        ax.bar(range(len(names)), means, yerr=[lo, hi], color=colors, capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(METRIC_LABELS[k] + " (bars: min-max)")
        if k != "heldout_loglik":
            ax.axhline(0.5, color="k", lw=0.5, ls=":")
            ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out: Path) -> dict:
    result["table"] = aggregate(result["runs"])
    result["scores"] = str(out / "scores")
    md = markdown(result)
    (out / "results.md").write_text(md)
    fig = out / "figure.png"
    try:
        figure(result, fig)
        result["figure"] = str(fig)
    except Exception as e:  # the numbers matter more than the picture
        result["figure_error"] = repr(e)
    result["outputs"] = {"results_md": str(out / "results.md"), "results_json": str(out / "results.json"),
                         "figure": str(fig), "gap_histogram": str(out / "selections" / "smallest-gap" /
                                                                  "gap_histogram.png")}
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    return result
