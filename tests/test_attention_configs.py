"""Tile-config choice: candidates per dtype and head dim, and the fallback past configs that do not fit."""

from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from fastattn.ops import attention_configs as configs


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
