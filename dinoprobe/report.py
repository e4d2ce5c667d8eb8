"""A sweep's results as files other tools read (results.csv, results.json) and a plot (sweep.png)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from dinoprobe.metrics import figure

RESULT_FIELDS = ("val_top1", "val_top1_std", "tries", "best_epoch", "epochs_run", "group", "group_size",
                 "group_seconds")


def ranked(rows: list[dict]) -> list[dict]:
    """Best validation accuracy first; ties keep grid order (the earlier configuration wins, as in the fit)."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["val_top1"], i))
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


def plot_sweep(rows: list[dict], path: Path) -> None:
    """Best val top-1 against the learning rate, one line per combination of the other varying parameters."""
    varying = [k for k in varying_params(rows) if k != "lr"]
    lines: dict[tuple, list] = {}
    for r in rows:
        lines.setdefault(tuple(str(r.get(k)) for k in varying), []).append((r["lr"], r["val_top1"]))
    fig, ax = figure(8, 5)
    for key, points in sorted(lines.items()):
        points.sort()
        label = ", ".join(f"{k}={v}" for k, v in zip(varying, key)) or "all"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if len({r["lr"] for r in rows}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best val top-1")
    ax.set_title(f"sweep: {len(rows)} configurations")
    if len(lines) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
