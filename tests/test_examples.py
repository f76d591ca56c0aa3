"""The training example: its tasks are what they say, and a tiny run learns (loss falls, accuracy far above
chance on held-out data, decoded greedily with the cache)."""

from __future__ import annotations

import torch

from fastattn.examples.train import EOS, FIRST, PAD, Config, make_batch, train


def test_tasks_build_padded_batches_of_the_right_targets():
    for task in ("reverse", "sort"):
        cfg = Config(task=task)
        src, tgt_in, tgt_out, pad = make_batch(cfg, 50, torch.Generator().manual_seed(0))
        for s, t_in, t_out, p in zip(src, tgt_in, tgt_out, pad):
            body = s[~p]
            assert (body >= FIRST).all() and (s[p] == PAD).all()
            want = body.flip(0) if task == "reverse" else body.sort().values
            n = len(body)
            assert torch.equal(t_out[:n], want) and t_out[n] == EOS and (t_out[n + 1 :] == PAD).all()
            assert torch.equal(t_in[1 : n + 1], t_out[:n])


def test_a_tiny_run_learns_to_reverse():
    cfg = Config(steps=160, batch=32, eval_size=128, log_every=1000, max_len=8)
    result = train(cfg, verbose=False)
    losses = result["losses"]
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20, (losses[:20], losses[-20:])
    chance = 1 / (cfg.vocab - FIRST)
    assert result["metrics"]["token_accuracy"] > 3 * chance, result["metrics"]
