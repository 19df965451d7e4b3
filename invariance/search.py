"""Optimal alignment of feature maps: the best spatial warp, channel permutation or linear map.

Given reference maps ``F`` (of the original images) and moving maps ``F_h`` (of the transformed
images), both ``(B, C, H, W)`` in the same layer frame, find per image

    e_sp   = min_g     ||M (W_g F_h - F)||^2 / ||M F||^2
    e_perm = min_{g,pi} ||M (P_pi W_g F_h - F)||^2 / ||M F||^2

over a family of warps ``g`` (DESIGN.md section 2), and fit the linear channel map ``A``.

How the optimum is found (and why it is not a local one)
--------------------------------------------------------
1. *Coarse, exhaustive*: every candidate of a grid over the non-translation part (angles,
   log-scales, affine shapes) is applied with ``grid_sample``; for families with a translation,
   the error of **every integer shift** is then computed at once by FFT cross-correlation
   (zero-padded, so a shift brings in zeros exactly like the warp's zero padding):
   ``E(t) = corr(M, sum_c G_c^2)(t) - 2 sum_c corr(M F_c, G_c)(t) + sum M F^2``.
2. *Refinement*: the best few candidates per image are refined by Adam on the family
   parameters through the sampler, started a little off the lattice point (bilinear sampling
   has kinks there).
3. *Exact scoring*: every reported error is re-computed exactly with ``grid_sample`` for the
   returned transformation, and the best of coarse, refined and any extra candidates (for
   example the expected transformation and the identity) is kept, so the search is never worse
   than those.

Channel permutations are searched jointly: candidates are short-listed by aligning
permutation-invariant summaries (the channel mean and the mean square), the spatial optimum and
any extra candidates are always added to the list, and at each candidate the optimal permutation is the Hungarian
assignment (:func:`scipy.optimize.linear_sum_assignment`) on the ``C x C`` cost matrix.
Because the spatial optimum with the identity permutation is a candidate, ``e_perm <= e_sp``.

Transformations are returned as normalised input -> output matrices of the layer frame (what
:func:`invariance.warp.warp` applies to ``moving``) and as family parameters in the layer's
centred frame (pixels of the layer, degrees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from . import geometry as G
from .warp import _check_images, disk_mask, warp, warp_chunks

__all__ = [
    "SEARCH_FAMILIES",
    "SearchConfig",
    "Alignment",
    "align",
    "masked_error",
    "fit_linear",
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


@dataclass
class SearchConfig:
    """Resolution of the coarse grid and the refinement (defaults suit 10-60 px feature maps).

    Attributes:
        n_angles: angles covering the full circle (72 = every 5 degrees).
        log2_scales: log2 scale factors tried by ``scale`` / ``scale_translation``.
        similarity_n_angles, similarity_log2_scales: the (coarser) grid of ``similarity``.
        affine_n_angles, affine_log2_scales, affine_log2_aspects, affine_aspect_angles: the grid
            of ``affine`` (rotation x scale x anisotropy along a direction).
        max_shift: largest integer shift tried, in layer pixels (None: any shift).
        top_k: candidates per image refined by gradient.
        refine_steps: Adam steps of the refinement (0 disables it).
        shortlist: candidates per image examined with the Hungarian assignment.
        chunk_size: candidates warped at a time (bounds memory; None picks one from the sizes).
        memory_budget: bytes of temporary memory a chunk may use when ``chunk_size`` is None.
    """

    n_angles: int = 72
    log2_scales: tuple[float, ...] = tuple(np.round(np.arange(-2.0, 2.0001, 0.125), 6).tolist())
    similarity_n_angles: int = 36
    similarity_log2_scales: tuple[float, ...] = tuple(np.round(np.arange(-1.0, 1.0001, 0.25), 6).tolist())
    affine_n_angles: int = 24
    affine_log2_scales: tuple[float, ...] = (-0.5, -0.25, 0.0, 0.25, 0.5)
    affine_log2_aspects: tuple[float, ...] = (-0.5, 0.5)
    affine_aspect_angles: tuple[float, ...] = (0.0, 45.0, 90.0, 135.0)
    max_shift: float | None = None
    top_k: int = 2
    refine_steps: int = 40
    shortlist: int = 6
    chunk_size: int | None = None
    memory_budget: int = 512 << 20
    seed: int = 0


@dataclass
class Alignment:
    """The result of :func:`align` for a batch of B image pairs.

    Attributes:
        family: the search family.
        errors: ``(B,)`` float64, the normalised error at the returned transformation.
        matrices: ``(B, 3, 3)`` normalised input -> output matrices (layer frame) applied to
            ``moving``.
        params: ``(B, P)`` family parameters in the layer's centred frame.
        permutations: ``(B, C)`` long or None; ``aligned[:, c] = warped_moving[:, perm[c]]``.
        coarse_errors: ``(B,)`` the best error of the coarse grid before refinement.
    """

    family: str
    errors: torch.Tensor
    matrices: torch.Tensor
    params: torch.Tensor
    permutations: torch.Tensor | None = None
    coarse_errors: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- basic measures


def _energy(reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (reference.pow(2) * mask).flatten(-3).sum(-1)


def masked_error(reference: torch.Tensor, aligned: torch.Tensor, mask: torch.Tensor | None = None,
                 eps: float = 1e-12) -> torch.Tensor:
    """``||M (aligned - reference)||^2 / ||M reference||^2`` over channels and positions.

    ``reference (B, C, H, W)``; ``aligned`` of the same shape or ``(B, K, C, H, W)``;
    ``mask (H, W)`` (default: all ones). Returns ``(B,)`` or ``(B, K)``. An all-zero reference
    (nothing to align) gives an error of 0 when ``aligned`` is zero too and ``inf`` otherwise.

    >>> x = torch.ones(2, 3, 4, 4)
    >>> masked_error(x, 0 * x)
    tensor([1., 1.])
    """
    m = torch.ones(reference.shape[-2:], dtype=reference.dtype, device=reference.device) \
        if mask is None else mask.to(reference.dtype)
    ref = reference if aligned.dim() == reference.dim() else reference.unsqueeze(1)
    num = ((aligned - ref).pow(2) * m).flatten(-3).sum(-1)
    den = _energy(ref, m)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.where(num > eps, torch.inf, 0.0))


def _resolve_mask(mask, mask_radius, size, dtype, device) -> torch.Tensor:
    if mask is None:
        m = disk_mask(size, mask_radius, dtype=dtype, device=device).to(dtype)
        if not bool(m.any()):
            raise ValueError(f"mask_radius: {mask_radius} leaves no pixel of the {size[0]}x{size[1]} map in the "
                             "evaluation disk; use a larger radius (1.0 is the inscribed disk)")
        return m
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(size):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask: expected a tensor of shape (H, W) = {tuple(size)}, got {shape}")
    m = mask.to(dtype=dtype, device=device)
    if not bool((m > 0).any()):
        raise ValueError("mask: the evaluation mask is empty (no positive entry)")
    return m


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


def _canvas_pad(lin: torch.Tensor, h: int, w: int, cap: float = 1.0) -> tuple[int, int]:
    """Padding (py, px) of a canvas that holds every warped candidate's whole support.

    The moving map is warped by each linear candidate onto a canvas larger than the reference
    (same pixel pitch and centre), so that an integer shift of the canvas followed by a crop is
    *exactly* the warp by ``shift o candidate``: no content is lost at the reference's border.
    The padding is capped at ``cap`` times the size (a zoom by more than ~5x loses a border).
    """
    corners = torch.tensor([[-w / 2, -h / 2], [w / 2, -h / 2], [-w / 2, h / 2], [w / 2, h / 2]],
                           dtype=lin.dtype, device=lin.device)
    pts = G.apply_to_points(lin, corners.expand(lin.shape[0], 4, 2))
    ext_x = float(pts[..., 0].abs().max()) + 1.0
    ext_y = float(pts[..., 1].abs().max()) + 1.0
    px = min(int(math.ceil(max(0.0, ext_x - w / 2))), int(cap * w))
    py = min(int(math.ceil(max(0.0, ext_y - h / 2))), int(cap * h))
    return py, px


class _ShiftScorer:
    """Errors of all integer shifts of canvas-warped candidates against one reference batch (FFT).

    With ``A = M * F`` (masked reference), ``Q = sum_c G_c^2`` and the canvas offset ``p``:
    ``E(t) = sum_x M(x) Q(x + p - t) - 2 sum_x sum_c A_c(x) G_c(x + p - t) + sum M F^2``; both sums
    are cross-correlations ``R(u) = sum_y A(y + u) G(y)`` at ``u = t - p``, computed by
    zero-padded real FFTs (no wrap-around).
    """

    def __init__(self, reference: torch.Tensor, mask: torch.Tensor, pad: tuple[int, int],
                 max_shift: float | None):
        b, c, h, w = reference.shape
        py, px = pad
        hc, wc = h + 2 * py, w + 2 * px
        self.s = (hc + h, wc + w)
        self.canvas = (hc, wc)
        self.fa = torch.fft.rfft2(reference * mask, s=self.s)  # (B, C, N, N')
        self.fm = torch.fft.rfft2(mask, s=self.s)
        self.energy = _energy(reference, mask)  # (B,)
        ty = torch.arange(-(h - 1) - py, h + py, device=reference.device)
        tx = torch.arange(-(w - 1) - px, w + px, device=reference.device)
        # index of u = t - p in the FFT output (negative u wrap around)
        self.iy = torch.remainder(ty - py, self.s[0])
        self.ix = torch.remainder(tx - px, self.s[1])
        self.ty, self.tx = ty, tx
        bad = torch.zeros(len(ty), len(tx), dtype=torch.bool, device=reference.device)
        if max_shift is not None:
            bad |= (ty[:, None] ** 2 + tx[None, :] ** 2).to(reference.dtype) > max_shift**2
        self.invalid = bad

    def __call__(self, warped: torch.Tensor):
        """warped (B, k, C, Hc, Wc) -> (best error (B, k), best shift (B, k, 2) as (tx, ty))."""
        fg = torch.fft.rfft2(warped, s=self.s)
        spec = torch.einsum("bcxy,bkcxy->bkxy", self.fa, fg.conj())
        del fg
        cross = torch.fft.irfft2(spec, s=self.s)
        fq = torch.fft.rfft2(warped.pow(2).sum(2), s=self.s)
        sq = torch.fft.irfft2(self.fm * fq.conj(), s=self.s)
        num = (sq - 2 * cross)[..., self.iy, :][..., self.ix]
        e = (num + self.energy[:, None, None, None]) / self.energy.clamp_min(1e-30)[:, None, None, None]
        e = e.masked_fill(self.invalid, torch.inf)
        best, idx = e.flatten(-2).min(-1)
        nx = len(self.tx)
        shift = torch.stack([self.tx[idx % nx], self.ty[idx // nx]], -1).to(warped.dtype)
        return best, shift


def _auto_chunk(cfg: SearchConfig, b: int, c: int, h: int, w: int, itemsize: int) -> int:
    if cfg.chunk_size is not None:
        if cfg.chunk_size < 1:
            raise ValueError(f"chunk_size: must be a positive integer, got {cfg.chunk_size}")
        return cfg.chunk_size
    # warped canvas + its spectrum (complex, about the same size) + a few planes
    per_candidate = b * c * h * w * itemsize * 4 + b * h * w * itemsize * 16
    return max(1, int(cfg.memory_budget // max(per_candidate, 1)))


def _coarse(reference, moving, mask, family, cfg, size):
    """Exhaustive coarse search. Returns (errors (B, K), centred matrices (B, K, 3, 3)).

    With a translation part, candidates are grouped by the canvas they need (rounded up to a
    multiple of 4 pixels), so that every candidate is scored exactly and small ones stay cheap.
    """
    b, c, h, w = reference.shape
    lin = _linear_candidates(family, cfg, reference.dtype, reference.device)  # (K,3,3) centred
    has_t = SEARCH_FAMILIES[family][1]
    k = lin.shape[0]
    if has_t:
        pads = [_canvas_pad(lin[i : i + 1], h, w, cap=4.0) for i in range(k)]
        pads = [(-(-py // 4) * 4, -(-px // 4) * 4) for py, px in pads]
    else:
        pads = [(0, 0)] * k
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pads):
        groups.setdefault(p, []).append(i)
    c_src = G.frame_matrix(size, frm="centred", to="normalized", dtype=lin.dtype, device=lin.device)
    errs = torch.empty(b, k, dtype=reference.dtype, device=reference.device)
    shifts = torch.zeros(b, k, 2, dtype=reference.dtype, device=reference.device)
    for (py, px), idx in groups.items():
        canvas = (h + 2 * py, w + 2 * px)
        # candidates from the moving map's normalised frame to the canvas' normalised frame
        c_out = G.frame_matrix(canvas, frm="centred", to="normalized", dtype=lin.dtype, device=lin.device)
        norm = c_out @ lin[idx] @ torch.linalg.inv(c_src)
        if has_t:
            scorer = _ShiftScorer(reference, mask, (py, px), cfg.max_shift)
            side = int(math.sqrt(scorer.s[0] * scorer.s[1]))
        else:
            side = int(math.sqrt(h * w))
        chunk = _auto_chunk(cfg, b, c, side, side, reference.element_size())
        ids = torch.tensor(idx, device=reference.device)
        for sl, warped in warp_chunks(moving, norm, size=canvas, chunk_size=chunk):
            if has_t:
                e, t = scorer(warped)
                shifts[:, ids[sl]] = t
            else:
                e = masked_error(reference, warped, mask)
            errs[:, ids[sl]] = e
    mats = _translation(shifts) @ lin.unsqueeze(0)  # (B, K, 3, 3) centred
    return errs, mats


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


def _exact(reference, moving, centred, mask, size, perm=None):
    """Exact errors of per-image centred matrices (B, n, 3, 3) -> (B, n)."""
    norm = G.centred_to_normalized(centred, size)
    mv = moving if perm is None else torch.gather(
        moving, 1, perm[:, :, None, None].expand(-1, -1, *moving.shape[-2:]))
    out = []
    b, n = centred.shape[:2]
    c = moving.shape[1]
    chunk = max(1, int((256 << 20) // max(1, b * c * size[0] * size[1] * moving.element_size() * 3)))
    for _, warped in warp_chunks(mv, norm, chunk_size=chunk):
        out.append(masked_error(reference, warped, mask))
    return torch.cat(out, 1)


def _refine(reference, moving, centred, mask, size, family, cfg, perm=None):
    """Adam on the family parameters, per (image, candidate). Returns refined centred matrices."""
    fam = G.get_family(SEARCH_FAMILIES[family][0])
    if cfg.refine_steps <= 0:
        return centred
    with torch.no_grad():
        p0 = G.from_matrix(fam, centred)
        z0 = _to_free(fam, p0)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        jitter = (torch.rand(z0.shape, generator=gen, dtype=z0.dtype) - 0.5) * 0.4
        z = (z0 + jitter.to(z0.device)).clone()
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.refine_steps, eta_min=0.01)
    mv = moving if perm is None else torch.gather(
        moving, 1, perm[:, :, None, None].expand(-1, -1, *moving.shape[-2:]))
    best_z = z.detach().clone()
    best_e = torch.full(z.shape[:-1], torch.inf, dtype=z.dtype, device=z.device)
    for _ in range(cfg.refine_steps):
        opt.zero_grad()
        m = G.centred_to_normalized(G.to_matrix(fam, _from_free(fam, z)), size)
        e = masked_error(reference, warp(mv, m, affine=True), mask)  # no projective family here
        with torch.no_grad():
            better = e < best_e
            best_e = torch.where(better, e, best_e)
            best_z = torch.where(better[..., None], z, best_z)
        e.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return G.to_matrix(fam, _from_free(fam, best_z))


# ----------------------------------------------------------------------------- permutations


def _summaries(x: torch.Tensor) -> torch.Tensor:
    """Permutation-invariant summaries (B, 2, H, W): channel mean and channel mean square."""
    return torch.stack([x.mean(1), x.pow(2).mean(1)], 1)


def _cost_matrices(reference, warped, mask):
    """(B, n, C, C) costs ||M (warped_c' - ref_c)||^2 normalised by ||M ref||^2."""
    m = mask.to(reference.dtype)
    rr = (reference.pow(2) * m).flatten(-2).sum(-1)  # (B, C)
    gg = (warped.pow(2) * m).flatten(-2).sum(-1)  # (B, n, C)
    rg = torch.einsum("bchw,bndhw->bncd", reference * m, warped)
    cost = rr[:, None, :, None] + gg[:, :, None, :] - 2 * rg
    return cost / _energy(reference, m).clamp_min(1e-30)[:, None, None, None]


def _hungarian(cost: torch.Tensor):
    """cost (B, n, C, C) -> (errors (B, n), perms (B, n, C))."""
    cnp = cost.detach().cpu().double().numpy()
    b, n, c, _ = cnp.shape
    perms = np.zeros((b, n, c), dtype=np.int64)
    errs = np.zeros((b, n))
    for i in range(b):
        for j in range(n):
            rows, cols = linear_sum_assignment(cnp[i, j])
            perms[i, j, rows] = cols
            errs[i, j] = cnp[i, j][rows, cols].sum()
    return (torch.as_tensor(errs, dtype=cost.dtype, device=cost.device),
            torch.as_tensor(perms, device=cost.device))


def _topk_distinct(errors: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, errors.shape[1])
    return errors.topk(k, dim=1, largest=False).indices


# ----------------------------------------------------------------------------- public API


def align(
    reference: torch.Tensor,
    moving: torch.Tensor,
    family: str = "rigid",
    *,
    mask: torch.Tensor | None = None,
    mask_radius: float = 1.0,
    channels: str = "spatial",
    config: SearchConfig | None = None,
    extra_candidates: torch.Tensor | None = None,
) -> Alignment:
    """Find, per image, the warp of ``moving`` (and channel permutation) that best matches ``reference``.

    Args:
        reference: ``(B, C, H, W)`` maps of the original images.
        moving: ``(B, C, H, W)`` maps of the transformed images (same layer, same frame).
        family: one of :data:`SEARCH_FAMILIES`.
        mask: ``(H, W)`` evaluation mask in the reference frame (default: the disk of radius
            ``mask_radius`` in normalised units).
        channels: ``"spatial"`` (warp only) or ``"permutation"`` (warp and channel permutation).
        config: grid and refinement settings.
        extra_candidates: ``(3, 3)``, ``(n, 3, 3)`` or ``(B, n, 3, 3)`` normalised layer-frame
            matrices that are scored exactly as well (e.g. the expected transformation).

    Returns:
        :class:`Alignment` (errors, matrices, parameters, permutations).

    >>> ref = torch.zeros(1, 1, 16, 16); ref[0, 0, 4:8, 9:12] = 1
    >>> mov = torch.roll(ref, shifts=(2, -3), dims=(-2, -1))
    >>> a = align(ref, mov, "translation")
    >>> a.errors.item() < 1e-6, a.params.round().tolist()
    (True, [[3.0, -2.0]])
    """
    _check_images(reference, "reference")
    _check_images(moving, "moving")
    if reference.shape != moving.shape:
        raise ValueError(f"moving: shape {tuple(moving.shape)} differs from reference {tuple(reference.shape)}")
    if family not in SEARCH_FAMILIES:
        raise ValueError(f"family: unknown search family {family!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    if channels not in ("spatial", "permutation"):
        raise ValueError(f"channels: unknown channel matching {channels!r}; valid choices: spatial, permutation")
    for name, t in (("reference", reference), ("moving", moving)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    cfg = config or SearchConfig()
    # the search differentiates with respect to the warp only, never into the caller's graph
    reference, moving = reference.detach(), moving.detach()
    size = tuple(reference.shape[-2:])
    dtype, device = reference.dtype, reference.device
    m = _resolve_mask(mask, mask_radius, size, dtype, device)
    fam = G.get_family(SEARCH_FAMILIES[family][0])

    # 1. coarse search (exhaustive over the grid x all integer shifts)
    with torch.no_grad():
        coarse_e, coarse_m = _coarse(reference, moving, m, family, cfg, size)
        coarse_best = coarse_e.min(1).values
        idx = _topk_distinct(coarse_e, cfg.top_k)
        starts = torch.gather(coarse_m, 1, idx[..., None, None].expand(-1, -1, 3, 3))
    # 2. refinement through the sampler
    refined = _refine(reference, moving, starts, m, size, family, cfg)
    cands = [starts, refined, torch.eye(3, dtype=dtype, device=device).expand(starts.shape[0], 1, 3, 3)]
    extras = None
    if extra_candidates is not None:
        ex = extra_candidates.to(dtype=dtype, device=device)
        ex = ex.reshape(1, 1, 3, 3) if ex.dim() == 2 else ex
        ex = ex.unsqueeze(0) if ex.dim() == 3 else ex
        extras = G.normalized_to_centred(ex, size).expand(starts.shape[0], -1, 3, 3)
        cands.append(extras)
    cands = torch.cat(cands, 1)
    # 3. exact scoring; keep the best
    with torch.no_grad():
        exact = _exact(reference, moving, cands, m, size)
        best_e, best_i = exact.min(1)
        best_m = cands[torch.arange(cands.shape[0]), best_i]
    result = Alignment(
        family=family,
        errors=best_e.double(),
        matrices=G.centred_to_normalized(best_m, size),
        params=G.from_matrix(fam, best_m),
        coarse_errors=coarse_best.double(),
    )
    if channels == "permutation":
        result = _align_permutation(reference, moving, m, family, cfg, size, result, extras)
    return result


def _align_permutation(reference, moving, m, family, cfg, size, spatial: Alignment,
                       extras: torch.Tensor | None = None) -> Alignment:
    """Shortlist warps by channel summaries, add the best spatial warp and any extra candidates (centred
    frame, ``(B, n, 3, 3)``), assign channels by the Hungarian method at each, refine the best."""
    fam = G.get_family(SEARCH_FAMILIES[family][0])
    b = reference.shape[0]
    with torch.no_grad():
        sr, sm = _summaries(reference), _summaries(moving)
        # put both summary channels on the same footing
        scale = sr.pow(2).mean((0, 2, 3), keepdim=True).clamp_min(1e-30).sqrt()
        e, mats = _coarse(sr / scale, sm / scale, m, family, cfg, size)
        idx = _topk_distinct(e, cfg.shortlist)
        short = torch.gather(mats, 1, idx[..., None, None].expand(-1, -1, 3, 3))
        short = torch.cat([short, G.normalized_to_centred(spatial.matrices, size)[:, None]]
                          + ([extras] if extras is not None else []), 1)
        warped = warp(moving, G.centred_to_normalized(short, size))
        perr, perms = _hungarian(_cost_matrices(reference, warped, m))
        j = perr.min(1).indices
        ar = torch.arange(b)
        best_m, best_p = short[ar, j], perms[ar, j]
    # refine the warp for the chosen permutation, then re-assign at the refined warp
    refined = _refine(reference, moving, best_m[:, None], m, size, family, cfg, perm=best_p)
    with torch.no_grad():
        warped = warp(moving, G.centred_to_normalized(refined, size))
        rerr, rperm = _hungarian(_cost_matrices(reference, warped, m))
        old = _exact(reference, moving, best_m[:, None], m, size, perm=best_p)[:, 0]
        new = _exact(reference, moving, refined, m, size, perm=rperm[:, 0])[:, 0]
        use_new = new < old
        final_m = torch.where(use_new[:, None, None], refined[:, 0], best_m)
        final_p = torch.where(use_new[:, None], rperm[:, 0], best_p)
        final_e = torch.minimum(new, old)
    return Alignment(
        family=spatial.family,
        errors=final_e.double(),
        matrices=G.centred_to_normalized(final_m, size),
        params=G.from_matrix(fam, final_m),
        permutations=final_p,
        coarse_errors=spatial.coarse_errors,
        extra={"spatial": spatial},
    )


def fit_linear(
    reference: torch.Tensor,
    moving: torch.Tensor,
    matrices: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    mask_radius: float = 1.0,
    permutations: torch.Tensor | None = None,
    ridge: float = 1e-4,
    folds: int = 2,
    seed: int = 0,
) -> dict:
    """Linear channel map ``A`` (C x C) on top of per-image warps: held-out and in-sample errors.

    ``A`` is shared by all images (a property of the layer and the transformation). It is fitted
    by ridge regression, weighting each image by ``1 / ||M F||^2`` so it minimises the mean
    normalised error, with ``folds``-fold cross-fitting: every image is scored by a map fitted
    on the other folds (``held_out``). ``fit`` is the in-sample error of the best per-image map
    (least squares on that image's own pixels, starting from its warp and permutation), a lower
    bound: on fitted data ``spatial >= permutation >= fit``.

    Returns a dict with ``held_out (B,)``, ``fit (B,)`` and ``matrix`` (A fitted on all images).

    >>> ref = torch.rand(4, 3, 8, 8); P = torch.tensor([[0., 1, 0], [0, 0, 1], [1, 0, 0]])
    >>> mov = torch.einsum("cd,bdhw->bchw", P.T, ref)          # channels mixed linearly
    >>> out = fit_linear(ref, mov, torch.eye(3).expand(4, 3, 3))
    >>> bool(out["held_out"].max() < 1e-3)
    True
    """
    _check_images(reference, "reference")
    _check_images(moving, "moving")
    size = tuple(reference.shape[-2:])
    m = _resolve_mask(mask, mask_radius, size, reference.dtype, reference.device)
    b, c = reference.shape[:2]
    with torch.no_grad():
        warped = warp(moving, matrices.to(reference).unsqueeze(1))[:, 0]
        if permutations is not None:
            warped = torch.gather(warped, 1, permutations[:, :, None, None].expand(-1, -1, *size))
        sel = m.flatten() > 0
        x = warped.flatten(2)[:, :, sel].double()  # (B, C, N)
        y = reference.flatten(2)[:, :, sel].double()
        w = 1.0 / (y.pow(2).sum((1, 2))).clamp_min(1e-30)  # (B,)
        xx = torch.einsum("b,bcn,bdn->bcd", w, x, x)
        yx = torch.einsum("b,bcn,bdn->bcd", w, y, x)

        def solve(ids):
            sxx, syx = xx[ids].sum(0), yx[ids].sum(0)
            lam = ridge * torch.trace(sxx) / c + 1e-12
            return torch.linalg.solve(sxx + lam * torch.eye(c, dtype=sxx.dtype, device=sxx.device), syx.T).T

        def score(a, ids):
            r = torch.einsum("cd,bdn->bcn", a, x[ids]) - y[ids]
            return r.pow(2).sum((1, 2)) * w[ids]

        held = torch.full((b,), float("nan"), dtype=torch.float64, device=reference.device)
        if b >= 2 and folds >= 2:
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(b, generator=gen).to(reference.device)
            k = min(folds, b)
            for f in range(k):
                test = order[f::k]
                train = torch.cat([order[g::k] for g in range(k) if g != f])
                held[test] = score(solve(train), test)
        a_all = solve(torch.arange(b, device=reference.device))
        # in-sample per-image least squares (lower bound)
        # normal equations per image (a vanishing ridge keeps rank-deficient images solvable)
        gram = torch.einsum("bcn,bdn->bcd", x, x)
        lam = 1e-12 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)[:, None, None]
        eye = torch.eye(c, dtype=gram.dtype, device=gram.device)
        sol = torch.linalg.solve(gram + lam * eye, torch.einsum("bcn,bdn->bcd", x, y))  # (B, C_in, C_out)
        r = torch.einsum("bdc,bdn->bcn", sol, x) - y
        fit = r.pow(2).sum((1, 2)) * w
        # the per-image permutation / identity is feasible for the least squares: never worse
        ident = (x - y).pow(2).sum((1, 2)) * w
        fit = torch.minimum(fit, ident)
    return {"held_out": held, "fit": fit, "matrix": a_all}


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
