"""The bare-FFT bound of a run: record every ``rfft2`` / ``irfft2`` it calls, then time them alone."""

from __future__ import annotations

import contextlib
import time

import torch


@contextlib.contextmanager
def recorded_ffts():
    """Within the block, every ``torch.fft.rfft2`` / ``irfft2`` call is recorded as ``(name, input
    shape, dtype, s)`` in the yielded list (and still computed).

    >>> with recorded_ffts() as calls:
    ...     _ = torch.fft.rfft2(torch.zeros(2, 4, 4), s=(6, 6))
    >>> calls
    [('rfft2', (2, 4, 4), torch.float32, (6, 6))]
    """
    calls: list = []
    real = {"rfft2": torch.fft.rfft2, "irfft2": torch.fft.irfft2}

    def spy(name):
        def fn(x, *a, s=None, **k):
            calls.append((name, tuple(x.shape), x.dtype, s))
            return real[name](x, *a, s=s, **k)
        return fn

    torch.fft.rfft2, torch.fft.irfft2 = spy("rfft2"), spy("irfft2")
    try:
        yield calls
    finally:
        torch.fft.rfft2, torch.fft.irfft2 = real["rfft2"], real["irfft2"]


def time_ffts(calls, device="cpu", repeats: int = 1) -> float:
    """Seconds the recorded ``calls`` take alone (median of ``repeats`` after one warm-up), on inputs
    allocated beforehand, one per distinct shape."""
    inputs = {}
    for _, shape, dt, _ in calls:
        if (shape, dt) not in inputs:
            inputs[(shape, dt)] = torch.randn(shape, dtype=dt, device=device)
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for name, shape, dt, s in calls:
            getattr(torch.fft, name)(inputs[(shape, dt)], s=s)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    rest = sorted(times[1:]) if repeats > 0 else times
    return rest[len(rest) // 2]
