"""Tile-config choice: candidates per dtype and head dim, and the fallback past configs that do not fit."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from triton.runtime.errors import OutOfResources

from fastattn.ops.attention import configs


@pytest.mark.parametrize(
    "lists", [configs.fwd_configs, configs.dkdv_configs, configs.dq_configs], ids=["fwd", "dkdv", "dq"]
)
@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("elem_size", [2, 4])
def test_every_case_has_candidates(lists, block_d, elem_size):
    cands = lists(block_d, elem_size)
    assert cands and all(not c.tma for c in cands)
    assert all(c.block_m >= 16 and c.block_n >= 16 for c in cands)  # tl.dot needs 16 on each side


def test_descriptor_configs_only_for_16_bit_up_to_128():
    for fn in (configs.tma_fwd_configs, configs.tma_dkdv_configs, configs.tma_dq_configs):
        assert fn(128, 2) and all(c.tma for c in fn(128, 2))
        assert fn(128, 4) == [] and fn(256, 2) == []


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTATTN_AUTOTUNE", "0")
    monkeypatch.setattr(configs, "_TUNED", {})
    return torch.device("cuda")


def test_pick_skips_configs_that_do_not_fit(fake_gpu):
    cands = [configs.Config(128, 128, 8, 3), configs.Config(64, 64, 4, 3)]
    tried = []

    def launch(cfg):
        tried.append(cfg)
        if cfg.block_m == 128:
            raise OutOfResources(300000, 232448, "shared memory")

    assert configs.pick(("k",), cands, launch, fake_gpu) == cands[1]
    assert tried == cands
    assert configs.pick(("k",), cands, launch, fake_gpu) == cands[1]  # cached: no new launches
    assert len(tried) == 2


def test_pick_raises_when_nothing_fits(fake_gpu):
    def launch(cfg):
        raise OutOfResources(300000, 232448, "shared memory")

    with pytest.raises(RuntimeError, match="no attention config fits"):
        configs.pick(("k2",), [configs.Config(64, 64, 4, 3)], launch, fake_gpu)


def test_pick_does_not_hide_other_errors(fake_gpu):
    def launch(cfg):
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        configs.pick(("k3",), [configs.Config(64, 64, 4, 3)], launch, fake_gpu)


# ---- every GPU candidate config, run on small shapes (the interpreter otherwise runs one 32x16 config) ----


def _config_runs():
    """Runs that together execute every config of the sm_90 candidate lists at least once, for its kind:
    (id, dtype, padded head dim, mode, {kind: config}). The lists of one launch (forward, dK/dV, dQ) are
    zipped into runs; a config already run for its kind and mode is not run again."""
    done, runs = set(), []

    def add(name, dtype, bd, mode, lists):
        todo = {kind: [c for c in cands if (kind, c, mode) not in done] for kind, cands in lists.items()}
        for i in range(max(map(len, todo.values()))):
            chosen = {kind: cands[i] for kind, cands in todo.items() if i < len(cands)}
            done.update((kind, c, mode) for kind, c in chosen.items())
            runs.append((f"{name}-{mode}-{i}", dtype, bd, mode, chosen))

    for es, dtype in ((2, torch.bfloat16), (4, torch.float32)):
        for bd in (32, 64, 128, 256):
            dt = str(dtype).replace("torch.", "")
            add(f"{dt}-d{bd}", dtype, bd, "pointers", {"fwd": configs.fwd_configs(bd, es),
                "dkdv": configs.dkdv_configs(bd, es), "dq": configs.dq_configs(bd, es)})  # fmt: skip
            tma = {"fwd": configs.tma_fwd_configs(bd, es), "dkdv": configs.tma_dkdv_configs(bd, es),
                   "dq": configs.tma_dq_configs(bd, es)}  # fmt: skip
            if any(tma.values()):
                add(f"{dt}-d{bd}", dtype, bd, "descriptors", tma)
            add(f"{dt}-d{bd}", dtype, bd, "rotary", {"fwd": configs.rotary_fwd_configs(bd, es)})
            varlen = {kind: configs.varlen_configs(kind, bd, es) for kind in ("fwd", "dkdv", "dq")}
            add(f"{dt}-d{bd}", dtype, bd, "varlen", varlen)
    return runs


CONFIG_RUNS = _config_runs()


def test_the_runs_cover_every_candidate():
    """Every config any candidate list can return (all head dims, both element sizes) is in some run."""
    ran = {(kind, c) for *_, chosen in CONFIG_RUNS for kind, c in chosen.items()}
    for bd in (16, 32, 64, 128, 256):
        for es in (2, 4):
            lists = {"fwd": configs.fwd_configs(bd, es) + configs.tma_fwd_configs(bd, es)
                     + configs.rotary_fwd_configs(bd, es) + configs.varlen_configs("fwd", bd, es),
                     "dkdv": configs.dkdv_configs(bd, es) + configs.tma_dkdv_configs(bd, es)
                     + configs.varlen_configs("dkdv", bd, es),
                     "dq": configs.dq_configs(bd, es) + configs.tma_dq_configs(bd, es)
                     + configs.varlen_configs("dq", bd, es)}  # fmt: skip
            missing = [(kind, str(c)) for kind, cands in lists.items() for c in cands if (kind, c) not in ran]
            assert not missing, f"d{bd} x{es}: {missing}"


@contextlib.contextmanager
def _fits_the_gpu(chosen):
    """On a GPU a forced config may not fit this case (a bias tile on top) or not assemble: the launcher's
    tuner skips such configs too, so the run skips, saying which."""
    from triton.runtime.errors import PTXASError

    try:
        yield
    except (OutOfResources, PTXASError) as exc:
        pytest.skip(f"{chosen} does not run on this GPU for this case ({type(exc).__name__}); the tuner skips it too")


def _bias_mask(keep, bias):
    return keep if bias is None else bias.masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("run_id,dtype,bd,mode,chosen", CONFIG_RUNS, ids=[r[0] for r in CONFIG_RUNS])
def test_forced_gpu_config(run_id, dtype, bd, mode, chosen, monkeypatch):
    """Forward, dK/dV and dQ with the forced configs against float64, within the rule of tests/helpers.py:
    GQA, L > S and ragged tiles always; causal with a differentiable bias or a sliding window by turns; head
    dims filling the tile or padded in it; descriptor loads where the mode says so."""
    from helpers import DEVICE, assert_close, formula_rotary, grad_out, randn, torch_result, torch_rotary

    import fastattn
    from fastattn import _torch
    from fastattn.ops.attention import launch as attention_launch

    if DEVICE.type == "cuda" and os.environ.get("FASTATTN_TEST_CONFIGS") != "1":
        pytest.skip("on a GPU these compile ~100 kernels: benchmarks/device_check.sh runs them in a step of their "
                    "own (FASTATTN_TEST_CONFIGS=1)")  # fmt: skip
    if mode == "pointers":
        monkeypatch.setattr(attention_launch, "_tma_ok", lambda *t: False)
    ran, real_pick = set(), attention_launch.pick

    def recording_pick(key, *args):
        cfg = real_pick(key, *args)
        ran.add((key[0], cfg))
        return cfg

    monkeypatch.setattr(attention_launch, "pick", recording_pick)
    variant = int(run_id.rsplit("-", 1)[1]) % 2
    E = bd if variant == 0 else bd * 3 // 4
    N, H, HK, L, S = 1, 2, 1, 150, 130  # two query heads on one key head: GQA at half the interpreter's time
    q = randn(N, H, L, E, dtype=dtype, requires_grad=True)
    k, v = (randn(N, HK, S, E, dtype=dtype, requires_grad=True) for _ in range(2))
    i, j = torch.arange(L)[:, None] + S - L, torch.arange(S)[None, :]
    keep = j <= i if variant == 0 else (j >= i - 40) & (j <= i + 8)
    bias = randn(1, H, L, S, requires_grad=True) if variant == 0 and mode != "varlen" else None
    rope = fastattn.RotaryEmbedding(E) if mode == "rotary" else None
    kwargs = {"causal": True} if variant == 0 else {"window": (40, 8)}
    with configs.forced(**chosen), fastattn.backend("triton"), _fits_the_gpu(chosen):
        if mode == "varlen":
            packed = [t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)]
            cu_q = torch.tensor([0, L], dtype=torch.int32, device=DEVICE)
            cu_k = torch.tensor([0, S], dtype=torch.int32, device=DEVICE)
            out = fastattn.varlen_attention(*packed, cu_q, cu_k, L, S, **kwargs).unflatten(0, (N, L)).transpose(1, 2)
        else:
            out = fastattn.attention(q, k, v, bias=bias, rotary=rope, **kwargs)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, bias) if t is not None]
    pos_q, pos_k = torch.arange(S - L, S)[None], torch.arange(S)[None]  # rotary: key j at j, query i at i + S - L

    def turned(q, k, rotary):
        return (q, k) if rope is None else (rotary(q, pos_q, E, False), rotary(k, pos_k, E, False))

    ref_mask = _bias_mask(keep, leaves[3] if bias is not None else None)
    ref = _torch.scaled_dot_product_attention(*turned(*leaves[:2], formula_rotary), leaves[2], ref_mask,
                                              enable_gqa=True)  # fmt: skip
    ref = torch.where(keep.any(-1)[:, None], ref, 0.0)
    dout = grad_out(ref.shape, dtype)
    tensors = [t.cpu() for t in (q, k, v, bias) if t is not None]
    torch_out, torch_grads = None, [None] * len(tensors)
    if dtype != torch.float32:  # torch's own SDPA (and rotate-half rotary) in bf16 for the rule
        torch_out, torch_grads = torch_result(
            lambda q, k, v, b=None: _torch.scaled_dot_product_attention(
                *turned(q, k, torch_rotary), v, _bias_mask(keep, None if b is None else b.to(dtype)), enable_gqa=True
            ),
            tensors,
            dout,
        )
    assert_close(out, ref, dtype, torch_out, f"out {chosen}")
    with configs.forced(**chosen), _fits_the_gpu(chosen):
        got = torch.autograd.grad(out, [t for t in (q, k, v, bias) if t is not None], dout.to(DEVICE, dtype))
    assert set(chosen.items()) <= ran, f"forced {chosen}, ran {ran}"
    want = torch.autograd.grad(ref, leaves, dout)
    for name, g, w, t in zip(["dq", "dk", "dv", "dbias"], got, want, torch_grads):
        assert_close(g, w, dtype, t, f"{name} {chosen}")  # dbias is fp32, held to the run's dtype rule


def test_forced_refuses_what_a_launch_cannot_take():
    with pytest.raises(ValueError, match="kernel kinds"), configs.forced(bwd=configs.Config(64, 64, 4, 3)):
        pass
    with configs.forced(fwd=configs.Config(64, 64, 4, 3, True)), pytest.raises(ValueError, match="descriptors"):
        configs.pick(("fwd",), [configs.Config(64, 64, 4, 3)], lambda cfg: None, torch.device("cpu"))
    with configs.forced(dq=configs.Config(64, 32, 4, 3)):
        assert configs.pick(("dq",), [configs.Config(128, 64, 8, 3)], lambda cfg: None, torch.device("cpu")) == (
            configs.Config(64, 32, 4, 3)
        )
