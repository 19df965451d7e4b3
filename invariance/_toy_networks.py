"""The toy networks with hand-set weights, and their filters (see :mod:`invariance.toys`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ._toy_images import GLYPH_SIZE, W_VERTICES, detector_window, render_polyline

__all__ = ["JET_ORDERS", "gaussian_derivative_kernel", "gaussian_blob_scale_error", "Rectify", "WMNet",
           "GaussianJetNet", "ScaleChannelNet", "IsotropicNet", "P4Net", "C8Net", "CircularNet"]

# ----------------------------------------------------------------------------- kernels

JET_ORDERS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2))
"""Derivative orders ``(n_x, n_y)`` of the 2-jet: L, Lx, Ly, Lxx, Lxy, Lyy."""


def _hermite(n: int, u: torch.Tensor, sigma: float) -> torch.Tensor:
    """``d^n/du^n exp(-u^2 / 2 sigma^2)`` divided by the Gaussian itself (n <= 2)."""
    if n == 0:
        return torch.ones_like(u)
    if n == 1:
        return -u / sigma**2
    if n == 2:
        return u**2 / sigma**4 - 1 / sigma**2
    raise ValueError(f"order: derivative orders up to 2 are supported, got {n}")


def gaussian_derivative_kernel(sigma: float, order: tuple[int, int] = (0, 0), *, radius: int | None = None,
                               normalized: bool = True, dtype=None) -> torch.Tensor:
    """A sampled Gaussian derivative ``sigma^(nx+ny) d^nx/dx^nx d^ny/dy^ny g_sigma``, as a conv2d weight.

    The kernel is sampled at integer offsets ``(x, y)`` in ``[-radius, radius]`` (default
    ``ceil(4 sigma)``, which keeps all but ``exp(-8)`` of the Gaussian's mass) and is **flipped**
    so that ``conv2d`` (a correlation) computes the derivative of the smoothed image:
    ``conv2d(f, k) = sigma^n d^n (g_sigma * f)``. With ``normalized=True`` the factor
    ``sigma^(nx+ny)`` makes the derivatives scale normalised (Lindeberg, gamma = 1): for an image
    rescaled by ``s`` the response at ``sigma`` equals the response of the original at
    ``sigma / s``, moved by the rescaling. Returns ``(2 radius + 1, 2 radius + 1)``; rows are y.

    >>> k = gaussian_derivative_kernel(2.0, (1, 0), dtype=torch.float64)
    >>> f = torch.arange(21.0, dtype=torch.float64).expand(21, 21)[None, None]   # f = x
    >>> round(torch.nn.functional.conv2d(f, k[None, None])[0, 0, 0, 0].item(), 2)  # sigma * d/dx
    2.0
    """
    if not sigma > 0:
        raise ValueError(f"sigma: must be positive, got {sigma}")
    r = int(math.ceil(4 * sigma)) if radius is None else int(radius)
    dt = dtype or torch.get_default_dtype()
    u = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-(u**2) / (2 * sigma**2)) / math.sqrt(2 * math.pi * sigma**2)
    kx = g * _hermite(order[0], u, sigma)
    ky = g * _hermite(order[1], u, sigma)
    k = ky[:, None] * kx[None, :]
    if normalized:
        k = k * sigma ** (order[0] + order[1])
    return torch.flip(k, (0, 1)).to(dt)


_MOMENTS = {(0, 0): 1.0, (1, 0): 0.5, (0, 1): 0.5, (2, 0): 0.75, (1, 1): 0.25, (0, 2): 0.75}


def gaussian_blob_scale_error(scale: float, blob_sigma: float, sigma: float = 2.0,
                              orders: Sequence[tuple[int, int]] = JET_ORDERS) -> tuple[float, float]:
    """The known answer for :class:`GaussianJetNet`: the continuum spatial error of a Gaussian blob.

    The image is ``f(x) = exp(-|x|^2 / 2 t^2)`` (``t = blob_sigma``), the layer the
    scale-normalised jet at ``sigma`` (channels ``orders``), the transformation a rescaling by
    ``s``, and the warps rescalings by ``c`` (translations cannot help: for a centred blob
    every channel's cross-correlation has a non-negative spectrum and peaks at zero shift). In
    the Fourier domain (Parseval) the channel ``alpha`` (order ``n = |alpha|``) of the reference
    is ``sigma^n (i w)^alpha exp(-T |w|^2 / 2)`` with ``T = t^2 + sigma^2``, and the warped
    transformed map is ``s^2 c^(2+n)`` times the same with ``U = c^2 (s^2 t^2 + sigma^2)``, so
    with ``I_alpha(p) = (pi / p) m_alpha / p^n`` (``m`` = 1, 1/2, 1/2, 3/4, 1/4, 3/4)::

        e(c) = sum_a sigma^2n [a^2 I(U) - 2 a I((U + T) / 2) + I(T)] / sum_a sigma^2n I(T),
        a = s^2 c^(2+n).

    Returns ``(min_c e(c), argmin c)`` (``c`` on a grid of step 0.001 in ``log c``). The
    minimum is > 0 for every ``s != 1`` and increases with ``|log s|``: the values of the maps
    change (the blob is seen at another scale of its scale space) and no warp recovers them.

    >>> e, c = gaussian_blob_scale_error(2.0, 2.0)
    >>> round(e, 3), round(c, 2)
    (0.157, 0.55)
    >>> gaussian_blob_scale_error(1.0, 2.0)[0] < 1e-9
    True
    """
    if not scale > 0 or not blob_sigma > 0 or not sigma > 0:
        raise ValueError("scale, blob_sigma and sigma must be positive")
    t2, s2 = blob_sigma**2, sigma**2
    big_t = t2 + s2
    log_c = np.linspace(-3.0, 3.0, 6001)
    c = np.exp(log_c)
    u = c**2 * (scale**2 * t2 + s2)
    num = np.zeros_like(c)
    den = 0.0
    for o in orders:
        n = o[0] + o[1]
        m = _MOMENTS[tuple(o)]

        def moment(p, n=n, m=m):
            return np.pi / p * m / p**n

        a = scale**2 * c ** (2 + n)
        num += s2**n * (a**2 * moment(u) - 2 * a * moment((u + big_t) / 2) + moment(big_t))
        den += s2**n * moment(big_t)
    e = num / den
    i = int(np.argmin(e))
    return float(max(e[i], 0.0)), float(c[i])


def _pad_kernel(k: torch.Tensor, size: int) -> torch.Tensor:
    p = (size - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p))


# ----------------------------------------------------------------------------- the networks


class Rectify(nn.Module):
    """``relu(x - threshold)``: keeps only responses above ``threshold`` (a rectifying threshold)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class WMNet(nn.Module):
    """The W/M detector network (``toy-wm``): ``detect`` -> ``rectify`` -> ``pool``.

    * ``detect``: ``Conv2d(1, 2, 17, padding=8, bias=False)``. Channel 0 is a W template (the W
      glyph of half-width 6 px rendered by :func:`render_polyline`, minus its mean), scaled so
      that its response to the W it was built from (its *self-response*) is 1. Channel 1 is
      the same filter rotated by 180°: an M detector.
    * ``rectify``: :class:`Rectify` at 0.7 of the self-response. A W glyph of half-width 5.4 to
      6.6 px drives the W channel to at least 0.78 and the M channel to at most 0.39 at any
      position (sub-pixel offsets included), so after ``rectify`` exactly one channel is non-zero.
    * ``pool``: ``MaxPool2d(2)``.

    Under a 180° rotation about the centre (exact on the pixel grid), the W channel of the
    rotated scene equals the M channel of the original rotated by 180°, and vice versa.
    """

    threshold = 0.7

    def __init__(self):
        super().__init__()
        k = detector_window()
        template = render_polyline(W_VERTICES * GLYPH_SIZE, (k, k), dtype=torch.float64)
        wfilt = template - template.mean()
        wfilt = wfilt / (wfilt * template).sum()  # self-response 1
        weight = torch.stack([wfilt, torch.rot90(wfilt, 2, (0, 1))])[:, None]
        self.detect = nn.Conv2d(1, 2, k, padding=k // 2, bias=False)
        self.rectify = Rectify(self.threshold)
        self.pool = nn.MaxPool2d(2)
        with torch.no_grad():
            self.detect.weight.copy_(weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.rectify(self.detect(x)))


class GaussianJetNet(nn.Module):
    """Scale-normalised Gaussian derivatives at one scale (``toy-scale``): the layer ``jet``.

    ``jet`` is ``Conv2d(1, 6, 2 ceil(4 sigma) + 1)`` (zero padding, same size) whose channels are
    ``L, Lx, Ly, Lxx, Lxy, Lyy`` (:data:`JET_ORDERS`) at ``sigma`` (default 2 px), each multiplied
    by ``sigma^order``. For an image rescaled by ``s``, ``W_{1/s}`` of the maps is the same jet
    at ``sigma / s``: a different set of values, which no warp recovers.
    """

    def __init__(self, sigma: float = 2.0):
        super().__init__()
        self.sigma = float(sigma)
        kernels = torch.stack([gaussian_derivative_kernel(sigma, o, dtype=torch.float64) for o in JET_ORDERS])
        k = kernels.shape[-1]
        self.jet = nn.Conv2d(1, len(JET_ORDERS), k, padding=k // 2, bias=False)
        with torch.no_grad():
            self.jet.weight.copy_(kernels[:, None].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.jet(x)


class ScaleChannelNet(nn.Module):
    """The same scale-normalised 2-jet at several scales (``toy-scale-channels``): the layer ``jet``.

    Scales ``sigma_j = sigma_min * ratio^j`` (default 1, sqrt 2, 2, 2 sqrt 2, 4 px); channel
    ``6 j + i`` holds order :data:`JET_ORDERS` ``[i]`` at ``sigma_j`` (scale-major). A rescaling
    of the image by ``s = ratio^k`` maps, after the warp ``W_{1/s}``, the channels of scale
    ``j`` onto those of scale ``j - k`` of the original: a shift by ``k`` scale steps along the
    channel axis (:meth:`channel_shift`).
    """

    def __init__(self, sigma_min: float = 1.0, ratio: float = math.sqrt(2.0), n_scales: int = 5):
        super().__init__()
        self.sigmas = tuple(float(sigma_min * ratio**j) for j in range(n_scales))
        self.ratio = float(ratio)
        big = gaussian_derivative_kernel(self.sigmas[-1]).shape[-1]
        kernels = torch.stack([_pad_kernel(gaussian_derivative_kernel(s, o, dtype=torch.float64), big)
                               for s in self.sigmas for o in JET_ORDERS])
        self.jet = nn.Conv2d(1, kernels.shape[0], big, padding=big // 2, bias=False)
        with torch.no_grad():
            self.jet.weight.copy_(kernels[:, None].float())

    def channel_shift(self, scale: float) -> int:
        """The number of scale steps ``k`` (``scale = ratio^k``); raises if ``scale`` is off the grid."""
        k = math.log(scale) / math.log(self.ratio)
        if abs(k - round(k)) > 1e-6:
            raise ValueError(f"scale: {scale} is not a power of the scale ratio {self.ratio}")
        return int(round(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.jet(x)


class IsotropicNet(nn.Module):
    """Rotationally symmetric filters only (``toy-isotropic``): the rotation-covariant control.

    ``conv1``: a Gaussian (sigma 1.5) and scale-normalised Laplacians of Gaussians
    (``sigma^2 (Lxx + Lyy)``) at sigma 1.5 and 3, with biases; ``relu1``; ``conv2`` mixes the
    three channels into three with isotropic kernels (Gaussians of sigma 1 and a Laplacian of
    Gaussian, weights given in the code); ``relu2``. Every filter is a function of the radius
    only, so the whole network commutes with rotations up to sampling.
    """

    def __init__(self):
        super().__init__()

        def log_kernel(sigma, size):
            k = gaussian_derivative_kernel(sigma, (2, 0), radius=size // 2, dtype=torch.float64)
            return k + gaussian_derivative_kernel(sigma, (0, 2), radius=size // 2, dtype=torch.float64)

        k1 = 2 * math.ceil(4 * 3.0) + 1
        w1 = torch.stack([gaussian_derivative_kernel(1.5, radius=k1 // 2, dtype=torch.float64),
                          -log_kernel(1.5, k1), -log_kernel(3.0, k1)])[:, None]
        self.conv1 = nn.Conv2d(1, 3, k1, padding=k1 // 2)
        self.relu1 = nn.ReLU()
        k2 = 9
        g = gaussian_derivative_kernel(1.0, radius=4, dtype=torch.float64)
        lg = -log_kernel(1.0, k2)
        mix = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.5, 0.0, 1.0]], dtype=torch.float64)
        base = [g, lg, g]
        w2 = torch.stack([torch.stack([mix[o, i] * base[o] for i in range(3)]) for o in range(3)])
        self.conv2 = nn.Conv2d(3, 3, k2, padding=k2 // 2)
        self.relu2 = nn.ReLU()
        with torch.no_grad():
            self.conv1.weight.copy_(w1.float())
            self.conv1.bias.copy_(torch.tensor([-0.05, 0.0, 0.0]))
            self.conv2.weight.copy_(w2.float())
            self.conv2.bias.copy_(torch.tensor([0.0, -0.01, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


def _p4_base(size: int = 7) -> torch.Tensor:
    """The base filter of :class:`P4Net`: an edge detector with an off-axis lobe (no rotation symmetry)."""
    dx = gaussian_derivative_kernel(1.2, (1, 0), radius=size // 2, dtype=torch.float64)
    lobe = torch.zeros(size, size, dtype=torch.float64)
    c = size // 2
    lobe[c - 2, c + 1] = 0.6  # above-right of the centre
    return dx + lobe


class P4Net(nn.Module):
    """A group-equivariant lifting layer (``toy-p4``): ``lift`` -> ``relu``.

    ``lift`` is ``Conv2d(1, 4, 7, padding=3)`` whose channel ``k`` holds the base filter rotated
    by ``k * 90°`` (``torch.rot90(base, k)``, counter-clockwise as displayed), with a shared bias.
    The base filter (an x-derivative of a Gaussian plus an off-axis lobe) has no rotational
    symmetry. Rotating the image by 90° rotates every map by 90° and moves channel ``k - 1`` to
    channel ``k``: the channel orbit is the 4-cycle.
    """

    def __init__(self):
        super().__init__()
        base = _p4_base()
        weight = torch.stack([torch.rot90(base, k, (0, 1)) for k in range(4)])[:, None]
        self.lift = nn.Conv2d(1, 4, base.shape[-1], padding=base.shape[-1] // 2)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.lift.weight.copy_(weight.float())
            self.lift.bias.fill_(-0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.lift(x))


class CircularNet(nn.Module):
    """A stride-1 stack with circular padding (``toy-circular``): exactly translation covariant.

    ``conv1`` (1 -> 4, 5x5): Gaussian derivatives ``Lx, Ly, Lxx, Lyy`` at sigma 1; ``relu1``;
    ``conv2`` (4 -> 4, 3x3): a fixed mix of the channels with a one-pixel offset per channel;
    ``relu2``. Every convolution pads circularly, so a circular shift of the input
    (``torch.roll``) shifts every map by the same number of pixels, for any image content.
    """

    def __init__(self):
        super().__init__()
        orders = ((1, 0), (0, 1), (2, 0), (0, 2))
        ks = [gaussian_derivative_kernel(1.0, o, radius=2, dtype=torch.float64) for o in orders]
        self.conv1 = nn.Conv2d(1, 4, 5, padding=2, padding_mode="circular")
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.relu2 = nn.ReLU()
        w2 = torch.zeros(4, 4, 3, 3, dtype=torch.float64)
        offsets = [(0, 1), (1, 2), (2, 1), (1, 0)]  # (row, col) of each output channel's tap
        for o in range(4):
            for i in range(4):
                w2[o, i, offsets[(o + i) % 4][0], offsets[(o + i) % 4][1]] = 1.0 if i == o else -0.5
        with torch.no_grad():
            self.conv1.weight.copy_(torch.stack(ks)[:, None].float())
            self.conv1.bias.zero_()
            self.conv2.weight.copy_(w2.float())
            self.conv2.bias.fill_(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


class C8Net(nn.Module):
    """A C8 lifting layer of steerable filters (``toy-c8``): ``lift`` -> ``relu``.

    ``lift`` is ``Conv2d(1, 8, 9, padding=4)`` whose channel ``k`` holds the base filter turned
    by ``k * 45°``: with Gaussian derivatives at sigma 1.5, ``cos(a) Lx + sin(a) Ly + 0.5 (cos(2a)
    (Lxx - Lyy) / 2 + sin(2a) Lxy)`` at ``a = k * 45°``. Directional derivatives of a sampled
    Gaussian steer exactly, so each channel is the base filter rotated about its centre, sample by
    sample, not an interpolation of it. Rotating the image by 45° (up to the image's own
    resampling) rotates every map and moves channel ``k`` to channel ``k + 1``: the channel orbit
    is the 8-cycle. Under an infinitesimal rotation the channels turn into one another
    continuously, which no warp of the maps explains.
    """

    def __init__(self):
        super().__init__()
        kw = dict(radius=4, dtype=torch.float64)
        lx, ly = gaussian_derivative_kernel(1.5, (1, 0), **kw), gaussian_derivative_kernel(1.5, (0, 1), **kw)
        lxx, lyy = gaussian_derivative_kernel(1.5, (2, 0), **kw), gaussian_derivative_kernel(1.5, (0, 2), **kw)
        lxy = gaussian_derivative_kernel(1.5, (1, 1), **kw)
        # a = k * 45° counter-clockwise as displayed (y down): the direction (cos a, -sin a) in (x, y)
        weights = []
        for k in range(8):
            a = k * math.pi / 4
            weights.append(math.cos(a) * lx - math.sin(a) * ly
                           + 0.5 * (math.cos(2 * a) * (lxx - lyy) / 2 - math.sin(2 * a) * lxy))
        weight = torch.stack(weights)[:, None]
        self.lift = nn.Conv2d(1, 8, weight.shape[-1], padding=weight.shape[-1] // 2)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.lift.weight.copy_(weight.float())
            self.lift.bias.fill_(-0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.lift(x))
