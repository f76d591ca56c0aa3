"""A CPU emulator for Gluon kernels (``@gluon.jit``), with their synchronization checked, not assumed.

``gluon_emulate(kernel)[grid](*args, num_warps=4, **kwargs)`` runs the kernel's Python body on CPU tensors with
every Gluon builtin replaced by a PyTorch implementation. Programs run one after another; inside a program the
partitions of ``gl.warp_specialize`` run as threads, one at a time, switching at every synchronization point
(round robin, so a run is reproducible). What the hardware leaves to the programmer is checked:

- ``mbarrier.wait`` blocks until the phase of that parity completes; when no partition can run the program is
  deadlocked and a ``DeadlockError`` names each waiting partition, its barrier, the parity and the barrier's
  count of arrivals and bytes still missing.
- A bulk tensor copy (TMA) lands only when a wait on its barrier needs it, and its data may be read only by a
  partition whose wait has seen that phase complete; reading earlier (a missing wait, a wait of the wrong
  parity, another partition's wait) raises ``RaceError``. The bytes that land are checked against ``expect``.
- Shared memory is tracked per buffer (per index of its first dimension) with vector clocks: a read or write
  that no barrier orders after another partition's write or read (or a bulk copy into a buffer another
  partition still reads) raises ``RaceError``; so does reading memory never written, generic stores read by the
  async proxy (wgmma, TMA store) without ``fence_async_shared``, and writing a buffer an async wgmma or TMA store
  still reads.
- The accumulator of an async ``warpgroup_mma`` is a token until ``warpgroup_mma_wait`` retires it; using it
  earlier raises ``RaceError``.
- Shared-memory indices and slices and pointer loads/stores out of bounds raise ``EmulationError`` (bulk copies
  clip at the tensor's bounds, as the copy engine does); layouts are checked for rank and warp count but do not
  change values; shared memory per program is checked against the sm_90 budget.

Values are computed as the device computes them: matrix products of 16-bit operands accumulate in float32 and
results are rounded to the stored dtype on conversion and store.

Not modelled: races in global memory (between partitions or programs: programs run one after another, so
atomics add in a fixed order), anything below a partition (its warps act as one: thread-level divergence and
intra-warpgroup races), clusters, multicast and named barriers, and time; exp2, log2 and division are exact in
float32 where the device uses approximations of about 2 ulp, and the order of a product's float32 sums is that
of PyTorch's CPU matmul.
"""

from __future__ import annotations

import builtins
import functools
import inspect
import math
import sys
import threading
import types
from collections import deque
from dataclasses import dataclass, field

import torch
from triton.experimental.gluon import language as _gl
from triton.experimental.gluon.language import _layouts
from triton.experimental.gluon.language.nvidia import hopper as _hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier as _mbarrier
from triton.experimental.gluon.language.nvidia.hopper import tma as _tma
from triton.runtime.jit import JITFunction

SHARED_BUDGET = 232448  # bytes of shared memory one sm_90 program may use
WATCHDOG_S = 60.0  # a partition that runs this long without reaching a synchronization point is reported


class EmulationError(RuntimeError):
    """A kernel did something the device would not allow (out of bounds, bad layout, unsupported op)."""


class DeadlockError(EmulationError):
    """No partition of a program can make progress."""


class RaceError(EmulationError):
    """An access the kernel's synchronization does not order."""


class _Abort(BaseException):
    """Unwinds the other partitions of a program that failed."""


# --------------------------------------------------------------------------------------------------- dtypes

_TORCH = {
    "fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "int1": torch.bool,
}  # fmt: skip
_GL = {v: getattr(_gl, {"fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int1": "int1"}
                  .get(k, k)) for k, v in _TORCH.items()}  # fmt: skip


def _torch_dtype(dtype) -> torch.dtype:
    dtype = getattr(dtype, "value", dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _TORCH[dtype.name]
    except (KeyError, AttributeError):
        raise EmulationError(f"dtype {dtype} is not emulated") from None


def _unwrap(x):
    return x.value if isinstance(x, _gl.constexpr) else x


# --------------------------------------------------------------------------------------------------- context

_tls = threading.local()


def _part() -> _Partition:
    part = getattr(_tls, "part", None)
    if part is None:
        raise EmulationError("a Gluon builtin was called outside an emulated kernel")
    return part


_KERNEL_CODES: set = set()


def _where() -> str:
    """file:line of the innermost emulated kernel frame (for messages)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code in _KERNEL_CODES:
            return f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


# --------------------------------------------------------------------------------------------------- layouts


def _layout_rank_warps(layout):
    """(rank, warps) a distributed layout implies, None where it implies nothing we check."""
    if isinstance(layout, _layouts.BlockedLayout):
        return len(layout.size_per_thread), math.prod(layout.warps_per_cta)
    if isinstance(layout, _layouts.NVMMADistributedLayout):
        return 2, math.prod(layout.warps_per_cta)
    if isinstance(layout, _layouts.SliceLayout):
        parent = _layout_rank_warps(layout.parent)
        return None if parent is None else (parent[0] - 1, parent[1])
    if isinstance(layout, _layouts.DotOperandLayout):
        return _layout_rank_warps(layout.parent)
    return None


def _check_layout(layout, shape, what: str) -> None:
    if layout is None or isinstance(layout, _Any):
        return
    if isinstance(layout, _layouts.AutoLayout):
        return
    info = _layout_rank_warps(layout)
    if info is None:
        return
    rank, warps = info
    if rank != len(shape):
        raise EmulationError(f"{what} at {_where()}: layout {layout} has rank {rank}, the tensor {list(shape)}")
    part = _part()
    if warps != part.num_warps:
        raise EmulationError(
            f"{what} at {_where()}: layout {layout} spans {warps} warps, partition {part.name} has {part.num_warps}"
        )


class _Any:
    """The layout of a result whose layout the compiler infers (permute, reshape): matches any."""

    def __eq__(self, other):
        return True

    __hash__ = object.__hash__

    def __repr__(self):
        return "<inferred>"


def _same_layout(a, b, what: str):
    if a is None:
        return b
    if b is None or a == b:
        return a
    raise EmulationError(f"{what} at {_where()}: operands have different layouts ({a} and {b})")


# --------------------------------------------------------------------------------------------------- values


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """Triton's binary-op result dtype."""
    if a == b:
        return a
    af, bf = a.is_floating_point, b.is_floating_point
    if af and bf:
        if {a, b} == {torch.float16, torch.bfloat16}:
            return torch.float32
        return a if torch.finfo(a).bits > torch.finfo(b).bits else b
    if af or bf:
        return a if af else b
    if a == torch.bool or b == torch.bool:
        return b if a == torch.bool else a
    return a if torch.iinfo(a).bits >= torch.iinfo(b).bits else b


def _val(x):
    """The torch value of an operand; a pending wgmma accumulator raises."""
    if isinstance(x, _Pending):
        return x._ready("used").data
    if isinstance(x, Tensor):
        return x.data
    return _unwrap(x)


def _layout_of(x):
    if isinstance(x, _Pending):
        return x._ready("used").layout
    return x.layout if isinstance(x, Tensor) else None


def _result_dtype(va, vb) -> torch.dtype:
    """Triton's result dtype of a binary op; Python ints take the tensor's type, Python floats are float32."""

    def kind(v):
        if isinstance(v, torch.Tensor):
            return v.dtype
        if isinstance(v, bool):
            return torch.bool
        return None if isinstance(v, int) else torch.float32

    ka, kb = kind(va), kind(vb)
    if ka is None or kb is None:
        known = ka or kb
        return torch.int32 if known == torch.bool else known
    if not isinstance(va, torch.Tensor) and ka == torch.float32 and kb.is_floating_point:
        ka = kb if kb == torch.float64 else torch.float32
    if not isinstance(vb, torch.Tensor) and kb == torch.float32 and ka.is_floating_point:
        kb = ka if ka == torch.float64 else torch.float32
    return _promote(ka, kb)


def _binary(a, b, fn, what: str, result_dtype=None):
    layout = _same_layout(_layout_of(a), _layout_of(b), what)
    va, vb = _val(a), _val(b)
    if not isinstance(va, torch.Tensor) and not isinstance(vb, torch.Tensor):
        return fn(va, vb)
    dt = _result_dtype(va, vb)
    if dt == torch.bool and what in ("add", "sub", "mul", "floordiv", "mod"):
        dt = torch.int32
    ta = va.to(dt) if isinstance(va, torch.Tensor) else torch.tensor(va, dtype=dt)
    tb = vb.to(dt) if isinstance(vb, torch.Tensor) else torch.tensor(vb, dtype=dt)
    out = fn(ta, tb)
    if result_dtype is not None:
        out = out.to(result_dtype)
    return Tensor(out, layout)


def _div(a, b):
    if a.is_floating_point():
        return a / b
    return torch.div(a.float(), b.float()).float()


def _floordiv(a, b):
    if isinstance(a, torch.Tensor) and not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")  # C semantics, as on the device
    if isinstance(a, torch.Tensor):
        return torch.floor(a / b)
    return a // b


def _mod(a, b):
    if isinstance(a, torch.Tensor):
        return torch.fmod(a, b)
    return a % b


class Tensor:
    """A distributed tensor: a torch value and its layout (None for scalars)."""

    __slots__ = ("data", "layout")

    def __init__(self, data: torch.Tensor, layout=None):
        self.data = data
        self.layout = layout

    @property
    def shape(self):
        return list(self.data.shape)

    @property
    def dtype(self):
        return _GL[self.data.dtype]

    @property
    def type(self):
        return types.SimpleNamespace(shape=self.shape, layout=self.layout, element_ty=self.dtype)

    def numel(self):
        return self.data.numel()

    def to(self, dtype, bitcast=False, fp_downcast_rounding=None):
        dt = _torch_dtype(dtype)
        if bitcast:
            return Tensor(self.data.view(dt), self.layout)
        return Tensor(self.data.to(dt), self.layout)

    def __bool__(self):
        if self.data.numel() != 1:
            raise EmulationError(f"only scalars have a truth value ({_where()})")
        return bool(self.data)

    def __index__(self):
        return int(self.data)

    __int__ = __index__

    def __float__(self):
        return float(self.data)

    def __repr__(self):
        return f"Tensor({self.data!r}, layout={self.layout})"

    def __getitem__(self, idx):
        if not isinstance(idx, tuple):
            idx = (idx,)
        out, axis = self, 0
        for i in idx:
            if i is None:
                out = expand_dims(out, axis)
            elif isinstance(i, slice) and i == slice(None):
                pass
            else:
                raise EmulationError(f"tensor indexing takes None and ':' only ({_where()})")
            axis += 1
        return out

    def __neg__(self):
        return Tensor(-self.data, self.layout)

    def __invert__(self):
        return Tensor(~self.data, self.layout)

    def __pos__(self):
        return self

    def reshape(self, *shape, can_reorder=False):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else shape
        return Tensor(self.data.reshape([_unwrap(s) for s in shape]), _Any())

    def permute(self, *dims):
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        return Tensor(self.data.permute([_unwrap(d) for d in dims]), _Any())

    def trans(self, *dims):
        return self.permute(*(dims or (1, 0)))

    @property
    def T(self):
        return self.permute(1, 0)


def _op(fn, name, result_dtype=None, reverse=False):
    def method(self, other):
        if reverse:
            return _binary(other, self, fn, name, result_dtype)
        return _binary(self, other, fn, name, result_dtype)

    return method


for _name, _fn, _rd in [
    ("add", lambda a, b: a + b, None), ("sub", lambda a, b: a - b, None), ("mul", lambda a, b: a * b, None),
    ("truediv", _div, None), ("floordiv", _floordiv, None), ("mod", _mod, None),
    ("and", lambda a, b: a & b, None), ("or", lambda a, b: a | b, None), ("xor", lambda a, b: a ^ b, None),
    ("lshift", lambda a, b: a << b, None), ("rshift", lambda a, b: a >> b, None),
]:  # fmt: skip
    setattr(Tensor, f"__{_name}__", _op(_fn, _name))
    setattr(Tensor, f"__r{_name}__", _op(_fn, _name, reverse=True))
for _name, _fn in [
    ("lt", lambda a, b: a < b), ("le", lambda a, b: a <= b), ("gt", lambda a, b: a > b),
    ("ge", lambda a, b: a >= b), ("eq", lambda a, b: a == b), ("ne", lambda a, b: a != b),
]:  # fmt: skip
    setattr(Tensor, f"__{_name}__", _op(_fn, _name, torch.bool))
Tensor.__hash__ = object.__hash__


class Pointer(Tensor):
    """Pointers into one argument's storage: element offsets (int64) into ``flat``; loads and stores check
    them against the argument's extent [lo, hi)."""

    __slots__ = ("flat", "lo", "hi")

    def __init__(self, offsets, layout, flat, lo, hi):
        super().__init__(offsets, layout)
        self.flat, self.lo, self.hi = flat, lo, hi

    @property
    def dtype(self):
        return _gl.pointer_type(_GL[self.flat.dtype])

    def _with(self, offsets, layout):
        return Pointer(offsets, layout, self.flat, self.lo, self.hi)

    def __add__(self, other):
        layout = _same_layout(self.layout, _layout_of(other), "pointer +")
        off = _val(other)
        off = off.to(torch.int64) if isinstance(off, torch.Tensor) else int(off)
        return self._with(self.data + off, layout)

    __radd__ = __add__

    def __sub__(self, other):
        return self + (-_val(other) if isinstance(_val(other), torch.Tensor) else -int(_val(other)))

    def __getitem__(self, idx):
        out = Tensor.__getitem__(Tensor(self.data, self.layout), idx)
        return self._with(out.data, out.layout)

    def to(self, dtype, bitcast=False, fp_downcast_rounding=None):
        raise EmulationError(f"pointer casts are not emulated ({_where()})")


def _pointer_arg(t: torch.Tensor) -> Pointer:
    if t.device.type != "cpu":
        raise EmulationError(f"the emulator runs on CPU tensors, got one on {t.device}")
    storage = t.untyped_storage()
    flat = t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
    lo = t.storage_offset()
    hi = lo + 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 0) if t.numel() else lo
    return Pointer(torch.tensor(lo, dtype=torch.int64), None, flat, lo, hi)


def _check_bounds(ptr: Pointer, mask, what: str) -> torch.Tensor:
    off = ptr.data
    bad = (off < ptr.lo) | (off >= ptr.hi)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):
        first = int(off[bad].flatten()[0]) - ptr.lo
        raise EmulationError(f"{what} out of bounds at {_where()}: element {first} of a tensor of {ptr.hi - ptr.lo}")
    return off.clamp(ptr.lo, max(ptr.lo, ptr.hi - 1))


def _mask_of(mask, shape):
    if mask is None:
        return None
    m = _val(mask)
    m = m if isinstance(m, torch.Tensor) else torch.tensor(bool(m))
    return m.to(torch.bool).expand(shape)


# --------------------------------------------------------------------------------------------------- gl ops


def arange(start, end, layout=None):
    start, end = _unwrap(start), _unwrap(end)
    _check_layout(_unwrap(layout), [end - start], "gl.arange")
    return Tensor(torch.arange(start, end, dtype=torch.int32), _unwrap(layout))


def full(shape, value, dtype, layout=None):
    shape = [_unwrap(s) for s in _unwrap(shape)]
    layout = _unwrap(layout)
    _check_layout(layout, shape, "gl.full")
    return Tensor(torch.full(shape, _val(value), dtype=_torch_dtype(dtype)), layout)


def zeros(shape, dtype, layout=None):
    return full(shape, 0, dtype, layout)


def full_like(x, value, dtype=None, layout=None):
    return full(x.shape, value, dtype or x.dtype, layout or x.layout)


def zeros_like(x):
    return full_like(x, 0)


def expand_dims(x, axis):
    axis = _unwrap(axis)
    if isinstance(axis, (list, tuple)):
        for a in sorted(axis):
            x = expand_dims(x, a)
        return x
    layout = _layout_of(x)
    if layout is not None and not isinstance(layout, _Any):
        if not isinstance(layout, _layouts.SliceLayout) or layout.dim != axis:
            raise EmulationError(f"expand_dims({axis}) at {_where()} needs a SliceLayout(dim={axis}), got {layout}")
        layout = layout.parent
    out = _val(x).unsqueeze(axis)
    return x._with(out, layout) if isinstance(x, Pointer) else Tensor(out, layout)


def broadcast(a, b):
    layout = _same_layout(_layout_of(a), _layout_of(b), "gl.broadcast")
    va, vb = torch.broadcast_tensors(torch.as_tensor(_val(a)), torch.as_tensor(_val(b)))
    return Tensor(va, layout), Tensor(vb, layout)


def convert_layout(x, layout, assert_trivial=False):
    layout = _unwrap(layout)
    _check_layout(layout, x.shape, "gl.convert_layout")
    return Tensor(_val(x), layout)


def _reduce(fn, name):
    def reduce(x, axis=None, keep_dims=False, dtype=None, **_):
        axis = _unwrap(axis)
        data, layout = _val(x), _layout_of(x)
        if axis is None:
            out = fn(data.flatten(), 0)
            return Tensor(out, None)
        out = fn(data, axis)
        if name == "sum" and not data.is_floating_point() and data.dtype != torch.int64:
            out = out.to(torch.int32)
        elif dtype is not None:
            out = out.to(_torch_dtype(dtype))
        else:
            out = out.to(data.dtype)
        out_layout = None if layout is None or isinstance(layout, _Any) else _layouts.SliceLayout(axis, layout)
        if keep_dims:
            return expand_dims(Tensor(out, out_layout), axis)
        return Tensor(out, out_layout)

    return reduce


gl_max = _reduce(lambda d, a: torch.amax(d, a), "max")
gl_min = _reduce(lambda d, a: torch.amin(d, a), "min")
gl_sum = _reduce(lambda d, a: torch.sum(d.double() if d.is_floating_point() else d, a), "sum")


def _elementwise(fn):
    def op(x, *rest, **_):
        layout = _layout_of(x)
        for r in rest:
            layout = _same_layout(layout, _layout_of(r), fn.__name__)
        data = _val(x)
        dt = data.dtype
        compute = data.float() if dt in (torch.float16, torch.bfloat16) else data
        out = fn(compute, *[_val(r) for r in rest])
        return Tensor(out.to(dt) if out.is_floating_point() else out, layout)

    return op


exp2 = _elementwise(torch.exp2)
exp = _elementwise(torch.exp)
log2 = _elementwise(torch.log2)
log = _elementwise(torch.log)
sqrt = _elementwise(torch.sqrt)
sqrt_rn = sqrt
rsqrt = _elementwise(torch.rsqrt)
gl_abs = _elementwise(torch.abs)
floor = _elementwise(torch.floor)
ceil = _elementwise(torch.ceil)
sin = _elementwise(torch.sin)
cos = _elementwise(torch.cos)
erf = _elementwise(torch.erf)


def fma(a, b, c):
    return a * b + c


def maximum(a, b, propagate_nan=None):
    return _binary(a, b, lambda x, y: torch.fmax(x, y) if isinstance(x, torch.Tensor) else builtins_max(x, y), "max")


def minimum(a, b, propagate_nan=None):
    return _binary(a, b, lambda x, y: torch.fmin(x, y) if isinstance(x, torch.Tensor) else builtins_min(x, y), "min")


builtins_max, builtins_min = builtins.max, builtins.min


def where(cond, x, y):
    layout = _same_layout(_layout_of(cond), _layout_of(x), "gl.where")
    layout = _same_layout(layout, _layout_of(y), "gl.where")
    vx, vy = _val(x), _val(y)
    dt = _result_dtype(vx, vy) if isinstance(vx, torch.Tensor) or isinstance(vy, torch.Tensor) else torch.float32
    tx = vx.to(dt) if isinstance(vx, torch.Tensor) else torch.tensor(vx, dtype=dt)
    ty = vy.to(dt) if isinstance(vy, torch.Tensor) else torch.tensor(vy, dtype=dt)
    c = _val(cond)
    c = c.to(torch.bool) if isinstance(c, torch.Tensor) else torch.tensor(bool(c))
    return Tensor(torch.where(c, tx, ty), layout)


def permute(x, *dims):
    return x.permute(*dims)


def reshape(x, *shape, can_reorder=False):
    return x.reshape(*shape)


def _scalar(v) -> Tensor:
    """A runtime scalar as the kernel sees it: an int32 (int64 if it does not fit) or float32 0-d tensor."""
    if isinstance(v, bool):
        return Tensor(torch.tensor(v))
    if isinstance(v, int):
        return Tensor(torch.tensor(v, dtype=torch.int32 if -(2**31) <= v < 2**31 else torch.int64))
    return Tensor(torch.tensor(v, dtype=torch.float32))


def program_id(axis):
    return _scalar(_part().program.pid[_unwrap(axis)])


def num_programs(axis):
    return _scalar(_part().program.grid[_unwrap(axis)])


def num_warps():
    return _part().num_warps


def cdiv(x, div):
    return (x + div - 1) // div


def static_range(a, b=None, step=1, **_):
    a, b, step = _unwrap(a), _unwrap(b), _unwrap(step)
    return range(a) if b is None else range(a, b, step)


def static_assert(cond, msg=""):
    if not _unwrap(cond):
        raise EmulationError(f"static_assert failed at {_where()}: {msg}")


def device_assert(cond, msg="", mask=None):
    c = _val(cond)
    if not bool(torch.as_tensor(c).all()):
        raise EmulationError(f"device_assert failed at {_where()}: {msg}")


def _identity(x, *_, **__):
    return x


def load(pointer, mask=None, other=None, **_):
    if not isinstance(pointer, Pointer):
        raise EmulationError(f"gl.load takes a pointer tensor here ({_where()})")
    shape = pointer.data.shape
    m = _mask_of(mask, shape)
    off = _check_bounds(pointer, m, "gl.load")
    out = pointer.flat[off]
    if m is not None:
        fill = _val(other) if other is not None else 0
        out = torch.where(m, out, torch.as_tensor(fill, dtype=out.dtype))
    layout = _same_layout(pointer.layout, _layout_of(mask), "gl.load")
    return Tensor(out.clone(), layout)


def store(pointer, value, mask=None, **_):
    if not isinstance(pointer, Pointer):
        raise EmulationError(f"gl.store takes a pointer tensor here ({_where()})")
    _same_layout(pointer.layout, _layout_of(value), "gl.store")
    shape = pointer.data.shape
    m = _mask_of(mask, shape)
    off = _check_bounds(pointer, m, "gl.store")
    v = torch.as_tensor(_val(value)).to(pointer.flat.dtype).expand(shape)
    if m is None:
        pointer.flat[off.flatten()] = v.flatten()
    else:
        pointer.flat[off[m]] = v[m]


def atomic_add(pointer, val, mask=None, sem=None, scope=None):
    shape = pointer.data.shape
    m = _mask_of(mask, shape)
    off = _check_bounds(pointer, m, "gl.atomic_add")
    v = torch.as_tensor(_val(val)).to(pointer.flat.dtype).expand(shape)
    old = pointer.flat[off].clone()
    sel = torch.ones(shape, dtype=torch.bool) if m is None else m
    pointer.flat.index_add_(0, off[sel].flatten(), v[sel].flatten())
    return Tensor(old, pointer.layout)


# --------------------------------------------------------------------------------------------------- shared memory


@dataclass
class _Cell:
    write: tuple | None = None  # ("thread", tid, clock) | ("tma", barrier, phase) | ("pending", copy)
    fenced: bool = True
    reads: dict = field(default_factory=dict)  # tid -> clock of its last read
    async_readers: set = field(default_factory=set)  # in-flight wgmma / TMA stores reading this cell


class _Alloc:
    def __init__(self, dtype, shape, layout, name):
        self.dtype, self.shape, self.layout, self.name = dtype, list(shape), layout, name
        tdt = _torch_dtype(dtype)
        fill = float("nan") if tdt.is_floating_point else -(2**30)
        self.data = torch.full(self.shape, fill, dtype=tdt)
        self.cells = [_Cell() for _ in range(self.shape[0] if self.shape else 1)]
        self.barriers: dict[int, _Barrier] = {}


class SharedMemory:
    """A view of a shared-memory allocation, covering cells [c0, c1) of its first dimension."""

    def __init__(self, alloc: _Alloc, view: torch.Tensor, c0: int, c1: int, root: bool, layout):
        self.alloc, self.view, self.c0, self.c1, self.root, self._layout = alloc, view, c0, c1, root, layout

    @property
    def shape(self):
        return list(self.view.shape)

    @property
    def dtype(self):
        return self.alloc.dtype

    @property
    def layout(self):
        return self._layout

    @property
    def type(self):
        return types.SimpleNamespace(shape=self.shape, layout=self._layout, element_ty=self.dtype)

    @property
    def rank(self):
        return self.view.dim()

    def numel(self):
        return self.view.numel()

    def _cells(self):
        return self.alloc.cells[self.c0 : self.c1]

    def _name(self):
        span = f"[{self.c0}]" if self.c1 == self.c0 + 1 else f"[{self.c0}:{self.c1}]"
        return f"shared buffer {self.alloc.name}{span}"

    def index(self, i):
        i = int(_val(i))
        if not 0 <= i < self.view.shape[0]:
            raise EmulationError(f"shared memory index {i} out of range [0, {self.view.shape[0]}) at {_where()}")
        c0, c1 = (self.c0 + i, self.c0 + i + 1) if self.root else (self.c0, self.c1)
        return SharedMemory(self.alloc, self.view[i], c0, c1, False, self._layout)

    def slice(self, start, length, dim=0):
        start, length, dim = int(_val(start)), _unwrap(length), _unwrap(dim)
        if start < 0 or start + length > self.view.shape[dim]:
            raise EmulationError(
                f"shared memory slice [{start}, {start + length}) of dim {dim} (size {self.view.shape[dim]}) "
                f"at {_where()}"
            )
        c0, c1 = (self.c0 + start, self.c0 + start + length) if self.root and dim == 0 else (self.c0, self.c1)
        return SharedMemory(self.alloc, self.view.narrow(dim, start, length), c0, c1, self.root and dim == 0,
                            self._layout)  # fmt: skip

    def permute(self, order):
        order = [_unwrap(o) for o in _unwrap(order)]
        return SharedMemory(self.alloc, self.view.permute(order), self.c0, self.c1, False, self._layout)

    def reshape(self, shape):
        shape = [_unwrap(s) for s in _unwrap(shape)]
        root = self.root and shape[0] == self.view.shape[0]  # the first dimension (the cells) kept
        return SharedMemory(self.alloc, self.view.view(shape), self.c0, self.c1, root, self._layout)

    def _reinterpret(self, dtype, shape, layout):
        raise EmulationError(f"shared memory reinterpretation is not emulated ({_where()})")

    def _keep_alive(self):
        pass

    def load(self, layout):
        layout = _unwrap(layout)
        _check_layout(layout, self.shape, "shared_memory.load")
        _read(self, _part(), asynchronous=False)
        return Tensor(self.view.clone(), layout)

    def store(self, value):
        if isinstance(value, _Pending):
            value = value._ready("stored")
        if list(value.shape) != self.shape:
            raise EmulationError(f"shared_memory.store of {value.shape} into {self.shape} at {_where()}")
        part = _part()
        _write(self, part)
        self.view.copy_(_val(value).to(self.view.dtype))


def allocate_shared_memory(element_ty, shape, layout, value=None):
    part = _part()
    shape = [_unwrap(s) for s in _unwrap(shape)]
    dtype = _unwrap(element_ty)
    alloc = _Alloc(dtype, shape, _unwrap(layout), _where())
    prog = part.program
    prog.shared_bytes += math.prod(shape) * alloc.data.element_size()
    if prog.shared_bytes > SHARED_BUDGET:
        raise EmulationError(f"shared memory {prog.shared_bytes} bytes > the sm_90 budget {SHARED_BUDGET} ({_where()})")
    smem = SharedMemory(alloc, alloc.data, 0, len(alloc.cells), True, alloc.layout)
    if value is not None:
        smem.store(value)
    return smem


def _ordered(epoch, part) -> bool:
    tid, clock = epoch
    return tid == part.tid or clock <= part.vc.get(tid, 0)


def _check_visible(cell: _Cell, smem: SharedMemory, part, what: str) -> None:
    w = cell.write
    if w is None:
        raise RaceError(
            f"{what} of {smem._name()} by partition {part.name} at {_where()} reads memory nothing has written yet "
            "(no wait orders it after the write or bulk copy that fills it)"
        )
    if w[0] == "pending":
        copy = w[1]
        raise RaceError(
            f"{what} of {smem._name()} by partition {part.name} at {_where()}: the bulk tensor copy into it "
            f"(issued at {copy.where} on {copy.barrier.name}) has not been waited for"
        )
    if w[0] == "tma":
        bar, phase = w[1], w[2]
        if part.acquired.get(bar.key, 0) <= phase:
            raise RaceError(
                f"{what} of {smem._name()} by partition {part.name} at {_where()} before a wait on {bar.name} "
                f"saw phase {phase} complete (the bulk tensor copy's data is not yet visible to it)"
            )
        return
    if not _ordered((w[1], w[2]), part):
        raise RaceError(
            f"{what} of {smem._name()} by partition {part.name} at {_where()}: partition "
            f"{part.program.parts[w[1]].name} wrote it with no barrier ordering that write before this read"
        )


def _read(smem: SharedMemory, part, asynchronous: bool, what: str | None = None) -> None:
    what = what or ("async read" if asynchronous else "load")
    for cell in smem._cells():
        _check_visible(cell, smem, part, what)
        if asynchronous and not cell.fenced and cell.write[0] == "thread":
            raise RaceError(
                f"{what} of {smem._name()} at {_where()}: written by generic stores with no fence_async_shared "
                "before the async proxy (wgmma / TMA) reads it"
            )
        cell.reads[part.tid] = part.vc[part.tid]


def _check_writable(smem: SharedMemory, part, what: str) -> None:
    for cell in smem._cells():
        if cell.async_readers:
            reader = next(iter(cell.async_readers))
            raise RaceError(
                f"{what} into {smem._name()} at {_where()} while {reader.describe()} still reads it (wait for it first)"
            )
        if cell.write is not None and cell.write[0] == "pending":
            raise RaceError(f"{what} into {smem._name()} at {_where()}: a bulk copy into it is still in flight")
        for tid, clock in cell.reads.items():
            if not _ordered((tid, clock), part):
                raise RaceError(
                    f"{what} into {smem._name()} by partition {part.name} at {_where()}: partition "
                    f"{part.program.parts[tid].name} reads it with no barrier ordering that read before this write"
                )
        w = cell.write
        if w is not None and w[0] == "tma" and w[1].max_acquired <= w[2]:
            raise RaceError(
                f"{what} into {smem._name()} by partition {part.name} at {_where()} overwrites a bulk copy's data "
                f"before any wait on {w[1].name} saw its phase {w[2]} complete (nobody consumed it)"
            )
        if w is not None and w[0] == "thread" and not _ordered((w[1], w[2]), part):
            raise RaceError(
                f"{what} into {smem._name()} by partition {part.name} at {_where()}: partition "
                f"{part.program.parts[w[1]].name} wrote it with no barrier ordering the two writes"
            )


def _write(smem: SharedMemory, part) -> None:
    _check_writable(smem, part, "store")
    for cell in smem._cells():
        cell.write, cell.fenced, cell.reads = ("thread", part.tid, part.vc[part.tid]), False, {}
        part.unfenced.append(cell)


def fence_async_shared(cluster=False):
    part = _part()
    for cell in part.unfenced:
        cell.fenced = True
    part.unfenced.clear()


# --------------------------------------------------------------------------------------------------- mbarrier


class _Barrier:
    def __init__(self, key, name, count):
        self.key, self.name, self.count = key, name, count
        self.pending, self.tx, self.completed = count, 0, 0
        self.max_acquired = 0  # phases some partition's wait has seen complete
        self.vc: dict = {}
        self.completed_vcs: list[dict] = []
        self.copies: deque = deque()

    def describe(self) -> str:
        return (f"{self.completed} phases completed, {self.pending} of {self.count} arrivals and {self.tx} "
                "transaction bytes missing")  # fmt: skip

    def _maybe_complete(self):
        if self.pending == 0 and self.tx <= 0:
            if self.tx < 0:
                raise EmulationError(
                    f"{self.name}: {-self.tx} more bytes arrived than mbarrier.expect announced "
                    f"(phase {self.completed})"
                )
            self.completed_vcs.append(dict(self.vc))
            self.completed += 1
            self.pending, self.tx = self.count, 0

    def arrive(self, part, count):
        _join(self.vc, part.vc)
        part.vc[part.tid] += 1
        self.pending -= count
        if self.pending < 0:
            raise EmulationError(f"{self.name}: more arrivals than its count {self.count} at {_where()}")
        self._maybe_complete()

    def land(self) -> bool:
        """Land the bulk copies in flight towards this barrier; whether any landed."""
        landed = bool(self.copies)
        while self.copies:
            self.copies.popleft().land()
        return landed

    def done(self, parity) -> bool:
        return self.completed % 2 != parity


def _join(into: dict, other: dict) -> None:
    for k, v in other.items():
        if into.get(k, 0) < v:
            into[k] = v


def _barrier(smem: SharedMemory) -> _Barrier:
    if smem.c1 != smem.c0 + 1 and len(smem.alloc.cells) != 1:
        raise EmulationError(f"an mbarrier operation needs one barrier, got {smem._name()} ({_where()})")
    bar = smem.alloc.barriers.get(smem.c0)
    if bar is None:
        raise EmulationError(f"{smem._name()} used as an mbarrier before mbarrier.init ({_where()})")
    return bar


def _pred(pred) -> bool:
    return bool(_val(pred))


def mbarrier_init(mbarrier, count):
    name = f"mbarrier {mbarrier.alloc.name}[{mbarrier.c0}]"
    mbarrier.alloc.barriers[mbarrier.c0] = _Barrier((id(mbarrier.alloc), mbarrier.c0), name, _unwrap(count))


def mbarrier_invalidate(mbarrier):
    bar = _barrier(mbarrier)
    if bar.copies:
        raise EmulationError(f"{bar.name} invalidated with bulk copies in flight ({_where()})")


def mbarrier_expect(mbarrier, bytes, pred=True):
    if not _pred(pred):
        return
    part = _part()
    bar = _barrier(mbarrier)
    bar.tx += _unwrap(bytes)  # mbarrier.arrive.expect_tx: announces the bytes and arrives once
    bar.arrive(part, 1)
    part.yield_point()


def mbarrier_arrive(mbarrier, *, count=1, pred=True):
    if not _pred(pred):
        return
    part = _part()
    _barrier(mbarrier).arrive(part, _unwrap(count))
    part.yield_point()


def mbarrier_wait(mbarrier, phase, pred=True, deps=()):
    if not _pred(pred):
        return
    part = _part()
    bar = _barrier(mbarrier)
    parity = int(_val(phase)) & 1
    part.yield_point()
    if not bar.done(parity):
        loc = _where()
        part.block(lambda: bar.done(parity) or (bar.land() and bar.done(parity)),
                   lambda: f"at {loc} waits on {bar.name} for phase parity {parity} ({bar.describe()})")  # fmt: skip
    c = bar.completed
    observed = c - 1 if c >= 1 and (c - 1) % 2 == parity else c - 2
    if observed >= 0:
        _join(part.vc, bar.completed_vcs[observed])
        part.acquired[bar.key] = builtins_max(part.acquired.get(bar.key, 0), observed + 1)
        bar.max_acquired = builtins_max(bar.max_acquired, observed + 1)


# --------------------------------------------------------------------------------------------------- TMA


@dataclass
class _Desc:
    flat: torch.Tensor
    base: int
    shape: list
    strides: list
    block_shape: list
    layout: object
    padding: str = "zero"

    @property
    def dtype(self):
        return _GL[self.flat.dtype]

    @property
    def block_type(self):
        nbytes = math.prod(self.block_shape) * self.flat.element_size()
        return types.SimpleNamespace(shape=list(self.block_shape), nbytes=nbytes, element_ty=self.dtype)

    def box(self, coord):
        """The box at ``coord`` (out-of-bounds elements zero, or NaN with padding 'nan') and its in-bounds mask."""
        idx = torch.full([1] * len(self.shape), self.base, dtype=torch.int64)
        ok = torch.ones([1] * len(self.shape), dtype=torch.bool)
        for d, (c, n, s, b) in enumerate(zip(coord, self.shape, self.strides, self.block_shape)):
            r = torch.arange(c, c + b, dtype=torch.int64)
            view = [1] * len(self.shape)
            view[d] = b
            idx = idx + (r * s).view(view)
            ok = ok & ((r >= 0) & (r < n)).view(view)
        return idx, ok


def _desc_arg(d) -> _Desc:
    base = d.base
    ptr = _pointer_arg(base)
    return _Desc(ptr.flat, ptr.lo, [int(s) for s in d.shape], [int(s) for s in d.strides], list(d.block_shape),
                 getattr(d, "layout", None), getattr(d, "padding", "zero"))  # fmt: skip


def make_tensor_descriptor(base, shape, strides, block_shape, layout, padding_option="zero"):
    if not isinstance(base, Pointer):
        raise EmulationError(f"make_tensor_descriptor takes a pointer ({_where()})")
    return _Desc(base.flat, int(base.data), [int(_val(s)) for s in shape], [int(_val(s)) for s in strides],
                 [_unwrap(b) for b in _unwrap(block_shape)], _unwrap(layout), _unwrap(padding_option))  # fmt: skip


def _box_matches(desc: _Desc, smem: SharedMemory, what: str) -> None:
    block = list(desc.block_shape)
    if smem.shape != block and math.prod(smem.shape) != math.prod(block):
        raise EmulationError(f"{what} at {_where()}: box {block} into a shared buffer {smem.shape}")
    if smem.view.dtype != desc.flat.dtype:
        raise EmulationError(f"{what} at {_where()}: {desc.flat.dtype} data into a {smem.view.dtype} buffer")


class _Copy:
    def __init__(self, desc, coord, barrier, smem, part):
        self.desc, self.coord, self.barrier, self.smem, self.part = desc, coord, barrier, smem, part
        self.where, self.vc = _where(), dict(part.vc)

    def land(self):
        idx, ok = self.desc.box(self.coord)
        fill = float("nan") if self.desc.padding == "nan" else 0
        data = torch.where(ok, self.desc.flat[idx.clamp(0, self.desc.flat.numel() - 1)],
                           torch.tensor(fill, dtype=self.desc.flat.dtype))  # fmt: skip
        self.smem.view.copy_(data.reshape(self.smem.shape))
        bar = self.barrier
        for cell in self.smem._cells():
            cell.write, cell.fenced, cell.reads = ("tma", bar, bar.completed), True, {}
        _join(bar.vc, self.vc)
        bar.tx -= self.desc.block_type.nbytes
        bar._maybe_complete()


def async_copy_global_to_shared(tensor_desc, coord, barrier, result, pred=True):
    if not _pred(pred):
        return
    part = _part()
    bar = _barrier(barrier)
    _box_matches(tensor_desc, result, "tma.async_copy_global_to_shared")
    _check_writable(result, part, "bulk tensor copy")
    copy = _Copy(tensor_desc, [int(_val(c)) for c in coord], bar, result, part)
    for cell in result._cells():
        cell.write = ("pending", copy)
    bar.copies.append(copy)
    part.yield_point()


class _Store:
    def __init__(self, smem):
        self.smem, self.where = smem, _where()

    def describe(self):
        return f"the TMA store issued at {self.where}"


def async_copy_shared_to_global(tensor_desc, coord, src):
    part = _part()
    _box_matches(tensor_desc, src, "tma.async_copy_shared_to_global")
    _read(src, part, asynchronous=True, what="TMA store")
    idx, ok = tensor_desc.box([int(_val(c)) for c in coord])
    data = src.view.reshape(idx.shape)
    tensor_desc.flat[idx[ok]] = data[ok].to(tensor_desc.flat.dtype)
    st = _Store(src)
    for cell in src._cells():
        cell.async_readers.add(st)
    part.stores.append(st)


def store_wait(pendings):
    part = _part()
    while len(part.stores) > _unwrap(pendings):
        st = part.stores.popleft()
        for cell in st.smem._cells():
            cell.async_readers.discard(st)


# --------------------------------------------------------------------------------------------------- wgmma


class _Pending:
    """The token of an async warpgroup_mma: its value is usable once warpgroup_mma_wait retired it."""

    def __init__(self, value: Tensor, part, operands, where):
        self.value, self.part, self.operands, self.where, self.retired = value, part, operands, where, False

    def describe(self):
        return f"the async warpgroup_mma issued at {self.where}"

    def _ready(self, use: str) -> Tensor:
        if not self.retired:
            raise RaceError(
                f"accumulator of {self.describe()} {use} at {_where()} before warpgroup_mma_wait retired it"
            )
        return self.value

    def __getattr__(self, name):
        if name in ("shape", "dtype", "layout", "type"):
            return getattr(self.value, name)
        return getattr(self._ready("used"), name)


for _name in ["add", "sub", "mul", "truediv", "floordiv", "mod", "lt", "le", "gt", "ge", "eq", "ne", "getitem",
              "radd", "rsub", "rmul", "rtruediv", "neg", "bool"]:  # fmt: skip

    def _fwd(self, *a, _n=_name):
        return getattr(self._ready("used"), f"__{_n}__")(*a)

    setattr(_Pending, f"__{_name}__", _fwd)


def warpgroup_mma_init(value):
    return value


def warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None, is_async=False):
    part = _part()
    where = _where()
    if part.num_warps % 4:
        raise EmulationError(f"warpgroup_mma at {where} needs whole warpgroups; partition {part.name} has "
                             f"{part.num_warps} warps")  # fmt: skip
    acc_value = acc.value if isinstance(acc, _Pending) and acc.part is part else acc
    if isinstance(acc, _Pending) and acc.part is not part:
        acc_value = acc._ready("used")
    layout = acc_value.layout
    if not isinstance(layout, _layouts.NVMMADistributedLayout):
        raise EmulationError(f"warpgroup_mma at {where}: the accumulator needs an NVMMADistributedLayout, got {layout}")
    _check_layout(layout, acc_value.shape, "warpgroup_mma")
    operands = []
    if isinstance(a, SharedMemory):
        _read(a, part, asynchronous=True, what="warpgroup_mma operand A")
        av = a.view
        operands.append(a)
    else:
        la = _layout_of(a)
        want = _layouts.DotOperandLayout
        if not isinstance(la, want) or la.operand_index != 0 or la.parent != layout:
            raise EmulationError(f"warpgroup_mma at {where}: a register A needs DotOperandLayout(0, parent="
                                 f"the accumulator's layout), got {la}")  # fmt: skip
        av = _val(a)
    if not isinstance(b, SharedMemory):
        raise EmulationError(f"warpgroup_mma at {where}: B must be in shared memory")
    _read(b, part, asynchronous=True, what="warpgroup_mma operand B")
    operands.append(b)
    M, N = acc_value.shape
    if list(av.shape) != [M, b.shape[0]] or b.shape[1] != N:
        raise EmulationError(f"warpgroup_mma at {where}: shapes {list(av.shape)} x {b.shape} -> {[M, N]}")
    prod = av.float() @ b.view.float()
    base = acc_value.data.float() if _pred(use_acc) else torch.zeros_like(prod)
    out = Tensor((base + prod).to(acc_value.data.dtype), layout)
    if not is_async:
        return out
    token = _Pending(out, part, operands, where)
    for smem in operands:
        for cell in smem._cells():
            cell.async_readers.add(token)
    part.mmas.append(token)
    return token


def _retire(token: _Pending):
    token.retired = True
    part = token.part
    for smem in token.operands:
        for cell in smem._cells():
            cell.async_readers.discard(token)
            cell.reads[part.tid] = part.vc[part.tid]


def warpgroup_mma_wait(num_outstanding=0, deps=None):
    if deps is None:
        raise EmulationError("warpgroup_mma_wait deps must be given")
    part = _part()
    n = _unwrap(num_outstanding)
    while len(part.mmas) > n:
        _retire(part.mmas.popleft())
    out = [d.value if isinstance(d, _Pending) and d.retired else d for d in deps]
    return out[0] if len(out) == 1 else tuple(out)


# --------------------------------------------------------------------------------------------------- partitions


class _Partition:
    def __init__(self, program, tid, name, num_warps, fn, args, vc):
        self.program, self.tid, self.name, self.num_warps = program, tid, name, num_warps
        self.fn, self.args = fn, args
        self.vc = dict(vc)
        self.vc[tid] = self.vc.get(tid, 0) + 1
        self.acquired: dict = {}
        self.mmas: deque = deque()
        self.stores: deque = deque()
        self.unfenced: list = []
        self.turn = threading.Event()
        self.waiting = None  # (ready(), describe()) while blocked
        self.finished = False
        self.error: BaseException | None = None
        self.result = None
        self.thread = threading.Thread(target=self._main, daemon=True, name=f"gluon-emulator {name}")

    def _main(self):
        self.turn.wait()
        _tls.part = self
        try:
            if self.program.aborted:
                raise _Abort
            self.result = self.fn(*self.args)
            if self.mmas:
                raise RaceError(f"partition {self.name} ended with {self.mmas[0].describe()} never waited for")
        except _Abort:
            pass
        except BaseException as exc:  # handed to the scheduler, which re-raises it in the caller's thread
            self.error = exc
        finally:
            self.finished = True
            _tls.part = None
            self.program.wake.set()

    def yield_point(self):
        """Let the other partitions run (every synchronization point is one: adversarial interleavings)."""
        self.turn.clear()
        self.program.wake.set()
        self.turn.wait()
        if self.program.aborted:
            raise _Abort

    def block(self, ready, describe):
        while not ready():
            self.waiting = (ready, describe)
            self.yield_point()
        self.waiting = None


class _Program:
    def __init__(self, pid, grid, num_warps):
        self.pid, self.grid, self.num_warps = pid, grid, num_warps
        self.parts: list[_Partition] = []
        self.wake = threading.Event()
        self.aborted = False
        self.shared_bytes = 0

    def spawn(self, fn, args, name, num_warps, vc) -> _Partition:
        part = _Partition(self, len(self.parts), name, num_warps, fn, args, vc)
        self.parts.append(part)
        part.thread.start()
        return part

    def run(self, fn, kwargs):
        self.spawn(lambda: fn(**kwargs), (), "default", self.num_warps, {})
        rr = 0
        while True:
            n = len(self.parts)
            chosen = None
            for k in range(n):
                part = self.parts[(rr + k) % n]
                if part.finished:
                    continue
                if part.waiting is None or part.waiting[0]():
                    chosen, rr = part, (rr + k + 1) % n
                    break
            if chosen is None:
                if all(p.finished for p in self.parts):
                    break
                lines = [f"  partition {p.name} {p.waiting[1]()}" for p in self.parts if not p.finished]
                self._abort()
                raise DeadlockError(f"deadlock in program {self.pid}: no partition can proceed\n" + "\n".join(lines))
            self.wake.clear()
            chosen.turn.set()
            if not self.wake.wait(WATCHDOG_S):
                self._abort()
                raise EmulationError(f"partition {chosen.name} ran {WATCHDOG_S:.0f} s without a synchronization point")
            if chosen.error is not None:
                self._abort()
                raise chosen.error
        for part in self.parts:
            part.thread.join()

    def _abort(self):
        self.aborted = True
        for part in self.parts:
            if not part.finished:
                part.turn.set()
        for part in self.parts:
            part.thread.join(5)


def warp_specialize(functions_and_args, worker_num_warps, worker_num_regs):
    part = _part()
    prog = part.program
    nw = [_unwrap(w) for w in worker_num_warps]
    nr = [_unwrap(r) for r in worker_num_regs]
    fa = list(functions_and_args)
    if len(fa) - 1 != len(nw) or len(nw) != len(nr):
        raise EmulationError(f"warp_specialize: {len(fa) - 1} workers, {len(nw)} warp counts, {len(nr)} budgets")
    for r in nr:
        if not (24 <= r <= 256 and r % 8 == 0):
            raise EmulationError(f"warp_specialize: register budget {r} is not a multiple of 8 in [24, 256]")
    if part.tid != 0 or getattr(part, "in_ws", False):
        raise EmulationError("warp_specialize is not nested")
    children = []
    for i, ((fn, args), warps) in enumerate(zip(fa[1:], nw)):
        efn = _emulated(fn)
        children.append(prog.spawn(efn, tuple(args), f"worker{i}:{_fn_name(fn)}", warps, part.vc))
    part.vc[part.tid] += 1
    default_fn, default_args = fa[0]
    name = part.name
    part.name, part.in_ws = f"default:{_fn_name(default_fn)}", True
    try:
        result = _emulated(default_fn)(*default_args)
    finally:
        part.name, part.in_ws = name, False
    part.block(lambda: all(c.finished for c in children), lambda: "waits for its worker partitions to finish")
    for c in children:
        _join(part.vc, c.vc)
    return result


def _fn_name(fn) -> str:
    return getattr(getattr(fn, "fn", fn), "__name__", "?")


# --------------------------------------------------------------------------------------------------- namespaces


def _namespace(real, impl: dict, name: str):
    ns = types.SimpleNamespace()
    for attr in dir(real):
        if attr.startswith("__"):
            continue
        value = getattr(real, attr)
        if callable(value) and getattr(value, "__triton_builtin__", False):  # gluon and tl builtins alike

            def missing(*_a, _attr=attr, **_k):
                raise EmulationError(f"{name}.{_attr} is not emulated")

            value = missing
        setattr(ns, attr, value)
    for k, v in impl.items():
        setattr(ns, k, v)
    return ns


_GL_IMPL = dict(
    arange=arange, full=full, zeros=zeros, full_like=full_like, zeros_like=zeros_like, expand_dims=expand_dims,
    broadcast=broadcast, convert_layout=convert_layout, max=gl_max, min=gl_min, sum=gl_sum, exp2=exp2, exp=exp,
    log2=log2, log=log, sqrt=sqrt, sqrt_rn=sqrt_rn, rsqrt=rsqrt, abs=gl_abs, floor=floor, ceil=ceil, sin=sin,
    cos=cos, erf=erf,
    fma=fma, maximum=maximum, minimum=minimum, where=where, program_id=program_id, num_programs=num_programs,
    num_warps=num_warps, cdiv=cdiv, static_range=static_range, static_assert=static_assert,
    static_print=print, device_assert=device_assert, device_print=print, load=load, store=store,
    atomic_add=atomic_add, allocate_shared_memory=allocate_shared_memory, warp_specialize=warp_specialize,
    thread_barrier=lambda: None, assume=lambda *a, **k: None, multiple_of=_identity, max_contiguous=_identity,
    max_constancy=_identity, constexpr=_unwrap, to_tensor=lambda x: x,
    fdiv=lambda a, b, **_: a / b, div_rn=lambda a, b: a / b, permute=permute, reshape=reshape,
)  # fmt: skip
_MBARRIER = _namespace(_mbarrier, dict(init=mbarrier_init, invalidate=mbarrier_invalidate, expect=mbarrier_expect,
                                       arrive=mbarrier_arrive, wait=mbarrier_wait), "mbarrier")  # fmt: skip
_TMA = _namespace(_tma, dict(async_copy_global_to_shared=async_copy_global_to_shared,
                             async_copy_shared_to_global=async_copy_shared_to_global, store_wait=store_wait,
                             make_tensor_descriptor=make_tensor_descriptor), "tma")  # fmt: skip
_HOPPER = _namespace(_hopper, dict(fence_async_shared=fence_async_shared, warpgroup_mma=warpgroup_mma,
                                   warpgroup_mma_wait=warpgroup_mma_wait, warpgroup_mma_init=warpgroup_mma_init,
                                   mbarrier=_MBARRIER, tma=_TMA), "hopper")  # fmt: skip
_GL_NS = _namespace(_gl, _GL_IMPL, "gl")
_GL_NS.nvidia = types.SimpleNamespace(hopper=_HOPPER)

# Real objects (modules and builtins) -> their emulated counterparts, by identity.
_SUBST: dict[int, object] = {
    id(_gl): _GL_NS, id(_hopper): _HOPPER, id(_tma): _TMA, id(_mbarrier): _MBARRIER,
}  # fmt: skip
for _real, _ns in [(_gl, _GL_NS), (_hopper, _HOPPER), (_tma, _TMA), (_mbarrier, _MBARRIER)]:
    for _attr in dir(_real):
        _v = getattr(_real, _attr)
        if callable(_v) and not isinstance(_v, type) and hasattr(_ns, _attr):
            _SUBST.setdefault(id(_v), getattr(_ns, _attr))


@functools.cache
def _emulated(fn):
    """The Python function of a (Gluon) JIT function, with its globals' Gluon modules and builtins replaced."""
    if not isinstance(fn, JITFunction):
        return fn
    py = fn.fn
    g = dict(py.__globals__)
    for k, v in list(g.items()):
        sub = _SUBST.get(id(v))
        if sub is not None:
            g[k] = sub
        elif isinstance(v, _gl.constexpr):
            g[k] = v.value
        elif isinstance(v, JITFunction):
            g[k] = _LazyJit(v)
    _KERNEL_CODES.add(py.__code__)
    return types.FunctionType(py.__code__, g, py.__name__, py.__defaults__, py.__closure__)


class _LazyJit:
    """A JIT function called from an emulated one (resolved on first call: helpers may refer to each other)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return _emulated(self.fn)(*args, **kwargs)


# --------------------------------------------------------------------------------------------------- launcher


def _convert(arg):
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    from triton.tools.tensor_descriptor import TensorDescriptor as TritonDescriptor

    if isinstance(arg, torch.Tensor):
        return _pointer_arg(arg)
    if isinstance(arg, (GluonDescriptor, TritonDescriptor)):
        return _desc_arg(arg)
    if isinstance(arg, tuple):
        items = [_convert(a) for a in arg]
        return type(arg)(*items) if hasattr(arg, "_fields") else tuple(items)
    return arg


@dataclass
class RunInfo:
    """What the last emulated launch did (for tests): programs, partitions per program and their warps."""

    programs: int = 0
    partitions: list = field(default_factory=list)
    shared_bytes: int = 0


class _Launcher:
    def __init__(self, kernel):
        if not isinstance(kernel, JITFunction):
            raise TypeError(f"gluon_emulate takes a @gluon.jit kernel, got {type(kernel).__name__}")
        self.kernel = kernel
        self.last_run = RunInfo()

    def __getitem__(self, grid):
        return functools.partial(self._run, grid)

    def _run(self, grid, *args, num_warps=4, num_ctas=1, maxnreg=None, num_stages=None, **kwargs):
        if num_ctas != 1:
            raise EmulationError("clusters (num_ctas > 1) are not emulated")
        sig = inspect.signature(self.kernel.fn)
        if "num_warps" in sig.parameters:
            kwargs["num_warps"] = num_warps
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        constexprs = {p.name for p in self.kernel.params if p.is_constexpr}
        call = {k: v if k in constexprs else _convert(v) for k, v in bound.arguments.items()}
        call = {k: _scalar(v) if k not in constexprs and isinstance(v, (int, float)) else v for k, v in call.items()}
        if callable(grid):
            grid = grid(bound.arguments)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        fn = _emulated(self.kernel)
        info = RunInfo()
        for z in range(grid[2]):
            for y in range(grid[1]):
                for x in range(grid[0]):
                    prog = _Program((x, y, z), grid, num_warps)
                    prog.run(fn, call)
                    info.programs += 1
                    info.partitions = [(p.name, p.num_warps) for p in prog.parts]
                    info.shared_bytes = builtins_max(info.shared_bytes, prog.shared_bytes)
        self.last_run = info
        return info


@functools.cache
def gluon_emulate(kernel) -> _Launcher:
    """``gluon_emulate(kernel)[grid](*args, num_warps=..., **constexprs)`` runs a ``@gluon.jit`` kernel on CPU
    tensors (see the module docstring). The launcher's ``last_run`` says what ran."""
    return _Launcher(kernel)
