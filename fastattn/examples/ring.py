"""Ring attention across processes: each rank holds a shard of one long sequence.

    torchrun --nproc-per-node 2 -m fastattn.examples.ring [--seqlen 4096] [--layout zigzag]

Uses NCCL on GPUs (one per rank) and gloo on the CPU. Every rank checks its rows (and its gradients) against
attention over the whole sequence computed on that rank alone, and prints the errors.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fastattn
from fastattn.distributed import ring_attention, shard


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator().manual_seed(0)  # the same full sequence on every rank
    q, k, v, dout = (torch.randn(1, args.heads, args.seqlen, args.head_dim, generator=gen) for _ in range(4))
    q, k, v, dout = (t.to(device, dtype) for t in (q, k, v, dout))
    local = [shard(t, rank, world, args.layout).detach().requires_grad_() for t in (q, k, v)]
    out = ring_attention(*local, causal=True, layout=args.layout)
    out.backward(shard(dout, rank, world, args.layout))
    full = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = fastattn.attention(*full, causal=True)
    ref.backward(dout)

    def err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    errors = [err(out, shard(ref, rank, world, args.layout))]
    errors += [err(t.grad, shard(f.grad, rank, world, args.layout)) for t, f in zip(local, full)]
    print(f"rank {rank}/{world}: {args.seqlen} positions, {args.layout}; relative error out {errors[0]:.1e}, "
          f"dq {errors[1]:.1e}, dk {errors[2]:.1e}, dv {errors[3]:.1e}", flush=True)  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
