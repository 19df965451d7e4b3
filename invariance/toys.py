"""Analytic toy networks with hand-set weights, and the images they are meant to be measured on.

The theory, made executable (summary of ``docs/proof.md``)
-----------------------------------------------------------
*Statement.* Let ``Γ`` be a CNN layer and ``T_h`` a spatial transformation of the image. A purely
spatial warp ``W_g`` of the feature maps can undo ``T_h`` (``W_g Γ T_h f ≈ Γ f``, docs/definitions.md,
"The question") for translations always, for rotations only when the features are rotation
invariant, and for rescalings in general never. Two intuitions carry the argument:

1. *"W" becomes "M".* A 180° rotation turns a W into an M, so a *different channel* responds. A
   warp moves values within each channel and cannot move the response back into the W
   channel: with exclusive (thresholded) detectors the spatial error is at least 1, exactly,
   while the W <-> M swap plus the rotation aligns the maps (:class:`WMNet`;
   ``test_wm_rotation_180_moves_the_response_to_the_other_channel``). With the four 90°
   rotations of one filter (:class:`P4Net`) a 90° rotation is a cyclic channel shift
   (``test_p4_lattice_rotation_is_a_cyclic_channel_shift``), and generic random filters behave
   the same way without the exact bookkeeping
   (``test_random_cnns_with_generic_filters_are_not_alignable``).
2. *A fixed-size filter never covers the rescaled object.* Gaussian-derivative filters at one
   scale (:class:`GaussianJetNet`) see a rescaled image at another level of its scale space:
   the *values* of the maps change and no warp recovers them. For a Gaussian blob the smallest
   error over all warps is known in closed form (:func:`gaussian_blob_scale_error`), positive
   and growing with ``|log s|`` (``test_scale_error_of_a_gaussian_blob_follows_the_continuum_answer``,
   ``test_fixed_scale_filters_are_not_alignable_under_rescaling``). The same filters at several
   scales (:class:`ScaleChannelNet`) turn the rescaling into a shift along the channel axis,
   which a channel shift undoes (``test_scale_channels_turn_a_rescaling_into_a_channel_shift``).

Controls: rotationally symmetric filters (:class:`IsotropicNet`) are alignable under any
rotation down to the interpolation floor (``test_isotropic_filters_are_alignable_under_any_rotation``);
stride-1 stacks with circular padding (:class:`CircularNet`) align integer circular shifts
exactly (``test_circular_stacks_align_integer_translations_exactly``); and the input itself
(the identity network) is alignable under every transformation
(``test_the_input_layer_is_alignable_under_any_transformation``), which is why a spatial
transformer that warps the *input* can support invariance and one that warps deeper feature
maps in general cannot. The tests are in ``tests/test_theory.py``; ``tests/test_toys.py`` pins
the construction of each toy with exact identities.

Built-in models (registered with :func:`invariance.models.register_model` on import)
-------------------------------------------------------------------------------------
* ``toy-wm``: :class:`WMNet`, images ``glyphs`` (48x48 scenes of W or M), layers ``detect``,
  ``rectify``, ``pool``.
* ``toy-scale``: :class:`GaussianJetNet`, images ``blobs``, layer ``jet``.
* ``toy-scale-channels``: :class:`ScaleChannelNet`, images ``blobs``, layer ``jet``.
* ``toy-isotropic``: :class:`IsotropicNet`, images ``blobs``, layers ``conv1, relu1, conv2, relu2``.
* ``toy-p4``: :class:`P4Net`, images ``blobs``, layers ``lift, relu``.
* ``toy-circular``: :class:`CircularNet`, images ``blobs``, layers ``conv1, relu1, conv2, relu2``.

Image sources (:func:`make_images`): ``glyphs`` (one letter per scene, W or M, at a random
position and size inside the central disk, anti-aliased strokes) and ``blobs`` (smooth random
anisotropic Gaussian blobs inside a central disk, exactly zero outside it).

Conventions follow :mod:`invariance.geometry`: ``(x, y)`` with y pointing down, rotations
counter-clockwise as displayed (``torch.rot90(k=1, dims=(-2, -1))`` is ``rotation:90``).
``conv2d`` computes a correlation, so a weight that should *convolve* with a kernel holds the
kernel flipped (done by :func:`gaussian_derivative_kernel`).

>>> import torch
>>> net = WMNet()
>>> scene = make_images("glyphs", 2, seed=0, letters="W")
>>> out = net(scene)                         # (2, 2, 24, 24): channel 0 = W, 1 = M, pooled
>>> bool((out[:, 0].amax((1, 2)) > 0).all()), bool((out[:, 1] == 0).all())
(True, True)
>>> rotated = torch.rot90(scene, 2, dims=(-2, -1))          # a W rotated by 180° is an M
>>> bool((net(rotated)[:, 0] == 0).all()), bool((net(rotated)[:, 1].amax((1, 2)) > 0).all())
(True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .models import ModelInfo, register_model

__all__ = [
    "W_VERTICES",
    "JET_ORDERS",
    "gaussian_derivative_kernel",
    "gaussian_blob_scale_error",
    "render_polyline",
    "glyph_scene",
    "make_glyph_images",
    "make_blob_images",
    "make_images",
    "IMAGE_SOURCES",
    "Rectify",
    "WMNet",
    "GaussianJetNet",
    "ScaleChannelNet",
    "IsotropicNet",
    "P4Net",
    "CircularNet",
]

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


# ----------------------------------------------------------------------------- glyph images

W_VERTICES = torch.tensor([(-1.0, -0.7), (-0.5, 0.7), (0.0, 0.1), (0.5, 0.7), (1.0, -0.7)], dtype=torch.float64)
"""The W glyph as a polyline in glyph units ``(x, y)``, y down: two tall outer strokes and a short
middle apex (which keeps a W-detector's response to any part of an M below 0.4 of its response to
a W). The M glyph is this polyline rotated by 180° (``-W_VERTICES``)."""

_GLYPH_SIZE = 6.0  # half-width in pixels of the glyph the detectors are built from
_GLYPH_HALF_STROKE = 1.0
_GLYPH_EXTENT = 1.25  # bounding radius of the glyph in glyph units (sqrt(1 + 0.7^2) = 1.22)


def render_polyline(vertices: torch.Tensor, size: Sequence[int], *, half_width: float = _GLYPH_HALF_STROKE,
                    dtype=None) -> torch.Tensor:
    """Anti-aliased stroke along a polyline given in the **centred** frame (pixels, y down).

    The intensity of a pixel is ``clamp(half_width + 1/2 - d, 0, 1)`` with ``d`` the exact
    distance from the pixel centre to the polyline: a stroke ``2 half_width`` pixels wide with a
    one-pixel linear edge. Returns ``(H, W)``.
    """
    h, w = (int(s) for s in size)
    v = torch.as_tensor(vertices, dtype=torch.float64)
    ys = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    d = torch.full((h, w), torch.inf, dtype=torch.float64)
    for a, b in zip(v[:-1], v[1:]):
        ab = b - a
        t = (((px - a[0]) * ab[0] + (py - a[1]) * ab[1]) / (ab @ ab).clamp_min(1e-12)).clamp(0, 1)
        d = torch.minimum(d, torch.hypot(px - a[0] - t * ab[0], py - a[1] - t * ab[1]))
    return (half_width + 0.5 - d).clamp(0, 1).to(dtype or torch.get_default_dtype())


def glyph_scene(size: Sequence[int], glyphs: Sequence[tuple[str, float, float, float]], *,
                dtype=None) -> torch.Tensor:
    """Render glyphs ``(letter, cx, cy, half_width)`` (centred frame, pixels) into one ``(H, W)`` scene.

    ``letter`` is ``"W"`` or ``"M"`` (the W rotated by 180°). Overlapping strokes take the maximum.
    """
    out = torch.zeros(tuple(int(s) for s in size), dtype=torch.float64)
    for letter, cx, cy, half in glyphs:
        if letter not in ("W", "M"):
            raise ValueError(f"letter: expected 'W' or 'M', got {letter!r}")
        base = W_VERTICES if letter == "W" else -W_VERTICES
        out = torch.maximum(out, render_polyline(base * half + torch.tensor([cx, cy], dtype=torch.float64), size,
                                                 dtype=torch.float64))
    return out.to(dtype or torch.get_default_dtype())


def _detector_window() -> int:
    return 2 * math.ceil(_GLYPH_SIZE + 2) + 1


def make_glyph_images(n: int, size: int | Sequence[int] = 48, seed: int = 0, *, letters: str = "WM",
                      n_glyphs: int = 1, scale_range: tuple[float, float] = (0.9, 1.1), disk: float = 0.85,
                      dtype=torch.float32, return_params: bool = False):
    """Scenes of W or M glyphs: ``(n, 1, H, W)`` in ``[0, 1]`` (and the glyph parameters if asked).

    Each scene holds up to ``n_glyphs`` glyphs of **one** letter, drawn per scene from
    ``letters`` (``"W"``, ``"M"`` or ``"WM"``), with half-width ``6 * u`` pixels,
    ``u ~ U(scale_range)``, at uniformly random positions such that the whole glyph lies inside
    the disk of radius ``disk`` (normalised units; so any rotation about the centre keeps it in
    the field of view) and any two glyphs are further apart than the detectors' window (so no
    detector window sees parts of two glyphs). One letter per scene matters: a scene with one W
    at ``p`` and one M at ``q`` becomes, rotated by 180°, an M at ``-p`` and a W at ``-q``,
    which the translation by ``p + q`` aligns channel by channel.

    >>> imgs, params = make_glyph_images(3, 48, seed=1, return_params=True)
    >>> imgs.shape, [len(p) for p in params]
    (torch.Size([3, 1, 48, 48]), [1, 1, 1])
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if n < 1:
        raise ValueError(f"n: must be at least 1, got {n}")
    if not set(letters) <= {"W", "M"} or not letters:
        raise ValueError(f"letters: expected a string of 'W' and/or 'M', got {letters!r}")
    rng = np.random.default_rng(seed)
    sep = _detector_window() + 2 * _GLYPH_EXTENT * _GLYPH_SIZE * scale_range[1]
    scenes, params = [], []
    for _ in range(n):
        letter = letters[rng.integers(len(letters))]
        placed: list[tuple[str, float, float, float]] = []
        for _k in range(n_glyphs):
            for _try in range(100):
                half = _GLYPH_SIZE * rng.uniform(*scale_range)
                # radius of the disk (pixels, per axis) that must hold the glyph's bounding circle
                rx = disk * w / 2 - _GLYPH_EXTENT * half - _GLYPH_HALF_STROKE - 0.5
                ry = disk * h / 2 - _GLYPH_EXTENT * half - _GLYPH_HALF_STROKE - 0.5
                if rx <= 0 or ry <= 0:
                    raise ValueError(f"size: {h}x{w} is too small for a glyph inside a disk of radius {disk}")
                rad, ang = math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
                cx, cy = rad * rx * math.cos(ang), rad * ry * math.sin(ang)
                if all(math.hypot(cx - p[1], cy - p[2]) > sep for p in placed):
                    placed.append((letter, cx, cy, half))
                    break
        scenes.append(glyph_scene((h, w), placed, dtype=dtype))
        params.append(placed)
    out = torch.stack(scenes)[:, None]
    return (out, params) if return_params else out


# ----------------------------------------------------------------------------- blob images


def make_blob_images(n: int, size: int | Sequence[int] = 48, seed: int = 0, *, n_blobs: tuple[int, int] = (3, 6),
                     sigma_range: tuple[float, float] = (1.5, 3.5), anisotropy: float = 2.0,
                     content_radius: float = 0.5, dtype=torch.float32) -> torch.Tensor:
    """Smooth random images ``(n, 1, H, W)``, exactly zero outside a central disk (a zero margin).

    Each image is a sum of ``n_blobs`` (inclusive range) anisotropic Gaussians: amplitude
    ``U(0.5, 1)``, standard deviations ``U(sigma_range)`` pixels along a random direction and up
    to ``anisotropy`` times that across it, centres uniform in the disk of radius
    ``0.7 content_radius`` (normalised units), multiplied by a smooth (``cos^2``) window that
    falls from 1 to exactly 0 over the outer ``max(0.2 content_radius, 3 px)`` of the disk of
    radius ``content_radius``. Generic
    (no symmetry); with ``content_radius <= 1 / s`` the content stays inside the field of view
    under rescaling by ``s`` and any rotation about the centre.

    >>> x = make_blob_images(2, 32, seed=0)
    >>> x.shape, bool(x[..., 0, :].abs().max() == 0)
    (torch.Size([2, 1, 32, 32]), True)
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if n < 1:
        raise ValueError(f"n: must be at least 1, got {n}")
    if not 0 < content_radius <= 1:
        raise ValueError(f"content_radius: must be in (0, 1], got {content_radius}")
    rng = np.random.default_rng(seed)
    ys = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    # the window lives in normalised coordinates (a disk of the field of view)
    r = torch.sqrt((px * 2 / w) ** 2 + (py * 2 / h) ** 2)
    taper = max(0.2 * content_radius, 6.0 / min(h, w))  # at least 3 pixels wide: smooth on the grid
    inner = max(content_radius - taper, 0.0)
    ramp = ((r - inner) / (content_radius - inner)).clamp(0, 1)
    window = torch.where(ramp < 1, torch.cos(ramp * math.pi / 2) ** 2, 0.0)  # exactly 0 outside
    out = []
    for _ in range(n):
        img = torch.zeros(h, w, dtype=torch.float64)
        for _k in range(int(rng.integers(n_blobs[0], n_blobs[1] + 1))):
            s1 = rng.uniform(*sigma_range)
            s2 = s1 * rng.uniform(1.0, anisotropy)
            phi = rng.uniform(0, math.pi)
            rad = min(w, h) / 2 * content_radius * 0.7 * math.sqrt(rng.uniform())
            ang = rng.uniform(0, 2 * math.pi)
            cx, cy = rad * math.cos(ang), rad * math.sin(ang)
            u = (px - cx) * math.cos(phi) + (py - cy) * math.sin(phi)
            v = -(px - cx) * math.sin(phi) + (py - cy) * math.cos(phi)
            img += rng.uniform(0.5, 1.0) * torch.exp(-(u**2) / (2 * s1**2) - v**2 / (2 * s2**2))
        out.append(img * window)
    return torch.stack(out)[:, None].to(dtype)


IMAGE_SOURCES = ("glyphs", "blobs")


def make_images(source: str, n: int, size: int | Sequence[int] | None = None, seed: int = 0, **kwargs) -> torch.Tensor:
    """Generate ``n`` images of an image source: ``"glyphs"`` (default 48x48) or ``"blobs"`` (48x48).

    Keyword arguments go to :func:`make_glyph_images` or :func:`make_blob_images`.

    >>> make_images("blobs", 4, 24, seed=3).shape
    torch.Size([4, 1, 24, 24])
    """
    size = 48 if size is None else size
    if source == "glyphs":
        return make_glyph_images(n, size, seed, **kwargs)
    if source == "blobs":
        return make_blob_images(n, size, seed, **kwargs)
    raise ValueError(f"source: unknown image source {source!r}; valid choices: {', '.join(IMAGE_SOURCES)}")


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
        k = _detector_window()
        template = render_polyline(W_VERTICES * _GLYPH_SIZE, (k, k), dtype=torch.float64)
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


# ----------------------------------------------------------------------------- registration

register_model("toy-wm", ModelInfo(
    WMNet, "W and M detectors (the M filter is the W filter rotated 180°) with a rectifying threshold",
    default_images="glyphs", default_layers="detect,rectify,pool"))
register_model("toy-scale", ModelInfo(
    GaussianJetNet, "scale-normalised Gaussian derivatives (2-jet) at one scale, sigma = 2 px",
    default_images="blobs", default_layers="jet"))
register_model("toy-scale-channels", ModelInfo(
    ScaleChannelNet, "the 2-jet at 5 scales (1 to 4 px): a rescaling shifts the channel axis",
    default_images="blobs", default_layers="jet"))
register_model("toy-isotropic", ModelInfo(
    IsotropicNet, "rotationally symmetric filters (Gaussians, Laplacians): rotation covariant",
    default_images="blobs", default_layers="conv1,relu1,conv2,relu2"))
register_model("toy-p4", ModelInfo(
    P4Net, "p4 lifting layer: the four 90° rotations of one filter; 90° rotations permute channels",
    default_images="blobs", default_layers="lift,relu"))
register_model("toy-circular", ModelInfo(
    CircularNet, "stride-1 convolutions with circular padding: exactly translation covariant",
    default_images="blobs", default_layers="conv1,relu1,conv2,relu2"))
