"""fastattn-bench: the CLI runs in --quick mode and writes valid JSON, Markdown and PNG plots; ratios are
taken case by case against the reference implementation."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from fastattn.bench.report import Progress, add_ratios, to_markdown


def test_ratios_pair_rows_by_case():
    rows = [
        dict(impl="fastattn", L=1, tok=30.0),
        dict(impl="torch", L=1, tok=10.0),
        dict(impl="fastattn", L=2, tok=5.0),
        dict(impl="torch", L=2, tok=20.0),
        dict(impl="fastattn", L=3, tok=7.0),  # no torch row for this case: no ratio
    ]
    add_ratios(rows, ("L",), ("tok",), "torch")
    assert [r.get("tok_vs_torch") for r in rows] == [3.0, 1.0, 0.25, 1.0, None]
    assert to_markdown(rows).splitlines()[0] == "| impl | L | tok | tok_vs_torch |"


def test_progress_bar_counts_to_the_total():
    out = io.StringIO()
    bar = Progress(4, width=8, stream=out)
    for i in range(4):
        bar.step(f"case {i}")
    assert "[##......] 1/4 case 0" in out.getvalue() and "[########] 4/4 case 3" in out.getvalue()
    assert out.getvalue().endswith("\n")


def test_cli_quick_writes_json_markdown_and_plots(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fastattn.bench", "all", "--quick", "--models", "gpt", "--out", str(tmp_path),
         "--plot", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "No GPU here" in out.stdout and "GPU numbers need a GPU" in out.stdout
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert {r["impl"] for r in e2e} >= {"fastattn", "torch"} and all("error" not in r for r in e2e)
    for r in e2e:
        assert r["train_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["train_tok_s_vs_torch"] > 0
    assert (tmp_path / "e2e.md").read_text().startswith("| model | impl |")
    for name in ("attention", "norms", "posenc"):
        rows = json.loads((tmp_path / f"{name}.json").read_text())
        assert rows and any(r["impl"].startswith("fastattn") for r in rows)
    for png in ("e2e_train_tok_s.png", "e2e_decode_tok_s.png", "attention.png", "norms.png", "posenc.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
