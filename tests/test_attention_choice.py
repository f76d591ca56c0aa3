"""auto's choice by measurement (fastattn/ops/attention/choice.json, built by tools/choice_table.py from the
committed GPU runs): where torch's SDPA measured fastest, the drop-in runs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE

import fastattn
from fastattn.ops.attention.choice import measured_choice

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
import choice_table  # noqa: E402


def test_the_committed_table_is_what_the_committed_runs_say():
    """The table in the package is the tool's output on the results files it names (nobody edited it)."""
    table = json.loads((Path(fastattn.__file__).parent / "ops" / "attention" / "choice.json").read_text())
    root = Path(__file__).parents[1]
    assert choice_table.build("sm90", [str(root / f) for f in table["source"]])["classes"] == table["classes"]


def test_measured_choice_reads_the_classes():
    # On the H200 runs cuDNN (torch's default on Hopper) beat our Triton kernels in every measured class.
    assert measured_choice((9, 0), torch.bfloat16, 128, True, True) == "sdpa"
    assert measured_choice((9, 0), torch.bfloat16, 64, False, False) == "sdpa"
    assert measured_choice((8, 0), torch.bfloat16, 128, True, True) is None  # not measured: the default
    assert measured_choice((9, 0), torch.float32, 128, True, True) is None


def test_the_tool_picks_the_least_total_time(tmp_path):
    def row(impl, L, fwd, fb):
        return dict(impl=impl, head_dim=128, seqlen=L, causal=True, dtype="bfloat16", **{"fwd_ms": fwd,
                    "fwd+bwd_ms": fb})  # fmt: skip

    rows = [row("fastattn-gluon", 1024, 1.0, 5.0), row("fastattn-gluon", 4096, 4.0, 20.0),
            row("sdpa-cudnn", 1024, 1.5, 4.0), row("sdpa-cudnn", 4096, 4.2, 19.0),
            row("fastattn", 1024, 2.0, 9.0)]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(rows))
    classes = choice_table.build("sm90", [str(tmp_path / "r.json")])["classes"]
    assert classes["sm90/bfloat16/d128/causal/fwd"] == "gluon"  # 5.0 ms against 5.7 (fastattn: one length only)
    assert classes["sm90/bfloat16/d128/causal/fwd+bwd"] == "sdpa"


@pytest.mark.skipif(
    DEVICE.type != "cuda" or torch.cuda.get_device_capability(DEVICE) != (9, 0),
    reason="the dispatch reads the measured table on an sm_90 GPU only; on the CPU the table's reading is tested",
)
def test_the_drop_in_runs_torch_where_torch_measured_fastest():
    q, k, v = (torch.randn(1, 8, 256, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    with fastattn.kernel_log() as log:
        fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert log == [("attention_fwd", "scaled_dot_product_attention", "torch")]


def test_auto_takes_the_gluon_kernels_for_a_class_they_won(monkeypatch):
    """Where the table names gluon, auto runs the Gluon kernels (here: the emulator, with the table's answer
    stubbed for CPU tensors); where it names nothing, the default path runs."""
    from fastattn.ops.attention import choice as attention_choice

    q, k, v = (torch.randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(attention_choice, "measured_for", lambda q, k, v, causal: "gluon" if causal else None)
    with fastattn.backend("auto"), fastattn.kernel_log() as log:
        fastattn.attention(q, k, v, causal=True)
        fastattn.attention(q, k, v)
    assert [e.backend for e in log] == ["gluon", "torch"], log
