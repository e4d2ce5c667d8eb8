"""A sweep's results as files other tools read (results.csv, results.json) and a plot (sweep.png)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from dinoprobe.runs.metrics import figure

RESULT_FIELDS = ("val_top1", "val_top1_std", "val_map", "val_map_std", "tries", "best_epoch", "epochs_run",
                 "diverged_epoch", "group", "group_size", "group_seconds")


def score_key(rows: list[dict]) -> str:
    """What the sweep ranked on: val_top1, or val_map for multi-label heads."""
    return "val_map" if "val_map" in rows[0] else "val_top1"


def ranked(rows: list[dict]) -> list[dict]:
    """Best validation score first; ties keep grid order (the earlier configuration wins, as in the fit)."""
    key = score_key(rows)
    order = sorted(range(len(rows)), key=lambda i: (-rows[i][key], i))
    return [rows[i] for i in order]


def varying_params(rows: list[dict]) -> list[str]:
    params = [k for k in rows[0] if k not in RESULT_FIELDS]
    return [k for k in params if len({str(r.get(k)) for r in rows}) > 1]


def write_results(out: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=1))


def plot_sweep(rows: list[dict], path: Path, title: str = "sweep"):
    """Best val top-1 against the learning rate, one line per combination of the other varying parameters. Lines
    differ in marker and dash and are nudged apart by a hair, so identical curves stay visible; the best
    configuration is ringed."""
    varying = [k for k in varying_params(rows) if k != "lr"]
    score = score_key(rows)
    what = "val mAP" if score == "val_map" else "val top-1"
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault(tuple(str(r.get(k)) for k in varying), []).append((r["lr"], r[score]))
    fig, ax = figure(8, 5)
    markers, dashes = "os^vD<>ph*", ["-", "--", "-.", ":"]
    spread = 0.004 * (len(lines) > 1)
    for i, (key, points) in enumerate(sorted(lines.items())):
        points.sort()
        nudge = spread * (i - (len(lines) - 1) / 2)
        label = ", ".join(f"{k}={v}" for k, v in zip(varying, key)) or "all"
        ax.plot([p[0] for p in points], [p[1] + nudge for p in points], marker=markers[i % len(markers)],
                linestyle=dashes[(i // len(markers)) % len(dashes)], markersize=5, alpha=0.85, label=label)
    best = rows[0]  # rows are ranked
    ax.scatter([best["lr"]], [best[score]], s=220, facecolors="none", edgecolors="black", linewidths=1.5,
               zorder=5, label=f"best: {what} {best[score]:.4f}")
    if len({r["lr"] for r in rows}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best {what}" + (" (lines nudged apart by 0.004)" if spread else ""))
    ax.set_title(f"{title}: {len(rows)} configurations")
    if len(lines) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
