"""Run PyTorch's own attention tests twice, on stock torch and with fastattn swapped in, and compare.

    python tools/torch_suite.py PYTORCH_TEST_DIR [--backend auto|triton] [--out FILE.md]

PYTORCH_TEST_DIR holds PyTorch's ``test_transformers.py`` and ``nn/test_multihead_attention.py`` (from a
PyTorch source checkout; they are not part of the torch wheel and not of this repository). The swapped run
imports ``tools/torch_suite_swap.py`` as a pytest plugin, which does the usual global drop-in before the tests
import torch's names:

    torch.nn.functional.scaled_dot_product_attention = fastattn.scaled_dot_product_attention
    torch.nn.MultiheadAttention = fastattn.MultiheadAttention

Every test that passes on stock torch must pass swapped; the report lists those that do not, and the counts.
``--backend triton`` also sets TRITON_INTERPRET=1 and FASTATTN_BACKEND=triton, so fastattn's Triton kernels
(through the interpreter) take every case they can.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

FILES = ["test_transformers.py", "nn/test_multihead_attention.py"]


def _run(test_dir: Path, swapped: bool, backend: str, xml: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "-o",
           "addopts=", "--rootdir", str(test_dir)] + [str(test_dir / f) for f in FILES]  # fmt: skip
    if swapped:
        cmd[3:3] = ["-p", "torch_suite_swap"]
        if backend == "triton":
            env.update(TRITON_INTERPRET="1", FASTATTN_BACKEND="triton")
    subprocess.run(cmd, env=env, cwd=test_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("test_dir", type=Path)
    parser.add_argument("--backend", choices=["auto", "triton"], default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stock = _run(args.test_dir, False, args.backend, Path(tmp) / "stock.xml")
        swapped = _run(args.test_dir, True, args.backend, Path(tmp) / "swapped.xml")
    regressions = sorted(n for n, o in stock.items() if o == "passed" and swapped.get(n) != "passed")
    count = lambda d, o: sum(v == o for v in d.values())  # noqa: E731
    lines = [
        f"PyTorch's attention tests with fastattn swapped in (backend {args.backend})",
        "",
        "| run | passed | failed | skipped |",
        "|---|---|---|---|",
        *(
            f"| {name} | {count(d, 'passed')} | {count(d, 'failed')} | {count(d, 'skipped')} |"
            for name, d in (("stock torch", stock), ("fastattn swapped in", swapped))
        ),  # fmt: skip
        "",
        f"Passing on stock torch but not swapped: {len(regressions)}",
        *(f"- {n} ({swapped.get(n, 'missing')})" for n in regressions),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
