"""Optimal alignment of feature maps: the best spatial warp, channel permutation or linear map.

Given reference maps ``F`` (of the original images) and moving maps ``F_h`` (of the transformed
images), both ``(B, C, H, W)`` in the same layer frame, find per image

    e_sp   = min_g      sum R_g ||W_g F_h - F||^2 / sum R_g ||F||^2
    e_perm = min_{g,pi} sum R_g ||P_pi W_g F_h - F||^2 / sum R_g ||F||^2

over a family of warps ``g``, and fit the linear channel map ``A`` (docs/definitions.md).

The comparison region
---------------------
Both maps are compared only where both are defined: ``R_g = M * V_g`` with ``M`` the
reference's region (``mask``: the user's evaluation mask times the optional receptive-field
interior; default the whole map) and ``V_g`` the positions whose source under ``g`` lies inside
the moving map's valid region (``moving_mask``, default the whole map). ``V_g`` is a weight:
the valid share of the position's bilinear footprint (the bilinear sample of the valid region),
and the warped value blends only the valid samples, renormalised (:func:`aligned`), so no value
that the warp fills in (zeros from outside the frame, or content that came from outside the
original image) is ever scored and the error is continuous in ``g``. A warp is *feasible* only
if its region compares content (docs/definitions.md, "What a verdict needs"): at least
``max(MIN_REGION, min_overlap * O_exp)`` positions and ``max(min_signal * S, min_overlap * S_exp)``
of the reference's signal (``S`` its energy about its mean on ``M``, so background and constant
padding count for nothing; ``O_exp``, ``S_exp`` what the expected warp's region keeps, or all of
``M`` without one). An image whose expected warp carries less than ``min_signal * S``, or keeps
fewer than ``MIN_REGION`` positions, has no verdict. No slack: the exact scoring that decides the
result applies the rule as written; user candidates obey it too.

How the optimum is found (and why it is not a local one)
--------------------------------------------------------
1. *Coarse, exhaustive*: every candidate of a grid over the non-translation part (angles,
   log-scales, affine shapes) is applied with ``grid_sample`` onto a canvas that holds its whole
   support; for families with a translation, the error of **every integer shift** is then
   computed at once by FFT cross-correlations, region terms included (masked registration,
   Padfield 2012): with ``V`` the weight of the warped valid region, ``warped`` the normalised
   samples and ``G = V * warped``,
   ``num(t) = corr(M, V sum_c warped_c^2) - 2 sum_c corr(M F_c, G_c) + corr(M sum_c F_c^2, V)``,
   ``den(t) = corr(M sum_c F_c^2, V)``, ``overlap(t) = corr(M, V)``.
2. *Refinement*: starts from **distinct basins** (greedy: the best coarse candidate, then the
   best one at least ``basin_separation`` away in its linear part or ``basin_shift`` pixels in
   its translation from every start taken, ...) are refined by Adam on the family parameters
   through the sampler, started a little off the lattice point (bilinear sampling has kinks);
   after a third of the steps only the ``refine_keep`` best starts go on (successive halving).
   The best warp and the best refined starts are then polished by a derivative-free pattern
   search on the exact error, whose moves include every pair of parameters moved together (the
   error has kinks where a sample crosses a pixel, where a gradient method can stall, and its
   valleys run diagonally: a rotation moves the content, and the shift that brings it back must
   move with it). An image whose best start is exact already (error <= 1e-12: an
   integer shift, a quarter turn) skips the refinement, the polish and the re-search below, as
   none of them could lower its error by more than that. The coarse stage also searches each image's best linear parts
   at the three half-pixel offsets (``subpixel_top``): on small maps the optimum often lies on
   a half-pixel line where every integer shift is poor.
3. *Local re-search* (``hop_steps``): around the polished warp each linear parameter is moved by
   1, 2 and 4 of its units either way and every integer shift is searched again, at the warp's own
   sub-pixel offset and the three half-pixel offsets from it; the best is polished and kept if
   better. Between nearby angles or scales a small map's error has ridges that neither Adam nor
   the pattern search crosses.
4. *Exact scoring*: every reported error is re-computed exactly with ``grid_sample`` for the
   returned transformation, and the best of coarse, refined and any extra candidates (the
   expected transformation, the identity) is kept, so the search is never worse than those.

Channel permutations are searched jointly: candidates are short-listed by aligning
permutation-invariant summaries (the channel mean and the mean square), the spatial optimum and
any extra candidates are always added to the list, and at each candidate the optimal permutation
is the Hungarian assignment (:func:`scipy.optimize.linear_sum_assignment`) on the ``C x C`` cost
matrix over the same region. Because the spatial optimum with the identity permutation is a
candidate, ``e_perm <= e_sp``.

No signal, no verdict: an image whose reference has no energy on the region, or is constant
there, a region of fewer than :data:`MIN_REGION` positions, and an image for which no warp is
feasible give NaN with a reason (``Alignment.reasons``), never 0. Every result reports, per
image, the positions its region kept and the share of the reference's signal on them.

Transformations are returned as normalised input -> output matrices of the layer frame (what
:func:`invariance.warp` applies to ``moving``) and as family parameters in the layer's
centred frame (pixels of the layer, degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from scipy.fft import next_fast_len
from scipy.optimize import linear_sum_assignment

from . import geometry as G
from ._warp import disk_mask, grid_from_inverse, unchecked_block_chunks, unchecked_chunks, warp, warp_chunks
from .checks import check_images

__all__ = [
    "SEARCH_FAMILIES",
    "MIN_REGION",
    "SearchConfig",
    "PRESETS",
    "Alignment",
    "align",
    "masked_error",
    "warp_valid",
    "fit_linear",
    "search_bytes_per_image",
    "SEARCH_BYTES_PER_CANVAS_ELEMENT",
    "linear_design",
    "LinearFit",
    "channel_orbits",
]

# search family -> (geometry family of the result, has an exhaustive integer translation part)
SEARCH_FAMILIES: dict[str, tuple[str, bool]] = {
    "translation": ("translation", True),
    "rotation": ("rotation", False),
    "scale": ("scale", False),
    "rigid": ("rigid", True),
    "scale_translation": ("scale_translation", True),
    "similarity": ("similarity", True),
    "affine": ("affine", True),
}

MIN_REGION = 4
"""Fewest positions a comparison region may have; smaller regions give NaN (no verdict)."""

NO_FEASIBLE_WARP = ("no warp keeps enough of the reference to compare (min_overlap of the expected warp's "
                     "positions and signal, at least MIN_REGION positions and min_signal of the signal)")
"""The reason of an image for which no warp of the search family is feasible."""

NO_CONTENT_IN_VIEW = ("the transformation leaves too little of the reference's content in view (the expected "
                      "warp's region carries less than min_signal of its signal, or fewer than MIN_REGION positions)")
"""The reason of an image whose expected warp compares too little of the reference's signal."""

_VALID = 1.0 - 1e-5  # bilinear sample of a valid region that counts as "inside" (strict)
_STEP_BYTES = 4 << 20  # CPU: warped maps per step of the exact scoring and the refinement: small tensors
# are reused by the allocator, large ones are returned to the system and page-faulted back every step
_STEP_BYTES_CUDA = (4 << 20, 512 << 20)  # CUDA: 1/64 of the free memory, within these bounds
_BLOCK_BYTES = 1 << 20  # CPU: a block of channel spectra in the FFT scoring, sized to stay in the caches


def step_bytes(device: torch.device | str) -> int:
    """Bytes of warped maps per step of the exact scoring and the refinement, and per block of
    channels in the FFT scoring: ``_STEP_BYTES`` on the CPU, where small tensors stay in the
    allocator and the caches; on CUDA 1/64 of the device's free memory (within 4 MiB and 512 MiB),
    so that a refinement step spans many images and a channel block many channels instead of
    one image or one channel per kernel."""
    device = torch.device(device)
    if device.type != "cuda":
        return _STEP_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    lo, hi = _STEP_BYTES_CUDA
    return int(min(hi, max(lo, free // 64)))


_W_MIN = 1e-6  # a smaller valid share counts as outside (its sample would be rounding noise)
_SETTLED = 1e-12  # an exact error at or below this is final: no stage can lower it by more
_POLISH_MOVES = 8  # moves per step size of the polish (:func:`_polish`)
_POLISH_ONLY_MOVED = True  # CPU: the polish scores a copied seed column once and, after a move, only the seeds
# that moved along the directions the move did not reach (a test turns it off: every seed, every direction)
_COARSE_ROUNDING = 64  # the coarse FFT terms' absolute errors, in eps times their totals (_Rule.feasible)
_CONSTANT_RTOL = 1e-10  # spatial variance below this fraction of the energy: a constant map


#: Named search settings, the one place where they are written (``SearchConfig.preset(name)``).
PRESETS: dict[str, dict] = {
    "default": {},
    # the test kit's assertions: a 5-degree-step grid halved, fewer starts and permutation candidates
    # (and the half-pixel pass over the same share of the grid as the default's)
    "fast": {"n_angles": 36, "refine_steps": 20, "top_k": 2, "shortlist": 4, "subpixel_top": 8},
    # `invariance measure --quick`
    "quick": {"n_angles": 36, "refine_steps": 20, "log2_scales": tuple(np.arange(-2, 2.01, 0.25)),
              "subpixel_top": 8},
    # `invariance demo` (and its --quick mode for CI): coarse grids and no local re-search; its
    # claims are margins of 0.1 and more, far above the search's misses (<= 1e-2 on small maps)
    "demo": {"n_angles": 36, "refine_steps": 20, "subpixel_top": 4, "hop_steps": (),
             "log2_scales": tuple(np.arange(-1.5, 1.51, 0.25).round(6).tolist())},
    "demo-quick": {"n_angles": 24, "refine_steps": 10, "subpixel_top": 4, "hop_steps": (),
                   "log2_scales": tuple(np.arange(-1.5, 1.51, 0.25).round(6).tolist())},
    # stn's feature-map alignment of trained STN-C models
    "analysis": {"refine_steps": 20},
}


@dataclass(frozen=True)
class SearchConfig:
    """Resolution of the coarse grid and the refinement (defaults suit 10-60 px feature maps).

    Attributes:
        n_angles: angles covering the full circle (72 = every 5 degrees).
        log2_scales: log2 scale factors tried by ``scale`` / ``scale_translation``.
        similarity_n_angles, similarity_log2_scales: the grid of ``similarity`` (5-degree steps,
            as for rotations: a 10-degree grid missed the optimum's basin of a fresh random
            network by 6e-3; the scales coarser than ``log2_scales``).
        affine_n_angles, affine_log2_scales, affine_log2_aspects, affine_aspect_angles: the grid
            of ``affine`` (rotation x scale x anisotropy along a direction); the last two both
            empty: isotropic shapes only.
        max_shift: largest integer shift tried, in layer pixels (None: any shift).
        top_k: refinement starts per image, taken from distinct basins of the coarse grid.
        subpixel_top: for families with a translation, each image's best linear parts of the
            coarse grid (this many) searched again at the three half-pixel offsets, every integer
            shift each (0: none).
        basin_separation, basin_shift: two coarse candidates are in distinct basins when their
            linear parts differ by at least ``basin_separation`` (Frobenius norm; 0.2 is about
            8 degrees or a scale ratio of 1.15) or their translations by ``basin_shift`` pixels;
            two more starts are taken at half these separations (the neighbourhood of the best).
        refine_steps: Adam steps of the refinement (0 disables it, and the polish).
        refine_keep: starts per image refined past the first third of the steps (the best so far;
            successive halving: the others stop there).
        polish_levels: step halvings of the derivative-free polish of the best warp (0: none).
        polish_starts: refined starts polished as well, best first (the endpoints of other basins).
        hop_steps: for families with a translation and a linear part, the local re-search after
            the polish: each linear parameter of the best warp moved by these multiples of its
            refinement unit (1 degree, 2% of scale) either way, each with every integer shift at
            the warp's own and the three half-pixel offsets; its best is polished and kept when
            better (empty: none).
        shortlist: candidates per image examined with the Hungarian assignment.
        min_overlap: a warp must keep at least this fraction of the positions and of the signal of
            the expected warp's region (and at least :data:`MIN_REGION` positions; see the module
            docstring).
        min_signal: a warp's region must carry at least this share of the reference's signal on
            ``M`` (its energy about its mean there), and an image has a verdict only if the
            expected warp's region does (see the module docstring).
        compress_channels: search on an orthonormal basis of the two maps' joint channel span when
            it has under 3/4 of the channels (exact: the errors are unchanged; deep layers of large
            networks, where the channels outnumber the positions).
        chunk_size: candidates warped at a time (bounds memory; None picks one from the sizes).
        memory_budget: bytes of temporary memory a chunk may use when ``chunk_size`` is None.
        seed: seeds the refinement's start jitter.
    """

    n_angles: int = 72
    log2_scales: tuple[float, ...] = tuple(np.round(np.arange(-2.0, 2.0001, 0.125), 6).tolist())
    similarity_n_angles: int = 72
    similarity_log2_scales: tuple[float, ...] = tuple(np.round(np.arange(-1.0, 1.0001, 0.25), 6).tolist())
    affine_n_angles: int = 24
    affine_log2_scales: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5)
    affine_log2_aspects: tuple[float, ...] = (-0.5, 0.5)
    affine_aspect_angles: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0)
    max_shift: float | None = None
    top_k: int = 4
    basin_separation: float = 0.2
    basin_shift: float = 2.0
    refine_steps: int = 40
    refine_keep: int = 2
    polish_levels: int = 4
    polish_starts: int = 3
    shortlist: int = 6
    min_overlap: float = 0.5
    min_signal: float = 0.25
    subpixel_top: int = 16
    hop_steps: tuple[float, ...] = (1.0, 2.0, 4.0)
    compress_channels: bool = True
    chunk_size: int | None = None
    memory_budget: int = 64 << 20
    seed: int = 0

    @classmethod
    def preset(cls, name: str = "default", **overrides) -> SearchConfig:
        """The named settings of :data:`PRESETS`, with ``overrides`` on top.

        >>> SearchConfig.preset("fast").n_angles, SearchConfig.preset("fast", seed=3).seed
        (36, 3)
        """
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"preset: unknown search preset {name!r}; valid choices: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def of(cls, config: SearchConfig | str | None, **defaults) -> SearchConfig:
        """The settings a ``config`` argument names: ``None`` (the defaults, with ``defaults`` such as
        ``seed``), a preset name (:data:`PRESETS`) or a :class:`SearchConfig` (as it is).

        >>> SearchConfig.of("fast").n_angles, SearchConfig.of(None, seed=2).seed
        (36, 2)
        """
        if config is None:
            return cls(**defaults)
        if isinstance(config, str):
            return cls.preset(config, **defaults)
        if not isinstance(config, cls):
            raise TypeError(f"config: expected a SearchConfig or a preset name ({', '.join(PRESETS)}), got "
                            f"{type(config).__name__}")
        return config

    def __post_init__(self):
        """Every field checked once, here (one-line errors naming the field); frozen afterwards."""
        from .checks import check_int, check_number, check_seed

        for name in ("n_angles", "similarity_n_angles", "affine_n_angles", "top_k", "shortlist", "refine_keep"):
            check_int(getattr(self, name), name, minimum=1)
        for name in ("polish_levels", "refine_steps", "polish_starts", "subpixel_top"):
            check_int(getattr(self, name), name, minimum=0)
        check_number(self.min_overlap, "min_overlap", minimum=0.0, maximum=1.0)
        check_number(self.min_signal, "min_signal", minimum=0.0, maximum=1.0)
        check_number(self.basin_separation, "basin_separation", positive=True)
        check_number(self.basin_shift, "basin_shift", positive=True)
        if self.max_shift is not None:
            check_number(self.max_shift, "max_shift", minimum=0.0)
        if self.chunk_size is not None:
            check_int(self.chunk_size, "chunk_size", minimum=1)
        check_int(self.memory_budget, "memory_budget", minimum=1)
        check_seed(self.seed)
        if not isinstance(self.compress_channels, bool):
            raise TypeError(f"compress_channels: expected True or False, got {self.compress_channels!r}")
        for name in ("log2_scales", "similarity_log2_scales", "affine_log2_scales", "affine_log2_aspects",
                     "affine_aspect_angles"):
            v = getattr(self, name)
            may_be_empty = name in ("affine_log2_aspects", "affine_aspect_angles")  # () = isotropic shapes only
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or (len(v) == 0 and not may_be_empty):
                raise ValueError(f"{name}: must be a non-empty sequence of numbers, got {v!r}")
            vals = tuple(check_number(x, name) for x in v)
            if vals and (name.endswith("log2_scales") or name.endswith("log2_aspects")):
                if max(abs(x) for x in vals) > 6:
                    raise ValueError(f"{name}: log2 factors must lie in -6..6, got {max(vals, key=abs):g}")
            object.__setattr__(self, name, vals)
        if isinstance(self.hop_steps, (str, bytes)) or not hasattr(self.hop_steps, "__len__"):
            raise ValueError(f"hop_steps: must be a sequence of positive numbers (may be empty), got "
                             f"{self.hop_steps!r}")
        object.__setattr__(self, "hop_steps", tuple(check_number(x, "hop_steps", positive=True)
                                                    for x in self.hop_steps))
        if bool(self.affine_log2_aspects) != bool(self.affine_aspect_angles):
            empty, other = (("affine_aspect_angles", "affine_log2_aspects") if self.affine_log2_aspects
                            else ("affine_log2_aspects", "affine_aspect_angles"))
            raise ValueError(f"{empty}: empty while {other} is not, so no anisotropic shape would be searched; give "
                             f"both (anisotropy along directions) or neither (isotropic shapes only)")


def _search_config_init(init):
    import functools

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - {f.name for f in fields(SearchConfig)})
        if unknown:
            raise TypeError(f"SearchConfig: unknown option(s) {', '.join(map(repr, unknown))}; valid choices: "
                            f"{', '.join(f.name for f in fields(SearchConfig))}")
        init(self, *args, **kwargs)

    return __init__


SearchConfig.__init__ = _search_config_init(SearchConfig.__init__)


@dataclass
class Alignment:
    """The result of :func:`align` for a batch of B image pairs.

    Attributes:
        family: the search family.
        errors: ``(B,)`` float64, the normalised error at the returned transformation (NaN
            where there is no verdict; ``reasons`` says why).
        matrices: ``(B, 3, 3)`` normalised input -> output matrices (layer frame) applied to
            ``moving``.
        params: ``(B, P)`` family parameters in the layer's centred frame.
        overlap: ``(B,)`` the comparison region kept at the returned warp, as a fraction of the
            reference's region ``sum M``.
        positions: ``(B,)`` the same region in positions (``sum R_g``).
        signal: ``(B,)`` the share of the reference's signal on ``M`` that the region carries.
        reasons: per image, ``None`` or why the error is NaN.
        permutations: ``(B, C)`` long or None; ``aligned[:, c] = warped_moving[:, perm[c]]``.
        coarse_errors: ``(B,)`` the best error of the coarse grid before refinement.
        spatial: for a permutation search, the spatial-only :class:`Alignment`.
    """

    family: str
    errors: torch.Tensor
    matrices: torch.Tensor
    params: torch.Tensor
    overlap: torch.Tensor
    reasons: list = field(default_factory=list)
    positions: torch.Tensor | None = None
    signal: torch.Tensor | None = None
    permutations: torch.Tensor | None = None
    coarse_errors: torch.Tensor | None = None
    spatial: Alignment | None = None

    @property
    def n_excluded(self) -> int:
        """Images without a verdict (NaN error)."""
        return sum(r is not None for r in self.reasons)


# ----------------------------------------------------------------------------- regions and errors


def _energy(reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (reference.pow(2) * mask).flatten(-3).sum(-1)


def warp_valid(valid: torch.Tensor, matrices: torch.Tensor, *, size=None, strict: bool = False) -> torch.Tensor:
    """The weight of ``V_g`` (docs/definitions.md): how much of each warped position's bilinear
    footprint lies inside the valid region ``valid``.

    ``valid`` ``(H, W)`` (one region) or ``(B, H, W)``; ``matrices`` as in
    :func:`invariance.warp` (normalised, input -> output). The weight is the bilinear sample
    of the valid region: 1 where every sample the position blends is valid, 0 where none is, and
    in between on the border, so that the error is continuous in the warp. ``strict=True`` gives
    the 0/1 indicator "every sample is valid". Returns ``(H', W')`` for one region and one
    matrix, ``(K, H', W')`` for ``K`` shared matrices, ``(B, K, H', W')`` per image.

    >>> v = torch.ones(4, 6)
    >>> T = G.centred_to_normalized(G.to_matrix("translation", torch.tensor([2.5, 0.0])), (4, 6))
    >>> warp_valid(v, T)[0].tolist()       # a shift by 2.5 columns: two and a half columns pulled in
    [0.0, 0.0, 0.5, 1.0, 1.0, 1.0]
    >>> warp_valid(v, T, strict=True)[0].tolist()
    [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    """
    v = valid.to(matrices.dtype if matrices.is_floating_point() else torch.float32)
    v = v[None, None] if v.dim() == 2 else v[:, None]
    if matrices.dim() == 4 and v.shape[0] == 1:
        v = v.expand(matrices.shape[0], 1, *v.shape[-2:])
    out = warp(v, matrices.detach(), size=size)
    out = (out >= _VALID).to(v.dtype) if strict else _weights(out)
    out = out[:, :, 0] if out.dim() == 5 else out[:, 0]  # drop the channel
    return out[0] if valid.dim() == 2 and matrices.dim() < 4 else out


def _weights(w: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a 0/1 region -> weights in [0, 1]; below ``_W_MIN`` counts as outside."""
    return torch.where(w > _W_MIN, w.clamp(max=1.0), torch.zeros_like(w))


def _stack(moving: torch.Tensor, mvalid: torch.Tensor) -> torch.Tensor:
    """``(B, C + 1, H, W)``: the moving maps zeroed outside their valid region, and the region.

    One warp of the stack gives both terms of the normalised sample (module docstring)."""
    v = mvalid.expand(moving.shape[0], *mvalid.shape[-2:]) if mvalid.dim() == 2 else mvalid
    return torch.cat([moving * v[:, None], v[:, None].to(moving.dtype)], 1)


def _split(warped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A warped stack ``(..., C + 1, H, W)`` -> (normalised samples ``(..., C, H, W)``, weights ``(..., H, W)``).

    The sample at a position is the average of the *valid* maps' values its bilinear footprint
    blends; its weight is the valid share of that footprint (:func:`warp_valid`)."""
    w = _weights(warped[..., -1, :, :])
    vals = warped[..., :-1, :, :] / torch.where(w > 0, w, torch.ones_like(w)).unsqueeze(-3)
    return vals * (w > 0).unsqueeze(-3).to(vals.dtype), w


def aligned(moving: torch.Tensor, matrices: torch.Tensor, moving_mask: torch.Tensor | None = None,
            *, size=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The warp ``W_g F_h`` of docs/definitions.md and the weight of ``V_g``: ``(values, weights)``.

    ``moving (B, C, H, W)``; ``matrices`` as in :func:`invariance.warp`; ``moving_mask``
    ``(H, W)`` or ``(B, H, W)`` the moving maps' valid region (default: all). A warped value
    blends only valid positions (bilinear weights renormalised over them); its weight is the
    valid share of its footprint. Values have :func:`~invariance.warp`'s output shape,
    weights the same without the channel axis.

    >>> x = torch.ones(1, 2, 4, 6)
    >>> T = G.centred_to_normalized(G.to_matrix("translation", torch.tensor([2.5, 0.0])), (4, 6))
    >>> vals, w = aligned(x, T)
    >>> vals[0, 0, 0].tolist(), w[0, 0].tolist()   # the border position keeps its valid value
    ([0.0, 0.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    """
    check_images(moving, "moving")
    mv = _resolve_moving(moving_mask, moving.shape[0], tuple(moving.shape[-2:]), moving.dtype, moving.device)
    return _split(warp(_stack(moving, mv), matrices, size=size))


def region_error(reference: torch.Tensor, moving: torch.Tensor, matrices: torch.Tensor, *,
                 mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The error ``e(g)`` of docs/definitions.md of given warps: ``(B,)`` for one matrix or per-image
    ``(B, 3, 3)`` matrices, ``(B, K)`` for ``(K, 3, 3)`` or ``(B, K, 3, 3)``; NaN where the reference has
    no energy on the region.

    >>> ref = torch.zeros(1, 1, 8, 8); ref[0, 0, 2:5, 3:6] = 1
    >>> mov = torch.roll(ref, 1, dims=-1)
    >>> T = G.centred_to_normalized(G.to_matrix("translation", torch.tensor([-1.0, 0.0])), (8, 8))
    >>> region_error(ref, mov, T).tolist()
    [0.0]
    """
    check_images(reference, "reference")
    per_image = matrices.dim() == 3 and matrices.shape[0] == reference.shape[0] and matrices.dim() != 4
    m = matrices.to(reference)[:, None] if per_image else matrices.to(reference)
    vals, w = aligned(moving, m, moving_mask)
    region = _resolve_mask(mask, None, tuple(reference.shape[-2:]), reference.dtype, reference.device)
    err = masked_error(reference, vals, region, valid=w)
    return err[:, 0] if per_image else err


def masked_error(reference: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """``sum R ||aligned - reference||^2 / sum R ||reference||^2`` with ``R = mask * valid``.

    ``reference (B, C, H, W)``; ``aligned`` of the same shape or ``(B, K, C, H, W)``;
    ``mask (H, W)`` (default: all ones); ``valid`` the positions where ``aligned`` is defined,
    ``(H, W)``, ``(B, H, W)`` or ``(B, K, H, W)`` (default: all). Returns ``(B,)`` or
    ``(B, K)``; NaN where the reference has no energy on the region (no verdict).

    >>> x = torch.ones(2, 3, 4, 4)
    >>> masked_error(x, 0 * x)
    tensor([1., 1.])
    """
    m = torch.ones(reference.shape[-2:], dtype=reference.dtype, device=reference.device) \
        if mask is None else mask.to(device=reference.device, dtype=reference.dtype)
    ref = reference if aligned.dim() == reference.dim() else reference.unsqueeze(1)
    r = m if valid is None else m * valid.to(reference.dtype)
    r = r.unsqueeze(-3)
    num = ((aligned - ref).pow(2) * r).flatten(-3).sum(-1)
    den = (ref.pow(2) * r).flatten(-3).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.nan)


def _weight_terms(ref_sq, region, w, plane):
    """``R = region * w`` and its (den, count, signal) for a warp's weights ``w (B|1, k, H, W)``;
    ``ref_sq`` the reference's ``sum_c F_c^2`` ``(B, H, W)``, ``plane`` its signal plane
    ``(B, H, W)`` (:func:`_signal_plane`)."""
    r = region * w
    den = (ref_sq.unsqueeze(1) * r).flatten(-2).sum(-1)
    cnt = r.flatten(-2).sum(-1).expand_as(den)
    sig = (plane.unsqueeze(1) * w).flatten(-2).sum(-1).expand_as(den)
    return r, den, cnt, sig


def _safe_inverse(w: torch.Tensor) -> torch.Tensor:
    """``1 / w`` where ``w > 0``, else 0 (the normalised sample's factor)."""
    return torch.where(w > 0, 1 / torch.where(w > 0, w, torch.ones_like(w)), torch.zeros_like(w))


def _region_terms(reference, warped, region, valid, plane):
    """(num, den, count, signal) of ``R = region * valid`` for warped ``(B, k, C, H, W)``, valid
    ``(B|1, k, H, W)``; ``plane`` the reference's signal plane ``(B, H, W)`` (:func:`_signal_plane`)."""
    r, den, cnt, sig = _weight_terms(reference.pow(2).sum(1), region, valid, plane)
    num = ((warped - reference.unsqueeze(1)).pow(2).sum(2) * r).flatten(-2).sum(-1)
    return num, den, cnt, sig


def _stack_terms(reference, stacked, region, plane):
    """:func:`_region_terms` of :func:`_split` of a warped stack ``(B, k, C + 1, H, W)``, without the
    normalised samples: ``R ||x / w - F||^2`` is one fused pass over the ``C`` planes
    (``x (1 / w) - F``) squared in place, where the two functions make four passes and four
    temporaries (the error's inner loop: every polish move and exact scoring). The same terms up to
    rounding (``x (1 / w)`` for ``x / w``); outside the valid region (``w = 0``) ``R`` is 0 whatever the
    difference."""
    w = _weights(stacked[:, :, -1])  # (B, k, H, W)
    diff = torch.addcmul(-reference.unsqueeze(1), stacked[:, :, :-1], _safe_inverse(w).unsqueeze(2))
    r, den, cnt, sig = _weight_terms(reference.pow(2).sum(1), region, w, plane)
    num = (diff.square_().sum(2) * r).flatten(-2).sum(-1)
    return num, den, cnt, sig


def _resolve_mask(mask, mask_radius, size, dtype, device, name="mask") -> torch.Tensor:
    """The reference's region M (float 0/1, ``(H, W)``): the given mask, a disk, or the whole map."""
    if mask is None:
        if mask_radius is None:
            return torch.ones(size, dtype=dtype, device=device)
        if not (isinstance(mask_radius, (int, float)) and mask_radius > 0):
            raise ValueError(f"mask_radius: must be a positive number (normalised units), got {mask_radius!r}")
        return disk_mask(size, mask_radius, dtype=dtype, device=device).to(dtype)
    if mask_radius is not None:
        raise ValueError("mask_radius: give either mask or mask_radius, not both")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(size):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: expected a tensor of shape (H, W) = {tuple(size)}, got {shape}")
    return (mask.to(device=device) > 0).to(dtype)


def _resolve_moving(moving_mask, b, size, dtype, device) -> torch.Tensor:
    """The moving map's valid region (float 0/1): ``(H, W)`` shared, or ``(B, H, W)`` per image."""
    if moving_mask is None:
        return torch.ones(size, dtype=dtype, device=device)
    if isinstance(moving_mask, torch.Tensor) and moving_mask.dim() == 3 and tuple(moving_mask.shape) == (b, *size):
        return (moving_mask.to(device=device) > 0).to(dtype)
    if not isinstance(moving_mask, torch.Tensor) or tuple(moving_mask.shape) != tuple(size):
        shape = tuple(moving_mask.shape) if isinstance(moving_mask, torch.Tensor) else type(moving_mask).__name__
        raise ValueError(f"moving_mask: expected a tensor of shape (H, W) = {tuple(size)} or (B, H, W) = "
                         f"{(b, *size)}, got {shape}")
    return (moving_mask.to(device=device) > 0).to(dtype)


def _no_verdict(reference: torch.Tensor, region: torch.Tensor) -> list:
    """Per image: None, or why there is nothing to align (see :data:`MIN_REGION`)."""
    b = reference.shape[0]
    n = int(region.sum().round())
    if n < MIN_REGION:
        return [f"comparison region has {n} position(s), fewer than MIN_REGION = {MIN_REGION}"] * b
    energy = _energy(reference, region)
    mean = (reference * region).flatten(-2).sum(-1) / n  # (B, C)
    spread = ((reference - mean[..., None, None]).pow(2) * region).flatten(-3).sum(-1)
    out = []
    for e, s in zip(energy.tolist(), spread.tolist()):
        if not e > 0:
            out.append("reference maps are zero on the region (no signal)")
        elif s <= _CONSTANT_RTOL * e:
            out.append("reference maps are constant on the region (nothing to align)")
        else:
            out.append(None)
    return out


def _signal_plane(reference: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)``: the reference's signal per position, ``M * sum_c (F_c - mu_c)^2`` with ``mu_c``
    the channel's mean over ``M`` (docs/definitions.md, "What a verdict needs"): background and
    constant padding at the region's mean level carry none of it."""
    r = region if region.dim() == 2 else region[:, 0]
    n = r.flatten(-2).sum(-1).clamp_min(1e-30)
    mu = (reference * r.unsqueeze(-3)).flatten(-2).sum(-1) / (n[..., None] if n.dim() else n)  # (B, C)
    return (reference - mu[..., None, None]).pow(2).sum(1) * r


class _Rule:
    """What a feasible warp must keep, per image (docs/definitions.md, "What a verdict needs"):
    ``positions`` = ``max(MIN_REGION, min_overlap * O_exp)`` and ``signal`` =
    ``max(min_signal * S, min_overlap * S_exp)`` (``S`` the reference's signal on ``M``, ``S_exp``
    the part the expected warp's region carries), both ``(B,)``; ``plane`` the signal plane
    ``(B, H, W)``; ``verdict`` ``(B,)`` bool: whether the expected warp itself carries
    ``min_signal * S`` on at least ``MIN_REGION`` positions (else the image has no verdict)."""

    def __init__(self, positions: torch.Tensor, signal: torch.Tensor, plane: torch.Tensor,
                 verdict: torch.Tensor | None = None):
        self.positions, self.signal, self.plane = positions, signal, plane
        self.verdict = torch.ones_like(positions, dtype=torch.bool) if verdict is None else verdict

    @classmethod
    def of(cls, reference, region, v_exp, cfg: SearchConfig) -> _Rule:
        """The rule of :func:`align`; ``v_exp`` ``(B, 1, H, W)`` the weight ``V_g`` of the expected warp
        (None: no expected warp, its region is ``M``)."""
        plane = _signal_plane(reference, region)
        total = plane.flatten(-2).sum(-1)
        if v_exp is None:
            o_exp, s_exp = region.sum().expand(reference.shape[0]), total
        else:
            o_exp = (region * v_exp).flatten(-2).sum(-1)[:, 0]
            s_exp = (plane.unsqueeze(1) * v_exp).flatten(-2).sum(-1)[:, 0]
        positions = torch.clamp(cfg.min_overlap * o_exp, min=float(MIN_REGION))
        signal = torch.maximum(cfg.min_signal * total, cfg.min_overlap * s_exp)
        return cls(positions, signal, plane, verdict=(s_exp >= cfg.min_signal * total) & (o_exp >= MIN_REGION))

    @classmethod
    def anything(cls, reference, region) -> _Rule:
        """Every candidate with some region feasible (tests of the formulas)."""
        b = reference.shape[0]
        zero = torch.zeros(b, dtype=reference.dtype, device=reference.device)
        return cls(zero, zero, _signal_plane(reference, region))

    def select(self, images: slice) -> _Rule:
        """The rule of some of the images."""
        return _Rule(self.positions[images], self.signal[images], self.plane[images], self.verdict[images])

    def share(self, sig: torch.Tensor) -> torch.Tensor:
        """Kept signal ``(B, ...)`` -> its share of the reference's signal on ``M`` (NaN without any)."""
        total = self.plane.flatten(-2).sum(-1).reshape(-1, *[1] * (sig.dim() - 1))
        return torch.where(total > 0, sig / total.clamp_min(1e-300), torch.nan)

    def least_positions(self, n: int, dtype) -> float:
        """The fewest positions a coarse candidate of any image may keep and stay a candidate
        (:meth:`feasible` with ``rounding``, ``n`` positions in the map)."""
        return float(self.positions.min()) - _COARSE_ROUNDING * torch.finfo(dtype).eps * n

    def feasible(self, num, den, cnt, sig, energy, rounding: bool = False):
        """Errors ``num / den`` with infeasible candidates set to inf.

        A candidate is feasible when its region keeps ``positions`` and ``signal`` (exactly, unless
        ``rounding``: the FFT terms of the coarse stage carry absolute errors of ``~eps`` times the
        totals, so there a candidate within that much of the minimum is kept as a candidate; the
        exact scoring that decides the result applies the rule as written) and holds at least
        ``1000 eps`` of the reference's energy (1.2e-4 in float32): below that its error would be
        rounding noise."""
        eps = torch.finfo(den.dtype).eps
        shape = (-1, *[1] * (den.dim() - 1))
        need_n, need_s = self.positions.reshape(shape), self.signal.reshape(shape)
        if rounding:
            n = float(self.plane.shape[-1] * self.plane.shape[-2])
            need_n = need_n - _COARSE_ROUNDING * eps * n
            need_s = need_s - _COARSE_ROUNDING * eps * self.plane.flatten(-2).sum(-1).reshape(shape)
        ok = (cnt >= need_n) & (sig >= need_s) & (den > 1e3 * eps * energy.reshape(shape))
        # a safe denominator off the feasible set keeps gradients finite (torch.where differentiates both sides)
        return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.inf)


# ----------------------------------------------------------------------------- candidates


def _linear_candidates(family: str, cfg: SearchConfig, dtype, device) -> torch.Tensor:
    """(K, 3, 3) centred-frame linear parts of the coarse grid (identity always first)."""
    kw = dict(dtype=dtype, device=device)
    eye = torch.eye(3, **kw)[None]
    if family == "translation":
        return eye
    if family in ("rotation", "rigid"):
        ang = G.angle_grid(cfg.n_angles, **kw)
        return G.to_matrix("rotation", ang[:, None])
    if family in ("scale", "scale_translation"):
        s = 2.0 ** torch.tensor(cfg.log2_scales, **kw)
        return torch.cat([eye, G.to_matrix("scale", s[:, None])])
    if family == "similarity":
        ang = G.angle_grid(cfg.similarity_n_angles, **kw)
        s = 2.0 ** torch.tensor(cfg.similarity_log2_scales, **kw)
        a, b = torch.meshgrid(ang, s, indexing="ij")
        p = torch.stack([a.flatten(), b.flatten(), torch.zeros_like(a.flatten()), torch.zeros_like(a.flatten())], -1)
        return torch.cat([eye, G.to_matrix("similarity", p)])
    if family == "affine":
        mats = []
        ang = G.angle_grid(cfg.affine_n_angles, **kw)
        rot = G.to_matrix("rotation", ang[:, None])
        shapes = [torch.eye(3, **kw)]
        for la in cfg.affine_log2_aspects:
            for phi in cfg.affine_aspect_angles:
                r = G.to_matrix("rotation", torch.tensor([phi], **kw))
                d = G.to_matrix("anisotropic_scale", torch.tensor([2.0 ** (la / 2), 2.0 ** (-la / 2)], **kw))
                shapes.append(r @ d @ G.inverse(r))
        for ls in cfg.affine_log2_scales:
            sc = G.to_matrix("scale", torch.tensor([2.0**ls], **kw))
            for shp in shapes:
                mats.append(rot @ sc @ shp)
        return torch.cat([eye, torch.cat(mats)])
    raise ValueError(f"family: unknown search family {family!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")


def _translation(t: torch.Tensor) -> torch.Tensor:
    """(..., 2) shifts (x, y) in pixels -> (..., 3, 3) centred-frame translations."""
    return G.to_matrix("translation", t)


# ----------------------------------------------------------------------------- FFT shift search


def _support_outline(valid: torch.Tensor) -> torch.Tensor | None:
    """Points ``(P, 2)`` (centred ``(x, y)``, float64, CPU) whose convex hull holds every position
    that the bilinear footprint of the valid region ``(H, W)`` or ``(B, H, W)`` (any image's) reaches:
    each row's first and last valid pixel centre, moved by one pixel either way along both axes (a
    sample blends the pixels within one pixel of it). None when nothing is valid."""
    v = (valid.detach() > 0)
    v = (v.reshape(-1, *v.shape[-2:]).any(0)).cpu()
    h, w = v.shape
    rows = v.any(1).nonzero()[:, 0]
    if rows.numel() == 0:
        return None
    first = v[rows].to(torch.int8).argmax(1)
    last = w - 1 - v[rows].flip(1).to(torch.int8).argmax(1)
    y = rows.double() - (h - 1) / 2
    pts = torch.cat([torch.stack([x.double() - (w - 1) / 2, y], 1) for x in (first, last)])
    step = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    return (pts[:, None] + step).reshape(-1, 2)


def _canvas_pads(lin: torch.Tensor, h: int, w: int, cap: float = 1.0,
                 outline: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Padding ``(py, px)`` per candidate of a canvas that holds its warped map's whole support.

    The moving map is warped by each linear candidate ``lin (K, 3, 3)`` onto a canvas larger than
    the reference (same pixel pitch and centre), so that an integer shift of the canvas followed
    by a crop is *exactly* the warp by ``shift o candidate``: no content is lost at the
    reference's border. ``outline`` (:func:`_support_outline`): the canvas holds the warp of the
    valid region's footprint (all the search keeps of a warped map: it is zero elsewhere), else
    the whole frame's. The padding is capped at ``cap`` times the size (a zoom by more than ~5x
    loses a border).
    """
    if outline is None:
        # a sample blends the map while its source lies within one pixel of the outer pixel
        # centres, i.e. within half a pixel of the frame's edge
        hw, hh = w / 2 + 0.5, h / 2 + 0.5
        outline = torch.tensor([[-hw, -hh], [hw, -hh], [-hw, hh], [hw, hh]], dtype=torch.float64)
    pts = outline.to(dtype=lin.dtype, device=lin.device)
    pts = G.apply_to_points(lin, pts.expand(lin.shape[0], *pts.shape)).abs().amax(1).double().cpu().numpy()
    # canvas pixel centres reach (size - 1) / 2 + pad; half a pixel more as a margin for rounding
    # (a full valid region's outline is the frame's corners: the same pads either way)
    px = np.minimum(np.ceil(np.maximum(0.0, pts[:, 0] + 1.0 - w / 2)), int(cap * w)).astype(int)
    py = np.minimum(np.ceil(np.maximum(0.0, pts[:, 1] + 1.0 - h / 2)), int(cap * h)).astype(int)
    return list(zip(py.tolist(), px.tolist()))


SEARCH_BYTES_PER_CANVAS_ELEMENT = 56
"""Peak bytes :func:`align` holds per image, channel and element of its largest FFT canvas, for
float32 maps (the warped canvas, its half spectrum, the reference's, products and planes).
Measured on the CPU as the growth of the peak resident memory from one image to four: 45 for the
3 x 224 x 224 input of resnet50's interpolation floor, 30 for its layer1 maps (256 x 56 x 56,
with the random-pair null); the rest is a margin for the allocator's fragmentation, which moved
the peak of one run by up to a fifth (``benchmarks/results/memory_budget.md``)."""


def search_bytes_per_image(family: str, channels: int, size, config: SearchConfig | None = None,
                           itemsize: int = 4) -> int:
    """Estimated peak memory one image adds to :func:`align` (bytes), from its largest canvas.

    The coarse search scores at least one candidate for every image of the batch at once; with a
    translation part that is an FFT canvas of ``next_fast_len(h + 2 pad + h - 1)`` per axis, the
    padding holding the widest candidate's warped map (a 4x zoom needs ~10x the map's side).
    :func:`invariance.measure` sizes its batches of images from it.

    >>> search_bytes_per_image("rigid", 1024, (14, 14)) // 2**20   # resnet50 layer3, 72 angles
    110
    """
    cfg = SearchConfig.of(config)
    h, w = (int(v) for v in size)
    if SEARCH_FAMILIES[family][1]:
        pads = _canvas_pads(_linear_candidates(family, cfg, torch.float64, "cpu"), h, w, cap=4.0)
        py = -(-max(p[0] for p in pads) // 4) * 4
        px = -(-max(p[1] for p in pads) // 4) * 4
        canvas = next_fast_len(2 * h + 2 * py - 1, real=True) * next_fast_len(2 * w + 2 * px - 1, real=True)
    else:
        canvas = h * w
    return int(SEARCH_BYTES_PER_CANVAS_ELEMENT * (channels + 1) * canvas * itemsize / 4)


class _ShiftScorer:
    """Errors of all integer shifts of canvas-warped candidates against one reference batch (FFT).

    With ``M`` the reference region, ``P = sum_c F_c^2``, ``V`` the weight of the candidate's valid
    region on the canvas, ``G = V * warped`` (``warped``: the normalised samples),
    ``Q = V sum_c warped_c^2`` and the canvas offset ``p``, for a shift
    ``t`` every term is a cross-correlation ``R(u) = sum_y X(y + u) Y(y)`` at ``u = t - p``:
    ``num = corr(M, Q) - 2 sum_c corr(M F_c, G_c) + corr(M P, V)``, ``den = corr(M P, V)``,
    ``overlap = corr(M, V)``; all by zero-padded real FFTs, sized to hold the lags that can be
    feasible (:func:`_lag_window`) without wrap-around. The terms are not cropped: the FFT output's
    rows and columns carry their shifts (``ty``, ``tx``) and ``invalid`` marks the ones not scored.
    """

    def __init__(self, reference: torch.Tensor, region: torch.Tensor, pad: tuple[int, int],
                 max_shift: float | None, rule: _Rule, lags=None):
        """``lags``: per axis, the first and last lag ``u`` to score (:func:`_lag_window`); None: every
        lag with a nonzero correlation, ``-(canvas - 1) .. size - 1``."""
        b, c, h, w = reference.shape
        py, px = pad
        hc, wc = h + 2 * py, w + 2 * px
        self.canvas = (hc, wc)
        full = ((-(hc - 1), h - 1), (-(wc - 1), w - 1))
        lags = full if lags is None else lags
        # a cyclic correlation of length n holds the linear one's lags a .. b without wrap-around
        # when n > (size - 1) - a and n > b + (canvas - 1) (every lag: n >= canvas + size - 1), and
        # the canvas must fit; sizes with small prime factors are fast
        self.s = tuple(next_fast_len(max(cn, top - lo_u + 1, hi_u - lo + 1), real=True)
                       for (lo, top), (lo_u, hi_u), cn in zip(full, lags, (hc, wc)))
        self.energy = _energy(reference, region)  # (B,)
        # conj(FFT(M F_c)), channels first (C, B, N, N'): score_all accumulates FFT(G_c) * conj(FFT(M F_c))
        self.fa = torch.fft.rfft2((reference * region).transpose(0, 1), s=self.s).conj().resolve_conj()
        self.fm = torch.fft.rfft2(region, s=self.s)
        self.fp = torch.fft.rfft2(reference.pow(2).sum(1) * region, s=self.s)  # (B, N, N')
        self.rule = rule
        self.fs = torch.fft.rfft2(rule.plane, s=self.s)  # the signal plane (B, N, N')
        self._buf = None  # the zero-bordered canvas the maps are warped into, reused across chunks

        def axis(n, first, last, p):  # the shift t = u + p of each FFT output index, and whether it is scored
            u = first + torch.remainder(torch.arange(n, device=reference.device) - first, n)
            return u + p, u <= last

        (ty, oky), (tx, okx) = axis(self.s[0], *lags[0], py), axis(self.s[1], *lags[1], px)
        self.ty, self.tx = ty, tx  # per FFT output row / column
        bad = ~(oky[:, None] & okx[None, :])
        if max_shift is not None:
            bad |= (ty[:, None] ** 2 + tx[None, :] ** 2).to(reference.dtype) > max_shift**2
        self.invalid = bad

    def __call__(self, stacked: torch.Tensor, shared_valid: bool = False):
        """stacked (B, k, C + 1, Hc, Wc), the canvas-warped stack of :func:`_stack` ->
        (best error (B, k), best shift (B, k, 2) as (tx, ty))."""
        c = stacked.shape[2] - 1
        return self.score_all(lambda c0, c1: stacked[:, :, c0:c1].permute(2, 0, 1, 3, 4), c, shared_valid,
                              [(self, slice(None))])[0]

    def _canvas_buffer(self, c: int, b: int, k: int, like: torch.Tensor) -> torch.Tensor:
        """A zero ``(C, B, k, N, N')`` buffer, kept across chunks: the warped maps are written into its
        top-left ``(Hc, Wc)`` window, so its border stays zero and each chunk's transforms need
        neither a padded copy nor a fresh allocation (the allocator's page faults, issue 22);
        channels first, so that a block of channels is one contiguous transform."""
        shape = (c, b, k, *self.s)
        if self._buf is None or self._buf.shape != shape:
            self._buf = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self._buf

    def score_all(self, sample, c: int, shared_valid: bool, targets: list) -> list:
        """Score the canvas warps of the stack of :func:`_stack` (maps zeroed outside their valid
        region, then the region as channel ``c``) against each ``(scorer, images)`` of ``targets``
        (this scorer's canvas; ``images``: the moving maps of the scorer's reference images): a
        list of (best error ``(B', k)``, best shift ``(B', k, 2)`` as ``(tx, ty)``). ``sample(c0, c1)``
        gives the warps of the stack's channels ``c0 .. c1 - 1``, ``(c1 - c0, B, k, Hc, Wc)``
        (:func:`~invariance._warp.unchecked_block_chunks`).

        The moving side is warped and transformed once for all targets, in blocks of channels: a
        block is warped into the canvas, transformed and multiplied into every target's cross
        spectrum while it is in the caches, so no tensor holds all channels' warps or spectra.
        With the warped region's weight ``w`` (:func:`_weights`) and the normalised samples
        ``x_c / w`` (:func:`_split`), ``G_c = w (x_c / w) = x_c`` and ``Q = w sum_c (x_c / w)^2 =
        sum_c x_c^2 / w`` where ``w > 0`` (0 elsewhere): no division of the ``C`` planes.
        ``shared_valid``: every image's warped region is the same plane (one moving mask for every
        image, shared candidates), transformed once per candidate, not once per image."""
        w = _weights(sample(c, c + 1)[0])  # (B, k, Hc, Wc)
        b, k, hc, wc = w.shape
        inside = (w > 0).to(w.dtype)
        buf = self._canvas_buffer(c, b, k, w)
        # sum_c FFT(G_c) conj(FFT(M F_c)) per target, in blocks of channels whose spectra stay under
        # step_bytes on CUDA and _BLOCK_BYTES (the caches) on the CPU
        nf = self.s[1] // 2 + 1
        specs = [torch.zeros(len(range(b)[images]), k, self.s[0], nf, dtype=self.fa.dtype, device=buf.device)
                 for _, images in targets]
        sq = torch.zeros_like(w)
        budget = step_bytes(buf.device) if buf.device.type == "cuda" else _BLOCK_BYTES
        blk = max(1, min(c, budget // max(1, k * b * self.s[0] * nf * self.fa.element_size())))
        for c0 in range(0, c, blk):
            c1 = min(c, c0 + blk)
            window = buf[c0:c1, ..., :hc, :wc]
            torch.mul(sample(c0, c1), inside, out=window)
            fg = torch.fft.rfft2(buf[c0:c1])  # (c', B, k, N, N')
            for spec, (scorer, images) in zip(specs, targets):
                spec += (fg[:, images] * scorer.fa[c0:c1, :, None]).sum(0)
            sq += window.square_().sum(0)  # the block's transforms are taken: square it in place
        fq = torch.fft.rfft2(sq / torch.where(w > 0, w, torch.ones_like(w)), s=self.s)
        fv = torch.fft.rfft2(w[:1] if shared_valid else w, s=self.s).conj()  # (B or 1, k, ...)
        return [scorer.score(spec, fq[images], fv if shared_valid else fv[images])
                for spec, (scorer, images) in zip(specs, targets)]

    def score(self, spec: torch.Tensor, fq: torch.Tensor, fv: torch.Tensor):
        """The cross spectrum ``sum_c FFT(G_c) conj(FFT(M F_c))`` ``(B, k, N, N')``, ``FFT(Q)`` and
        ``conj FFT(V)`` (``(B or 1, k, N, N')``) of the moving maps of this scorer's references ->
        (best error (B, k), best shift (B, k, 2) as (tx, ty))."""
        # corr(M, Q) - 2 sum_c corr(M F_c, G_c) in one inverse transform (the FFT is linear)
        num = torch.fft.irfft2(self.fm * fq.conj() - 2 * spec.conj(), s=self.s)
        den = torch.fft.irfft2(self.fp[:, None] * fv, s=self.s)
        cnt = torch.fft.irfft2(self.fm * fv, s=self.s)  # (1, k): one per candidate when V is shared
        sig = torch.fft.irfft2(self.fs[:, None] * fv, s=self.s)
        e = self.rule.feasible(num.add_(den), den, cnt, sig, self.energy, rounding=True)
        e = e.masked_fill_(self.invalid, torch.inf)
        best, idx = e.flatten(-2).min(-1)
        nx = self.s[1]
        shift = torch.stack([self.tx[idx % nx], self.ty[idx // nx]], -1).to(best.dtype)
        return best, shift


def _region_profiles(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of the region ``M`` (any image's: the largest over a batch), float64 on
    the CPU: what :func:`_lag_window` needs of it."""
    m = region.detach().reshape(-1, *region.shape[-2:]).amax(0).double().cpu()
    return m.sum(1), m.sum(0)


def _lag_window(profiles: tuple[torch.Tensor, torch.Tensor], canvas: tuple[int, int], need: float):
    """Per axis ``(first, last)``: the lags ``u`` (:class:`_ShiftScorer`) at which a canvas-warped
    candidate can overlap the region ``M`` (its :func:`_region_profiles`) on ``need`` positions or
    more; None when every lag is needed. A candidate's weight ``V`` is at most 1 and zero off the
    canvas, so its overlap at a lag is at most the sum of ``M`` over the reference rows (columns)
    the canvas's rows (columns) reach there; a lag where that sum is below ``need`` is infeasible
    along either axis, and the FFT need not hold it (a feasible warp keeps ``min_overlap`` of the
    expected warp's positions: with the default 1/2 that drops about a third of the lags and half
    the FFT's area)."""
    if not need > 0:
        return None
    out = []
    for profile, cn in zip(profiles, canvas):
        n = profile.shape[0]
        cum = torch.cat([profile.new_zeros(1), profile.cumsum(0)])
        u = torch.arange(-(cn - 1), n)  # every lag with a nonzero correlation
        reach = cum[(u + cn).clamp(0, n)] - cum[u.clamp(0, n)]  # M over reference rows u .. u + cn - 1
        ok = (reach >= need).nonzero()[:, 0]
        if ok.numel() == 0:
            return None
        out.append((int(u[ok[0]]), int(u[ok[-1]])))
    return tuple(out)


def _auto_chunk(cfg: SearchConfig, b: int, c: int, h: int, w: int, itemsize: int) -> int:
    if cfg.chunk_size is not None:
        if cfg.chunk_size < 1:
            raise ValueError(f"chunk_size: must be a positive integer, got {cfg.chunk_size}")
        return cfg.chunk_size
    # warped canvas + its spectrum (complex, about the same size) + a few planes
    per_candidate = b * c * h * w * itemsize * 4 + b * h * w * itemsize * 20
    return max(1, int(cfg.memory_budget // max(per_candidate, 1)))


@dataclass(frozen=True)
class _Problem:
    """One search, as its stages (:func:`_coarse`, :func:`_refine`, :func:`_polish`) see it.

    Attributes:
        reference, moving: the maps ``(B, C, H, W)`` (``moving`` is warped onto ``reference``).
        region: ``M * I``, ``(H, W)`` or ``(B, 1, H, W)``; mvalid: the moving map's valid region.
        size: ``(H, W)``; family: the search family; cfg: the :class:`SearchConfig`.
        required: the feasibility rule (:class:`_Rule`); perm: per-image channel
            permutations applied to ``moving`` (``(B, C)``), or None.
        gram: the inner-product tables of the refinement and the polish (:class:`_Gram`), or None:
            they warp the channels.
    """

    reference: torch.Tensor
    moving: torch.Tensor
    region: torch.Tensor
    mvalid: torch.Tensor
    size: tuple[int, int]
    family: str
    cfg: SearchConfig
    required: _Rule
    perm: torch.Tensor | None = None
    gram: _Gram | None = None

    def select(self, images: slice) -> _Problem:
        """The same search for some of the images."""
        return replace(self, reference=self.reference[images], moving=self.moving[images],
                       mvalid=self.mvalid[images] if self.mvalid.dim() == 3 else self.mvalid,
                       required=self.required.select(images),
                       perm=None if self.perm is None else self.perm[images],
                       gram=None if self.gram is None else self.gram.select(images))


_HALF_PIXELS = ((0.5, 0.0), (0.0, 0.5), (0.5, 0.5))


def _coarse(prob: _Problem):
    """Exhaustive coarse search. Returns (errors (B, K'), centred matrices (B, K', 3, 3)).

    Every linear part of the grid with every integer shift; then, for families with a translation,
    each image's ``cfg.subpixel_top`` best linear parts again at the three half-pixel offsets with
    every integer shift. On small maps (a stride-4 layer of a 48 px image: 12 x 12)
    the error between integer shifts is not smooth at all: the optimum of a fresh random network
    sat on a half-pixel line where every integer shift read 0.42-0.68 and the optimum 0.339.
    """
    lin = _linear_candidates(prob.family, prob.cfg, prob.reference.dtype, prob.reference.device)  # (K,3,3)
    return _subpixel(prob, lin, *_coarse_grid(prob, lin))


def _coarse_pair(prob: _Problem, nxt: _Problem):
    """:func:`_coarse` of ``prob`` and of the problem ``nxt`` that warps ``prob``'s first moving maps
    (as many as ``nxt`` has references) onto ``nxt``'s references (the random-pair null): the
    shared grid's warps and their FFTs are computed once and scored against both references, so
    the null's exhaustive stage costs its channel products, not its warps and transforms.
    The results are those of two :func:`_coarse` calls."""
    lin = _linear_candidates(prob.family, prob.cfg, prob.reference.dtype, prob.reference.device)
    (e, m), (e2, m2) = _coarse_grid(prob, lin, nxt)
    return _subpixel(prob, lin, e, m), _subpixel(nxt, lin, e2, m2)


def _subpixel(prob: _Problem, lin: torch.Tensor, errs: torch.Tensor, mats: torch.Tensor):
    """The coarse stage's second part (:func:`_coarse`): each image's best linear parts again at
    the three half-pixel offsets."""
    n = min(prob.cfg.subpixel_top, lin.shape[0])
    if not SEARCH_FAMILIES[prob.family][1] or n == 0:
        return errs, mats
    # per image (an image's result never depends on its batch-mates): its n best linear parts
    e = errs.detach().double().cpu().numpy()
    e = np.where(np.isfinite(e), e, np.inf)
    top = np.argsort(e, axis=1, kind="stable")[:, :n]
    offsets = _translation(torch.tensor(_HALF_PIXELS, dtype=lin.dtype, device=lin.device))  # (3, 3, 3)
    top_t = torch.as_tensor(top, device=lin.device)
    chosen = lin[top_t] if lin.dim() == 3 else lin[torch.arange(lin.shape[0], device=lin.device)[:, None], top_t]
    sub = (offsets[None, None] @ chosen[:, :, None]).reshape(errs.shape[0], -1, 3, 3)
    # an image whose integer optimum is exact already (error <= _SETTLED: an integer shift of a
    # translation, a quarter turn) can gain nothing from half pixels: only the others take them,
    # the settled ones get their optimum again (never a new basin) at an infinite error
    todo = _Subset(torch.as_tensor(~(e.min(1) <= _SETTLED), device=errs.device))
    if not todo.any:
        return errs, mats
    e2, m2 = _coarse_grid(todo.of(prob), todo.take(sub))
    if not todo.all:
        ar = torch.arange(errs.shape[0], device=errs.device)
        best = mats[ar, torch.as_tensor(top[:, 0], device=errs.device)]  # (B, 3, 3)
        e2 = todo.put(torch.full((errs.shape[0], e2.shape[1]), torch.inf, dtype=e2.dtype, device=e2.device), e2)
        m2 = todo.put(best[:, None].expand(-1, m2.shape[1], 3, 3).clone(), m2)
    return torch.cat([errs, e2], 1), torch.cat([mats, m2], 1)


def _canvas_groups(lin: torch.Tensor, h: int, w: int, has_t: bool, outline: torch.Tensor | None = None) -> dict:
    """Candidates grouped by the canvas they need: ``{(py, px): indices}``.

    Shared ``lin (K, 3, 3)``: indices ``(k,)``. Per-image ``lin (B, K, 3, 3)``: indices ``(B, k)``:
    each image's candidates in the order of the canvas they need, the ``j``-th of every image on the
    canvas the largest of them needs (a larger canvas holds a warp as exactly), and the slots that
    need the same canvas in one group; every candidate is scored once (the images' candidates are
    not filled up to a common count per canvas).
    """
    flat = lin.reshape(-1, 3, 3)
    if has_t:
        pads = [(-(-py // 4) * 4, -(-px // 4) * 4) for py, px in _canvas_pads(flat, h, w, cap=4.0, outline=outline)]
    else:
        pads = [(0, 0)] * flat.shape[0]
    if lin.dim() == 3:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(pads):
            groups.setdefault(p, []).append(i)
        return {p: np.asarray(idx) for p, idx in groups.items()}
    b, k = lin.shape[:2]
    per = np.asarray(pads).reshape(b, k, 2)
    order = np.lexsort((per[..., 1], per[..., 0]), axis=1)  # per image: by canvas, then as given
    need = np.take_along_axis(per, order[..., None], 1).max(0)  # (k, 2): the slot's canvas
    out: dict = {}
    for j, p in enumerate(map(tuple, need.tolist())):
        out.setdefault(p, []).append(j)
    return {p: order[:, slots] for p, slots in out.items()}


def _coarse_grid(prob: _Problem, lin: torch.Tensor, nxt: _Problem | None = None):
    """The coarse search over the linear parts ``lin`` (centred), shared ``(K, 3, 3)`` or one set per
    image ``(B, K, 3, 3)``: (errors (B, K), matrices (B, K, 3, 3)).

    With a translation part, candidates are grouped by the canvas they need (rounded up to a
    multiple of 4 pixels), so that every candidate is scored exactly and small ones stay cheap.
    With ``nxt`` (shared ``lin`` only; see :func:`_coarse_pair`) the warps of ``prob``'s moving maps
    are scored against ``nxt``'s references too: a pair of results.
    """
    reference, moving, region, mvalid, family, cfg, size = (
        prob.reference, prob.moving, prob.region, prob.mvalid, prob.family, prob.cfg, prob.size)
    b, c, h, w = reference.shape
    has_t = SEARCH_FAMILIES[family][1]
    per_image = lin.dim() == 4
    k = lin.shape[-3]
    c_src = G.frame_matrix(size, frm="centred", to="normalized", dtype=lin.dtype, device=lin.device)
    stack = _stack(moving, mvalid)
    rows = torch.arange(b, device=reference.device)[:, None]
    probs = [prob] if nxt is None else [prob, nxt]
    energies = [_energy(q.reference, region) for q in probs]
    shared_valid = mvalid.dim() == 2 and not per_image
    # per problem: its images among the moving maps, errors and shifts
    out = [(slice(None) if q is prob else slice(0, q.reference.shape[0]),
            torch.full((q.reference.shape[0], k), torch.inf, dtype=reference.dtype, device=reference.device),
            torch.zeros(q.reference.shape[0], k, 2, dtype=reference.dtype, device=reference.device)) for q in probs]
    # the canvases hold the warps of the valid region's footprint (the search zeroes the rest), and
    # the FFTs only the lags where a warp can keep the rule's positions (less the coarse rounding)
    outline = _support_outline(mvalid) if has_t else None
    profiles = _region_profiles(region) if has_t else None
    need = min(q.required.least_positions(h * w, reference.dtype) for q in probs) - 1
    for (py, px), group in _canvas_groups(lin, h, w, has_t, outline).items():
        canvas = (h + 2 * py, w + 2 * px)
        # candidates from the moving map's normalised frame to the canvas' normalised frame
        c_out = G.frame_matrix(canvas, frm="centred", to="normalized", dtype=lin.dtype, device=lin.device)
        idx = torch.as_tensor(group, device=reference.device)
        part = lin[rows, idx] if per_image else lin[idx]  # (B, n, 3, 3) or (n, 3, 3)
        norm = c_out @ part @ torch.linalg.inv(c_src)
        if has_t:
            lags = _lag_window(profiles, canvas, need)
            scorers = [_ShiftScorer(q.reference, region, (py, px), cfg.max_shift, q.required, lags) for q in probs]
            side = int(math.sqrt(scorers[0].s[0] * scorers[0].s[1]))
        else:
            side = int(math.sqrt(h * w))
        chunk = _auto_chunk(cfg, b, c, side, side, reference.element_size())
        if has_t:  # warped a block of channels at a time, into the scorer's canvas
            chunks = unchecked_block_chunks(stack, norm if per_image else norm[None], canvas, chunk, affine=True,
                                            shared=not per_image)
        else:
            chunks = warp_chunks(stack, norm, size=canvas, chunk_size=chunk)
        for sl, part in chunks:  # has_t: a block sampler; else the warped stack
            if has_t:
                scored = scorers[0].score_all(part, c, shared_valid,
                                              [(sc, images) for sc, (images, _, _) in zip(scorers, out)])
            else:
                warped, valid = _split(part)  # (B, k, C, Hc, Wc), (B, k, Hc, Wc)
                if shared_valid:  # every image's warped valid region is the same plane
                    valid = valid[:1]
            for j, (q, (images, errs, shifts)) in enumerate(zip(probs, out)):
                if has_t:
                    e, t = scored[j]
                else:
                    v = valid if valid.shape[0] == 1 else valid[images]
                    e = q.required.feasible(*_region_terms(q.reference, warped[images], region, v, q.required.plane),
                                            energies[j])
                    t = None
                at = (rows, idx[:, sl]) if per_image else (slice(None), idx[sl])
                errs[at] = e
                if t is not None:
                    shifts[at] = t
    res = [(errs, _translation(shifts) @ (lin if per_image else lin.unsqueeze(0))) for _, errs, shifts in out]
    return res[0] if nxt is None else tuple(res)


def _distinct_starts(errors: torch.Tensor, centred: torch.Tensor, k: int, cfg: SearchConfig) -> torch.Tensor:
    """Indices (B, k) of the best candidate of up to ``k`` distinct basins per image (greedy).

    A candidate starts a new basin when its linear part differs from every start taken by at
    least ``cfg.basin_separation`` (Frobenius) or its translation by ``cfg.basin_shift`` pixels;
    images with fewer distinct basins repeat their best start.
    """
    b, n = errors.shape
    k = min(k, n)
    e = errors.detach().double().cpu().numpy()
    lin = centred[..., :2, :2].detach().double().cpu().numpy().reshape(b, n, 4)
    t = centred[..., :2, 2].detach().double().cpu().numpy()
    out = np.zeros((b, k), dtype=np.int64)
    for i in range(b):
        order = np.argsort(e[i], kind="stable")
        taken: list[int] = []
        for j in order:
            if len(taken) == k:
                break
            if taken:
                dl = np.linalg.norm(lin[i, taken] - lin[i, j], axis=-1)
                dt = np.linalg.norm(t[i, taken] - t[i, j], axis=-1)
                if not np.all((dl >= cfg.basin_separation) | (dt >= cfg.basin_shift)):
                    continue
            taken.append(int(j))
        taken += [taken[0]] * (k - len(taken))
        out[i] = taken
    return torch.as_tensor(out, device=errors.device)


# ----------------------------------------------------------------------------- refinement

_UNITS = {"angle": 1.0, "tx": 0.25, "ty": 0.25, "s": 0.02, "sx": 0.02, "sy": 0.02,
          "a": 0.01, "b": 0.01, "c": 0.25, "d": 0.01, "e": 0.01, "f": 0.25}
_LOG = {"s", "sx", "sy"}


def _to_free(fam: G.Family, params: torch.Tensor) -> torch.Tensor:
    cols = []
    for i, n in enumerate(fam.param_names):
        v = params[..., i]
        cols.append((torch.log(v.clamp_min(1e-6)) if n in _LOG else v) / _UNITS[n])
    return torch.stack(cols, -1)


def _from_free(fam: G.Family, z: torch.Tensor) -> torch.Tensor:
    cols = []
    for i, n in enumerate(fam.param_names):
        v = z[..., i] * _UNITS[n]
        cols.append(torch.exp(v) if n in _LOG else v)
    return torch.stack(cols, -1)



def _permuted(stack, perm):
    """A stack of :func:`_stack` with its map channels permuted (``perm (B, C)``), the region last."""
    if perm is None:
        return stack
    full = torch.cat([perm, torch.full_like(perm[:, :1], stack.shape[1] - 1)], 1)
    return torch.gather(stack, 1, full[:, :, None, None].expand(-1, -1, *stack.shape[-2:]))


def _exact(reference, moving, centred, region, mvalid, size, required, perm=None, signal=False):
    """Exact errors (inf where infeasible) and overlap counts of per-image centred matrices (B, n, 3, 3)
    (and the signal kept, with ``signal=True``). No device synchronisation: the polish calls it per move."""
    norm = G.centred_to_normalized(centred, size)
    stack = _permuted(_stack(moving, mvalid), perm)
    energy = _energy(reference, region)
    errs, cnts, sigs = [], [], []
    b, n = centred.shape[:2]
    c = stack.shape[1]
    chunk = max(1, int(step_bytes(moving.device) // max(1, b * c * size[0] * size[1] * moving.element_size())))
    for _, stacked in unchecked_chunks(stack, norm, size, chunk, affine=True):
        num, den, cnt, sig = _stack_terms(reference, stacked, region, required.plane)
        errs.append(required.feasible(num, den, cnt, sig, energy))
        cnts.append(cnt)
        sigs.append(sig)
    if signal:
        return torch.cat(errs, 1), torch.cat(cnts, 1), torch.cat(sigs, 1)
    return torch.cat(errs, 1), torch.cat(cnts, 1)


_GRAM_MIN_CHANNELS = 48
"""Channels from which the refinement and the polish score warps through :class:`_Gram` tables
rather than by warping every channel (a warp then costs O(H W) instead of O(C H W); the tables cost
one matrix product per image). Measured on 8 maps of 28 x 28, rigid, the whole ``align`` warping /
through tables: 1.76 / 1.74 s at 32 channels, 2.58 / 2.16 s at 48, 7.3 / 4.3 s at 128 (and 0.51 /
1.06 s at 4: below the threshold the tables cost more than they save)."""


@dataclass
class _Gram:
    """Inner-product tables that give a bilinear warp's exact error without warping the channels.

    With ``g`` the moving maps zeroed outside their valid region, on the grid padded by one zero
    pixel (``P = (H + 2)(W + 2)`` positions), and a warp's four bilinear taps ``p_k(q)`` with
    weights ``t_k(q)`` (zero off the valid region), the warped stack is ``x(q) = sum_k t_k g(p_k)``
    and ``w(q) = sum_k t_k``; so ``<x, F(q)> = sum_k t_k cross[q, p_k]`` and ``||x||^2 =
    sum_kl t_k t_l <g(p_k), g(p_l)>``, whose pairs are neighbours on the grid (``local``). The
    error's terms (:func:`_stack_terms`) follow: ``R ||x / w - F||^2 = region (||x||^2 / w -
    2 <x, F> + w ||F||^2)`` where ``w > 0``. The same numbers up to rounding (float64 sums in
    another order).

    Attributes:
        cross: ``(B, H W, P)``, ``<F(q), g(p)>``.
        local: ``(B, 5, P)``: ``<g(p), g(p + d)>`` for ``d`` = 0, right, down, down-right, and
            ``<g(p + right), g(p + down)>``.
        ref_sq: ``(B, H W)``, ``||F(q)||^2``.
        valid: ``(B | 1, P)``, the moving map's valid region, padded.
        rows: ``(B,)`` the rows of ``cross`` of a selection of the images (:meth:`select`: the
            largest table is not copied), or None for all of them in order.
    """

    cross: torch.Tensor
    local: torch.Tensor
    ref_sq: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor | None = None

    @staticmethod
    def of(reference: torch.Tensor, moving: torch.Tensor, mvalid: torch.Tensor) -> _Gram:
        b, c, h, w = moving.shape
        v = mvalid.expand(b, h, w) if mvalid.dim() == 2 else mvalid
        g = torch.nn.functional.pad(moving * v[:, None].to(moving.dtype), (1, 1, 1, 1))  # (B, C, H+2, W+2)
        ref = reference.flatten(2)  # (B, C, HW)
        cross = ref.transpose(1, 2) @ g.flatten(2)  # (B, HW, P)

        def pair(a, bb):  # <g(p + a), g(p + bb)> on the padded grid, zero where either leaves it
            out = torch.zeros(b, h + 2, w + 2, dtype=g.dtype, device=g.device)
            (ay, ax), (by, bx) = a, bb
            ys, xs = h + 2 - max(ay, by), w + 2 - max(ax, bx)
            out[:, :ys, :xs] = (g[:, :, ay:ay + ys, ax:ax + xs] * g[:, :, by:by + ys, bx:bx + xs]).sum(1)
            return out.flatten(1)

        local = torch.stack([pair((0, 0), (0, 0)), pair((0, 0), (0, 1)), pair((0, 0), (1, 0)),
                             pair((0, 0), (1, 1)), pair((0, 1), (1, 0))], 1)
        vp = torch.nn.functional.pad(mvalid.to(moving.dtype), (1, 1, 1, 1)).flatten(-2)
        return _Gram(cross, local, ref.pow(2).sum(1), vp[None] if vp.dim() == 1 else vp)

    def select(self, images) -> _Gram:
        rows = torch.arange(self.cross.shape[0], device=self.cross.device) if self.rows is None else self.rows
        return _Gram(self.cross, self.local[images], self.ref_sq[images],
                     self.valid if self.valid.shape[0] == 1 else self.valid[images], rows[images])


_GRAM_STEP_PLANES = 64
"""Planes of its positions that a refinement step through the tables holds per start (bytes for
:func:`_adam_groups`' groups): the four taps' indices, weights and gathered values, the sums,
and autograd's saved copies."""


def _use_gram(prob: _Problem) -> bool:
    """Whether the refinement and the polish score through :class:`_Gram` tables: many channels, no
    permutation, and the tables within the chunk budget (``cfg.memory_budget``: they are built once
    per search, after the coarse stage has freed its canvases, and kept to its end)."""
    b, c = prob.moving.shape[:2]
    return prob.perm is None and c >= _GRAM_MIN_CHANNELS and b * _table_bytes(prob.moving) <= prob.cfg.memory_budget


def _table_bytes(moving: torch.Tensor) -> int:
    """Bytes of one image's :class:`_Gram` tables: its ``H W`` positions against the ``(H + 2)(W + 2)``
    of the padded grid."""
    h, w = moving.shape[-2:]
    return h * w * (h + 2) * (w + 2) * moving.element_size()


def _gram_terms(gram: _Gram, centred: torch.Tensor, region: torch.Tensor, size, plane: torch.Tensor):
    """:func:`_stack_terms` of per-image centred matrices ``(B, n, 3, 3)`` from :class:`_Gram` tables."""
    h, w = size
    wp = w + 2
    norm = G.centred_to_normalized(centred, size)
    b, n = norm.shape[:2]
    grid = grid_from_inverse(torch.linalg.inv_ex(norm.reshape(-1, 3, 3))[0], size, affine=True)
    grid = grid.reshape(b, n, h * w, 2)
    # grid_sample's bilinear taps (align_corners=False), in the padded grid's coordinates
    ix = ((grid[..., 0] + 1) * w - 1) / 2
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = torch.floor(ix), torch.floor(iy)
    fx, fy = ix - x0, iy - y0
    px = torch.stack([x0 + 1, x0 + 2]).clamp_(0, w + 1).long()  # the taps' columns and rows, padded grid
    py = torch.stack([y0 + 1, y0 + 2]).clamp_(0, h + 1).long()
    idx = (py[:, None] * wp + px[None]).flatten(0, 1)  # (4, B, n, HW): (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    ax, ay = torch.stack([1 - fx, fx]), torch.stack([1 - fy, fy])
    a = (ay[:, None] * ax[None]).flatten(0, 1)
    valid = gram.valid.expand(b, -1)
    t = a * torch.take(valid, _row_offsets(valid, None) + idx)
    wt = _weights(t.sum(0))  # (B, n, HW)
    # <x, F(q)>: each tap's entry of its image's row q of the cross table (one gather for the 4 taps)
    rows = torch.arange(b, device=grid.device) if gram.rows is None else gram.rows
    q = torch.arange(h * w, device=grid.device) * gram.cross.shape[-1]
    x_f = (t * torch.take(gram.cross, _row_offsets(gram.cross, rows) + q + idx)).sum(0)
    # ||x||^2 = sum_k t_k^2 <g_k, g_k> + 2 sum_{k<l} t_k t_l <g_k, g_l>: the 4 + 6 entries of the
    # local table (plane j of ``local`` at tap k's position), in one gather; few kernels per step
    p = gram.local.shape[-1]
    at = torch.stack([idx[0], idx[1], idx[2], idx[3], idx[0] + p, idx[2] + p, idx[0] + 2 * p, idx[1] + 2 * p,
                      idx[0] + 3 * p, idx[0] + 4 * p])
    ip = torch.take(gram.local, _row_offsets(gram.local, None) + at)  # (10, B, n, HW)
    tt = torch.stack([t[0] * t[1], t[2] * t[3], t[0] * t[2], t[1] * t[3], t[0] * t[3], t[1] * t[2]])
    x_sq = (t.square() * ip[:4]).sum(0) + 2 * (tt * ip[4:]).sum(0)
    # region (||x||^2 / w - 2 <x, F> + w ||F||^2) where w > 0: R ||x / w - F||^2 (:class:`_Gram`)
    shape = (b, n, h, w)
    ref_sq = gram.ref_sq.reshape(b, 1, h * w)
    per = x_sq * _safe_inverse(wt) - 2 * x_f * (wt > 0) + wt * ref_sq
    r, den, cnt, sig = _weight_terms(gram.ref_sq.reshape(b, h, w), region, wt.reshape(shape), plane)
    num = (region * per.reshape(shape)).flatten(-2).sum(-1)
    return num, den, cnt, sig


def _row_offsets(table: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``(B, 1, 1)`` flat offsets of each image's block of ``table`` (its rows ``rows``, default in
    order), for :func:`torch.take` with indices inside one image's block."""
    block = table[0].numel()
    r = torch.arange(table.shape[0], device=table.device) if rows is None else rows
    return (r * block).reshape(-1, 1, 1)


def _exact_of(prob: _Problem, centred: torch.Tensor):
    """:func:`_exact` of a problem's maps; through its :class:`_Gram` tables when it has them."""
    gram = prob.gram
    if gram is None or prob.perm is not None:
        return _exact(prob.reference, prob.moving, centred, prob.region, prob.mvalid, prob.size, prob.required,
                      prob.perm)
    b, n = centred.shape[:2]
    h, w = prob.size
    energy = (gram.ref_sq.reshape(b, 1, h, w) * prob.region).flatten(1).sum(-1)  # no pass over the channels
    chunk = max(1, int(prob.cfg.memory_budget // max(1, b * h * w * 256)))
    errs, cnts = [], []
    for k0 in range(0, n, chunk):
        num, den, cnt, sig = _gram_terms(gram, centred[:, k0:k0 + chunk], prob.region, prob.size,
                                         prob.required.plane)
        errs.append(prob.required.feasible(num, den, cnt, sig, energy))
        cnts.append(cnt)
    return torch.cat(errs, 1), torch.cat(cnts, 1)


def _refine(prob: _Problem, centred: torch.Tensor):
    """Adam on the family parameters, per (image, start). Returns refined centred matrices.

    The loss is the region error of docs/definitions.md (``V_g`` follows the warp; no gradient
    flows through the region itself); the best *feasible* iterate is kept. Starts are independent
    (their own parameters, Adam state and error), so they run in groups whose warped maps per step
    stay within :func:`step_bytes` (:func:`_adam_groups`): several images per group on small maps,
    a few starts of one image on large ones, and the same result either way.
    """
    cfg = prob.cfg
    fam = G.get_family(SEARCH_FAMILIES[prob.family][0])
    if cfg.refine_steps <= 0:
        return centred
    with torch.no_grad():
        p0 = G.from_matrix(fam, centred)
        z0 = _to_free(fam, p0)
        # the same jitter for every image: an image's result never depends on its batch-mates
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        jitter = (torch.rand(z0.shape[1:], generator=gen, dtype=z0.dtype) - 0.5) * 0.4
        z = (z0 + jitter.to(z0.device)).clone()
    k = z.shape[1]
    keep = min(k, cfg.refine_keep)
    cut = max(1, cfg.refine_steps // 3) if keep < k else cfg.refine_steps
    unknown = torch.full(z.shape[:-1], torch.inf, dtype=z.dtype, device=z.device)
    best_z, best_e = _adam_groups(prob, fam, z, unknown, 0, cut)
    if cut < cfg.refine_steps:  # successive halving: only the best starts so far go on
        idx = best_e.argsort(dim=1, stable=True)[:, :keep, None].expand(-1, -1, z.shape[-1])
        bz, _ = _adam_groups(prob, fam, torch.gather(best_z, 1, idx), torch.gather(best_e, 1, idx[..., 0]), cut,
                             cfg.refine_steps)
        best_z = best_z.scatter(1, idx, bz)
    with torch.no_grad():
        return G.to_matrix(fam, _from_free(fam, best_z), check=False)


def _adam_groups(prob: _Problem, fam: G.Family, z: torch.Tensor, best_e: torch.Tensor, first: int, last: int):
    """:func:`_adam` on groups of (image, start) whose warped maps per step stay within
    :func:`step_bytes`: ``n`` whole images at a time when a start's maps are small, otherwise one
    image and as many of its starts as fit (at least one). Returns the best iterates and errors
    ``(B, k, P)``, ``(B, k)``."""
    b, k = z.shape[:2]
    tables = prob.gram is not None and prob.perm is None
    # through the tables a start's step holds ~64 planes of its positions (taps, weights, their
    # gradients), not its C + 1 warped channels
    planes = _GRAM_STEP_PLANES if tables else prob.moving.shape[1] + 1
    per_start = planes * prob.size[0] * prob.size[1] * prob.moving.element_size()
    cap = max(1, int(step_bytes(prob.moving.device) // max(per_start, 1)))
    n_images, n_starts = max(1, cap // k), min(k, cap)
    out_z, out_e = [], []
    for i in range(0, b, n_images):
        sub = prob if n_images >= b else prob.select(slice(i, i + n_images))
        stack = None if tables else _permuted(_stack(sub.moving, sub.mvalid), sub.perm)
        energy = _energy(sub.reference, sub.region)
        parts = [_adam(sub.reference, stack, z[i : i + n_images, j : j + n_starts],
                       best_e[i : i + n_images, j : j + n_starts], first, last, sub.region, sub.size, fam, sub.cfg,
                       sub.required, energy, sub.gram if tables else None) for j in range(0, k, n_starts)]
        out_z.append(torch.cat([p[0] for p in parts], 1))
        out_e.append(torch.cat([p[1] for p in parts], 1))
    return torch.cat(out_z), torch.cat(out_e)


def _adam(reference, stack, z, best_e, first, last, region, size, fam, cfg, required, energy, gram=None):
    """Steps ``first .. last - 1`` of the refinement's cosine schedule from free parameters ``z (B, k, P)``.

    ``best_e`` are the errors of ``z`` known so far (inf: none); with ``gram`` (:class:`_Gram`) the
    error and its gradient come from the tables, not from warping ``stack``. Returns the best feasible iterate
    and its error, per start. A step is a fixed sequence of kernels with no host synchronisation
    (no check, no ``.item()``, no data-dependent shape; tests/test_device_path.py counts them), so that
    on a GPU the steps queue up without waiting for each other."""
    z = z.detach().clone()
    adam = _AdamState(z)
    best_z = z.clone()
    best_e = best_e.clone()
    for step in range(first, last):
        # cosine annealing from 1 to 0.01 over all the refinement's steps
        lr = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / cfg.refine_steps))
        zz = z.requires_grad_(True)
        centred = G.to_matrix(fam, _from_free(fam, zz), check=False)
        if gram is not None:
            e = required.feasible(*_gram_terms(gram, centred, region, size, required.plane), energy)
        else:
            (_, stacked), = unchecked_chunks(stack, G.centred_to_normalized(centred, size), size, centred.shape[1],
                                             affine=True)
            warped, valid = _split(stacked)
            e = required.feasible(*_region_terms(reference, warped, region, valid, required.plane), energy)
        # infeasible starts (inf) take no step: their loss is replaced by a constant
        loss = torch.where(torch.isfinite(e), e, torch.zeros_like(e))
        (grad,) = torch.autograd.grad(loss.sum(), zz)
        z = zz.detach()
        with torch.no_grad():
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_z = torch.where(better[..., None], z, best_z)
            z = adam.step(z, grad, lr)
    return best_z, best_e.detach()


class _AdamState:
    """``torch.optim.Adam``'s update (betas 0.9 and 0.999, eps 1e-8, the same arithmetic, so the
    same iterates), with its step count a Python integer: torch's reads it back from a tensor
    every step, a host synchronisation where the count lives on the device."""

    BETAS, EPS = (0.9, 0.999), 1e-8

    def __init__(self, z: torch.Tensor):
        self.m, self.v, self.t = torch.zeros_like(z), torch.zeros_like(z), 0

    def step(self, z: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        (b1, b2), self.t = self.BETAS, self.t + 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / (1 - b2**self.t) ** 0.5).add_(self.EPS)
        return z.addcdiv(self.m, denom, value=-lr / (1 - b1**self.t))


def _hop(prob: _Problem, fam: G.Family, best_m: torch.Tensor, best_e: torch.Tensor):
    """Local re-search around each image's best warp: every linear parameter moved by
    ``cfg.hop_steps`` units either way, each with the warp's own sub-pixel offset and the three
    half-pixel offsets from it, and every integer shift (FFT); the best of these is polished and
    kept if it is better. On small maps the error between nearby linear parts has ridges that
    neither the refinement nor the polish crosses (a fresh random network: the polish ended at
    -73.8 degrees, 0.2637, where -79.7 degrees gives 0.2586)."""
    cfg = prob.cfg
    b = best_m.shape[0]
    lin_idx = [i for i in range(fam.n_params) if i not in fam.translation_params]
    if not lin_idx:
        return best_m, best_e
    z = _to_free(fam, G.from_matrix(fam, best_m))  # (B, P)
    steps = torch.tensor([d for h in cfg.hop_steps for d in (h, -h)], dtype=z.dtype, device=z.device)
    moves = []
    for j in lin_idx:
        zz = z[:, None, :].repeat(1, len(steps), 1)
        zz[..., j] += steps
        moves.append(zz)
    zz = torch.cat(moves, 1)  # (B, n, P)
    m = G.to_matrix(fam, _from_free(fam, zz), check=False)
    frac = m[..., :2, 2] - torch.round(m[..., :2, 2])
    offs = torch.tensor(((0.0, 0.0),) + _HALF_PIXELS, dtype=z.dtype, device=z.device)  # (4, 2)
    m = m[:, :, None].repeat(1, 1, 4, 1, 1)
    m[..., :2, 2] = frac[:, :, None] + offs
    e, mats = _coarse_grid(prob, m.flatten(1, 2))
    eb, i = e.min(1)
    seed = mats[torch.arange(b, device=e.device), i][:, None]
    # the FFT's rounding may accept a warp just below the minimum: the polish starts from exact errors
    seed_e, _ = _exact_of(prob, seed)
    pm, pe, _ = _polish(prob, seed, seed_e)
    better = pe < best_e
    return torch.where(better[:, None, None], pm, best_m), torch.where(better, pe, best_e)


def _pattern_directions(n: int, dtype, device) -> torch.Tensor:
    """The polish's moves in ``n`` free parameters: every unit vector and every pairwise diagonal,
    ``+-e_i`` and ``+-e_i +- e_j`` (``2n + 2n(n - 1)`` directions: 8 for a translation, 18 for a
    rigid warp, 32 for a similarity)."""
    eye = torch.eye(n, dtype=dtype, device=device)
    dirs = [eye, -eye]
    for i in range(n):
        for j in range(i + 1, n):
            for si in (1.0, -1.0):
                dirs.append((si * eye[i] + eye[j])[None])
                dirs.append((si * eye[i] - eye[j])[None])
    return torch.cat(dirs)


def _fresh_directions(dirs: torch.Tensor) -> torch.Tensor:
    """``(D, L)`` direction indices: after a move along ``dirs[j]``, the directions ``k`` whose point
    ``z + step (d_j + d_k)`` the move did not score already (``d_j + d_k`` neither 0 nor one of the
    directions), in order, padded to a common length with the first of them. The others scored no
    better than the new centre, so they cannot move it: skipping them changes nothing (a rigid
    warp: 9 or 11 of 18 directions left)."""
    d = dirs.shape[0]
    known = torch.cat([dirs, torch.zeros_like(dirs[:1])])
    rows = []
    for j in range(d):
        sums = dirs[j] + dirs  # (D, P)
        seen = (sums[:, None, :] == known[None]).all(-1).any(-1)
        rows.append([k for k in range(d) if not seen[k]])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long, device=dirs.device)


def _polish(prob: _Problem, centred: torch.Tensor, errors: torch.Tensor):
    """Derivative-free pattern search from per-image seeds ``(B, S, 3, 3)`` (errors ``(B, S)``) on the exact error.

    Each move tries every parameter +- a step in the refinement's units and every pair of them
    moved together (:func:`_pattern_directions`), all seeds at once, one exact scoring per move;
    a level makes up to :data:`_POLISH_MOVES` moves, and the step halves ``cfg.polish_levels``
    times. It needs no gradient, so it also finishes where the error has kinks (the region's
    border weights change slope as a sample crosses a pixel). The pairs matter: a rotation or a
    rescaling moves the content, and the translation that brings it back must move with it, so
    the error's valleys run diagonally in the parameters, where moves along single parameters
    stall (fresh random networks: 1.1-1.5e-3 above the reference's optimum, 1-2 degrees away).
    Never worse than its seeds. Returns the best of all seeds per image: (matrices (B, 3, 3),
    errors (B,), overlap counts (B,)).
    """
    reference, family, cfg = prob.reference, prob.family, prob.cfg
    fam = G.get_family(SEARCH_FAMILIES[family][0])
    if reference.device.type == "cpu" and _POLISH_ONLY_MOVED and centred.shape[1] > 1:
        # a seed equal to an earlier one of its image (the best warp is usually also the best
        # refined start) would walk the same path and tie with it; a seed column that is such a
        # copy in every image is left out (on the CPU, where reading the flag back is free)
        same = (centred[:, :, None] == centred[:, None]).flatten(-2).all(-1) & (errors[:, :, None] == errors[:, None])
        cols = ~torch.triu(same, 1).any(1).all(0)
        if not bool(cols.all()):
            centred, errors = centred[:, cols], errors[:, cols]
    b, s = centred.shape[:2]
    z = _to_free(fam, G.from_matrix(fam, centred))  # (B, S, P)
    best = errors.clone()
    n = z.shape[-1]
    dirs = _pattern_directions(n, z.dtype, z.device)  # (D, P)
    d = dirs.shape[0]
    step = 1.0
    # on the CPU a level ends as soon as no seed moves (reading the flag back is free there); on a
    # GPU every level makes all its moves, so the loop never waits for the device (a move that
    # improves nothing changes nothing: the result is the same)
    stop_early = reference.device.type == "cpu"
    fresh = _fresh_directions(dirs) if stop_early and _POLISH_ONLY_MOVED else None
    last = torch.zeros(b, s, dtype=torch.long, device=z.device)  # the direction of each seed's last move
    for _ in range(cfg.polish_levels):
        moving_seeds = None  # (image, seed) pairs that moved in the last move (CPU only)
        for _ in range(_POLISH_MOVES):
            if moving_seeds is None or fresh is None:
                cand = z[:, :, None, :] + step * dirs  # (B, S, D, P)
                moves = G.to_matrix(fam, _from_free(fam, cand.flatten(1, 2)), check=False)
                e, _ = _exact_of(prob, moves)
                eb, j = e.reshape(b, s, d).min(-1)
                better = eb < best
                if stop_early and not bool(better.any()):
                    break
                moved = torch.gather(cand, 2, j[..., None, None].expand(-1, -1, 1, n))[:, :, 0]
                z = torch.where(better[..., None], moved, z)
                best = torch.where(better, eb, best)
                last = j
            else:
                # a seed that did not move would try the same candidates again and find nothing
                # better: only the seeds that moved are scored, each as an image of its own (the
                # exact errors do not depend on the batch), and only along the directions that
                # reach a point its last move did not score (:func:`_fresh_directions`): the same
                # result, fewer warps
                bi, si = moving_seeds.idx // s, moving_seeds.idx % s
                sub = prob.select(bi)
                ks = fresh[last[bi, si]]  # (P', L)
                cand = z[bi, si][:, None, :] + step * dirs[ks]  # (P', L, P)
                moves = G.to_matrix(fam, _from_free(fam, cand), check=False)
                e, _ = _exact_of(sub, moves)
                eb, j = e.min(-1)
                better = eb < best[bi, si]
                if not bool(better.any()):
                    break
                rows = torch.arange(len(j), device=z.device)
                z[bi, si] = torch.where(better[:, None], cand[rows, j], z[bi, si])
                best[bi, si] = torch.where(better, eb, best[bi, si])
                last[bi, si] = ks[rows, j]
                full = torch.zeros(b * s, dtype=torch.bool, device=z.device)
                full[moving_seeds.idx] = better
                better = full.reshape(b, s)
            if stop_early:
                moving_seeds = _Subset(better.flatten())
        step /= 2
    m = G.to_matrix(fam, _from_free(fam, z), check=False)
    e, cnt = _exact_of(prob, m)
    keep = e <= errors  # rounding of the re-scoring: never return worse than a seed
    m = torch.where(keep[..., None, None], m, centred)
    e = torch.where(keep, e, errors)
    i = _best(e, cnt)
    ar = torch.arange(b, device=centred.device)
    return m[ar, i], e[ar, i], cnt[ar, i]


# ----------------------------------------------------------------------------- permutations


def _summaries(x: torch.Tensor) -> torch.Tensor:
    """Permutation-invariant summaries (B, 2, H, W): channel mean and channel mean square."""
    return torch.stack([x.mean(1), x.pow(2).mean(1)], 1)


def _cost_matrices(reference, warped, region, valid, plane):
    """(B, n, C, C) costs sum R ||warped_c' - ref_c||^2 / sum R ||ref||^2, R = region * valid (B, n, H, W);
    and the feasibility terms (den, cnt, signal) (B, n)."""
    r = region * valid
    rr = torch.einsum("bchw,bnhw->bnc", reference.pow(2), r)
    gg = torch.einsum("bndhw,bnhw->bnd", warped.pow(2), r)
    rg = torch.einsum("bchw,bndhw->bncd", reference, warped * r[:, :, None])
    den = rr.sum(-1)
    cost = rr[..., :, None] + gg[..., None, :] - 2 * rg
    safe = torch.where(den > 0, den, torch.ones_like(den))
    sig = (plane.unsqueeze(1) * valid).flatten(-2).sum(-1)
    return cost / safe[..., None, None], den, r.flatten(-2).sum(-1), sig


def _hungarian(cost: torch.Tensor, feasible: torch.Tensor):
    """cost (B, n, C, C) -> (errors (B, n), perms (B, n, C)); infeasible candidates get inf."""
    cnp = cost.detach().cpu().double().numpy()
    ok = feasible.cpu().numpy()
    b, n, c, _ = cnp.shape
    perms = np.tile(np.arange(c), (b, n, 1))
    errs = np.full((b, n), np.inf)
    for i in range(b):
        for j in range(n):
            if not ok[i, j]:
                continue
            rows, cols = linear_sum_assignment(cnp[i, j])
            perms[i, j, rows] = cols
            errs[i, j] = cnp[i, j][rows, cols].sum()
    return (torch.as_tensor(errs, dtype=cost.dtype, device=cost.device),
            torch.as_tensor(perms, device=cost.device))


def _assign(reference, moving, centred, region, mvalid, size, required):
    """Hungarian assignment at each per-image candidate ``(B, n, 3, 3)``: (errors, perms).

    One image at a time: the cost matrices are ``n x C x C`` per image (at 1,024 channels and 8
    candidates, 64 MiB in float64), never ``B`` times that."""
    norm = G.centred_to_normalized(centred, size)
    energy = _energy(reference, region)
    errs, perms = [], []
    for i in range(reference.shape[0]):
        mv = mvalid[i:i + 1] if mvalid.dim() == 3 else mvalid
        warped, valid = _split(warp(_stack(moving[i:i + 1], mv), norm[i:i + 1]))
        rule = required.select(slice(i, i + 1))
        cost, den, cnt, sig = _cost_matrices(reference[i:i + 1], warped, region, valid, rule.plane)
        feasible = torch.isfinite(rule.feasible(torch.zeros_like(den), den, cnt, sig, energy[i:i + 1]))
        e, p = _hungarian(cost, feasible)
        errs.append(e)
        perms.append(p)
    return torch.cat(errs), torch.cat(perms)


def _align_permutation(reference, moving, region, mvalid, family, cfg, size, spatial, required, extras):
    """Shortlist warps by channel summaries, add the best spatial warp and any extra candidates (centred
    frame, ``(B, n, 3, 3)``), assign channels by the Hungarian method at each, refine the best."""
    b = reference.shape[0]
    with torch.no_grad():
        sr, sm = _summaries(reference), _summaries(moving)
        # put both summary channels on the same footing
        scale = sr.pow(2).mean((0, 2, 3), keepdim=True).clamp_min(1e-30).sqrt()
        prob = _Problem(reference, moving, region, mvalid, size, family, cfg, required)
        e, mats = _coarse(replace(prob, reference=sr / scale, moving=sm / scale))
        idx = _distinct_starts(e, mats, cfg.shortlist, cfg)
        short = torch.gather(mats, 1, idx[..., None, None].expand(-1, -1, 3, 3))
        short = torch.cat([short, G.normalized_to_centred(spatial.matrices, size)[:, None], extras], 1)
        perr, perms = _assign(reference, moving, short, region, mvalid, size, required)
        j = perr.min(1).indices
        ar = torch.arange(b, device=reference.device)
        best_m, best_p = short[ar, j], perms[ar, j]
    # refine the warp for the chosen permutation, then re-assign at the refined warp
    refined = _refine(replace(prob, perm=best_p), best_m[:, None])
    with torch.no_grad():
        _, rperm = _assign(reference, moving, refined, region, mvalid, size, required)
        old, old_n = _exact(reference, moving, best_m[:, None], region, mvalid, size, required, perm=best_p)
        new, new_n = _exact(reference, moving, refined, region, mvalid, size, required, perm=rperm[:, 0])
        use_new = new[:, 0] < old[:, 0]
        final_m = torch.where(use_new[:, None, None], refined[:, 0], best_m)
        final_p = torch.where(use_new[:, None], rperm[:, 0], best_p)
        final_e = torch.minimum(new[:, 0], old[:, 0])
        final_n = torch.where(use_new, new_n[:, 0], old_n[:, 0])
    return final_e, final_m, final_p, final_n


# ----------------------------------------------------------------------------- public API


def _as_centred_batch(m: torch.Tensor | None, b: int, size, dtype, device, name: str) -> torch.Tensor | None:
    """Normalised ``(3, 3)``, ``(n, 3, 3)`` or ``(B, n, 3, 3)`` matrices -> centred ``(B, n, 3, 3)``."""
    if m is None:
        return None
    if not isinstance(m, torch.Tensor) or m.dim() not in (2, 3, 4) or tuple(m.shape[-2:]) != (3, 3):
        shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
        raise ValueError(f"{name}: expected (3, 3), (n, 3, 3) or (B, n, 3, 3) matrices, got {shape}")
    ex = m.to(dtype=dtype, device=device)
    ex = ex.reshape(1, 1, 3, 3) if ex.dim() == 2 else ex
    ex = ex.unsqueeze(0) if ex.dim() == 3 else ex
    if ex.shape[0] not in (1, b):
        raise ValueError(f"{name}: per-image matrices need a leading dimension B = {b}, got {tuple(m.shape)}")
    return G.normalized_to_centred(ex, size).expand(b, -1, 3, 3)


def align(
    reference: torch.Tensor,
    moving: torch.Tensor,
    family: str = "rigid",
    *,
    mask: torch.Tensor | None = None,
    mask_radius: float | None = None,
    moving_mask: torch.Tensor | None = None,
    channels: str = "spatial",
    config: SearchConfig | None = None,
    expected: torch.Tensor | None = None,
    extra_candidates: torch.Tensor | None = None,
) -> Alignment:
    """Find, per image, the warp of ``moving`` (and channel permutation) that best matches ``reference``.

    Args:
        reference: ``(B, C, H, W)`` maps of the original images.
        moving: ``(B, C, H, W)`` maps of the transformed images (same layer, same frame).
        family: one of :data:`SEARCH_FAMILIES`.
        mask: ``(H, W)`` the reference's region ``M`` (evaluation mask times interior); default
            the whole map, or the disk of radius ``mask_radius`` (normalised units) if given.
        moving_mask: ``(H, W)`` or ``(B, H, W)`` the moving map's valid positions (default: all); a warp is scored
            only where its source lies inside them (``V_g``, docs/definitions.md).
        channels: ``"spatial"`` (warp only) or ``"permutation"`` (warp and channel permutation).
        config: grid, refinement and minimum-overlap settings.
        expected: ``(3, 3)`` or ``(B, 3, 3)`` normalised layer-frame matrix of the warp an STN
            "should" apply: scored as a candidate, and the baseline of the minimum overlap.
        extra_candidates: ``(3, 3)``, ``(n, 3, 3)`` or ``(B, n, 3, 3)`` normalised layer-frame
            matrices that are scored exactly as well (the identity always is).

    Returns:
        :class:`Alignment` (errors, matrices, parameters, overlap, reasons, permutations).

    >>> ref = torch.zeros(1, 1, 16, 16); ref[0, 0, 4:8, 9:12] = 1
    >>> mov = torch.roll(ref, shifts=(2, -3), dims=(-2, -1))
    >>> a = align(ref, mov, "translation")
    >>> a.errors.item() < 1e-6, a.params.round().tolist()
    (True, [[3.0, -2.0]])
    """
    st = _setup(reference, moving, family, mask=mask, mask_radius=mask_radius, moving_mask=moving_mask,
                channels=channels, config=config, expected=expected, extra_candidates=extra_candidates)
    return st if isinstance(st, Alignment) else _search(st)


def near_candidates(family: str, config: SearchConfig | None = None, steps: float = 2.0, *, dtype=torch.float64,
                    device="cpu") -> torch.Tensor:
    """``(K, 3, 3)`` the linear parts of the coarse grid of ``family`` within ``steps`` grid steps of
    the identity (Frobenius distance to the identity at most ``steps`` times the grid's smallest
    non-zero one; the identity first): the grid :func:`align_near` searches about its expected warp.

    >>> near_candidates("rigid").shape[0]   # 72 angles: the identity and +-5, +-10 degrees
    5
    """
    lin = _linear_candidates(family, SearchConfig.of(config), dtype, device)
    d = torch.linalg.matrix_norm(lin - torch.eye(3, dtype=dtype, device=device))
    if lin.shape[0] == 1:
        return lin
    step = d[d > 1e-9].min()
    return lin[d <= steps * step * (1 + 1e-9)]


def align_near(
    reference: torch.Tensor,
    moving: torch.Tensor,
    family: str,
    *,
    expected: torch.Tensor,
    mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    config: SearchConfig | None = None,
    steps: float = 2.0,
) -> Alignment:
    """:func:`align` with its exhaustive stage restricted to the neighbourhood of ``expected``: the
    linear parts of :func:`near_candidates` composed with each image's expected linear part, every
    integer shift (and the half-pixel pass); then the same refinement, exact scoring and polish.
    For maps whose optimum is known to lie near the expected warp (the identity network's: the
    interpolation floor) at a fraction of the grid's cost (5 of 72 angles for ``rigid``).
    """
    st = _setup(reference, moving, family, mask=mask, mask_radius=None, moving_mask=moving_mask,
                channels="spatial", config=config, expected=expected, extra_candidates=None)
    if isinstance(st, Alignment):
        return st
    prob = st.prob
    lin = near_candidates(family, prob.cfg, steps, dtype=prob.reference.dtype, device=prob.reference.device)
    exp_lin = st.exp_c[:, 0].clone()
    exp_lin[:, :2, 2] = 0  # its linear part: the FFT covers every shift
    local = exp_lin[:, None] @ lin[None]  # (B, K, 3, 3)
    return _search(st, _subpixel(prob, local, *_coarse_grid(prob, local)))


def align_with_null(
    reference: torch.Tensor,
    moving: torch.Tensor,
    family: str,
    *,
    null_config: SearchConfig,
    mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    channels: str = "spatial",
    config: SearchConfig | None = None,
    expected: torch.Tensor | None = None,
    next_reference: torch.Tensor | None = None,
    next_moving_mask: torch.Tensor | None = None,
    next_expected: torch.Tensor | None = None,
) -> tuple[Alignment, Alignment | None]:
    """:func:`align` of the pairs ``(reference[i], moving[i])`` and, with ``null_config``, of the
    pairs ``(reference[i + 1], moving[i])`` (the random-pair null within a batch; each pair with
    the moving mask and expected warp of its reference image), which are ``align``'s results of
    each (None for a single image).

    ``next_reference`` ``(1, C, H, W)``: the reference of the image after the batch's last (the
    null's wrap-around: image 0 after the last batch), paired with ``moving[-1]`` as the null's
    last pair (with ``next_moving_mask`` and ``next_expected``, its own, where those are per
    image); the null then has one pair per moving map.

    The two searches share their exhaustive stage: the grid's warps of ``moving`` and their FFTs
    are computed once and scored against both references (where both searches see the same
    maps: the channels are not compressed, one moving mask for all images, the same grid), so
    the null costs its channel products and its later stages, not a second set of warps and
    transforms. Otherwise the two searches run one after the other, with the same results.
    """
    b = reference.shape[0]
    common = dict(mask=mask, mask_radius=None, extra_candidates=None)
    st = _setup(reference, moving, family, moving_mask=moving_mask, channels=channels, config=config,
                expected=expected, **common)

    def run(s: _Setup | Alignment, coarse=None) -> Alignment:
        return s if isinstance(s, Alignment) else _search(s, coarse)

    def then(x, nxt, name):  # the null's references' own masks or expected warps: x[1:] and nxt's
        if not (isinstance(x, torch.Tensor) and x.dim() == 3):
            return x  # one for every image
        if next_reference is None:
            return x[1:]
        if nxt is None:
            raise ValueError(f"{name}: needed with next_reference when {name[5:]} is one per image")
        return torch.cat([x[1:], nxt.reshape(1, *x.shape[1:]).to(x)])

    if b < 2 and next_reference is None:
        return run(st), None
    if next_reference is not None and next_reference.shape != (1, *reference.shape[1:]):
        raise ValueError(f"next_reference: expected one map {(1, *reference.shape[1:])}, "
                         f"got {tuple(next_reference.shape)}")
    null_ref = reference[1:] if next_reference is None else torch.cat([reference[1:], next_reference])
    nxt = _setup(null_ref, moving[:null_ref.shape[0]], family, channels="spatial", config=null_config,
                 moving_mask=then(moving_mask, next_moving_mask, "next_moving_mask"),
                 expected=then(expected, next_expected, "next_expected"), **common)
    if isinstance(st, Alignment) or isinstance(nxt, Alignment) or not _shares_grid(st, nxt):
        return run(st), run(nxt)
    with torch.no_grad():
        coarse, coarse_next = _coarse_pair(st.prob, nxt.prob)
    return run(st, coarse), run(nxt, coarse_next)


@dataclass
class _Setup:
    """One validated search before it runs (:func:`_setup`): its problem (on the maps' joint channel
    span where that is exact and smaller), the maps themselves for the permutation stage, the
    expected warp and extra candidates (centred), and the images without a verdict."""

    prob: _Problem
    fam: G.Family
    reference: torch.Tensor
    moving: torch.Tensor
    exp_c: torch.Tensor | None
    extra_c: torch.Tensor | None
    reasons: list
    channels: str


def _shares_grid(a: _Setup, b: _Setup) -> bool:
    """Whether ``b``'s exhaustive stage can score ``a``'s warps (:func:`align_with_null`)."""
    pa, pb = a.prob, b.prob
    return (pa.moving is a.moving and pb.moving is b.moving and pa.mvalid.dim() == 2
            and torch.equal(pa.mvalid, pb.mvalid) and pa.cfg.max_shift == pb.cfg.max_shift
            and torch.equal(_linear_candidates(pa.family, pa.cfg, torch.float64, "cpu"),
                            _linear_candidates(pb.family, pb.cfg, torch.float64, "cpu")))


def _setup(reference, moving, family, *, mask, mask_radius, moving_mask, channels, config, expected,
           extra_candidates) -> _Setup | Alignment:
    """:func:`align`'s checks and preparation: a :class:`_Setup`, or the result when no image has
    anything to search."""
    check_images(reference, "reference")
    check_images(moving, "moving")
    if reference.shape != moving.shape:
        raise ValueError(f"moving: shape {tuple(moving.shape)} differs from reference {tuple(reference.shape)}")
    if moving.dtype != reference.dtype:
        raise TypeError(f"moving: dtype {moving.dtype} differs from reference ({reference.dtype})")
    if family not in SEARCH_FAMILIES:
        raise ValueError(f"family: unknown search family {family!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    if channels not in ("spatial", "permutation"):
        raise ValueError(f"channels: unknown channel matching {channels!r}; valid choices: spatial, permutation")
    if reference.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"reference: the search runs in float32 or float64, got {reference.dtype}; "
                        "convert the maps, e.g. maps.float()")
    for name, t in (("reference", reference), ("moving", moving)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    cfg = SearchConfig.of(config)
    # the search differentiates with respect to the warp only, never into the caller's graph
    reference, moving = reference.detach(), moving.detach()
    b = reference.shape[0]
    size = tuple(reference.shape[-2:])
    dtype, device = reference.dtype, reference.device
    region = _resolve_mask(mask, mask_radius, size, dtype, device)
    mvalid = _resolve_moving(moving_mask, b, size, dtype, device)
    fam = G.get_family(SEARCH_FAMILIES[family][0])
    if expected is not None and not (isinstance(expected, torch.Tensor) and (
            expected.shape == (3, 3) or expected.shape == (b, 3, 3))):
        shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
        raise ValueError(f"expected: one matrix (3, 3) or one per image ({b}, 3, 3), got {shape}")
    exp_c = _as_centred_batch(None if expected is None else expected.reshape(-1, 1, 3, 3), b, size, dtype, device,
                              "expected")
    extra_c = _as_centred_batch(extra_candidates, b, size, dtype, device, "extra_candidates")
    reasons = _no_verdict(reference, region)
    # the feasibility rule, relative to what the expected warp compares (or the whole region)
    with torch.no_grad():
        v = None if exp_c is None else warp_valid(mvalid, G.centred_to_normalized(exp_c, size))  # (B, 1, H, W)
        required = _Rule.of(reference, region, v, cfg)
    reasons = [r if r is not None else (None if ok else NO_CONTENT_IN_VIEW)
               for r, ok in zip(reasons, required.verdict.tolist())]
    if all(r is not None for r in reasons):  # nothing to search
        return _no_search(family, fam, reference, size, reasons, channels)

    # the spatial search on the maps' joint channel span (exact; the permutation stage keeps the channels)
    sp_ref, sp_mov = _compressed(reference, moving, region, cfg)
    prob = _Problem(sp_ref, sp_mov, region, mvalid, size, family, cfg, required)
    return _Setup(prob, fam, reference, moving, exp_c, extra_c, reasons, channels)


def _table_groups(prob: _Problem) -> list[torch.Tensor] | None:
    """The batch's images in groups whose inner-product tables (:class:`_Gram`) fit the chunk budget,
    where the whole batch's do not but one image's do (resnet50 ``layer1``: 42 MB per image, 64 MiB
    budget); None: one group (the tables fit, or are not used)."""
    b, c = prob.moving.shape[:2]
    fit = int(prob.cfg.memory_budget // _table_bytes(prob.moving))
    if prob.perm is not None or c < _GRAM_MIN_CHANNELS or not 1 <= fit < b:
        return None
    return list(torch.arange(b, device=prob.moving.device).split(fit))


def _refined(prob: _Problem, fam: G.Family, starts, start_e, start_n, extras):
    """:func:`_search`'s stages after the coarse one, for its batch's starts ``(B, k, 3, 3)`` (their
    exact errors and positions) and extra candidates ``(B, n, 3, 3)``: refinement, exact scoring,
    polish and local re-search -> (best error (B,), best matrix (B, 3, 3))."""
    sp_ref, sp_mov, region, mvalid, size, family, cfg, required = (
        prob.reference, prob.moving, prob.region, prob.mvalid, prob.size, prob.family, prob.cfg, prob.required)
    b, device = sp_ref.shape[0], sp_ref.device
    # an image whose best start is exact already (an integer shift, a quarter turn: error <= _SETTLED)
    # can gain at most that much: it skips the refinement, the polish and the local re-search
    todo = ~(start_e.min(1).values <= _SETTLED)
    some = _Subset(todo)
    # 2. refinement through the sampler (or the tables that give its errors, :class:`_Gram`)
    if _use_gram(prob) and some.any and cfg.refine_steps > 0:
        prob = replace(prob, gram=_Gram.of(prob.reference, prob.moving, prob.mvalid))
    refined = some.put(starts, _refine(some.of(prob), some.take(starts))) if some.any else starts
    cands = torch.cat([starts, refined, extras], 1)
    # 3. exact scoring; keep the best
    with torch.no_grad():
        more_e, more_n = _exact(sp_ref, sp_mov, cands[:, starts.shape[1]:], region, mvalid, size, required)
        exact, counts = torch.cat([start_e, more_e], 1), torch.cat([start_n, more_n], 1)
        best_i = _best(exact, counts)
        ar = torch.arange(b, device=device)
        best_e = exact[ar, best_i]
        best_m = cands[ar, best_i]
        if cfg.polish_levels > 0 and cfg.refine_steps > 0 and some.any:
            # polish the best candidate and the polish_starts best refined starts (other basins' endpoints)
            k = starts.shape[1]
            order = exact[:, k:2 * k].argsort(1)[:, :cfg.polish_starts]
            picked = torch.gather(refined, 1, order[..., None, None].expand(-1, -1, 3, 3))
            seeds_m = torch.cat([best_m[:, None], picked], 1)
            seeds_e = torch.cat([best_e[:, None], torch.gather(exact[:, k:2 * k], 1, order)], 1)
            pm, pe, _ = _polish(some.of(prob), some.take(seeds_m), some.take(seeds_e))
            pm, pe = some.put(best_m, pm), some.put(best_e, pe)
            better = pe < best_e
            best_m = torch.where(better[:, None, None], pm, best_m)
            best_e = torch.where(better, pe, best_e)
        if cfg.hop_steps and SEARCH_FAMILIES[family][1] and cfg.refine_steps > 0 and some.any:
            hm, he = _hop(some.of(prob), fam, some.take(best_m), some.take(best_e))
            best_m, best_e = some.put(best_m, hm), some.put(best_e, he)
    return best_e, best_m


def _search(st: _Setup, coarse: tuple[torch.Tensor, torch.Tensor] | None = None) -> Alignment:
    """Run a :class:`_Setup`'s search: coarse (or the given coarse errors and matrices), refinement,
    exact scoring, polish, local re-search; then the permutation stage when asked for."""
    prob, fam, reference, moving, exp_c, extra_c, reasons, channels = (
        st.prob, st.fam, st.reference, st.moving, st.exp_c, st.extra_c, st.reasons, st.channels)
    sp_ref, sp_mov, region, mvalid, size, family, cfg, required = (
        prob.reference, prob.moving, prob.region, prob.mvalid, prob.size, prob.family, prob.cfg, prob.required)
    b, dtype, device = sp_ref.shape[0], sp_ref.dtype, sp_ref.device
    # 1. coarse search (exhaustive over the grid x all integer shifts)
    with torch.no_grad():
        coarse_e, coarse_m = _coarse(prob) if coarse is None else coarse
        coarse_best = coarse_e.min(1).values
        # distinct basins at two separations: across the grid, and near the best
        fine = replace(cfg, basin_separation=cfg.basin_separation / 2, basin_shift=cfg.basin_shift / 2)
        idx = torch.cat([_distinct_starts(coarse_e, coarse_m, cfg.top_k, cfg),
                         _distinct_starts(coarse_e, coarse_m, 3, fine)[:, 1:]], 1)
        starts = torch.gather(coarse_m, 1, idx[..., None, None].expand(-1, -1, 3, 3))
        start_e, start_n = _exact(sp_ref, sp_mov, starts, region, mvalid, size, required)
    extras = [torch.eye(3, dtype=dtype, device=device).expand(b, 1, 3, 3)]
    for m in (exp_c, extra_c):
        if m is not None:
            extras.append(m)
    extras = torch.cat(extras, 1)
    # 2.-5. per group of images whose inner-product tables fit the chunk budget (every image's
    # search is its own: the groups give the same results as one batch)
    groups = _table_groups(prob)
    if groups is None:
        best_e, best_m = _refined(prob, fam, starts, start_e, start_n, extras)
    else:
        best_e = start_e.new_empty(b)
        best_m = starts.new_empty(b, 3, 3)
        for idx in groups:
            best_e[idx], best_m[idx] = _refined(prob.select(idx), fam, starts[idx], start_e[idx], start_n[idx],
                                                extras[idx])
    result = _result(prob, fam, best_e, best_m, reasons)
    result.coarse_errors = torch.where(torch.isfinite(coarse_best), coarse_best, torch.nan).double()
    if channels == "permutation":
        pe, pm, pp, _ = _align_permutation(reference, moving, region, mvalid, family, cfg, size, result,
                                            required, extras)
        perm_result = _result(prob, fam, pe, pm, reasons)
        perm_result.permutations = pp
        perm_result.coarse_errors = result.coarse_errors
        perm_result.spatial = result
        return perm_result
    return result


class _Subset:
    """The images of a batch that a stage works on (``todo``, bool ``(B,)``): :meth:`take` their
    rows, :meth:`of` their problem, :meth:`put` a stage's rows back over the others' values."""

    def __init__(self, todo: torch.Tensor):
        self.all = bool(todo.all())
        self.any = bool(todo.any())
        self.idx = todo.nonzero()[:, 0]

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all else x[self.idx]

    def of(self, prob: _Problem) -> _Problem:
        return prob if self.all else prob.select(self.idx)

    def put(self, full: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        if self.all:
            return part
        out = full.clone()
        out[self.idx] = part
        return out


def _compressed(reference: torch.Tensor, moving: torch.Tensor, region: torch.Tensor, cfg: SearchConfig):
    """Both maps expressed on an orthonormal basis ``Q`` of their joint channel span, when that
    basis is clearly smaller than ``C`` (``cfg.compress_channels``); else the maps themselves.

    Every error the spatial search scores is a ratio of squared norms of differences between
    reference vectors on the region and bilinear blends of moving vectors; all of them lie in the
    span of the reference's vectors on the region's support and of every moving vector, where
    ``Q^T`` preserves norms (docs/definitions.md, "Channel compression"). So the errors, overlaps
    and signal shares are unchanged, with ``n = |supp M| + H W`` channels instead of ``C``
    (resnet50 ``layer3``: 392 instead of 1,024). A Householder QR: ``Q`` is orthonormal even
    where the vectors are dependent.
    """
    b, c, h, w = reference.shape
    if not cfg.compress_channels:
        return reference, moving
    supp = (region.reshape(-1, h * w) > 0).any(0)  # the union over images of a per-image region
    n = int(supp.sum()) + h * w
    if 4 * n > 3 * c:  # a QR and two projections for less than a quarter of the channels: not worth it
        return reference, moving
    refs, movs = [], []
    for i in range(b):  # one (C, n) float64 basis at a time
        x = torch.cat([reference[i].flatten(1)[:, supp], moving[i].flatten(1)], 1).double()
        q = torch.linalg.qr(x).Q  # (C, n)
        refs.append((q.T @ reference[i].flatten(1).double()).to(reference.dtype))
        movs.append((q.T @ moving[i].flatten(1).double()).to(moving.dtype))
    return torch.stack(refs).reshape(b, n, h, w), torch.stack(movs).reshape(b, n, h, w)


def _no_search(family, fam, reference, size, reasons, channels) -> Alignment:
    """The :class:`Alignment` of a batch in which no image has a verdict: NaN errors at the identity."""
    b, c = reference.shape[:2]
    nan = torch.full((b,), math.nan, dtype=torch.float64, device=reference.device)
    eye = torch.eye(3, dtype=reference.dtype, device=reference.device).expand(b, 3, 3)
    out = Alignment(family=family, errors=nan, matrices=G.centred_to_normalized(eye, size),
                    params=G.from_matrix(fam, eye), overlap=nan, reasons=list(reasons), positions=nan.clone(),
                    signal=nan.clone(), coarse_errors=nan.clone())
    if channels == "permutation":
        out = replace(out, permutations=torch.arange(c, device=reference.device).expand(b, c).clone(), spatial=out)
    return out


def _best(errors: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per image; exact ties (within rounding) go to the larger overlap."""
    low = errors.min(1, keepdim=True).values
    tie = errors <= low + 1e-20 + 1e-12 * low.abs()
    key = torch.where(tie, counts, torch.full_like(counts, -1.0))
    return key.max(1).indices


def _result(prob: _Problem, fam, errors, centred, reasons) -> Alignment:
    """The :class:`Alignment` of per-image best warps ``centred (B, 3, 3)``, with the positions and
    signal share their regions keep (re-measured on the region itself, the same for any permutation)."""
    reasons = list(reasons)
    for i, e in enumerate(errors.tolist()):
        if reasons[i] is None and not math.isfinite(e):
            reasons[i] = NO_FEASIBLE_WARP
    bad = torch.tensor([r is not None for r in reasons], device=errors.device)
    with torch.no_grad():
        _, cnt, sig = _exact(prob.reference, prob.moving, centred[:, None], prob.region, prob.mvalid, prob.size,
                             prob.required, signal=True)
    cnt, sig = cnt[:, 0].double(), sig[:, 0]
    return Alignment(
        family=prob.family,
        errors=torch.where(bad, torch.nan, errors).double(),
        matrices=G.centred_to_normalized(centred, prob.size),
        params=G.from_matrix(fam, centred),
        overlap=cnt / prob.region.sum().double(),
        reasons=reasons,
        positions=cnt,
        signal=prob.required.share(sig).double(),
    )


def fit_linear(
    reference: torch.Tensor,
    moving: torch.Tensor,
    matrices: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    mask_radius: float | None = None,
    moving_mask: torch.Tensor | None = None,
    permutations: torch.Tensor | None = None,
    ridge: float = 1e-4,
    folds: int = 2,
    seed: int = 0,
) -> dict:
    """Linear channel map ``A`` (C x C) on top of per-image warps: held-out and in-sample errors.

    ``A`` is shared by all images (a property of the layer and the transformation). It is fitted
    by ridge regression over each image's comparison region ``R_g`` (docs/definitions.md),
    weighting each image by ``1 / sum R_g ||F||^2`` so it minimises the mean normalised error,
    with ``folds``-fold cross-fitting: every image is scored by a map fitted on the other folds
    (``held_out``). ``fit`` is the in-sample error of the best per-image map (least squares on
    that image's own positions, starting from its warp and permutation), a lower bound: on
    fitted data ``spatial >= permutation >= fit``. Images without signal on their region get NaN.

    Returns a dict with ``held_out (B,)``, ``fit (B,)`` and ``matrix`` (A fitted on all images).

    >>> ref = torch.rand(4, 3, 8, 8); P = torch.tensor([[0., 1, 0], [0, 0, 1], [1, 0, 0]])
    >>> mov = torch.einsum("cd,bdhw->bchw", P.T, ref)          # channels mixed linearly
    >>> out = fit_linear(ref, mov, torch.eye(3).expand(4, 3, 3))
    >>> bool(out["held_out"].max() < 1e-3)
    True
    """
    check_images(reference, "reference")
    check_images(moving, "moving")
    if reference.shape != moving.shape:
        raise ValueError(f"moving: shape {tuple(moving.shape)} differs from reference {tuple(reference.shape)}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds: cross-fitting needs an integer >= 2, got {folds!r}")
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge: must be a finite number >= 0, got {ridge!r}")
    size = tuple(reference.shape[-2:])
    region = _resolve_mask(mask, mask_radius, size, reference.dtype, reference.device)
    mvalid = _resolve_moving(moving_mask, reference.shape[0], size, reference.dtype, reference.device)
    b, c = reference.shape[:2]
    with torch.no_grad():
        x, y = linear_design(reference, moving, matrices, region, mvalid, permutations)
        fit = LinearFit(b, c, folds=folds, ridge=ridge, seed=seed, device=reference.device)
        in_sample = fit.add(x, y, torch.arange(b, device=reference.device))
        fit.solve()
        held = fit.score(x, y, torch.arange(b, device=reference.device))
    return {"held_out": held, "fit": in_sample, "matrix": fit.matrix}


def linear_design(reference, moving, matrices, region, mvalid, permutations=None):
    """The ridge regression's data of :func:`fit_linear`: ``x`` the warped (and permuted) moving
    maps, ``y`` the reference, both ``(B, C, N)`` float64 weighted by ``sqrt(R_g)``, zero
    outside the comparison region."""
    size = tuple(reference.shape[-2:])
    mats = matrices.to(reference).unsqueeze(1)
    warped, valid = _split(warp(_stack(moving, mvalid), mats)[:, 0])
    r = (region * valid).sqrt()  # (B, H, W): the residuals are weighted by R_g
    if permutations is not None:
        warped = torch.gather(warped, 1, permutations[:, :, None, None].expand(-1, -1, *size))
    return (warped * r[:, None]).flatten(2).double(), (reference * r[:, None]).flatten(2).double()


class LinearFit:
    """The cross-fitted ridge map of :func:`fit_linear`, accumulated over batches of images.

    Image ``i`` (of ``n_images``) belongs to fold ``f(i)``, drawn once from ``seed``; ``add``
    takes the :func:`linear_design` of a batch with the images' indices, accumulates each fold's
    normal equations ``sum_i w_i x_i x_i^T`` and ``sum_i w_i y_i x_i^T`` (``w_i = 1 / ||y_i||^2``)
    and returns the in-sample errors; after ``solve``, ``score`` gives each image's error under
    the map fitted on the *other* folds. Memory is ``2 folds x 2 x C^2`` numbers, whatever the
    number of images, so a layer can be fitted batch by batch; batching never changes the result
    beyond float summation order.

    >>> x = torch.rand(4, 3, 10, dtype=torch.float64); ids = torch.arange(4)
    >>> fit = LinearFit(4, 3); _ = fit.add(x[:2], x[:2], ids[:2]); _ = fit.add(x[2:], x[2:], ids[2:])
    >>> fit.solve(); bool(fit.score(x, x, ids).max() < 1e-6)
    True
    """

    def __init__(self, n_images: int, channels: int, *, folds: int = 2, ridge: float = 1e-4, seed: int = 0,
                 device=None):
        self.n, self.c, self.ridge = n_images, channels, ridge
        self.k = min(folds, n_images)
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))
        self.fold = torch.empty(n_images, dtype=torch.long)
        self.fold[order] = torch.arange(n_images) % self.k  # test fold f is order[f::k]
        self.fold = self.fold.to(device)
        self.xx = torch.zeros(self.k, channels, channels, dtype=torch.float64, device=device)
        self.yx = torch.zeros_like(self.xx)
        self.maps: torch.Tensor | None = None
        self.matrix: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Accumulate a batch ``x, y (b, C, N)`` of images ``index (b,)``; returns their in-sample
        errors (the best per-image map, a lower bound; NaN without signal)."""
        energy = y.pow(2).sum((1, 2))
        usable = energy > 0
        w = torch.where(usable, 1.0 / energy.clamp_min(1e-300), 0.0)
        gram = torch.einsum("bcn,bdn->bcd", x, x)
        cross = torch.einsum("bcn,bdn->bcd", y, x)
        fold = self.fold[index]
        self.xx.index_add_(0, fold, gram * w[:, None, None])
        self.yx.index_add_(0, fold, cross * w[:, None, None])
        # in-sample per-image least squares; a vanishing ridge keeps rank-deficient images solvable
        lam = 1e-12 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
        eye = torch.eye(self.c, dtype=gram.dtype, device=gram.device)
        sol = torch.linalg.solve(gram + lam * eye, cross.transpose(1, 2))  # (B, C_in, C_out)
        res = torch.einsum("bdc,bdn->bcn", sol, x) - y
        fit = res.pow(2).sum((1, 2)) * w
        # the per-image permutation / identity is feasible for the least squares: never worse
        ident = (x - y).pow(2).sum((1, 2)) * w
        return torch.where(usable, torch.minimum(fit, ident), torch.nan)

    def _solve(self, sxx: torch.Tensor, syx: torch.Tensor) -> torch.Tensor:
        lam = self.ridge * torch.trace(sxx) / self.c + 1e-12
        eye = torch.eye(self.c, dtype=sxx.dtype, device=sxx.device)
        return torch.linalg.solve(sxx + lam * eye, syx.T).T

    def solve(self) -> None:
        """Fit the map of each fold's complement (``maps``) and of all images (``matrix``)."""
        sxx, syx = self.xx.sum(0), self.yx.sum(0)
        self.matrix = self._solve(sxx, syx)
        if self.n >= 2:
            self.maps = torch.stack([self._solve(sxx - self.xx[f], syx - self.yx[f]) for f in range(self.k)])

    def score(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Held-out errors of images ``index`` (NaN with a single image or without signal)."""
        energy = y.pow(2).sum((1, 2))
        if self.maps is None:
            return torch.full_like(energy, float("nan"))
        a = self.maps[self.fold[index]]  # (b, C, C)
        res = torch.einsum("bcd,bdn->bcn", a, x) - y
        return torch.where(energy > 0, res.pow(2).sum((1, 2)) / energy.clamp_min(1e-300), torch.nan)


def channel_orbits(permutation) -> list[list[int]]:
    """Cycles of a channel permutation ``perm`` (``aligned[c] = moving[perm[c]]``), fixed points omitted.

    >>> channel_orbits([1, 2, 3, 0, 4])
    [[0, 1, 2, 3]]
    """
    perm = [int(p) for p in (permutation.tolist() if hasattr(permutation, "tolist") else permutation)]
    seen, out = set(), []
    for start in range(len(perm)):
        if start in seen:
            continue
        cyc, j = [], start
        while j not in seen:
            seen.add(j)
            cyc.append(j)
            j = perm[j]
        if len(cyc) > 1:
            out.append(cyc)
    return out
