"""The package's shape: no import cycle among fastattn's modules, and the PyTorch path without triton."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fastattn

ROOT = Path(fastattn.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """fastattn modules imported when ``path`` is imported: module-level statements only (imports inside
    functions run later, on use), each resolved to the module (or package) it names."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {n for n in names if n.startswith("fastattn") and _exists(n)}
    # Packages above the module are being imported already when it runs (importing a.b.c imports a, a.b
    # first): an edge back to one of them is not a cycle.
    ancestors = {".".join(mod.split(".")[:i]) for i in range(1, len(mod.split(".")) + 1)}
    return found - ancestors


def _exists(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph (a path back to its first module), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle():
    graph = {_module(p): _imports(p) for p in ROOT.rglob("*.py")}
    assert len(graph) > 40 and graph["fastattn.ops.attention.function"]  # the scan sees the package
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # The check bites: the circle the old flat ops/ had (attention <-> posenc) is found when planted.
    planted = dict(graph, **{"fastattn.ops.posenc.function": {"fastattn.ops.attention.function"}})
    planted["fastattn.ops.attention.function"] = graph["fastattn.ops.attention.function"] | {
        "fastattn.ops.posenc.function"
    }
    assert _cycle(planted) is not None


def test_the_pytorch_path_imports_no_triton():
    """With triton impossible to import, fastattn imports and runs attention, norms and encodings on the CPU
    through its PyTorch path, forward and backward."""
    code = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch, fastattn
q = torch.randn(1, 2, 8, 16, requires_grad=True)
out = fastattn.attention(q, q, q, causal=True, softcap=5.0, sinks=torch.zeros(2))
out.sum().backward()
fastattn.layer_norm(torch.randn(3, 16), (16,))
fastattn.sinusoidal_encoding(torch.randn(8, 16))
fastattn.apply_rotary(q.detach(), q.detach())
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules if sys.modules[m] is not None)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_readme_backend_table_is_the_support_table():
    """The README's table of what each backend takes is the one the refusal reasons come from."""
    from fastattn.ops.attention.support import support_table

    readme = (ROOT.parent / "README.md").read_text()
    assert support_table() in readme
