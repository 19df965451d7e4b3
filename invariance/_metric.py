"""The one measurement core: one layer, one transformation, per-image errors over the comparison region.

Every number the toolkit reports about a layer comes from :func:`measure_layer`:
:func:`invariance.measure` aggregates its per-image results over images, the test kit
(:mod:`invariance.testing`) asserts on them, and the STN analysis (:func:`stn.feature_map_alignment`) calls
it on a trained transformer's maps. The definitions are those of docs/definitions.md:

* the **comparison region** of a warp ``g`` is ``R_g = M * I * V_g``: ``M`` the evaluation mask
  (default the whole map; a disk of radius ``mask_radius`` in the layer's normalised frame on
  request), ``I`` the receptive-field interior (positions whose receptive field lies inside the
  image; see ``interior`` below), ``V_g`` the positions whose source under ``g`` lies inside the
  moving map's valid region: positions of the transformed image's map whose receptive field
  (``interior`` on) or centre (off) covers only pixels that came from inside the original frame;
* each error is ``sum R_g ||W_g F_h - F||^2 / sum R_g ||F||^2`` per image; an image with no
  signal on the region gets NaN and a reason, never 0;
* the **interpolation floor** is the spatial error of the images themselves (the identity
  network) under the same transformation, search and region; a round trip can be exact by a
  lattice coincidence that a layer does not enjoy (zooming an odd-sized image about its centre
  pixel), so the floor is the larger of the round trips on the images and on the images padded
  by one zero row and column (the other grid parity);
* the **random-pair null** is the spatial error between an image's maps and the transformed
  maps of another image (the next one in the batch).

``interior``: ``True`` applies ``I``; ``False`` does not; ``None`` (default, "auto") applies it
when the layer's frame is traced (its receptive field is known) and the interior keeps at least
:data:`INTERIOR_MIN_FRACTION` of the map, and otherwise compares up to the border (deep layers
whose receptive field covers most of the image). :attr:`LayerResult.interior` records which.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from . import geometry as G
from ._features import LayerFrame
from ._search import (
    SEARCH_FAMILIES,
    Alignment,
    SearchConfig,
    align,
    channel_orbits,
    fit_linear,
    masked_error,
    region_error,
    warp_valid,
)
from ._warp import disk_mask, warp

__all__ = ["INTERIOR_MIN_FRACTION", "LayerResult", "measure_layer", "interpolation_floor", "comparison_region",
           "transformed_valid"]

INTERIOR_MIN_FRACTION = 0.25
"""``interior=None`` applies the receptive-field interior only where it keeps this much of the map."""


@dataclass
class LayerResult:
    """Per-image errors of one layer under one transformation (``(B,)`` float64, NaN = no verdict).

    Attributes:
        layer, transform, search: what was measured (transform label) and the search family.
        invariance, expected, spatial: errors with no warp, the expected warp ``W_{h^-1}``, and
            the best warp of the search family.
        permutation: best warp and channel permutation (None unless asked).
        linear, linear_fit: held-out and in-sample errors of a linear channel map on top of the
            warp (None unless asked).
        overlap: the comparison region kept by the best warp, as a fraction of ``M * I``.
        reasons: per image, None or why its errors are NaN.
        params, param_names, param_family: the best spatial warp per image in the image's centred
            frame (pixels, degrees), as applied to the transformed image's maps.
        matrices: the same warps, normalised layer-frame matrices.
        permutations: ``(B, C)`` best channel permutations (``aligned[c] = warped[perm[c]]``).
        orbits: channel orbits (cycles) of the most frequent permutation.
        floor, null: the interpolation floor and the random-pair null per image (None unless asked).
        interior: whether the receptive-field interior was applied; region_size: positions of
            ``M * I``; frame: the layer's frame.
    """

    layer: str
    transform: str
    search: str
    invariance: torch.Tensor
    expected: torch.Tensor
    spatial: torch.Tensor
    overlap: torch.Tensor
    reasons: list
    params: torch.Tensor
    param_names: tuple[str, ...]
    param_family: str
    matrices: torch.Tensor
    interior: bool
    region_size: int
    frame: LayerFrame
    permutation: torch.Tensor | None = None
    permutations: torch.Tensor | None = None
    orbits: list = field(default_factory=list)
    linear: torch.Tensor | None = None
    linear_fit: torch.Tensor | None = None
    floor: torch.Tensor | None = None
    null: torch.Tensor | None = None

    @property
    def n_images(self) -> int:
        return int(self.spatial.shape[0])

    @property
    def n_excluded(self) -> int:
        """Images left out of every mean (no verdict)."""
        return sum(r is not None for r in self.reasons)


def _warp_each(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Warp ``x (B, ...)`` by one matrix ``(3, 3)`` or by one per image ``(B, 3, 3)``."""
    return warp(x, m) if m.dim() == 2 else warp(x, m[:, None])[:, 0]


def transformed_valid(t_img: torch.Tensor, size) -> torch.Tensor:
    """``(H, W)`` bool (``(B, H, W)`` for per-image ``(B, 3, 3)`` matrices): the pixels of
    ``warp(image, t_img)`` that came from inside the original frame.

    >>> T = G.centred_to_normalized(G.to_matrix("translation", torch.tensor([2.0, 0.0])), (3, 5))
    >>> transformed_valid(T, (3, 5)).int()[0].tolist()
    [0, 0, 1, 1, 1]
    """
    ones = torch.ones(tuple(size), dtype=t_img.dtype, device=t_img.device)
    if t_img.dim() == 3:
        return warp_valid(ones, t_img[:, None], strict=True)[:, 0] > 0
    return warp_valid(ones, t_img, strict=True) > 0


def comparison_region(frame: LayerFrame, *, mask_radius: float | None = None, interior: bool | None = None,
                      image_valid: torch.Tensor | None = None, device=None, dtype=torch.float64):
    """The reference's region ``M * I`` and the moving map's valid region of one layer.

    Returns ``(region (h, w), moving_valid (h, w), interior_used: bool)`` as 0/1 tensors of
    ``dtype``; ``image_valid`` ``(H, W)`` marks the transformed image's pixels that came from
    inside the original frame (default: all; ``(B, H, W)`` per image gives a ``(B, h, w)``
    moving region). See the module docstring for ``interior``.
    """
    size = tuple(frame.size)
    inside = frame.valid_positions(interior=True) if frame.rf_radius is not None else None
    if interior is None:
        use = inside is not None and frame.exact and float(inside.double().mean()) >= INTERIOR_MIN_FRACTION
    else:
        use = bool(interior)
    m = torch.ones(size, dtype=torch.bool) if mask_radius is None else disk_mask(size, mask_radius)
    iv = None if image_valid is None else image_valid.cpu()
    ref = m & (inside if inside is not None else frame.valid_positions(interior=True)) if use else m
    if iv is not None and iv.dim() == 3:
        mov = torch.stack([frame.valid_positions(v, interior=use) for v in iv])
    else:
        mov = frame.valid_positions(iv, interior=use)
    return ref.to(device=device, dtype=dtype), mov.to(device=device, dtype=dtype), use


def _with_reasons(values: torch.Tensor, reasons: list) -> torch.Tensor:
    bad = torch.tensor([r is not None for r in reasons], device=values.device)
    return torch.where(bad, torch.nan, values.double())


def interpolation_floor(images: torch.Tensor, t_img: torch.Tensor, family: str, *, mask_radius: float | None = None,
                        config: SearchConfig | None = None, transformed: torch.Tensor | None = None) -> torch.Tensor:
    """The interpolation floor per image ``(B,)`` float64 (see the module docstring).

    ``t_img``: the image transformation (normalised, input -> output) for ``images``' size,
    ``(3, 3)`` or one per image ``(B, 3, 3)``;
    with ``transformed`` given (images transformed some other way, e.g. ``torch.roll``), only
    that round trip is measured and every pixel of it counts as valid.

    >>> x = torch.zeros(2, 1, 31, 31); x[:, :, 10:20, 12:22] = torch.rand(2, 1, 10, 10)
    >>> T = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([90.0])), (31, 31))
    >>> bool(interpolation_floor(x, T, "rigid").max() < 1e-9)
    True
    """
    cfg = config or SearchConfig()
    centred = G.normalized_to_centred(t_img.double(), tuple(images.shape[-2:]))

    def round_trip(imgs, moved, valid):
        size = tuple(imgs.shape[-2:])
        t = G.centred_to_normalized(centred, size).to(device=imgs.device)
        if moved is None:
            moved = _warp_each(imgs, t.to(imgs.dtype))
            valid = transformed_valid(t, size)
        region, mvalid, _ = comparison_region(LayerFrame.identity(size), mask_radius=mask_radius, interior=False,
                                              image_valid=valid, device=imgs.device, dtype=imgs.dtype)
        res = align(imgs, moved, family, mask=region, moving_mask=mvalid, config=cfg,
                    expected=G.inverse(t).to(imgs.dtype))
        return res.errors.double().cpu()

    if transformed is not None:
        return round_trip(images, transformed, None)
    padded = torch.nn.functional.pad(images, (0, 1, 0, 1))
    return torch.fmax(round_trip(images, None, None), round_trip(padded, None, None))


def measure_layer(
    features: torch.Tensor,
    features_h: torch.Tensor,
    frame: LayerFrame,
    t_img: torch.Tensor,
    *,
    family: str,
    channels=("spatial",),
    mask_radius: float | None = None,
    interior: bool | None = None,
    image_valid: torch.Tensor | None = None,
    config: SearchConfig | None = None,
    null: bool = False,
    seed: int = 0,
    layer: str = "",
    transform: str = "",
) -> LayerResult:
    """Measure one layer under one transformation: per-image errors over the comparison region.

    Args:
        features, features_h: ``(B, C, h, w)`` maps of the images and of the transformed images.
        frame: the layer's :class:`invariance.LayerFrame`.
        t_img: the image transformation, normalised ``(3, 3)`` input -> output matrix, or one
            per image ``(B, 3, 3)``.
        family: the search family (:data:`invariance.SEARCH_FAMILIES`).
        channels: which of ``spatial``, ``permutation``, ``linear`` to compute (spatial always is).
        mask_radius: evaluation disk radius (layer-normalised); default the whole map.
        interior: the receptive-field interior (module docstring); default auto.
        image_valid: ``(H, W)`` pixels of the transformed images that came from inside the
            original frame (default: those of ``warp(images, t_img)``; pass all ones for images
            transformed without a border, e.g. ``torch.roll``).
        config: the search settings.
        null: also compute the random-pair null.
        seed: seeds the linear map's folds.
        layer, transform: labels carried into the result.

    Returns:
        :class:`LayerResult`.

    >>> import torch.nn as nn
    >>> from invariance import extract_features
    >>> net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()).double()
    >>> x = torch.zeros(2, 1, 20, 20, dtype=torch.float64); x[:, :, 6:12, 5:13] = 1
    >>> T = G.centred_to_normalized(G.to_matrix("translation", torch.tensor([3.0, -2.0])), (20, 20))
    >>> f, frames = extract_features(net, x, "1"); fh, _ = extract_features(net, warp(x, T.to(x)), "1")
    >>> r = measure_layer(f["1"], fh["1"], frames["1"], T, family="translation")
    >>> bool(r.spatial.max() < 1e-12), r.params[0].round().tolist(), r.interior
    (True, [-3.0, 2.0], True)
    """
    if family not in SEARCH_FAMILIES:
        raise ValueError(f"family: unknown search family {family!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    f, fh = features, features_h
    dtype, device = f.dtype, f.device
    t_img = t_img.to(device=device, dtype=torch.float64)
    if image_valid is None:
        image_valid = transformed_valid(t_img, frame.input_size)
    region, mvalid, used = comparison_region(frame, mask_radius=mask_radius, interior=interior,
                                             image_valid=image_valid, device=device, dtype=dtype)
    expected = frame.to_layer(G.inverse(t_img)).to(dtype=dtype, device=device)
    want_perm = "permutation" in channels
    res = align(f, fh, family, mask=region, moving_mask=mvalid, channels="permutation" if want_perm else "spatial",
                config=config, expected=expected)
    sp: Alignment = res.spatial if want_perm else res
    with torch.no_grad():
        e_inv = masked_error(f, fh, region, valid=mvalid)
        e_exp = region_error(f, fh, expected, mask=region, moving_mask=mvalid)
    fam = G.get_family(SEARCH_FAMILIES[family][0])
    img_params = G.from_matrix(fam, G.normalized_to_centred(frame.to_image(sp.matrices.double()), frame.input_size))
    out = LayerResult(
        layer=layer, transform=transform, search=family,
        invariance=_with_reasons(e_inv, sp.reasons).cpu(), expected=_with_reasons(e_exp, sp.reasons).cpu(),
        spatial=sp.errors.cpu(), overlap=sp.overlap.cpu(), reasons=list(sp.reasons),
        params=img_params.cpu(), param_names=tuple(fam.param_names), param_family=fam.name,
        matrices=sp.matrices.cpu(), interior=used, region_size=int(region.sum().round()), frame=frame,
    )
    if want_perm:
        out.permutation = res.errors.cpu()
        out.permutations = res.permutations.cpu()
        modal = Counter(tuple(p) for p in out.permutations.tolist()).most_common(1)[0][0]
        out.orbits = channel_orbits(modal)
    if "linear" in channels:
        # A is shared by all images, g per image: the warp is the best of a few per-image choices
        # (the spatial and permutation optima, the expected warp), the one whose cross-fitted
        # (held-out) error is lowest; the in-sample bound is the per-image minimum.
        b = f.shape[0]
        choices = [(sp.matrices, None), (expected.expand(b, 3, 3).to(sp.matrices), None)]
        if want_perm:
            choices.append((res.matrices, res.permutations))
        fits = [fit_linear(f, fh, mats, mask=region, moving_mask=mvalid, permutations=perms, seed=seed)
                for mats, perms in choices]
        best = min(fits, key=lambda d: float(torch.nan_to_num(d["held_out"], nan=float("inf")).mean()))
        out.linear = _with_reasons(best["held_out"], sp.reasons).cpu()
        out.linear_fit = _with_reasons(torch.stack([d["fit"] for d in fits]).min(0).values, sp.reasons).cpu()
    if null:
        if f.shape[0] > 1:
            # image b against the transformed maps of image b-1; the null needs the same search,
            # not its last decimals: refine the best start only
            cfg = replace(config or SearchConfig(), top_k=1)
            rn = align(f, torch.roll(fh, 1, dims=0), family, mask=region, moving_mask=mvalid, config=cfg,
                       expected=expected)
            out.null = rn.errors.cpu()
        else:
            out.null = torch.full((1,), math.nan, dtype=torch.float64)
    return out
