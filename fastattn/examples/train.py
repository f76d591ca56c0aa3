"""Train the reference encoder-decoder Transformer on a synthetic sequence-to-sequence task and evaluate it.

Tasks are generated in code: ``reverse`` (output the input backwards) or ``sort`` (output it sorted), over
sequences of random symbols with random lengths, padded in a batch. Evaluation decodes held-out inputs greedily
(with the key/value cache) and reports token accuracy (over target positions, end-of-sequence included),
exact-match rate and BLEU (when sacrebleu is installed).

    python -m fastattn.examples.train [--task reverse] [--steps 1000] [--impl fastattn] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fastattn.models import Transformer

PAD, BOS, EOS, FIRST = 0, 1, 2, 3  # symbols are FIRST .. vocab - 1


@dataclass
class Config:
    task: str = "reverse"
    vocab: int = 16
    min_len: int = 3
    max_len: int = 12
    d_model: int = 64
    nhead: int = 4
    layers: int = 2
    dim_feedforward: int = 128
    dropout: float = 0.1
    batch: int = 64
    steps: int = 1000
    lr: float = 2e-3
    warmup: int = 100
    eval_size: int = 512
    seed: int = 0
    impl: str = "fastattn"
    device: str = "cpu"
    log_every: int = 100


def make_batch(cfg: Config, n: int, gen: torch.Generator):
    """Padded (src, tgt_in, tgt_out, src_padding) for n examples; tgt_in starts with BOS, tgt_out ends with EOS."""
    lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (n,), generator=gen)
    L = int(lengths.max())
    src = torch.randint(FIRST, cfg.vocab, (n, L), generator=gen)
    pos = torch.arange(L)[None, :]
    pad = pos >= lengths[:, None]
    src = src.masked_fill(pad, PAD)
    tgt = torch.full((n, L + 1), PAD)
    for i, (row, n_i) in enumerate(zip(src, lengths.tolist())):
        body = row[:n_i]
        out = body.flip(0) if cfg.task == "reverse" else body.sort().values
        tgt[i, :n_i] = out
        tgt[i, n_i] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), tgt[:, :-1]], 1)  # positions past EOS are ignored by the loss
    return src, tgt_in, tgt, pad


def _lr(step: int, cfg: Config) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(model: Transformer, cfg: Config, gen: torch.Generator) -> dict:
    model.eval()
    src, _, tgt, pad = (t.to(cfg.device) for t in make_batch(cfg, cfg.eval_size, gen))
    pred = model.generate(src, tgt.shape[1], bos_id=BOS, eos_id=EOS, src_key_padding_mask=pad)
    pred = torch.nn.functional.pad(pred, (0, tgt.shape[1] - pred.shape[1]), value=EOS)
    real = tgt != PAD
    correct = (pred == tgt) & real
    token_acc = correct.sum().item() / real.sum().item()
    exact = (correct | ~real).all(1).float().mean().item()
    metrics = {"token_accuracy": round(token_acc, 4), "exact_match": round(exact, 4)}
    try:
        import sacrebleu
    except ImportError:
        metrics["bleu"] = None  # optional extra: pip install sacrebleu
    else:

        def text(row):
            return " ".join(str(t) for t in row.tolist() if t >= FIRST)

        hyps = [text(p[: int(r.sum())]) for p, r in zip(pred, real)]
        refs = [text(t) for t in tgt]
        metrics["bleu"] = round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    model.train()
    return metrics


def train(cfg: Config, verbose: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = Transformer(cfg.d_model, cfg.nhead, cfg.layers, vocab_size=cfg.vocab, dim_feedforward=cfg.dim_feedforward,
                        dropout=cfg.dropout, max_len=2 * cfg.max_len + 2, impl=cfg.impl).to(cfg.device)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        src, tgt_in, tgt_out, pad = (t.to(cfg.device) for t in make_batch(cfg, cfg.batch, gen))
        logits = model(src, tgt_in, src_key_padding_mask=pad)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if verbose and (step + 1) % cfg.log_every == 0:
            print(f"step {step + 1:5d}  loss {sum(losses[-cfg.log_every:]) / cfg.log_every:.4f}  "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip
    metrics = evaluate(model, cfg, torch.Generator().manual_seed(cfg.seed + 1))  # held out: another stream
    metrics["train_seconds"] = round(time.perf_counter() - t0, 1)
    return {"config": asdict(cfg), "losses": losses, "metrics": metrics, "model": model}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field, default in asdict(Config()).items():
        ap.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    cfg = Config(**vars(ap.parse_args(argv)))
    print(f"# {cfg.task}: {cfg.steps} steps of {cfg.batch} on {cfg.device}, impl={cfg.impl}")
    result = train(cfg)
    print("held-out:", result["metrics"])


if __name__ == "__main__":
    main()
