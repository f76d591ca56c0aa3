"""Reporting for the benchmarks: a Markdown table in the terminal, the same rows as JSON and Markdown files,
ratios against a reference implementation computed case by case, PNG plots, and a progress bar."""

from __future__ import annotations

import json
import os
import sys


def to_markdown(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write(rows: list[dict], out_dir: str, name: str) -> list[str]:
    """``name.md`` and ``name.json`` under ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.json")]
    with open(paths[0], "w") as f:
        f.write(to_markdown(rows) + "\n")
    with open(paths[1], "w") as f:
        json.dump(rows, f, indent=1)
    return paths


def report(rows: list[dict], out_dir: str, name: str) -> None:
    """Print the Markdown table; with ``out_dir``, also write ``name.md`` and ``name.json`` there."""
    print(to_markdown(rows))
    if out_dir:
        write(rows, out_dir, name)


def add_ratios(rows: list[dict], case_keys: tuple[str, ...], metrics: tuple[str, ...], reference: str) -> None:
    """For each row, ``<metric>_vs_<reference>`` = its metric over the reference implementation's metric in the
    same case (same values of ``case_keys``), measured in the same run. Higher metrics are better."""
    refs = {tuple(r.get(k) for k in case_keys): r for r in rows if r.get("impl") == reference}
    for r in rows:
        ref = refs.get(tuple(r.get(k) for k in case_keys))
        for m in metrics:
            if ref is not None and r.get(m) and ref.get(m):
                r[f"{m}_vs_{reference}"] = round(r[m] / ref[m], 2)


def plot(rows: list[dict], x: str, y: str, path: str, title: str, group: tuple[str, ...] = ()) -> str | None:
    """A PNG of ``y`` against ``x``, one line per implementation (and per value of the ``group`` keys).
    Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot {path}: matplotlib is not installed; pip install fastattn[bench])", file=sys.stderr)
        return None
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get(y) is None or r.get(x) is None:
            continue
        label = " ".join([str(r["impl"])] + [f"{g}={r.get(g)}" for g in group])
        lines.setdefault(label, []).append((r[x], r[y]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    if len({p[0] for pts in lines.values() for p in pts}) > 2:
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Progress:
    """A one-line progress bar on stderr: ``[#####.....] 5/10 label``."""

    def __init__(self, total: int, width: int = 24, stream=sys.stderr):
        self.total, self.done, self.width, self.stream = max(total, 1), 0, width, stream

    def step(self, label: str) -> None:
        self.done += 1
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if self.done >= self.total else ""
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:60]:<60}{end}")
        self.stream.flush()
