"""CUDA checks (run by ``benchmarks/gpu_suite.sh`` on a GPU machine; skipped where there is no GPU).

Each compares the device path with the CPU path on the same inputs; tolerances are float32
rounding of the operations involved (stated per test).
"""

from __future__ import annotations

import pytest
import torch

from invariance import SearchConfig, align, load_digits
from invariance import geometry as G
from stn import StepSchedule, TransformedDataset, build_model, get_protocol, train_together

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available")


@cuda
def test_cuda_align_matches_cpu():
    """The search on CUDA (float32) finds the same optimum as on the CPU (float64): errors agree to
    1e-4 (float32 FFT sums over ~1e3 positions carry relative errors ~1e-6 of the energy; the
    refinement's end points may differ by rounding, which moves the error by far less than 1e-4)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.avg_pool2d(torch.rand(4, 8, 24, 24, generator=g, dtype=torch.float64), 3, 1, 1)
    t = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([30.0, 1.0, -2.0], dtype=torch.float64)), (24, 24))
    from invariance import warp

    mov = warp(ref, t)
    cfg = SearchConfig(n_angles=36)
    cpu = align(ref, mov, "rigid", config=cfg)
    dev = align(ref.float().cuda(), mov.float().cuda(), "rigid", config=cfg)
    torch.testing.assert_close(dev.errors.cpu(), cpu.errors, atol=1e-4, rtol=0)


@cuda
def test_cuda_rendering_matches_cpu():
    """The transformed digits rendered on the GPU equal the CPU's to float32 rounding of bilinear
    interpolation.

    Both compute each sample's source coordinate in the normalised frame, where it has magnitude at
    most ``M`` (rotation: the corners, sqrt 2; translation: 1 + 2 x max shift / canvas; scale: the
    largest zoom-out, 1 / smallest scale = 2), from about 8 float32 roundings (base grid, the
    affine product and sum, the unnormalisation), each within eps/2 relative of ``M``; scaled by
    canvas / 2 into pixels, two devices' coordinates differ by at most ``8 eps M canvas / 2`` px per
    axis. A value in [0, 1] moves by at most that difference times its largest neighbour difference
    (1) per axis, plus the blend's own rounding (4 eps): ``tol = 8 eps M canvas + 4 eps`` (3.8e-5 at
    28 px rotation, 8.7e-5 at 60 px translation, 2.1e-4 at 112 px scale). A convention error (half a
    pixel, a flipped axis) moves values by 1e-1 or more. (The first GPU run compared at a flat 1e-5
    and saw 1.5e-5 at 2 of 200,704 values of the scale protocol.)"""
    eps = torch.finfo(torch.float32).eps
    imgs, labels = load_digits()
    for name in ("rotation", "scale", "translation"):
        p = get_protocol(name)
        reach = {"rotation": 2 ** 0.5, "translation": 1 + 2 * p.max_shift / p.canvas,
                 "scale": 2.0 ** -p.log2_scale[0]}[name]
        a = TransformedDataset(imgs[:16], labels[:16], p, seed=3, device="cpu")
        b = TransformedDataset(imgs[:16], labels[:16], p, seed=3, device="cuda")
        xa, _, _ = next(a.batches(0, 16))
        xb, _, _ = next(b.batches(0, 16))
        torch.testing.assert_close(xb.cpu(), xa, atol=8 * eps * reach * p.canvas + 4 * eps, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


@cuda
def test_cuda_training_together_matches_cpu_and_amp_trains():
    """One float32 step of the budgeted trainer on CUDA gives the CPU's loss to 1e-4 (float32
    convolutions reorder sums); with bfloat16 autocast and channels-last, 30 steps lower the
    training loss (the path that the GPU budget runs actually learns)."""
    imgs, labels = load_digits()
    ds_cpu = TransformedDataset(imgs, labels, get_protocol("rotation"), seed=0, device="cpu")
    ds_gpu = TransformedDataset(imgs, labels, get_protocol("rotation"), seed=0, device="cuda")
    losses = {}
    for dev, ds in (("cpu", ds_cpu), ("cuda", ds_gpu)):
        torch.manual_seed(0)
        m = build_model("STN-SL1", family="rotation").to(dev)
        h = train_together({0: (ds, {"m": m})}, StepSchedule(steps=1, lr=0.01), batch_size=64, log_every=1,
                           amp=False, channels_last=False, progress=False, log=None)
        losses[dev] = h["m"][0]["train_loss"]
    assert abs(losses["cuda"] - losses["cpu"]) < 1e-4
    torch.manual_seed(0)
    m = build_model("STN-SL1", family="rotation").cuda()
    h = train_together({0: (ds_gpu, {"m": m})}, StepSchedule(steps=30, lr=0.02), batch_size=64, log_every=10,
                       amp=True, channels_last=True, progress=False, log=None)
    assert h["m"][-1]["train_loss"] < h["m"][0]["train_loss"]
