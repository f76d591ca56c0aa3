"""The ahead-of-time sm_90 compile: attention forward and backward at head dims 64 and 128 in bf16 must use
wgmma, spill nothing and fit Hopper's shared memory. Compiles with no GPU (ptxas ships with Triton); runs as
a subprocess because the suite's kernels are decorated for the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from filelock import FileLock

from fastattn.codegen import GLUON_KEYS, KEYS

HOPPER_SHARED_LIMIT = 232448  # 227 KB of opt-in shared memory per block on sm_90


@pytest.fixture(scope="module")
def rows(tmp_path_factory, worker_id):
    """The compile report, made once per test run: the xdist workers share it through a file (the compiles take
    a minute of both cores; each worker taking this module's tests would otherwise redo them)."""
    base = tmp_path_factory.getbasetemp()
    path = (base if worker_id == "master" else base.parent) / "codegen_rows.json"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            out = subprocess.run(
                [sys.executable, "-m", "fastattn.codegen", "--arch", "sm_90", "--head-dims", "64,128", "--json"],
                capture_output=True,
                text=True,
                env={**os.environ, "TRITON_INTERPRET": "0"},
            )
            assert out.returncode == 0, out.stderr[-2000:]
            notes = [line for line in out.stderr.splitlines() if line.startswith("note:")]
            path.write_text(json.dumps({"rows": json.loads(out.stdout), "notes": notes}))
        report = json.loads(path.read_text())
    rows_notes[:] = report["notes"]
    return report["rows"]


rows_notes: list[str] = []


def test_rows_have_the_documented_keys(rows):
    assert rows and all(tuple(row) == (GLUON_KEYS if "gluon" in row["kernel"] else KEYS) for row in rows), rows[:2]
    kinds = {r["kernel"].split("[")[0] for r in rows}
    assert kinds == {
        "attention_fwd", "attention_fwd_rotary", "attention_bwd_preprocess", "attention_bwd_dkdv", "attention_bwd_dq",
        "layer_norm_fwd", "layer_norm_bwd", "sinusoidal", "rotary", "attention_fwd_varlen",
        "attention_bwd_dkdv_varlen", "attention_bwd_dq_varlen", "attention_fwd_gluon", "attention_bwd_gluon",
        "attention_fwd_gluon_softcap_sinks",
    }  # fmt: skip


@pytest.mark.parametrize(
    "kernel,head_dims",
    [
        ("attention_fwd_gluon", {64, 128, 256}),
        ("attention_fwd_gluon_softcap_sinks", {128}),
        ("attention_bwd_gluon", {64, 128}),
    ],
)  # the backward at head dim 256 is checked by the next test; softcap_sinks: Gemma 2 / gpt-oss's forward
def test_gluon_kernels_are_warp_specialized_without_spills(rows, kernel, head_dims):
    """The Gluon kernels as compiled for sm_90: a loader partition and consumer warpgroups each under its own
    register budget (setmaxnreg), wgmma with a group kept in flight while waiting, no spills, shared memory in
    the budget. (The backward at head dim 256 is not written: it steps down to Triton.)"""
    from fastattn.ops.attention.gluon import CONSUMER_REGS, LOADER_REGS

    mine = [r for r in rows if r["kernel"].split("[")[0] == kernel and r["dtype"] == "bf16"]
    mine = [r for r in mine if r["head_dim"] in head_dims]
    assert {r["head_dim"] for r in mine} == head_dims
    assert any(r["kernel"].endswith("[causal]") for r in mine)
    for r in mine:
        assert "error" not in r, r
        assert {LOADER_REGS, CONSUMER_REGS} <= set(r["setmaxnreg"]), r  # two partitions, each with a budget
        assert r["num_warps"] == 12, r  # loader warp (padded to a warpgroup) + two consumer warpgroups
        assert r["wgmma"] is True and r["wgmma_async"] is True, r
        assert r["spills"] == 0, r
        assert 0 < r["shared_bytes"] <= HOPPER_SHARED_LIMIT, r


def test_memory_bound_kernels_vectorized_without_spills(rows):
    """Norms and encodings: the "head_dim" column holds the hidden size (rotary: the head dim)."""
    mine = [r for r in rows if r["kernel"].startswith(("layer_norm", "sinusoidal", "rotary"))]
    assert {r["head_dim"] for r in mine if r["kernel"] != "rotary"} == {1024, 4096, 16384}
    assert all(r["spills"] == 0 for r in mine), mine
    assert not [n for n in rows_notes if "vector loads" in n], rows_notes


@pytest.mark.parametrize(
    "kernel",
    ["attention_fwd", "attention_fwd_rotary", "attention_bwd_dkdv", "attention_bwd_dq", "attention_fwd_varlen",
     "attention_bwd_dkdv_varlen", "attention_bwd_dq_varlen"],
)  # fmt: skip
def test_matmul_kernels_use_wgmma_without_spills(rows, kernel):
    mine = [r for r in rows if r["kernel"].split("[")[0] == kernel]
    assert {r["head_dim"] for r in mine} == {64, 128}
    assert any(r["kernel"].endswith("[causal]") for r in mine)
    for r in mine:
        assert r["dtype"] == "bf16"
        assert r["wgmma"] is True, r
        assert r["spills"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert 0 < r["shared_bytes"] <= HOPPER_SHARED_LIMIT, r


def test_head_dim_256_backward_is_refused_exactly_while_it_spills(rows):
    """The d=256 Gluon backward (SPLIT_D) compiles warp-specialized with async wgmma, but while any of its rows
    spills the dispatch refuses it (and says so); once it compiles clean this fails: take it then."""
    from fastattn.ops.attention import gluon as attention_gluon

    mine = [r for r in rows if r["kernel"].startswith("attention_bwd_gluon") and r["head_dim"] == 256]
    assert mine and all("error" not in r and r["wgmma_async"] and r["num_warps"] == 12 for r in mine), mine
    assert all(0 < r["shared_bytes"] <= HOPPER_SHARED_LIMIT for r in mine), mine
    assert attention_gluon.SPLIT_D_SPILLS == any(r["spills"] for r in mine), [(r["kernel"], r["spills"]) for r in mine]


def test_compile_rows_refuses_under_the_interpreter(monkeypatch):
    from fastattn.codegen import compile_rows

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_rows()


def test_no_kernel_uses_atomics(rows):
    """No atomic or reduction instruction in any Triton kernel (attention backward included, norm dW/dB: partial
    rows summed afterwards): the results cannot depend on the order programs run in, so they are the same bits
    on every run. This is the CPU's proof of the deterministic backward (the interpreter runs programs one after
    another, so repeating a run there shows nothing; test_norms repeats it on a GPU)."""
    using = [(r["kernel"], r["config"], r["atomics"]) for r in rows if r["atomics"] != 0 and "gluon" not in r["kernel"]]
    assert not using, using
    # The Gluon backward adds dQ with atomics (as FA3 does): its dQ is not bit-reproducible, and says so.
    assert all(r["atomics"] > 0 for r in rows if r["kernel"].startswith("attention_bwd_gluon"))
