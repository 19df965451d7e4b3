"""Tests of :mod:`invariance._search`: the alignment search finds known optima, exactly where the
lattice makes them exact.

Conventions under test: ``align(reference, moving)`` returns, per image, the warp applied to
``moving`` (normalised input -> output matrices of the map, and family parameters in the map's
centred frame: pixels, degrees, counter-clockwise as displayed) that best matches
``reference``; so for ``moving = T reference`` the answer is ``T^-1``. Shifts are ``(tx, ty)``
= (columns, rows).

Known answers:

* ``translation``: integer shifts, negative and larger than half the map, are found exactly
  (the FFT path), error ~0; and the FFT's coarse error equals the exact ``grid_sample`` error;
* ``rotation``: 90 / 180 / 270 degrees are lattice maps (``torch.rot90``), found exactly;
* ``rigid`` / ``scale_translation``: a smooth blob image rotated / rescaled and shifted is
  recovered within interpolation accuracy;
* permutations and linear channel maps planted in the data are recovered exactly;
* orderings that hold by construction: ``spatial >= permutation >= linear fit`` and
  ``spatial <= identity`` and ``spatial <= any extra candidate``.

Float64 throughout except where a test is about float32. The search is run with a reduced
:class:`SearchConfig` (36 angles, 15 refinement steps) to keep the suite fast. The numeric tests
run on every device of the ``device`` fixture (``conftest.py``): inputs are built on the CPU as
before and moved with ``.to(device)``; results are compared on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from invariance import disk_mask, region_error, transform_images, warp
from invariance import geometry as G
from invariance._search import (
    MIN_REGION,
    SEARCH_FAMILIES,
    SearchConfig,
    _coarse,
    _compressed,
    _lag_window,
    _Problem,
    _region_profiles,
    _Rule,
    _ShiftScorer,
    align,
    channel_orbits,
    fit_linear,
    masked_error,
)

DT = torch.float64
CFG = SearchConfig(n_angles=36, refine_steps=15)
# A lattice-exact alignment leaves only rounding: bilinear weights off by ~1e-16 on O(1) values
# give squared errors ~1e-30 relative; 1e-20 (float64) is far below any real misalignment (a
# 1-pixel error on these maps costs >= 1e-2).
EXACT64 = 1e-20
# float32: affine_grid coordinates carry ~6e-8 * size ~ 3e-6 px of rounding, an error of
# (3e-6 * |grad F| / |F|)^2 ~ 1e-10 at most; 1e-8 keeps margin and is still 6 orders below 1e-2.
EXACT32 = 1e-8



def region_err(ref, mov, mats, m=None) -> torch.Tensor:
    """The definition (docs/definitions.md), written out: ``sum R_g ||W_g mov - ref||^2 / sum R_g ||ref||^2``
    with ``R_g = m * V_g``, ``V_g`` the share of each position's bilinear footprint that lies inside
    ``mov``'s frame and ``W_g mov`` the zero-filled warp renormalised by that share."""
    ones = torch.ones(1, 1, *ref.shape[-2:], dtype=ref.dtype, device=ref.device)
    share = warp(ones.expand(ref.shape[0], 1, -1, -1), mats)[..., 0, :, :]
    share = torch.where(share > 1e-6, share, torch.zeros_like(share))
    vals = warp(mov, mats) / share.clamp_min(1e-6).unsqueeze(-3)
    return masked_error(ref, vals, m, valid=share)


def no_overlap_rule(reference, region) -> _Rule:
    """No minimum positions or signal (every candidate with some region feasible), for tests of the formulas."""
    return _Rule.anything(reference, region)


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def nmat(family, params, size, dtype=DT, device="cpu") -> torch.Tensor:
    """Centred-frame family parameters -> the normalised matrix that ``warp`` consumes (computed on
    the CPU, then moved to ``device``)."""
    return G.centred_to_normalized(G.to_matrix(family, torch.tensor(params, dtype=dtype)), size).to(device)


def blob_image(h: int, w: int, f: float = 1.0) -> torch.Tensor:
    """(1, 1, H, W) smooth off-centre image: three anisotropic Gaussians with centres within
    ``0.35 f r`` of the centre and standard deviations ``0.15-0.28 f r`` (``r`` = half the short
    side: >= 2.4 px at f = 1 on 32 px), so bilinear resampling barely blurs it and it is ~0 at
    the border. ``f`` shrinks the content (f = 0.7 keeps it inside the view under a sqrt(2) zoom).
    No symmetry: a wrong angle or a sign error cannot fit."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=DT) - (h - 1) / 2, torch.arange(w, dtype=DT) - (w - 1) / 2,
                            indexing="ij")
    r = min(h, w) / 2 * f
    out = torch.zeros(h, w, dtype=DT)
    for cx, cy, sx, sy, amp in ((-0.3, -0.2, 0.28, 0.18, 1.0), (0.25, 0.05, 0.18, 0.26, 0.7),
                                (0.0, 0.35, 0.2, 0.15, 0.85)):
        out += amp * torch.exp(-((xx - cx * r) ** 2 / (2 * (sx * r) ** 2) + (yy - cy * r) ** 2 / (2 * (sy * r) ** 2)))
    return out[None, None]


def angle_diff(a, b) -> float:
    """Largest wrapped difference of two angles (tensors on any device, or numbers), in degrees."""
    a = a.cpu() if isinstance(a, torch.Tensor) else a
    b = b.cpu() if isinstance(b, torch.Tensor) else b
    return float(G.wrap_angle(torch.as_tensor(a - b, dtype=DT)).abs().max())


# ----------------------------------------------------------------------------- translation (FFT)


SHIFTS = [(3, -2), (-9, 13), (10, -14), (0, -14)]


@pytest.mark.parametrize("dy, dx", SHIFTS)
def test_translation_finds_integer_shifts_exactly(dy, dx, device):
    """Content 9 x 13 in a zero margin of 10 (rows) / 14 (cols) px, so ``torch.roll`` by up to
    that much is the zero-filled shift the warp applies, and the optimum is exact: shifts
    negative and larger than half the map (14 of 41 columns) included. Answer ``(-dx, -dy)``.
    Such shifts keep only 47% of the map in common, below the default minimum overlap (50% of
    the whole map when no expected warp is given), which is therefore lowered to 25%."""
    ref = F.pad(rand(2, 3, 9, 13), (14, 14, 10, 10))  # 29 x 41, non-square
    mov = torch.roll(ref, (dy, dx), dims=(-2, -1))
    a = align(ref.to(device), mov.to(device), "translation", config=replace(CFG, min_overlap=0.25))
    torch.testing.assert_close(a.params.cpu(), torch.tensor([[-dx, -dy]] * 2, dtype=DT), atol=1e-9, rtol=0)
    assert float(a.errors.max()) < EXACT64
    assert a.matrices.dtype == DT and a.params.dtype == DT and a.errors.dtype == DT


@pytest.mark.parametrize("dy, dx", [(-9, 13), (10, -14)])
def test_fft_coarse_error_equals_the_exact_error_at_the_planted_shift(dy, dx, device):
    """With noise added (relative energy ~3%), the optimum stays at the planted shift but its error
    is not zero, so the FFT expression ``E(t) = corr(M, sum G^2) - 2 corr(M F, G) + sum M F^2`` is
    compared with the exact ``grid_sample`` error of that shift on a real value, not on 0 = 0.
    ``refine_steps=0`` keeps the returned transformation on the integer lattice; agreement to
    1e-10 is float64 FFT rounding on ~2500-term sums."""
    ref = F.pad(rand(2, 3, 9, 13), (14, 14, 10, 10))
    noise = 0.1 * rand(2, 3, 29, 41, seed=9)
    mov = torch.roll(ref, (dy, dx), dims=(-2, -1)) + noise
    ref, mov = ref.to(device), mov.to(device)
    # these shifts keep 47% of the map in common: below the default minimum overlap of 50%
    a = align(ref, mov, "translation", config=SearchConfig(refine_steps=0, min_overlap=0.25))
    torch.testing.assert_close(a.params.cpu(), torch.tensor([[-dx, -dy]] * 2, dtype=DT), atol=0, rtol=0)
    direct = region_err(ref, mov, nmat("translation", [-dx, -dy], (29, 41), device=device)).cpu()
    assert float(direct.min()) > 1e-3
    torch.testing.assert_close(a.coarse_errors.cpu(), direct, atol=1e-10, rtol=0)
    torch.testing.assert_close(a.errors.cpu(), direct, atol=1e-12, rtol=0)


@pytest.mark.parametrize("family, cfg", [
    ("translation", SearchConfig(refine_steps=0)),
    ("rigid", SearchConfig(n_angles=12, refine_steps=0)),
    ("scale_translation", SearchConfig(refine_steps=0, log2_scales=(-1.0, -0.5, 0.0, 0.5, 1.0, 1.5))),
    ("affine", SearchConfig(refine_steps=0, affine_n_angles=8)),
    pytest.param("scale_translation", SearchConfig(refine_steps=0),
                 id="default-scale-grid"),
])
def test_coarse_errors_equal_exact_grid_sample_errors(family, cfg, device):
    """For every linear candidate of the coarse grid, the FFT's best-shift error equals the exact
    ``grid_sample`` error of the returned matrix (candidate then shift): this validates the FFT
    formula, the canvas offset bookkeeping and the sign of the shift for every candidate at once.
    Random maps, non-square (9 x 14), disk mask of radius 0.8; 1e-9 is float64 FFT rounding."""
    gen = torch.Generator().manual_seed(0)
    ref, mov = torch.rand(2, 3, 9, 14, generator=gen, dtype=DT), torch.rand(2, 3, 9, 14, generator=gen, dtype=DT)
    ref, mov = ref.to(device), mov.to(device)
    m = disk_mask((9, 14), 0.8, dtype=DT).to(DT).to(device)
    ones = torch.ones(9, 14, dtype=DT, device=device)
    e, mats = _coarse(_Problem(ref, mov, m, ones, (9, 14), family, cfg, no_overlap_rule(ref, m)))
    direct = region_err(ref, mov, G.centred_to_normalized(mats, (9, 14)), m)
    assert e.shape == direct.shape and e.shape[1] >= 1
    torch.testing.assert_close(e.cpu(), direct.cpu(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("pad", [(0, 0), (2, 3)])
def test_shift_scorer_matches_direct_evaluation_shift_by_shift(pad, device):
    """``_ShiftScorer`` evaluates every integer shift of a (canvas of the) moving map at once by
    FFT. Restricting it to one shift at a time (all others marked invalid) must give the exact
    ``grid_sample`` error of that shift, for shifts of both signs, along both axes and up to the
    largest overlap (|t| = size - 1); with a zero-padded canvas of padding (py, px) the canvas
    is the moving map embedded at the offset, so the numbers are the same. 1e-10: float64 FFT
    rounding."""
    h, w = 9, 14
    ref, mov = rand(2, 3, h, w, seed=10).to(device), rand(2, 3, h, w, seed=11).to(device)
    m = disk_mask((h, w), 0.9, dtype=DT).to(DT).to(device)
    py, px = pad
    scorer = _ShiftScorer(ref, m, pad, None, no_overlap_rule(ref, m))
    canvas = F.pad(mov, (px, px, py, py))
    for tx, ty in [(0, 0), (3, -2), (-5, 4), (13, 0), (0, -8), (-13, 8)]:
        only = torch.ones_like(scorer.invalid)
        only[(scorer.ty == ty).nonzero().item(), (scorer.tx == tx).nonzero().item()] = False
        scorer.invalid = only
        valid = F.pad(torch.ones(h, w, dtype=DT), (px, px, py, py)).to(device)
        stacked = torch.cat([canvas, valid.expand(2, 1, *valid.shape)], 1)  # the maps and their region
        e, shift = scorer(stacked[:, None])
        direct = region_err(ref, mov, nmat("translation", [tx, ty], (h, w), device=device), m).cpu()
        if bool(direct.isnan().all()):  # the shift leaves no position of the mask to compare
            assert bool(torch.isinf(e).all())
            continue
        assert shift[:, 0].tolist() == [[tx, ty]] * 2
        torch.testing.assert_close(e[:, 0].cpu(), direct, atol=1e-10, rtol=0)


@settings(max_examples=40)
@given(h=st.integers(3, 12), w=st.integers(3, 12), py=st.integers(0, 5), px=st.integers(0, 5),
       density=st.floats(0.2, 1.0), share=st.floats(0.05, 1.2), seed=st.integers(0, 2**16))
def test_the_lag_window_is_the_hull_of_the_lags_where_a_warp_can_keep_enough_positions(h, w, py, px, density,
                                                                                      share, seed):
    """``_lag_window`` may leave out of the FFT only lags at which no warp keeps ``need`` positions
    of the region. The largest weight a warp can have is 1 on its whole canvas; its overlap with
    the region ``M`` at every lag is computed here directly (a sum over the shifted canvas). The
    window must be exactly each axis's hull of the lags where that overlap reaches ``need``: a
    wider one wastes FFT area, a narrower one drops a feasible warp. Exact: the overlaps are sums
    of 0/1 values. None stands for every lag (what the scorer does without a window): right when
    nothing is needed (an empty region, ``need`` 0) and harmless when no lag is feasible."""
    gen = torch.Generator().manual_seed(seed)
    m = (torch.rand(h, w, generator=gen) < density).to(DT)
    hc, wc = h + 2 * py, w + 2 * px
    need = share * float(m.sum())
    overlap = torch.zeros(hc + h - 1, wc + w - 1, dtype=DT)  # lag u: canvas row y meets reference row y + u
    for i, uy in enumerate(range(-(hc - 1), h)):
        for j, ux in enumerate(range(-(wc - 1), w)):
            overlap[i, j] = m[max(0, uy):min(h, uy + hc), max(0, ux):min(w, ux + wc)].sum()
    feasible = (overlap >= need).nonzero()
    window = _lag_window(_region_profiles(m), (hc, wc), need)
    if feasible.numel() == 0:
        assert window is None
        return
    hull = ((int(feasible[:, 0].min()) - (hc - 1), int(feasible[:, 0].max()) - (hc - 1)),
            (int(feasible[:, 1].min()) - (wc - 1), int(feasible[:, 1].max()) - (wc - 1)))
    every = ((-(hc - 1), h - 1), (-(wc - 1), w - 1))
    assert (every if window is None else window) == hull


def test_the_fft_sized_to_the_feasible_lags_scores_as_the_full_one(device):
    """With the default rule (a warp keeps at least half the expected warp's positions), the
    scorer whose FFT holds only the lags of :func:`_lag_window` must return what the scorer of
    every lag returns: the same best shift and error for every candidate (1e-10: float64 FFT
    rounding of two transform sizes), with a smaller transform. Random maps, a moving map embedded
    in a padded canvas, disk region."""
    h, w, py, px = 16, 13, 3, 5
    ref, mov = rand(3, 2, h, w, seed=20).to(device), rand(3, 2, h, w, seed=21).to(device)
    m = disk_mask((h, w), 0.9, dtype=DT).to(DT).to(device)
    rule = _Rule.of(ref, m, None, SearchConfig())
    rule = _Rule(rule.positions, torch.zeros_like(rule.signal), rule.plane)  # positions only: the edges are feasible
    need = float(rule.positions.min()) - 1
    lags = _lag_window(_region_profiles(m), (h + 2 * py, w + 2 * px), need)
    full = _ShiftScorer(ref, m, (py, px), None, rule)
    cut = _ShiftScorer(ref, m, (py, px), None, rule, lags)
    assert cut.s[0] * cut.s[1] < full.s[0] * full.s[1]
    canvas = F.pad(mov, (px, px, py, py))
    valid = F.pad(torch.ones(h, w, dtype=DT), (px, px, py, py)).to(device)
    # the canvas, and the canvas with a part of its valid region cleared
    stacks = []
    for rows in (slice(0, 0), slice(0, h // 2), slice(h // 3, h)):
        v = valid.clone()
        v[py:py + h][rows] = 0
        stacks.append(torch.cat([canvas * v, v.expand(3, 1, *v.shape)], 1))
    # and a candidate valid on its whole canvas: the only one that reaches the window's edges
    whole = torch.ones_like(valid).expand(3, 1, *valid.shape)
    stacks.append(torch.cat([rand(3, 2, *valid.shape, seed=22).to(device), whole], 1))
    stacked = torch.stack(stacks, 1)  # (B, k, C + 1, Hc, Wc)
    (e_full, t_full), (e_cut, t_cut) = full(stacked), cut(stacked)
    assert bool(torch.isfinite(e_full).any())
    torch.testing.assert_close(e_cut.cpu(), e_full.cpu(), atol=1e-10, rtol=0)
    ok = torch.isfinite(e_full)
    assert torch.equal(t_cut[ok].cpu(), t_full[ok].cpu())
    # the window's edges, one lag at a time (each scorer's own invalid shifts kept): a window one
    # lag short, or an FFT one point short (wrap-around), changes these
    (ay, by), (ax, bx) = lags
    scored = 0
    for uy, ux in [(ay, -px), (by, -px), (-py, ax), (-py, bx)]:
        ty, tx = uy + py, ux + px
        out = []
        for sc, own in ((full, full.invalid), (cut, cut.invalid)):
            sc.invalid = own | (sc.ty != ty)[:, None] | (sc.tx != tx)[None, :]
            out.append(sc(stacked)[0])
            sc.invalid = own
        torch.testing.assert_close(out[1].cpu(), out[0].cpu(), atol=1e-10, rtol=0)
        scored += int(torch.isfinite(out[0]).sum())
    assert scored > 0


@pytest.mark.parametrize("family", ["rigid", "similarity"])
def test_coarse_errors_on_a_partly_valid_moving_map_equal_the_exact_errors(family, device):
    """When the moving map is valid on part of its frame only (a rotated image's valid region),
    the coarse canvases hold the warps of that part's footprint, not of the whole frame (smaller
    FFTs). Every candidate's FFT error must still equal the exact ``grid_sample`` error of the
    returned matrix with that moving mask (1e-9: float64 FFT rounding), and the canvas must be
    smaller than the frame's (so that this path is the one tested)."""
    from invariance._search import _canvas_pads, _linear_candidates, _support_outline
    h, w = 15, 18
    ref, mov = rand(2, 3, h, w, seed=30).to(device), rand(2, 3, h, w, seed=31).to(device)
    t = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([35.0], dtype=DT)), (h, w))
    mvalid = (warp(torch.ones(1, 1, h, w, dtype=DT), t)[0, 0] > 0.999).to(DT).to(device)
    m = disk_mask((h, w), 0.9, dtype=DT).to(DT).to(device)
    cfg = SearchConfig(refine_steps=0, n_angles=24, similarity_n_angles=12)
    lin = _linear_candidates(family, cfg, DT, "cpu")
    frame = _canvas_pads(lin, h, w, cap=4.0)
    tight = _canvas_pads(lin, h, w, cap=4.0, outline=_support_outline(mvalid))
    assert sum(map(sum, tight)) < sum(map(sum, frame))
    rule = _Rule.of(ref, m, None, cfg)
    e, mats = _coarse(_Problem(ref, mov, m, mvalid, (h, w), family, cfg, rule))
    direct = region_error(ref, mov, G.centred_to_normalized(mats, (h, w)), mask=m, moving_mask=mvalid)
    ok = torch.isfinite(e)
    assert bool(ok.any())
    torch.testing.assert_close(e[ok].cpu(), direct[ok].cpu(), atol=1e-9, rtol=0)


@settings(max_examples=30)
@given(b=st.integers(1, 4), k=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_per_image_candidates_are_grouped_once_each_on_a_canvas_that_holds_them(b, k, seed):
    """Per-image candidates (the half-pixel pass, the local re-search) are scored in groups that
    share a canvas: every image's every candidate must appear in exactly one group (none filled in
    twice, none left out), and the group's canvas must be at least the one the candidate needs
    (:func:`_canvas_pads`, rounded up to 4 pixels), so that its warp loses nothing."""
    from invariance._search import _canvas_groups, _canvas_pads
    gen = torch.Generator().manual_seed(seed)
    params = torch.stack([torch.rand(b, k, generator=gen, dtype=DT) * 360 - 180,
                          2 ** (torch.rand(b, k, generator=gen, dtype=DT) * 2 - 1)], -1)
    lin = G.to_matrix("similarity", torch.cat([params, torch.zeros(b, k, 2, dtype=DT)], -1))
    h, w = 11, 14
    own = [(-(-py // 4) * 4, -(-px // 4) * 4) for py, px in _canvas_pads(lin.reshape(-1, 3, 3), h, w, cap=4.0)]
    seen = [[] for _ in range(b)]
    for (py, px), idx in _canvas_groups(lin, h, w, True).items():
        for i in range(b):
            for j in idx[i]:
                seen[i].append(int(j))
                assert own[i * k + j][0] <= py and own[i * k + j][1] <= px
    assert all(sorted(s) == list(range(k)) for s in seen)


def test_max_shift_bounds_the_coarse_shift(device):
    """A planted shift of (5, 5) px is out of reach with ``max_shift=2``: the coarse answer stays
    within the radius (and is then not exact)."""
    ref = F.pad(rand(2, 2, 7, 9), (6, 6, 6, 6))
    mov = torch.roll(ref, (5, 5), dims=(-2, -1))
    ref, mov = ref.to(device), mov.to(device)
    a = align(ref, mov, "translation", config=SearchConfig(max_shift=2.0, refine_steps=0))
    assert float(a.params.norm(dim=-1).max()) <= 2.0
    assert float(a.errors.min()) > 0.05
    free = align(ref, mov, "translation", config=SearchConfig(refine_steps=0))
    assert float(free.errors.max()) < EXACT64


def test_float32_translation_is_exact_to_float32_precision(device):
    ref = F.pad(rand(2, 3, 9, 11), (8, 8, 8, 8)).float()
    mov = torch.roll(ref, (-5, 7), dims=(-2, -1))
    a = align(ref.to(device), mov.to(device), "translation", config=CFG)
    assert a.matrices.dtype == torch.float32 and a.params.dtype == torch.float32
    assert a.errors.dtype == torch.float64
    torch.testing.assert_close(a.params.double().cpu(), torch.tensor([[-7.0, 5.0]] * 2, dtype=DT), atol=1e-4,
                               rtol=0)
    assert float(a.errors.max()) < EXACT32


def test_circular_network_and_roll_is_found_exactly_on_the_valid_interior(device):
    """A stack of stride-1 convolutions with circular padding commutes with ``torch.roll``:
    ``F_h = roll(F, t)`` exactly. The search's warp is a *zero-filled* shift, so ``W_{-t} F_h(x)
    = F_h(x + t) = F(x)`` only where ``x + t`` lies inside the map; elsewhere the warp brings in
    zeros while ``F`` does not vanish. The mask that makes the optimum exact is therefore the
    interior crop ``|ty| <= i < H - |ty|``, ``|tx| <= j < W - |tx|`` (valid for either sign of t).
    On it the search must return ``(-tx, -ty)`` with error ~0. With the default disk mask, which
    reaches the border, the true shift is *not* exact (the check below that it is > 1e-3 shows
    that the interior mask is what makes the known answer exact)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular"), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 3, 5, padding=2, padding_mode="circular"),
    ).double().to(device)
    x = rand(2, 1, 16, 21, seed=3).to(device)
    ty, tx = 3, -4
    with torch.no_grad():
        f = net(x)
        fh = net(torch.roll(x, (ty, tx), dims=(-2, -1)))
    torch.testing.assert_close(fh.cpu(), torch.roll(f, (ty, tx), dims=(-2, -1)).cpu(), atol=1e-12, rtol=0)
    mask = torch.zeros(16, 21, dtype=DT)
    mask[abs(ty): 16 - abs(ty), abs(tx): 21 - abs(tx)] = 1
    a = align(f, fh, "translation", mask=mask.to(device), config=CFG)
    torch.testing.assert_close(a.params.cpu(), torch.tensor([[-tx, -ty]] * 2, dtype=DT), atol=1e-9, rtol=0)
    assert float(a.errors.max()) < EXACT64
    at_truth_disk = masked_error(f, warp(fh, nmat("translation", [-tx, -ty], (16, 21), device=device)),
                                 disk_mask((16, 21), device=device))
    assert float(at_truth_disk.min()) > 1e-3


# ----------------------------------------------------------------------------- rotations


@pytest.mark.parametrize("k, angle", [(1, -90.0), (2, 180.0), (3, 90.0)])
def test_rotation_family_finds_quarter_turns_exactly(k, angle, device):
    """``moving = rot90(reference, k)`` (counter-clockwise by 90k); the warp back is ``-90k``
    (wrapped to (-180, 180]). The 36-angle grid contains the multiples of 90, where bilinear
    sampling is a lattice permutation on a square map: error ~0, angle exact."""
    ref = rand(3, 2, 15, 15)
    a = align(ref.to(device), torch.rot90(ref, k, (-2, -1)).to(device), "rotation", config=CFG)
    assert angle_diff(a.params[:, 0], angle) < 1e-6
    assert float(a.errors.max()) < EXACT64


def test_rotation_180_on_a_non_square_map(device):
    """180 degrees about the centre maps the pixel centres of any H x W grid onto themselves."""
    ref = rand(2, 3, 15, 22)
    a = align(ref.to(device), torch.rot90(ref, 2, (-2, -1)).to(device), "rotation", config=CFG)
    assert angle_diff(a.params[:, 0], 180.0) < 1e-6
    assert float(a.errors.max()) < EXACT64


# The refinement moves each parameter by at most ~lr per Adam step (lr = 0.5 degree, cosine
# decay): 15 steps reach sum(lr_t) ~ 3.8 degrees, which must cover half the angle spacing of the
# coarse grid. 72 angles (2.5 degrees to the nearest grid point) satisfy that; 36 (5 degrees) do
# not (a 4-degree rotation then comes back as ~2.8 degrees).
CFG_RIGID = SearchConfig(n_angles=72, refine_steps=15)


@settings(max_examples=4)
@given(angle=st.floats(-175, 175), tx=st.floats(-3, 3), ty=st.floats(-3, 3),
       size=st.sampled_from([(32, 32), (30, 38)]))
def test_rigid_recovers_rotation_and_shift_of_a_blob(angle, tx, ty, size, device):
    """``moving = T reference`` with T a rotation by ``angle`` then a shift; the answer is
    ``T^-1`` = rotation by ``-angle``, shift ``-R^-1 t``. The error landscape of the smooth blob
    has its minimum at ``T^-1`` (checked: +-0.2 degree costs 5 % more error); 15 refinement
    steps land within ~0.5 degree / 0.05 px of it. The grid alone is up to 2.5 degrees off, a
    sign error 2 * angle: 1 degree and 0.3 px fail for both."""
    h, w = size
    ref = blob_image(h, w).to(device)
    T = G.to_matrix("rigid", torch.tensor([angle, tx, ty], dtype=DT))
    mov = warp(ref, G.centred_to_normalized(T, size).to(device))
    a = align(ref, mov, "rigid", config=CFG_RIGID)
    want = G.from_matrix("rigid", G.inverse(T))
    got = a.params[0].cpu()
    assert angle_diff(got[0], want[0]) < 1.0, (got, want)
    assert float((got[1:] - want[1:]).abs().max()) < 0.3, (got, want)
    assert float(a.errors[0]) < 0.01


@pytest.mark.parametrize("size", [(32, 32), (30, 38)])
def test_scale_translation_recovers_a_sqrt2_zoom(size, device):
    """``moving`` = the blob (f = 0.7) enlarged by ``sqrt(2)``, content still inside the view; the
    warp back shrinks by ``2^-0.5``, shift 0. The log2 grid (step 1/8) contains -0.5 exactly and
    shrinking an enlarged smooth image loses nothing: |log2 s + 0.5| < 0.02 (1.4 %) and
    shift < 0.3 px fail for the neighbouring grid points (0.125 away) or a wrong direction."""
    ref = blob_image(*size, f=0.7).to(device)
    mov = transform_images(ref, "scale", [2**0.5])
    a = align(ref, mov, "scale_translation", config=CFG)
    s, t = a.params[0, 0], a.params[0, 1:]
    assert abs(math.log2(float(s)) + 0.5) < 0.02
    assert float(t.abs().max()) < 0.3
    assert float(a.errors[0]) < 0.01


@pytest.mark.parametrize("family", [
    "scale_translation", "affine", "scale", "similarity",
])
def test_zoom_is_found_and_params_match_matrices(family, device):
    """Every family that contains scalings finds the sqrt(2) zoom back (isotropic scale factor
    ``sqrt(det)`` within 1.4 % of 2^-0.5, error < 0.01 as for ``scale_translation`` above), and
    the reported parameters describe the returned matrix: ``to_matrix(params)`` equals the
    centred-frame matrix (1e-9)."""
    ref = blob_image(32, 32, f=0.7).to(device)
    mov = transform_images(ref, "scale", [2**0.5])
    cfg = SearchConfig(n_angles=36, refine_steps=15, affine_n_angles=4, similarity_n_angles=12,
                       log2_scales=(-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5))
    a = align(ref, mov, family, config=cfg)
    centred = G.normalized_to_centred(a.matrices, (32, 32)).cpu()
    fam = SEARCH_FAMILIES[family][0]
    torch.testing.assert_close(G.to_matrix(fam, a.params).cpu(), centred, atol=1e-9, rtol=0)
    s = float(torch.det(centred[0, :2, :2]).sqrt())
    assert abs(math.log2(s) + 0.5) < 0.02
    assert float(a.errors[0]) < 0.01


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("channels", ["spatial", "permutation"])
def test_results_do_not_depend_on_chunk_size(channels, device):
    """``chunk_size`` only bounds memory: errors, matrices and permutations are identical."""
    ref, mov = rand(2, 3, 9, 12, seed=1).to(device), rand(2, 3, 9, 12, seed=2).to(device)
    cfg = SearchConfig(n_angles=8, refine_steps=3)
    base = align(ref, mov, "rigid", config=cfg, channels=channels)
    for cs in (1, 3):
        other = align(ref, mov, "rigid", channels=channels,
                      config=SearchConfig(n_angles=8, refine_steps=3, chunk_size=cs))
        torch.testing.assert_close(other.errors.cpu(), base.errors.cpu(), atol=1e-12, rtol=0)
        torch.testing.assert_close(other.matrices.cpu(), base.matrices.cpu(), atol=1e-9, rtol=0)
        if channels == "permutation":
            assert torch.equal(other.permutations.cpu(), base.permutations.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("family", sorted(SEARCH_FAMILIES))
def test_dtype_follows_the_inputs(family, dtype, device):
    ref, mov = rand(1, 2, 8, 10, seed=1).to(dtype).to(device), rand(1, 2, 8, 10, seed=2).to(dtype).to(device)
    cfg = SearchConfig(n_angles=8, refine_steps=2, similarity_n_angles=4, affine_n_angles=4,
                       log2_scales=(-0.5, 0.0, 0.5), similarity_log2_scales=(0.0,), affine_log2_scales=(0.0,))
    a = align(ref, mov, family, config=cfg)
    assert a.matrices.dtype == dtype and a.params.dtype == dtype
    assert a.matrices.device.type == device.type and a.params.device.type == device.type
    assert a.errors.dtype == torch.float64
    assert a.params.shape == (1, G.get_family(SEARCH_FAMILIES[family][0]).n_params)
    # the returned error is the exact error of the returned matrix
    direct = region_err(ref.double(), mov.double(), a.matrices.double()[:, None])[:, 0]
    tol = 1e-10 if dtype == DT else 1e-5
    torch.testing.assert_close(a.errors.cpu(), direct.cpu(), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 2, 2), (1, 1, 1, 7), (2, 1, 3, 5), (1, 3, 2, 3)])
@pytest.mark.parametrize("family", ["translation", "rigid", "scale_translation"])
def test_tiny_maps_batch_one_single_channel(shape, family, device):
    """B = 1, C = 1 and maps down to 1 x 1 work, and the identity bound holds:
    the search can never be worse than not moving at all."""
    ref, mov = rand(*shape, seed=1).to(device), rand(*shape, seed=2).to(device)
    a = align(ref, mov, family, config=SearchConfig(n_angles=8, refine_steps=3), channels="permutation")
    ident = masked_error(ref, mov)
    assert a.errors.shape == (shape[0],)
    if shape[-1] * shape[-2] < MIN_REGION:
        # too few positions to compare: no verdict (NaN with a reason), never a perfect 0
        assert bool(torch.isnan(a.errors).all()) and all("MIN_REGION" in r for r in a.reasons)
        return
    assert torch.isfinite(a.errors).all()
    assert bool((a.errors.cpu() <= ident.cpu() + 1e-12).all())
    assert a.permutations.shape == shape[:2]


# ----------------------------------------------------------------------------- permutations


@settings(max_examples=6)
@given(perm=st.permutations(range(5)), k=st.sampled_from([0, 2]))
def test_planted_permutation_is_recovered(perm, k, device):
    """``moving[:, c] = rot180^k(reference[:, sigma[c]])``. With the convention
    ``aligned[:, c] = warped_moving[:, perm[c]]`` the answer is ``perm = sigma^-1`` (argsort), the
    error ~0, and ``channel_orbits`` are the cycles of ``sigma^-1`` (the same sets as the cycles
    of ``sigma``). Random channels: no other permutation comes close."""
    sigma = torch.tensor(perm)
    ref = rand(2, 5, 9, 11, seed=4)
    mov = torch.rot90(ref[:, sigma], k, (-2, -1))
    a = align(ref.to(device), mov.to(device), "rotation", config=SearchConfig(n_angles=36, refine_steps=3),
              channels="permutation")
    want = torch.argsort(sigma)
    perms = a.permutations.cpu()
    assert torch.equal(perms, want.expand(2, 5))
    assert float(a.errors.max()) < EXACT64
    assert angle_diff(a.params[:, 0], 180.0 if k else 0.0) < 1e-6
    orbits = channel_orbits(perms[0])
    cycles = {frozenset(c) for c in channel_orbits(sigma)}
    assert {frozenset(c) for c in orbits} == cycles
    assert all(len(c) > 1 for c in orbits)
    for cyc in orbits:  # each orbit follows perm
        for i, c in enumerate(cyc):
            assert int(perms[0, c]) == cyc[(i + 1) % len(cyc)]


def test_planted_permutation_with_a_shift_uses_the_fft_path(device):
    sigma = torch.tensor([2, 0, 1, 4, 3])
    ref = F.pad(rand(3, 5, 9, 11, seed=5), (4, 4, 4, 4))
    mov = torch.roll(ref, (3, -2), (-2, -1))[:, sigma]
    a = align(ref.to(device), mov.to(device), "translation", config=CFG, channels="permutation")
    assert torch.equal(a.permutations.cpu(), torch.argsort(sigma).expand(3, 5))
    torch.testing.assert_close(a.params.cpu(), torch.tensor([[2.0, -3.0]] * 3, dtype=DT), atol=1e-9, rtol=0)
    assert float(a.errors.max()) < EXACT64
    assert float(a.spatial.errors.min()) > 0.05  # without the permutation: no fit


def test_channel_orbits_known_answers():
    assert channel_orbits([1, 0, 3, 2]) == [[0, 1], [2, 3]]
    assert channel_orbits(torch.tensor([0, 1, 2])) == []
    assert channel_orbits([2, 0, 1]) == [[0, 2, 1]]


# ----------------------------------------------------------------------------- linear maps


def test_fit_linear_recovers_a_planted_channel_mixing(device):
    """``moving = B rot180(reference)`` with an invertible random ``B`` and the known warp: the
    held-out (cross-fitted) error and the in-sample fit are ~0 and the map is ``B^-1``.
    With ``ridge=1e-12`` the only error is the solve's rounding (condition number of the 5x5
    Gram matrix of random maps is O(10^2): errors ~1e-26, matrix ~1e-12)."""
    ref = rand(6, 5, 11, 13, seed=6)
    B = torch.randn(5, 5, generator=torch.Generator().manual_seed(7), dtype=DT) + 2 * torch.eye(5, dtype=DT)
    mov = torch.einsum("cd,bdhw->bchw", B, torch.rot90(ref, 2, (-2, -1)))
    R = nmat("rotation", [180.0], (11, 13), device=device).expand(6, 3, 3)
    out = fit_linear(ref.to(device), mov.to(device), R, ridge=1e-12)
    assert float(out["held_out"].max()) < 1e-16
    assert float(out["fit"].max()) < 1e-16
    torch.testing.assert_close(out["matrix"].cpu(), torch.linalg.inv(B), atol=1e-8, rtol=0)


def test_fit_linear_default_ridge_bias_is_small(device):
    """The default ridge ``1e-4 tr(Sxx)/C`` shrinks the map by a relative ~1e-4 * cond: the
    held-out error of an exact linear relation is <= ~1e-6, far below the O(1) spatial error."""
    ref = rand(4, 3, 10, 10, seed=8)
    B = torch.tensor([[0.0, 1, 0], [0.6, 0, 0.8], [0.8, 0, -0.6]], dtype=DT)
    mov = torch.einsum("cd,bdhw->bchw", B, ref)
    ref, mov = ref.to(device), mov.to(device)
    out = fit_linear(ref, mov, torch.eye(3, dtype=DT, device=device).expand(4, 3, 3))
    assert float(out["held_out"].max()) < 1e-6
    assert float(masked_error(ref, mov, disk_mask((10, 10), device=device)).min()) > 0.1


def test_fit_linear_single_image_has_no_held_out_error(device):
    """Cross-fitting needs two images: with B = 1 ``held_out`` is NaN, the in-sample fit exists."""
    ref = rand(1, 2, 6, 6, seed=1).to(device)
    out = fit_linear(ref, ref.flip(1), torch.eye(3, dtype=DT, device=device)[None])
    assert torch.isnan(out["held_out"]).all()
    assert float(out["fit"][0]) < 1e-20


@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), c=st.integers(1, 4), b=st.integers(1, 3),
       family=st.sampled_from(["translation", "rotation", "rigid"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ordering_spatial_permutation_linear(seed, c, b, family, dtype, device):
    """For any maps: ``identity >= spatial >= permutation >= linear fit`` per image, on fitted
    data. The identity is always a candidate; the spatial optimum with the identity permutation
    is a candidate of the permutation search; the per-image least-squares map can reproduce any
    permutation. Slack for the different summation orders: 1e-9 in float64; in float32 the
    Hungarian costs are expanded sums (rounding ~1e-7 of O(1) errors), so 1e-6."""
    ref = rand(b, c, 9, 10, seed=seed).to(dtype)
    mov = 0.5 * ref.flip(1) + rand(b, c, 9, 10, seed=seed + 1).to(dtype)  # partly related, partly not
    ref, mov = ref.to(device), mov.to(device)
    cfg = SearchConfig(n_angles=12, refine_steps=5)
    p = align(ref, mov, family, config=cfg, channels="permutation")
    sp = p.spatial
    ident = masked_error(ref.double(), mov.double())
    lin = fit_linear(ref, mov, p.matrices, permutations=p.permutations)
    tol = 1e-9 if dtype == DT else 1e-6
    spatial, perm, fit = sp.errors.cpu(), p.errors.cpu(), lin["fit"].cpu()
    assert bool((spatial <= ident.cpu() + tol).all())
    assert bool((perm <= spatial + tol).all())
    assert bool((fit <= perm + tol).all())


def test_extra_candidates_bound_the_error(device):
    """A user-supplied candidate (here the true inverse of a 37-degree rotation, off the 10-degree
    grid and, with refinement disabled, unreachable otherwise) is scored exactly, so the result is
    at least as good as it."""
    ref = blob_image(24, 24, f=0.8).to(device)
    T = nmat("rotation", [37.0], (24, 24), device=device)
    mov = warp(ref, T)
    inv = G.inverse(T)
    a = align(ref, mov, "rotation", config=SearchConfig(n_angles=36, refine_steps=0), extra_candidates=inv)
    direct = region_err(ref, mov, inv)
    assert float(a.errors[0]) <= float(direct[0]) + 1e-15
    assert angle_diff(a.params[0, 0], -37.0) < 1e-6


# ----------------------------------------------------------------------------- masks and errors


def test_custom_mask_is_used(device):
    """Only the masked pixels count: a mask selecting the left half makes a map that differs only
    on the right half perfectly aligned at the identity."""
    ref = rand(1, 1, 8, 10, seed=2)
    mov = ref.clone()
    mov[..., 5:] += 1.0
    mask = torch.zeros(8, 10)
    mask[:, :4] = 1
    a = align(ref.to(device), mov.to(device), "rotation", mask=mask.to(device), config=CFG)
    assert float(a.errors[0]) < EXACT64


def test_empty_mask_is_not_a_perfect_alignment(device):
    ref, mov = rand(2, 1, 5, 5, seed=1).to(device), rand(2, 1, 5, 5, seed=2).to(device)
    try:
        a = align(ref, mov, "translation", mask=torch.zeros(5, 5, device=device), config=CFG)
    except ValueError:
        return
    assert not bool((a.errors == 0).any()), a.errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(family="rotate"), r"unknown search family 'rotate'; valid choices: translation, rotation"),
    (dict(channels="linear"), r"unknown channel matching 'linear'; valid choices: spatial, permutation"),
    (dict(mask=torch.ones(4, 4)), r"mask: expected a tensor of shape \(H, W\) = \(6, 7\)"),
])
def test_bad_arguments(kwargs, match):
    ref = rand(1, 1, 6, 7)
    kw = dict(family="translation", config=CFG) | kwargs
    with pytest.raises(ValueError, match=match):
        align(ref, ref, **kw)


def test_bad_inputs():
    ref = rand(1, 1, 6, 7)
    with pytest.raises(ValueError, match="differs from reference"):
        align(ref, rand(1, 1, 7, 6), "translation")
    bad = ref.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="moving: contains NaN"):
        align(ref, bad, "translation")
    with pytest.raises(ValueError, match="empty batch"):
        align(ref[:0], ref[:0], "translation")


def test_permutation_search_examines_the_extra_candidates(device):
    """An extra candidate is examined with the channel assignment too, not only as a spatial candidate.

    Known answer: ``reference = (A, rot90 A)`` for a random map ``A``, ``moving = rot90(reference)`` with its
    two channels swapped ``= (rot180 A, rot90 A)``. The inverse rotation (-90 degrees) plus the swap aligns
    them exactly (lattice rotations, error ~0). Without a permutation, that warp is the worst candidate (both
    channels mismatch), while 0 and 180 degrees each match one channel exactly, so the best spatial warp is
    not the extra candidate. The rotation grid holds only 0 and 180 degrees and there is no refinement, so
    only the extra candidate can lead to the exact answer."""
    a = rand(2, 1, 12, 12, seed=8)
    ref = torch.cat([a, torch.rot90(a, 1, (-2, -1))], 1)
    mov = torch.rot90(ref, 1, (-2, -1))[:, [1, 0]]
    cfg = SearchConfig(n_angles=2, refine_steps=0)
    back = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([-90.0], dtype=DT)), (12, 12))
    found = align(ref.to(device), mov.to(device), "rotation", config=cfg, channels="permutation",
                  extra_candidates=back.to(device))
    assert float(found.spatial.errors.min()) > 0.1          # the extra is not the spatial optimum
    assert angle_diff(found.spatial.params[:, 0], -90.0) > 1.0
    assert float(found.errors.max()) < EXACT64
    assert torch.equal(found.permutations.cpu(), torch.tensor([[1, 0]] * 2))
    assert angle_diff(found.params[:, 0], -90.0) < 1e-6


# ----------------------------------------------------------------------------- channel compression


@settings(max_examples=12)
@given(c=st.integers(30, 90), h=st.integers(4, 6), w=st.integers(4, 6), seed=st.integers(0, 2**16),
       per_image_region=st.booleans())
def test_compressed_maps_give_every_warp_the_same_error(c, h, w, seed, per_image_region):
    """The identity of docs/definitions.md ("Channel compression"): on the maps projected onto an
    orthonormal basis of their joint span, ``region_error`` of any warp (rotations, scalings,
    shifts; partial overlaps) equals the full maps' to float64 rounding (1e-12 on errors of O(1))."""
    g = torch.Generator().manual_seed(seed)
    b = 2
    ref = torch.randn(b, c, h, w, generator=g, dtype=DT)
    mov = torch.randn(b, c, h, w, generator=g, dtype=DT)
    if per_image_region:
        region = (torch.rand(b, 1, h, w, generator=g) > 0.4).to(DT)
    else:
        region = torch.zeros(h, w, dtype=DT)
        region[1:, :-1] = 1
    sr, sm = _compressed(ref, mov, region, SearchConfig())
    n = int((region.reshape(-1, h * w) > 0).any(0).sum()) + h * w
    assert sr.shape[1] == (n if 4 * n <= 3 * c else c)
    for k in range(6):
        p = torch.tensor([[30.0 * k - 70, 0.8 + 0.1 * k, 0.7 * k - 1.3, 0.45 - 0.2 * k]], dtype=DT)
        m = G.centred_to_normalized(G.to_matrix("similarity", p), (h, w))[0]
        for i in range(b):  # region_error takes one (H, W) region: image by image
            mask = region[i, 0] if per_image_region else region
            full = region_error(ref[i:i + 1], mov[i:i + 1], m, mask=mask)
            small = region_error(sr[i:i + 1], sm[i:i + 1], m, mask=mask)
            torch.testing.assert_close(small, full, atol=1e-12, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_the_search_on_compressed_channels_finds_the_same_optimum(dtype, tol, device):
    """Deep-layer shapes (channels outnumber positions): ``align`` with and without the compression
    returns the same errors (1e-9 float64; 1e-5 float32, its rounding on the projection) and warps."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(2, 160, 7, 7, generator=g, dtype=torch.float64)
    mov = torch.roll(ref, (1, -1), (-2, -1)) + 0.5 * torch.randn(2, 160, 7, 7, generator=g, dtype=torch.float64)
    ref, mov = ref.to(dtype).to(device), mov.to(dtype).to(device)
    cfg = SearchConfig(n_angles=24, refine_steps=10)
    on = align(ref, mov, "rigid", config=cfg)
    off = align(ref, mov, "rigid", config=replace(cfg, compress_channels=False))
    torch.testing.assert_close(on.errors.cpu().double(), off.errors.cpu().double(), atol=tol, rtol=0)
    torch.testing.assert_close(on.matrices.cpu().double(), off.matrices.cpu().double(), atol=1e-4, rtol=0)
    assert float(on.errors.max()) < 0.5  # the planted shift is found: far below unrelated maps' ~2


def test_an_exact_start_skips_the_refinement_and_its_batch_mates_do_not_notice(monkeypatch):
    """An image whose best start is exact (an integer shift: error ~1e-30 in float64) can gain at
    most that much, so only the other images of the batch take the half-pixel pass and the
    refinement; each image's result equals its result searched alone (an image's search never
    depends on its batch-mates)."""
    import invariance._search as S

    g = torch.Generator().manual_seed(5)
    ref = torch.zeros(2, 3, 16, 16, dtype=DT)
    ref[:, :, 4:12, 3:13] = torch.rand(2, 3, 8, 10, generator=g, dtype=DT)
    mov = torch.roll(ref, (2, -3), (-2, -1))
    mov[1] = warp(ref[1:2], G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([[17.0, 0.4, -0.3]],
                                                                                       dtype=DT)), (16, 16)))[0]
    refined = []
    real = S._refine

    def counting(prob, starts):
        refined.append(starts.shape[0])
        return real(prob, starts)

    grids = []
    real_grid = S._coarse_grid

    def counting_grid(prob, lin, nxt=None):
        grids.append(prob.reference.shape[0])
        return real_grid(prob, lin, nxt)

    monkeypatch.setattr(S, "_refine", counting)
    monkeypatch.setattr(S, "_coarse_grid", counting_grid)
    both = align(ref, mov, "rigid", config=CFG)
    assert refined == [1]  # image 1 alone
    # the integer grid for both; the half-pixel pass (and the local re-search) for image 1 alone
    assert grids[0] == 2 and len(grids) > 1 and all(n == 1 for n in grids[1:])
    assert float(both.errors[0]) < EXACT64 and float(both.errors[1]) > EXACT64
    for i in range(2):
        alone = align(ref[i:i + 1], mov[i:i + 1], "rigid", config=CFG)
        torch.testing.assert_close(alone.errors, both.errors[i:i + 1], atol=1e-12, rtol=0)
        torch.testing.assert_close(alone.matrices, both.matrices[i:i + 1], atol=1e-9, rtol=0)


@pytest.mark.parametrize("channels, size", [(3, 20), (200, 6)])
def test_the_null_shares_the_main_searchs_warps_and_equals_two_calls(monkeypatch, channels, size):
    """``align_with_null`` gives the results of ``align(reference, moving)`` and of
    ``align(reference[1:], moving[:-1])`` (each image's search is independent of its batch-mates,
    so the only difference may be rounding, 1e-12), and computes the shared grid's warps once:
    one exhaustive pass over the shared grid instead of two. With 200 channels on a 6 x 6 map the
    channels are compressed per pair, the two searches see different maps, and they run apart."""
    from invariance._search import _coarse_grid, align_with_null

    g = torch.Generator().manual_seed(3)
    ref = F.avg_pool2d(torch.randn(4, channels, size + 4, size + 4, generator=g, dtype=DT), 5, 1)
    mov = torch.rot90(ref, 1, (-2, -1)) + 0.01 * torch.randn(ref.shape, generator=g, dtype=DT)
    null_cfg = replace(CFG, top_k=1, hop_steps=())
    grids = []

    def counted(prob, lin, nxt=None):
        grids.append((lin.dim(), nxt is not None))
        return _coarse_grid(prob, lin, nxt)

    monkeypatch.setattr("invariance._search._coarse_grid", counted)
    main, null = align_with_null(ref, mov, "rigid", null_config=null_cfg, config=CFG)
    joint = [d for d, _ in grids if d == 3]
    grids.clear()
    alone, pairs = align(ref, mov, "rigid", config=CFG), align(ref[1:], mov[:-1], "rigid", config=null_cfg)
    apart = [d for d, _ in grids if d == 3]
    for a, b in ((main, alone), (null, pairs)):
        assert torch.allclose(a.errors, b.errors, rtol=0, atol=1e-12)
        assert torch.allclose(a.matrices, b.matrices, rtol=0, atol=1e-9)
    assert len(apart) == 2
    assert len(joint) == (2 if channels > 3 * size * size else 1)
    assert float(null.errors.mean()) > 10 * float(main.errors.mean())  # another image's maps: far worse


def test_the_nulls_wrap_around_pair_rides_in_the_shared_exhaustive_stage(monkeypatch):
    """With ``next_reference`` the null has one pair per moving map: ``(reference[i + 1],
    moving[i])`` and ``(next_reference, moving[-1])``, equal to ``align`` of those pairs (each
    image's search is independent of its batch-mates: rounding, 1e-12), in the one exhaustive pass
    the main search makes anyway; a batch of one image gets its null pair too. Per-image masks
    and expected warps need the next image's own (a one-line error names the argument)."""
    from invariance._search import _coarse_grid, align_with_null

    g = torch.Generator().manual_seed(5)
    ref = F.avg_pool2d(torch.randn(4, 3, 22, 22, generator=g, dtype=DT), 5, 1)
    mov = torch.rot90(ref, 1, (-2, -1)) + 0.01 * torch.randn(ref.shape, generator=g, dtype=DT)
    first = F.avg_pool2d(torch.randn(1, 3, 22, 22, generator=g, dtype=DT), 5, 1)
    null_cfg = replace(CFG, top_k=1, hop_steps=())
    passes = []

    def counted(prob, lin, nxt=None):
        passes.append((lin.dim(), nxt is not None))
        return _coarse_grid(prob, lin, nxt)

    monkeypatch.setattr("invariance._search._coarse_grid", counted)
    for b in (4, 1):
        passes.clear()
        main, null = align_with_null(ref[:b], mov[:b], "rigid", null_config=null_cfg, config=CFG, next_reference=first)
        assert [p for p in passes if p[0] == 3] == [(3, True)]  # one pass over the shared grid, for both
        pairs = align(torch.cat([ref[1:b], first]), mov[:b], "rigid", config=null_cfg)
        assert null.errors.shape == (b,)
        assert torch.allclose(null.errors, pairs.errors, rtol=0, atol=1e-12)
        assert torch.allclose(null.matrices, pairs.matrices, rtol=0, atol=1e-9)
        assert torch.allclose(main.errors, align(ref[:b], mov[:b], "rigid", config=CFG).errors, rtol=0, atol=1e-12)
    per_image = G.centred_to_normalized(G.to_matrix("rotation", torch.full((4, 1), -90.0, dtype=DT)), (18, 18))
    with pytest.raises(ValueError, match="^next_expected: needed with next_reference"):
        align_with_null(ref, mov, "rigid", null_config=null_cfg, config=CFG, expected=per_image, next_reference=first)
    with pytest.raises(ValueError, match="^next_reference: expected one map"):
        align_with_null(ref, mov, "rigid", null_config=null_cfg, config=CFG, next_reference=ref[:2])


def test_the_near_grid_searches_only_the_expected_warps_neighbourhood(monkeypatch):
    """``align_near`` scores, per image, the grid's linear parts within two steps of the identity
    (5 of the 72 rotations) composed with that image's expected warp. A quarter turn, expected to
    be undone, is undone exactly (float64 rounding, EXACT64); under a 33-degree rotation its
    optimum is never worse than the expected warp itself, which its grid contains (the expected
    linear part at the integer shift 0). How it compares with the full grid is a question for the
    battery (benchmarks/bench_floor_grid.py), not a law."""
    import invariance._search as S

    g = torch.Generator().manual_seed(2)
    ref = F.avg_pool2d(torch.rand(2, 3, 24, 24, generator=g, dtype=DT), 5, 1, 2)
    mask = disk_mask((24, 24), dtype=DT)
    seen = []
    real = S._coarse_grid

    def counting(prob, lin, nxt=None):
        seen.append(tuple(lin.shape))
        return real(prob, lin, nxt)

    monkeypatch.setattr(S, "_coarse_grid", counting)
    for angle in (90.0, 33.0):
        t = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([angle, 0.0, 0.0], dtype=DT)), (24, 24))
        mov = warp(ref, t)
        seen.clear()
        near = S.align_near(ref, mov, "rigid", expected=G.inverse(t), mask=mask)
        assert seen[0] == (2, 5, 3, 3)  # the integer grid: 5 linear parts per image
        if angle == 90.0:
            assert float(near.errors.max()) < EXACT64
        else:
            at_expected = region_error(ref, mov, G.inverse(t).expand(2, 3, 3), mask=mask)
            assert bool((near.errors <= at_expected * (1 + 1e-12)).all()) and float(near.errors.max()) > EXACT64


def test_the_refinement_groups_starts_within_its_step_budget_and_gets_the_same_result(monkeypatch):
    """Refinement starts are independent (their own parameters, Adam state and error), so grouping
    them changes nothing: with a step budget of one start's warped maps the refinement runs one
    start of one image per Adam call (never more than the budget's maps at once) and returns the
    same warps and errors as with all starts of all images in one call, to rounding (1e-12)."""
    import invariance._search as S

    g = torch.Generator().manual_seed(7)
    ref = F.avg_pool2d(torch.randn(2, 5, 24, 24, generator=g, dtype=DT), 5, 1)
    mov = torch.rot90(ref, 1, (-2, -1)) + 0.05 * torch.randn(ref.shape, generator=g, dtype=DT)
    per_start = (5 + 1) * 20 * 20 * 8  # one start's warped maps and valid plane, float64
    calls = []
    real = S._adam

    def counting(reference, stack, z, *args):
        calls.append(tuple(z.shape[:2]))
        return real(reference, stack, z, *args)

    monkeypatch.setattr(S, "_adam", counting)
    monkeypatch.setattr(S, "step_bytes", lambda device: 1 << 30)
    whole = align(ref, mov, "rigid", config=CFG)
    assert calls and all(n > 1 for _, n in calls)
    calls.clear()
    monkeypatch.setattr(S, "step_bytes", lambda device: per_start)
    grouped = align(ref, mov, "rigid", config=CFG)
    assert calls and all(shape == (1, 1) for shape in calls), calls
    torch.testing.assert_close(grouped.errors, whole.errors, atol=1e-12, rtol=0)
    torch.testing.assert_close(grouped.matrices, whole.matrices, atol=1e-12, rtol=0)


def polish_both_ways(monkeypatch, run):
    """``run()`` with the polish scoring every seed along every direction at every move, then with
    its subsets (the seeds that moved, the fresh directions, a copied seed once): ``[(result,
    candidates scored)] * 2``."""
    import invariance._search as S

    scored, real = [], S._exact

    def counting(reference, moving, centred, *args, **kw):
        scored.append(centred.shape[0] * centred.shape[1])
        return real(reference, moving, centred, *args, **kw)

    monkeypatch.setattr(S, "_exact", counting)
    out = []
    for subsets in (False, True):
        monkeypatch.setattr(S, "_POLISH_ONLY_MOVED", subsets)
        scored.clear()
        out.append((run(), sum(scored)))
    return out


def test_the_polish_scores_again_only_the_seeds_that_moved_and_gets_the_same_result(monkeypatch):
    """The polish is deterministic: a seed that did not move in a move would try the same candidates
    in the next and find nothing better. Scoring only the seeds that moved must therefore return
    the same warps and errors as scoring every seed at every move (to 1e-12: the exact errors do not
    depend on the batch), with fewer candidates scored; three images whose seeds stop at different
    moves make the subsets ragged."""

    g = torch.Generator().manual_seed(3)
    ref = F.avg_pool2d(torch.randn(3, 4, 24, 24, generator=g, dtype=DT), 5, 1)
    mov = torch.cat([warp(ref[i:i + 1], nmat("rigid", [a, 0.6, -0.4], (24, 24))) for i, a in
                     enumerate([17.0, -41.0, 63.0])]) + 0.03 * torch.randn(ref.shape, generator=g, dtype=DT)
    (every, n_every), (moved, n_moved) = polish_both_ways(monkeypatch, lambda: align(ref, mov, "rigid", config=CFG))
    assert n_moved < n_every, (n_moved, n_every)
    torch.testing.assert_close(moved.errors, every.errors, atol=1e-12, rtol=0)
    torch.testing.assert_close(moved.matrices, every.matrices, atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_after_a_move_the_polish_skips_exactly_the_points_that_move_scored(n):
    """After a move along ``d_j`` the polish's next candidates are ``z + step d_j + step d_k``; those
    with ``d_j + d_k`` zero or one of the directions were scored in the move itself (no better than
    the new centre) and are skipped, every other one is kept, the repeated ``d_j`` first among
    them when it comes first. Known answer from the definition: the set of ``k`` for each ``j``, in
    order, padded with the first."""
    from invariance._search import _fresh_directions, _pattern_directions
    dirs = _pattern_directions(n, DT, "cpu")
    fresh = _fresh_directions(dirs)
    scored = {tuple(v) for v in dirs.tolist()} | {(0.0,) * n}
    for j in range(len(dirs)):
        want = [k for k in range(len(dirs)) if tuple((dirs[j] + dirs[k]).tolist()) not in scored]
        assert j in want  # twice the same direction is never a direction
        assert fresh[j].tolist() == want + [want[0]] * (fresh.shape[1] - len(want))


def test_the_polish_walking_down_a_long_valley_gets_the_same_result_with_fewer_directions(monkeypatch):
    """Seeds several steps from the optimum (4.5 degrees and 3.5 px off) make the polish move along
    the same direction move after move, where the skipped directions matter most, and one seed is a
    copy of another (polished once on the CPU). The result must equal the one that scores every
    seed along every direction at every move (1e-12: the exact errors do not depend on the
    batch), with under 3/4 of its candidates (a third of the seeds is a copy, and half the
    directions are skipped after each move)."""
    from invariance._search import _exact, _polish

    g = torch.Generator().manual_seed(5)
    ref = F.avg_pool2d(torch.randn(2, 3, 28, 28, generator=g, dtype=DT), 7, 1)  # (2, 3, 22, 22)
    true = G.to_matrix("rigid", torch.tensor([[20.0, 1.0, -0.5], [-35.0, -0.7, 0.3]], dtype=DT))
    inv = G.centred_to_normalized(G.inverse(true), (22, 22))
    mov = torch.cat([warp(ref[i:i + 1], inv[i]) for i in range(2)])  # the optimum of image i: true[i]
    m = torch.ones(22, 22, dtype=DT)
    off = G.to_matrix("rigid", torch.tensor([[4.5, 3.5, 0.0], [-2.0, 0.0, -3.5]], dtype=DT))
    seeds = (true[:, None] @ off[None]).contiguous()  # (2 images, 2 seeds, 3, 3)
    seeds = seeds[:, [0, 1, 0]]  # the third a copy of the first (the best warp is often the best refined start)
    prob = _Problem(ref, mov, m, torch.ones(22, 22, dtype=DT), (22, 22), "rigid", CFG, _Rule.anything(ref, m))
    e0, _ = _exact(ref, mov, seeds, m, prob.mvalid, (22, 22), prob.required)
    (every, n_every), (fewer, n_fewer) = polish_both_ways(monkeypatch, lambda: _polish(prob, seeds, e0))
    assert float(every[1].max()) < 0.5 * float(e0.min())  # the seeds did walk down
    assert n_fewer < 0.75 * n_every, (n_fewer, n_every)  # a third of the seeds is a copy
    torch.testing.assert_close(fewer[1], every[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(fewer[0], every[0], atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), angle=st.floats(-180, 180), dx=st.floats(-4, 4), edge=st.integers(0, 5))
def test_the_fused_exact_terms_equal_the_normalised_samples_terms(seed, angle, dx, edge):
    """``_stack_terms`` (one fused pass over the raw warped stack) is an algebraic rewrite of
    ``_region_terms(_split(stack))``: ``R ||x / w - F||^2`` with ``x (1 / w)`` for ``x / w``, and R = 0
    where w = 0. On any warp of maps with a ragged moving mask (border weights strictly between 0
    and 1) the four terms agree to float64 rounding (1e-12 relative to the reference's energy)."""
    from invariance._search import _region_terms, _split, _stack, _stack_terms
    from invariance._warp import unchecked_chunks

    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(2, 3, 12, 14, generator=g, dtype=DT)
    mov = torch.randn(2, 3, 12, 14, generator=g, dtype=DT)
    mvalid = torch.ones(2, 12, 14, dtype=DT)
    mvalid[0, :edge] = 0
    mvalid[1, :, 14 - edge:] = 0
    region = disk_mask((12, 14), 0.9, dtype=DT).to(DT)
    plane = ref.pow(2).sum(1) * region
    mats = torch.stack([nmat("rigid", [angle, dx, 0.5], (12, 14)), nmat("rigid", [-angle, 0.0, dx], (12, 14))])
    (_, stacked), = unchecked_chunks(_stack(mov, mvalid), mats[None].expand(2, -1, -1, -1), (12, 14), 2, affine=True)
    warped, valid = _split(stacked)
    old = _region_terms(ref, warped, region, valid, plane)
    new = _stack_terms(ref, stacked, region, plane)
    scale = (ref.pow(2).sum(1) * region).flatten(-2).sum(-1)[:, None]
    for a, b in zip(new, old):
        torch.testing.assert_close(a / scale, b / scale, atol=1e-12, rtol=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), h=st.integers(5, 16), w=st.integers(5, 16), c=st.integers(1, 6),
       per_image_valid=st.booleans(), rule=st.sampled_from(["of", "anything"]))
def test_gram_tables_give_the_exact_errors(seed, h, w, c, per_image_valid, rule):
    """The polish's inner-product tables (:class:`invariance._search._Gram`) give the warped
    stack's exact errors and overlap counts: the same sums as warping every channel, in another
    order, so equal to float64 rounding (1e-12 on errors and counts of at most a few hundred
    positions). Random similarity warps (any angle, scale 0.5-2, shifts up to 6 px: footprints
    leaving the map, zooms skipping pixels), a partly valid moving map (shared or per image), a
    disk region, and a selection of images with repeats (the polish's moved seeds) that reads
    the full table through its rows."""
    from invariance._search import _exact_of, _Gram, _Problem, _Rule

    g = torch.Generator().manual_seed(seed)
    b = 3
    ref = torch.randn(b, c, h, w, generator=g, dtype=DT)
    mov = torch.randn(b, c, h, w, generator=g, dtype=DT)
    mvalid = (torch.rand(b if per_image_valid else 1, h, w, generator=g, dtype=DT) > 0.2).to(DT)
    mvalid = mvalid if per_image_valid else mvalid[0]
    region = disk_mask((h, w), 0.95, dtype=DT).to(DT)
    req = _Rule.of(ref, region, None, SearchConfig()) if rule == "of" else _Rule.anything(ref, region)
    prob = _Problem(ref, mov, region, mvalid, (h, w), "similarity", SearchConfig(), req)
    n = 7
    p = torch.stack([torch.rand(b, n, generator=g, dtype=DT) * 360 - 180,
                     0.5 + 1.5 * torch.rand(b, n, generator=g, dtype=DT),
                     6 * torch.rand(b, n, generator=g, dtype=DT) - 3,
                     6 * torch.rand(b, n, generator=g, dtype=DT) - 3], -1)
    cen = G.to_matrix("similarity", p.reshape(-1, 4)).reshape(b, n, 3, 3)
    tables = replace(prob, gram=_Gram.of(ref, mov, mvalid))
    rows = torch.tensor([2, 0, 2])
    for direct, through in ((prob, tables), (prob.select(rows), tables.select(rows))):
        c_ = cen if direct is prob else cen[rows]
        (e0, n0), (e1, n1) = _exact_of(direct, c_), _exact_of(through, c_)
        assert torch.equal(torch.isfinite(e0), torch.isfinite(e1))
        ok = torch.isfinite(e0)
        torch.testing.assert_close(e1[ok], e0[ok], atol=1e-12, rtol=0)
        torch.testing.assert_close(n1, n0, atol=1e-12, rtol=0)


def test_the_search_scores_through_tables_when_channels_are_many(monkeypatch):
    """With 64 channels (at least ``_GRAM_MIN_CHANNELS``) ``align`` refines and polishes through the
    tables, and finds what it finds warping every channel: the same errors (1e-12, float64
    rounding of the scores and gradients; Adam and the walk take the same steps) and matrices
    (1e-9)."""
    import invariance._search as S

    g = torch.Generator().manual_seed(5)
    ref = F.avg_pool2d(torch.randn(3, 64, 24, 24, generator=g, dtype=DT), 5, 1)
    t = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([30.0, 1.3, -0.7], dtype=DT)), (20, 20))
    mov = warp(ref, t) + 0.05 * torch.randn(ref.shape, generator=g, dtype=DT)
    calls = []
    real = S._gram_terms
    monkeypatch.setattr(S, "_gram_terms", lambda *a: calls.append(a[1].requires_grad) or real(*a))
    tables = align(ref, mov, "rigid", config=CFG)
    assert sum(calls) >= CFG.refine_steps and not all(calls)  # every Adam step (a gradient), and the polish
    monkeypatch.setattr(S, "_use_gram", lambda prob: False)
    calls.clear()
    direct = align(ref, mov, "rigid", config=CFG)
    assert not calls
    torch.testing.assert_close(tables.errors, direct.errors, atol=1e-12, rtol=0)
    torch.testing.assert_close(tables.matrices, direct.matrices, atol=1e-9, rtol=0)


def test_a_batch_whose_tables_do_not_fit_refines_in_groups_whose_tables_do(monkeypatch):
    """When one image's inner-product tables fit the chunk budget but the batch's do not, the
    stages after the coarse one run on groups of images whose tables fit (each image's search is
    its own): the tables are built once per group, and every image gets what it gets alone
    (float64 rounding, 1e-12; matrices 1e-9). With a budget below one image's tables nothing is
    grouped and no tables are built."""
    import invariance._search as S

    g = torch.Generator().manual_seed(6)
    ref = F.avg_pool2d(torch.randn(5, 48, 14, 14, generator=g, dtype=DT), 5, 1)  # 10 x 10 maps
    t = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([25.0, 0.6, -0.4], dtype=DT)), (10, 10))
    mov = warp(ref, t) + 0.05 * torch.randn(ref.shape, generator=g, dtype=DT)
    per_image = 10 * 10 * 12 * 12 * 8  # one image's tables, float64
    built = []
    real = S._Gram.of
    monkeypatch.setattr(S._Gram, "of", staticmethod(lambda r, *a: built.append(r.shape[0]) or real(r, *a)))
    cfg = replace(CFG, memory_budget=2 * per_image)  # two images' tables
    grouped = align(ref, mov, "rigid", config=cfg)
    assert built == [2, 2, 1]
    built.clear()
    for i in range(5):
        alone = align(ref[i:i + 1], mov[i:i + 1], "rigid", config=cfg)
        torch.testing.assert_close(alone.errors, grouped.errors[i:i + 1], atol=1e-12, rtol=0)
        torch.testing.assert_close(alone.matrices, grouped.matrices[i:i + 1], atol=1e-9, rtol=0)
    assert built == [1] * 5
    built.clear()
    align(ref, mov, "rigid", config=replace(CFG, memory_budget=per_image - 1))
    assert built == []
