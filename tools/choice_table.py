"""Build fastattn's measured attention choice table (``fastattn/ops/attention/choice.json``) from GPU benchmark
results: for each class of case (architecture, dtype, head dim, causal or not; forward alone, or forward and
backward), the implementation with the least total time over the sequence lengths every candidate ran.

  python tools/choice_table.py --arch sm90 benchmarks/results/h200-run1-attention.json \
      benchmarks/results/h200-run2-attention.json > fastattn/ops/attention/choice.json

Later files override earlier ones for the same implementation and shape (newer code). Implementation names map
to what ``auto`` can run: ``fastattn`` (the Triton kernels) -> ``triton``, ``fastattn-gluon`` -> ``gluon``, any
``sdpa-*`` -> ``sdpa`` (torch's own SDPA, which picks its fastest backend itself: cuDNN on Hopper).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

CHOICES = {"fastattn": "triton", "fastattn-triton": "triton", "fastattn-gluon": "gluon"}


def choice_of(impl: str) -> str | None:
    if impl.startswith("sdpa-"):
        return "sdpa"
    return CHOICES.get(impl)


def build(arch: str, files: list[str]) -> dict:
    rows: dict[tuple, dict] = {}
    for path in files:
        for r in json.load(open(path)):
            if "error" in r or choice_of(r["impl"]) is None:
                continue
            dtype = r["dtype"].split(".")[-1]  # older files wrote "torch.bfloat16"
            rows[(r["impl"], dtype, r["head_dim"], r["causal"], r["seqlen"])] = r
    classes: dict[str, str] = {}
    evidence: dict[str, dict] = {}
    groups: dict[tuple, dict] = defaultdict(dict)
    for (impl, dtype, d, causal, L), r in rows.items():
        groups[(dtype, d, causal)].setdefault(impl, {})[L] = r
    for (dtype, d, causal), impls in sorted(groups.items()):
        common = set.intersection(*(set(v) for v in impls.values()))
        for phase, key in (("fwd", "fwd_ms"), ("fwd+bwd", "fwd+bwd_ms")):
            totals = {}
            for impl, by_len in impls.items():
                times = [by_len[L].get(key) for L in common]
                if common and all(t is not None for t in times):
                    totals[impl] = sum(times)
            if not totals:
                continue
            best = min(totals, key=totals.get)
            name = f"{arch}/{dtype}/d{d}/{'causal' if causal else 'full'}/{phase}"
            classes[name] = choice_of(best)
            evidence[name] = {impl: round(ms, 4) for impl, ms in sorted(totals.items(), key=lambda kv: kv[1])}
    return {"source": files, "seqlens": "the lengths every candidate ran", "classes": classes, "ms": evidence}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", required=True, help="e.g. sm90 (the GPU the files were measured on)")
    ap.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    json.dump(build(args.arch, args.files), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
