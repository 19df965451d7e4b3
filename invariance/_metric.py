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
  maps of another image (image i against image i - 1, image 0 against the last, whatever the batches).

``interior``: ``True`` applies ``I``; ``False`` does not; ``None`` (default, "auto") applies it
whenever the layer's frame is traced (its receptive field is known). Where the interior keeps
fewer than :data:`invariance.MIN_REGION` positions (a deep layer whose receptive field covers the
image), every image gets no verdict with the reason :data:`RF_COVERS_IMAGE`: comparing the band
that sees the padding instead would score the padding, not the image. Untraced frames (the
receptive field unknown) are compared up to the border. :attr:`LayerResult.interior` records
which.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from . import geometry as G
from ._features import LayerFrame
from ._search import (
    MIN_REGION,
    SEARCH_FAMILIES,
    Alignment,
    LinearFit,
    SearchConfig,
    align,
    align_near,
    align_with_null,
    channel_orbits,
    linear_design,
    masked_error,
    region_error,
    warp_valid,
)
from ._warp import disk_mask, warp

__all__ = ["RF_COVERS_IMAGE", "LayerResult", "measure_layer", "interpolation_floor", "comparison_region",
           "transformed_valid", "LayerAccumulator"]

RF_COVERS_IMAGE = ("the receptive field covers the image (fewer than MIN_REGION positions see only the image; "
                   "interior=False compares the padding band too)")
"""The reason of every image of a layer whose receptive-field interior is too small for a verdict."""


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
        positions, signal: the same region in positions, and the share of the reference's signal on
            ``M * I`` it carries (docs/definitions.md, "What a verdict needs").
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
    positions: torch.Tensor | None = None
    signal: torch.Tensor | None = None

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
    use = (inside is not None and frame.exact) if interior is None else bool(interior)
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


FLOOR_GRIDS = ("full", "near")
"""The exhaustive stages the floor may search: the family's whole grid, or its neighbourhood of
the expected warp (:func:`invariance._search.align_near`)."""


def interpolation_floor(images: torch.Tensor, t_img: torch.Tensor, family: str, *, mask_radius: float | None = None,
                        config: SearchConfig | None = None, transformed: torch.Tensor | None = None,
                        grid: str = "full") -> torch.Tensor:
    """The interpolation floor per image ``(B,)`` float64 (see the module docstring).

    ``t_img``: the image transformation (normalised, input -> output) for ``images``' size,
    ``(3, 3)`` or one per image ``(B, 3, 3)``;
    with ``transformed`` given (images transformed some other way, e.g. ``torch.roll``), only
    that round trip is measured and every pixel of it counts as valid. ``grid``: ``"full"`` (the
    default, the floor's definition: the search's whole grid) or ``"near"`` (only the grid's
    neighbourhood of the expected warp, :func:`invariance._search.align_near`: 2-3x faster, and
    within the refinement's precision of the full floor, ~1e-3 relative, but not the same value:
    ``benchmarks/results/floor_grid.md``).

    >>> x = torch.zeros(2, 1, 31, 31); x[:, :, 10:20, 12:22] = torch.rand(2, 1, 10, 10)
    >>> T = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([90.0])), (31, 31))
    >>> bool(interpolation_floor(x, T, "rigid").max() < 1e-9)
    True
    """
    if grid not in FLOOR_GRIDS:
        raise ValueError(f"grid: unknown floor grid {grid!r}; valid choices: {', '.join(FLOOR_GRIDS)}")
    cfg = SearchConfig.of(config)
    centred = G.normalized_to_centred(t_img.double(), tuple(images.shape[-2:]))

    def round_trip(imgs, moved, valid):
        size = tuple(imgs.shape[-2:])
        t = G.centred_to_normalized(centred, size).to(device=imgs.device)
        if moved is None:
            moved = _warp_each(imgs, t.to(imgs.dtype))
            valid = transformed_valid(t, size)
        region, mvalid, _ = comparison_region(LayerFrame.identity(size), mask_radius=mask_radius, interior=False,
                                              image_valid=valid, device=imgs.device, dtype=imgs.dtype)
        if grid == "near":
            res = align_near(imgs, moved, family, mask=region, moving_mask=mvalid, config=cfg,
                             expected=G.inverse(t).to(imgs.dtype))
        else:
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
    acc = LayerAccumulator(frame, t_img, features.shape[0], family=family, channels=channels,
                           mask_radius=mask_radius, interior=interior, image_valid=image_valid, config=config,
                           null=null, seed=seed, layer=layer, transform=transform, device=features.device,
                           dtype=features.dtype)
    everything = slice(0, features.shape[0])
    acc.add(features, features_h, everything)
    if acc.second_pass:
        acc.score(features, features_h, everything)
    return acc.result()


def _sliced(x: torch.Tensor, index: slice, per_image: bool) -> torch.Tensor:
    return x[index] if per_image else x


class LayerAccumulator:
    """:func:`measure_layer` over batches of images, for layers whose maps do not fit at once.

    ``add(features, features_h, index)`` measures the images ``index`` (a slice of the
    ``n_images``, in order) and keeps their per-image results; the random-pair null pairs image
    ``i`` with image ``i - 1`` across batches (image 0 with the last one), so it is the same
    pairing as one batch. The linear map is shared by all images: ``add`` accumulates its
    normal equations (:class:`invariance.LinearFit`), and, when ``second_pass`` is true, the same
    batches are given again to ``score`` for the held-out errors. ``result()`` gives the
    :class:`LayerResult`, equal to one :func:`measure_layer` call on all images (every image's
    search is independent of its batch-mates; sums may differ in the last bits).

    >>> import torch.nn as nn
    >>> net = nn.Conv2d(1, 2, 3, padding=1).double()
    >>> x = torch.rand(4, 1, 12, 12, dtype=torch.float64)
    >>> T = G.centred_to_normalized(G.to_matrix("translation", torch.tensor([2.0, 0.0])), (12, 12))
    >>> f, fh = net(x).detach(), net(warp(x, T)).detach()
    >>> acc = LayerAccumulator(LayerFrame.identity((12, 12)), T, 4, family="translation", null=True)
    >>> for sl in (slice(0, 3), slice(3, 4)):
    ...     acc.add(f[sl], fh[sl], sl)
    >>> one = measure_layer(f, fh, LayerFrame.identity((12, 12)), T, family="translation", null=True)
    >>> bool(torch.allclose(acc.result().null, one.null)), bool(torch.allclose(acc.result().spatial, one.spatial))
    (True, True)
    """

    def __init__(self, frame: LayerFrame, t_img: torch.Tensor, n_images: int, *, family: str,
                 channels=("spatial",), mask_radius: float | None = None, interior: bool | None = None,
                 image_valid: torch.Tensor | None = None, config: SearchConfig | None = None, null: bool = False,
                 seed: int = 0, layer: str = "", transform: str = "", device=None, dtype=torch.float64):
        if family not in SEARCH_FAMILIES:
            raise ValueError(f"family: unknown search family {family!r}; "
                             f"valid choices: {', '.join(SEARCH_FAMILIES)}")
        self.frame, self.n, self.family, self.config, self.seed = frame, n_images, family, config, seed
        self.labels = (layer, transform)
        self.want_perm = "permutation" in channels
        self.want_linear = "linear" in channels
        self.want_null = null
        t_img = t_img.to(device=device, dtype=torch.float64)
        self.per_image = t_img.dim() == 3
        if image_valid is None:
            image_valid = transformed_valid(t_img, frame.input_size)
        self.region, self.mvalid, self.used = comparison_region(frame, mask_radius=mask_radius, interior=interior,
                                                                image_valid=image_valid, device=device, dtype=dtype)
        # the interior is on and too small for a verdict: say why, rather than compare the padding band
        self.rf_covers = self.used and float(self.region.sum()) < MIN_REGION
        self.expected = frame.to_layer(G.inverse(t_img)).to(dtype=dtype, device=device)
        self.parts: list[dict] = []
        self.fits: list[LinearFit] = []  # one per warp choice (spatial, expected, permutation)
        self.in_sample: list[list[torch.Tensor]] = []
        self.held: list[list[torch.Tensor]] = []
        self.first_f: torch.Tensor | None = None  # image 0's maps and the last transformed maps
        self.last_fh: torch.Tensor | None = None
        self.wrap_null: torch.Tensor | None = None  # image 0's null, from the last batch

    @property
    def second_pass(self) -> bool:
        """Whether ``score`` must see the batches again (the linear map's held-out errors)."""
        return self.want_linear

    def _mvalid(self, index: slice) -> torch.Tensor:
        return _sliced(self.mvalid, index, self.mvalid.dim() == 3)

    def _expected(self, index: slice) -> torch.Tensor:
        return _sliced(self.expected, index, self.per_image)

    def add(self, f: torch.Tensor, fh: torch.Tensor, index: slice) -> None:
        """Measure images ``index`` from their maps ``f`` and transformed maps ``fh``."""
        mvalid, expected = self._mvalid(index), self._expected(index)
        channels = "permutation" if self.want_perm else "spatial"
        if self.want_null:  # the null's pairs within the batch share the main search's warps
            if index.start == 0:
                self.first_f = f[:1]
            # the last batch's last moving map also takes the wrap-around pair (image 0's reference)
            wrap = index.stop == self.n and self.n > 1
            first = slice(0, 1)
            res, within = align_with_null(f, fh, self.family, null_config=self._null_config(), mask=self.region,
                                          moving_mask=mvalid, config=self.config, expected=expected, channels=channels,
                                          next_reference=self.first_f if wrap else None,
                                          next_moving_mask=self._mvalid(first) if wrap else None,
                                          next_expected=self._expected(first) if wrap else None)
        else:
            res = align(f, fh, self.family, mask=self.region, moving_mask=mvalid, config=self.config,
                        expected=expected, channels=channels)
        sp: Alignment = res.spatial if self.want_perm else res
        if self.rf_covers:
            sp.reasons = [RF_COVERS_IMAGE] * len(sp.reasons)
        with torch.no_grad():
            e_inv = masked_error(f, fh, self.region, valid=mvalid)
            e_exp = region_error(f, fh, expected, mask=self.region, moving_mask=mvalid)
        part = {"invariance": _with_reasons(e_inv, sp.reasons).cpu(),
                "expected": _with_reasons(e_exp, sp.reasons).cpu(), "spatial": sp.errors.cpu(),
                "overlap": sp.overlap.cpu(), "reasons": list(sp.reasons), "matrices": sp.matrices.cpu(),
                "positions": sp.positions.cpu(), "signal": sp.signal.cpu()}
        if self.want_perm:
            part["permutation"], part["permutations"] = res.errors.cpu(), res.permutations.cpu()
        if self.want_linear:
            part["choices"] = self._linear_add(f, fh, index, sp, res, expected, mvalid)
        if self.want_null:
            part["null"] = self._null(f, fh, index, expected, mvalid, within)
        self.parts.append(part)

    def _linear_add(self, f, fh, index, sp, res, expected, mvalid) -> list:
        # A is shared by all images, g per image: the warp is the best of a few per-image choices
        # (the spatial and permutation optima, the expected warp), the one whose cross-fitted
        # (held-out) error is lowest; the in-sample bound is the per-image minimum.
        b, c = f.shape[:2]
        choices = [(sp.matrices, None), (expected.expand(b, 3, 3).to(sp.matrices), None)]
        if self.want_perm:
            choices.append((res.matrices, res.permutations))
        if not self.fits:
            self.fits = [LinearFit(self.n, c, seed=self.seed, device=f.device) for _ in choices]
            self.in_sample = [[] for _ in choices]
            self.held = [[] for _ in choices]
        ids = torch.arange(index.start, index.stop, device=f.device)
        with torch.no_grad():
            for fit, fits, (mats, perms) in zip(self.fits, self.in_sample, choices):
                x, y = linear_design(f, fh, mats, self.region, mvalid, perms)
                fits.append(fit.add(x, y, ids).cpu())
        return choices

    def score(self, f: torch.Tensor, fh: torch.Tensor, index: slice) -> None:
        """Second pass: the held-out linear errors of images ``index`` (batches in the same order)."""
        if self.fits and self.fits[0].matrix is None:
            for fit in self.fits:
                fit.solve()
        part = next(p for p, start in zip(self.parts, self._starts()) if start == index.start)
        ids = torch.arange(index.start, index.stop, device=f.device)
        with torch.no_grad():
            for fit, held, (mats, perms) in zip(self.fits, self.held, part["choices"]):
                x, y = linear_design(f, fh, mats, self.region, self._mvalid(index), perms)
                held.append(fit.score(x, y, ids).cpu())

    def _starts(self) -> list[int]:
        out, s = [], 0
        for p in self.parts:
            out.append(s)
            s += len(p["spatial"])
        return out

    def _null_config(self) -> SearchConfig:
        # the null (errors of 0.3-1) needs the same search, not its last decimals: the best start
        # refined alone, no local re-search around the optimum
        return replace(self.config or SearchConfig(), top_k=1, hop_steps=())

    def _null(self, f, fh, index, expected, mvalid, within: Alignment | None) -> torch.Tensor:
        """Image i against the transformed maps of image i - 1 (image 0: of the last image):
        ``within`` holds the pairs inside this batch (:func:`align_with_null`), and in the last batch
        also image 0's pair, last; the first image of a later batch is paired with the previous
        batch's last here."""
        b = f.shape[0]
        out = torch.full((b,), math.nan, dtype=torch.float64)
        if within is not None:
            errors = within.errors.cpu().double()
            out[1:] = errors[: b - 1]
            if errors.shape[0] == b:  # the wrap-around pair
                self.wrap_null = errors[-1]
        if index.start > 0:
            first = slice(0, 1)
            out[0] = align(f[:1], self.last_fh, self.family, mask=self.region, config=self._null_config(),
                           moving_mask=_sliced(mvalid, first, mvalid.dim() == 3),
                           expected=_sliced(expected, first, self.per_image)).errors.cpu().double()[0]
        self.last_fh = fh[-1:]
        return out

    def result(self) -> LayerResult:
        """The :class:`LayerResult` of every image added (``n_images`` in all)."""
        got = sum(len(p["spatial"]) for p in self.parts)
        if got != self.n:
            raise ValueError(f"index: {got} images were added, expected n_images = {self.n}")
        cat = {k: torch.cat([p[k] for p in self.parts]) for k in ("invariance", "expected", "spatial", "overlap",
                                                                 "matrices", "positions", "signal")}
        reasons = [r for p in self.parts for r in p["reasons"]]
        sp_mats = cat["matrices"]
        fam = G.get_family(SEARCH_FAMILIES[self.family][0])
        size = self.frame.input_size
        img_params = G.from_matrix(fam, G.normalized_to_centred(self.frame.to_image(sp_mats.double()), size))
        out = LayerResult(
            layer=self.labels[0], transform=self.labels[1], search=self.family,
            invariance=cat["invariance"], expected=cat["expected"], spatial=cat["spatial"], overlap=cat["overlap"],
            reasons=reasons, params=img_params.cpu(), param_names=tuple(fam.param_names), param_family=fam.name,
            matrices=sp_mats, interior=self.used, region_size=int(self.region.sum().round()), frame=self.frame,
            positions=cat["positions"].double(), signal=cat["signal"].double(),
        )
        if self.want_perm:
            out.permutation = torch.cat([p["permutation"] for p in self.parts])
            out.permutations = torch.cat([p["permutations"] for p in self.parts])
            modal = Counter(tuple(p) for p in out.permutations.tolist()).most_common(1)[0][0]
            out.orbits = channel_orbits(modal)
        if self.want_linear:
            out.linear, out.linear_fit = self._linear_result(reasons)
        if self.want_null:
            out.null = self._null_result()
        return out

    def _linear_result(self, reasons) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.held[0]) != len(self.parts):
            raise ValueError("score: the held-out linear errors need a second pass over the same batches "
                             "(LayerAccumulator.second_pass)")
        held = [torch.cat(h) for h in self.held]
        best = min(held, key=lambda h: float(torch.nan_to_num(h, nan=float("inf")).mean()))
        fit = torch.stack([torch.cat(f) for f in self.in_sample]).min(0).values
        return _with_reasons(best, reasons).cpu(), _with_reasons(fit, reasons).cpu()

    def _null_result(self) -> torch.Tensor:
        null = torch.cat([p["null"] for p in self.parts])
        if self.n > 1:
            null[0] = self.wrap_null  # image 0 against the last image's transformed maps (the last batch)
        return null
