"""The toys' images: W/M glyph scenes and smooth random blobs (see :mod:`invariance.toys`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .checks import check_size

__all__ = ["W_VERTICES", "GLYPH_SIZE", "GLYPH_HALF_STROKE", "GLYPH_EXTENT", "detector_window",
           "render_polyline", "glyph_scene", "make_glyph_images", "make_blob_images", "make_images",
           "IMAGE_SOURCES"]

# ----------------------------------------------------------------------------- glyph images

W_VERTICES = torch.tensor([(-1.0, -0.7), (-0.5, 0.7), (0.0, 0.1), (0.5, 0.7), (1.0, -0.7)], dtype=torch.float64)
"""The W glyph as a polyline in glyph units ``(x, y)``, y down: two tall outer strokes and a short
middle apex (which keeps a W-detector's response to any part of an M below 0.4 of its response to
a W). The M glyph is this polyline rotated by 180° (``-W_VERTICES``)."""

GLYPH_SIZE = 6.0  # half-width in pixels of the glyph the detectors are built from
GLYPH_HALF_STROKE = 1.0
GLYPH_EXTENT = 1.25  # bounding radius of the glyph in glyph units (sqrt(1 + 0.7^2) = 1.22)


def render_polyline(vertices: torch.Tensor, size: Sequence[int], *, half_width: float = GLYPH_HALF_STROKE,
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


def detector_window() -> int:
    return 2 * math.ceil(GLYPH_SIZE + 2) + 1


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
    h, w = check_size((size, size) if isinstance(size, int) else size)
    if n < 1:
        raise ValueError(f"n: must be at least 1, got {n}")
    if not set(letters) <= {"W", "M"} or not letters:
        raise ValueError(f"letters: expected a string of 'W' and/or 'M', got {letters!r}")
    rng = np.random.default_rng(seed)
    sep = detector_window() + 2 * GLYPH_EXTENT * GLYPH_SIZE * scale_range[1]
    scenes, params = [], []
    for _ in range(n):
        letter = letters[rng.integers(len(letters))]
        placed: list[tuple[str, float, float, float]] = []
        for _k in range(n_glyphs):
            for _try in range(100):
                half = GLYPH_SIZE * rng.uniform(*scale_range)
                # radius of the disk (pixels, per axis) that must hold the glyph's bounding circle
                rx = disk * w / 2 - GLYPH_EXTENT * half - GLYPH_HALF_STROKE - 0.5
                ry = disk * h / 2 - GLYPH_EXTENT * half - GLYPH_HALF_STROKE - 0.5
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
    h, w = check_size((size, size) if isinstance(size, int) else size)
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


