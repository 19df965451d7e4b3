"""Op counts of a piece of work and the device rates that turn them into seconds (the GPU suite's plan).

:func:`count` runs a callable under torch's dispatcher and tallies what the device will have to
do: the aten operators (each at least one kernel launch), the host synchronisations, the FFT
floating-point operations (``2.5 N log2 N`` per real transform of ``N`` points, ``5 N log2 N``
per complex one, the usual count), the dense ones (matrix products and convolutions, counted by
``torch.utils.flop_counter``) and the bytes every operator but a view writes. :func:`rates` measures, on a
device, the four prices of that work (seconds per operator launch, FFT and matmul FLOP/s, memory
bandwidth) with micro-benchmarks of a few hundred milliseconds, and :func:`seconds` adds them up:

    t = ops * launch + syncs * sync + fft_flops / fft_rate + dense_flops / mm_rate + 2 * bytes / bandwidth

a sum, not a maximum, so an estimate errs long (a GPU overlaps launches with compute): a plan
that fits with this model fits the lease.

>>> import torch
>>> c = count(lambda: torch.fft.rfft2(torch.ones(4, 8, 8)))
>>> c.ops >= 1 and round(c.fft_flops) == 4 * round(2.5 * 64 * 6)
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
            "aten.lift_fresh")
FFT_OPS = {"aten._fft_r2c": 2.5, "aten._fft_c2r": 2.5, "aten._fft_c2c": 5.0}


@dataclass
class OpCount:
    """What a piece of work asks of the device (see the module's docstring)."""

    ops: float = 0.0
    syncs: float = 0.0
    fft_flops: float = 0.0
    dense_flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: OpCount) -> OpCount:
        return OpCount(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def __mul__(self, k: float) -> OpCount:
        return OpCount(**{n: v * k for n, v in asdict(self).items()})

    __rmul__ = __mul__

    def __sub__(self, other: OpCount) -> OpCount:
        return OpCount(**{k: max(0.0, v - getattr(other, k)) for k, v in asdict(self).items()})


class _Tally(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.c = OpCount()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.c.ops += 1
        if name.startswith(SYNC_OPS):
            self.c.syncs += 1
        if name in FFT_OPS:
            x, dims = args[0], args[1]
            n = math.prod(x.shape[d] for d in dims) if name != "aten._fft_c2r" else \
                math.prod(out.shape[d] for d in dims)
            self.c.fft_flops += FFT_OPS[name] * (x.numel() if name != "aten._fft_c2r" else out.numel()) \
                * math.log2(max(n, 2))
        if not func.is_view:  # a view writes nothing
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.c.bytes += t.numel() * t.element_size()
        return out


def count(fn: Callable[[], object]) -> OpCount:
    """The op count of one call of ``fn`` (which runs, on whatever device its tensors live)."""
    flops = FlopCounterMode(display=False)
    with flops, _Tally() as tally:
        fn()
    tally.c.dense_flops = float(flops.get_total_flops())
    return tally.c


@dataclass
class Rates:
    """The prices of work on one device (measured by :func:`rates`)."""

    device: str
    launch: float  # seconds per operator
    sync: float  # seconds per host synchronisation
    fft: float  # FFT FLOP/s
    mm: float  # matmul FLOP/s (float32; bfloat16 where training uses it is faster: errs long)
    bandwidth: float  # bytes/s


def elapsed(fn, dev: torch.device) -> float:
    """Seconds of one call of ``fn``, the device's queue drained before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _timed(fn, dev: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up (kernels, plans, allocator)
    return sorted(elapsed(fn, dev) for _ in range(repeats))[repeats // 2]


def rates(device: str | torch.device = "cpu") -> Rates:
    """Measure the device's prices with micro-benchmarks (well under a second each)."""
    dev = torch.device(device)
    small = torch.zeros(16, device=dev)
    n_launch = 200
    launch = _timed(lambda: [small.add_(1.0) for _ in range(n_launch)], dev) / n_launch
    sync = _timed(lambda: [small.sum().item() for _ in range(50)], dev) / 50
    big = 4 if dev.type == "cpu" else 64
    x = torch.randn(big, 64, 32, 32, device=dev)
    fft_flops = 2 * 2.5 * x.numel() * math.log2(32 * 32)
    fft = fft_flops / _timed(lambda: torch.fft.irfft2(torch.fft.rfft2(x), s=(32, 32)), dev)
    n = 512 if dev.type == "cpu" else 4096
    a = torch.randn(n, n, device=dev)
    mm = 2 * n**3 / _timed(lambda: a @ a, dev)
    v = torch.empty((64 if dev.type == "cpu" else 512) * 2**20 // 4, device=dev)
    w = torch.empty_like(v)
    bandwidth = 2 * v.numel() * 4 / _timed(lambda: w.copy_(v), dev)
    return Rates(str(dev), launch, sync, fft, mm, bandwidth)


def seconds(c: OpCount, r: Rates) -> float:
    """The estimated seconds of work ``c`` at prices ``r`` (the module docstring's sum)."""
    return (c.ops * r.launch + c.syncs * r.sync + c.fft_flops / r.fft + c.dense_flops / r.mm
            + 2 * c.bytes / r.bandwidth)
