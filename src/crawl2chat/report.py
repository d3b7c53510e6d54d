"""report.md + PNG plots: every stage's final metrics in tables and its curves, from the run directory alone."""
from __future__ import annotations

import json
from pathlib import Path

from crawl2chat.common import C2CError, atomic_write_text, read_json

# stage → (folder, curves to plot from metrics.jsonl: (y key, label[, "right": on a second y axis]))
CURVES = {
    "pretrain": ("base", [("loss", "train loss"), ("val_loss", "val loss")]),
    "sft": ("sft", [("loss", "train loss"), ("val_loss", "val loss")]),
    "idk": ("idk", [("loss", "train loss"), ("val_loss", "val loss")]),
    "rl": ("rl", [("reward_mean", "reward (mean)"), ("accuracy", "rollout accuracy"), ("pass1", "held-out pass@1"),
                  ("tool_calls", "python calls per reply (right axis)", "right")]),
    "rm": ("rm", [("loss", "train loss"), ("train_acc", "train pair accuracy"), ("rm_acc", "held-out pair accuracy")]),
    "rlhf": ("rlhf", [("proxy", "reward model (proxy)"), ("gold", "rubric (gold)"), ("kl", "KL to start (right axis)", "right")]),
}


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(rows: list[dict], curves: list[tuple], title: str, out: Path) -> bool:
    series = [(label, [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))], side)
              for key, label, *side in curves]
    series = [(label, pts, side) for label, pts, side in series if pts]
    if not series:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    right = ax.twinx() if any(side for _, _, side in series) else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, pts, side) in enumerate(series):
        xs, ys = zip(*pts)
        (right if side else ax).plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=label,
                                     color=colors[i % len(colors)], linestyle="--" if side else "-")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles = [h for a in (ax, right) if a is not None for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def plot_funnel(stats: dict, out: Path) -> bool:
    if "documents_in" not in stats or not stats.get("removed"):
        return False
    names, kept, left = ["read"], [stats["documents_in"]], stats["documents_in"]
    for name, n in stats["removed"].items():  # in pipeline order
        left -= n
        names.append(f"after {name}")
        kept.append(left)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.2), dpi=110)
    ax.barh(range(len(names)), kept, color="#4a7ab5")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    for i, k in enumerate(kept):
        ax.text(k, i, f" {k}", va="center", fontsize=7)
    ax.set_xlabel("documents left after the step")
    ax.set_title("data funnel")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return True


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        s = json.dumps(v)
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v)


def _table(metrics: dict) -> list[str]:
    rows = [(k, v) for k, v in metrics.items() if not k.startswith("examples") and not k.endswith("_examples")
            and not (isinstance(v, list) and v and isinstance(v[0], dict))]
    if not rows:
        return []
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v).replace('|', '/')} |" for k, v in rows]


def _examples(metrics: dict) -> list[str]:
    out = []
    for key, value in metrics.items():
        if (key.startswith("examples") or key.endswith("_examples")) and isinstance(value, list) and value:
            out += [f"", f"<details><summary>{key}</summary>", ""]
            for ex in value[:4]:
                out.append("- " + "; ".join(f"**{k}**: {str(v)[:200]}" for k, v in ex.items()).replace("\n", " "))
            out += ["", "</details>"]
    return out


def hacking_verdict(m: dict) -> tuple[bool, str] | None:
    """Whether an unguarded RLHF run (its metrics.json) was hacked, in a sentence: the proxy rose while
    gold fell, with the fall's 95% interval below zero. Measured to the last weights from the better,
    on fresh samples of the same prompts, of the gold peak's weights and the start: the peak is the best
    of noisy evaluations of 24 prompts, and its weights can score below the start on all of them."""
    from_peak = "gold_from_peak_ci95" in m and "proxy_at_peak" in m
    if from_peak and "gold_before" in m and "gold_diff_ci95" in m and m["gold_at_peak"] < m["gold_before"]:
        from_peak = False
    if from_peak:
        lo, hi = m["gold_from_peak_ci95"]
        where = (f"from the gold peak's weights (step {m.get('gold_peak_step')}) to the last, the proxy went "
                 f"{m['proxy_at_peak']:.2f} → {m['proxy_after']:.2f} and gold {m['gold_at_peak']:.3f} → "
                 f"{m['gold_after']:.3f} ({m['gold_from_peak']:+.3f}, 95% interval {lo:+.3f} to {hi:+.3f}; fresh samples)")
        rose = m["proxy_after"] > m["proxy_at_peak"]
    elif {"proxy_before", "proxy_after", "gold_before", "gold_after", "gold_diff_ci95"} <= m.keys():
        lo, hi = m["gold_diff_ci95"]
        where = (f"from the start to the last weights, the proxy went {m['proxy_before']:.2f} → {m['proxy_after']:.2f} "
                 f"and gold {m['gold_before']:.3f} → {m['gold_after']:.3f} (95% interval of the change "
                 f"{lo:+.3f} to {hi:+.3f}; fresh samples)")
        rose = m["proxy_after"] > m["proxy_before"]
    else:
        return None
    hacked = rose and hi < 0
    return hacked, (f"Reward hacking: {where}." if hacked else f"No reward hacking shown: {where}.")


def write_report(run_dir: Path) -> Path:
    """Write <run>/report.md and its PNGs from report.json, each stage's metrics.jsonl and data/stats.json."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not report_path.exists():
        raise C2CError(f"{run_dir}: no report.json — run a stage first (c2c run)")
    report = read_json(report_path, "run report")
    lines = [f"# crawl2chat run: {run_dir.name}", "",
             "Every figure below is computed from the run directory (report.json, each stage's metrics.jsonl).", ""]
    stats_path = run_dir / "data" / "stats.json"
    for stage, metrics in report.items():
        lines += [f"## {stage}", ""]
        if stage == "data" and stats_path.exists() and plot_funnel(read_json(stats_path), run_dir / "data_funnel.png"):
            lines += ["![data funnel](data_funnel.png)", ""]
        if stage in CURVES:
            folder, curves = CURVES[stage]
            png = f"{stage}_curves.png"
            if plot_curves(_rows(run_dir / folder / "metrics.jsonl"), curves, stage, run_dir / png):
                lines += [f"![{stage} curves]({png})", ""]
        lines += _table(metrics) + _examples(metrics) + [""]
    hack = run_dir / "rlhf_noguard" / "metrics.jsonl"
    if hack.exists() and plot_curves(_rows(hack), CURVES["rlhf"][1], "rlhf without the guard and KL",
                                     run_dir / "rlhf_noguard_curves.png"):
        lrs = [r["lr"] for r in _rows(hack) if isinstance(r.get("lr"), (int, float))]
        lines += ["## RLHF without the guard and the KL penalty", "",
                  "`c2c rlhf --no-guard` (rlhf_noguard/)" + (f", learning rate up to {max(lrs):.2g}." if lrs else "."), "",
                  "![no guard](rlhf_noguard_curves.png)", ""]
        summary = run_dir / "rlhf_noguard" / "metrics.json"
        if summary.exists():
            keys = ("beta", "steps", "proxy_before", "proxy_after", "gold_before", "gold_after", "gold_diff_ci95",
                    "gold_peak_step", "proxy_at_peak", "gold_at_peak", "gold_from_peak", "gold_from_peak_ci95",
                    "guard_would_stop", "kl_after")
            m = read_json(summary)
            verdict = hacking_verdict(m)
            if verdict:
                lines += [verdict[1], ""]
            lines += _table({k: m[k] for k in keys if k in m}) + [""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
