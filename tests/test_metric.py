"""Known answers of the measurement core :mod:`invariance._metric` (docs/definitions.md).

* :func:`invariance.transformed_valid`: after an integer shift ``t`` the pixels that came from inside
  the frame are exactly those ``q`` with ``q - t`` inside it (``warp(f, A)(q) = f(A^-1 q)``); a
  lattice rotation (90° multiples of a square map, 180° of any map) keeps every pixel.
* :func:`invariance.comparison_region`: the receptive-field interior of a stride-1 frame of radius
  ``r`` is the map less a border of ``r`` positions, applied by default whenever the frame is traced;
  where it keeps fewer than ``MIN_REGION`` positions every image has no verdict with the reason
  :data:`invariance.RF_COVERS_IMAGE` (never the padding band compared); the moving map's valid region is the
  image's valid pixels eroded by the ``(2r + 1)``-box of the receptive field; the evaluation disk is
  the set of pixel centres within the radius in the normalised frame.
* :func:`invariance.interpolation_floor`: integer translations round-trip exactly on both grid
  parities (floor 0); a zoom by 2 round-trips exactly on an odd-sized image only (the lattice
  coincidence of the definitions), so the floor is the even-sized (padded) round trip.
* :func:`invariance.measure_layer`: an identity network under an integer translation of content with a
  zero margin aligns to rounding with the found warp ``h^-1``, and the overlap is the share of the
  map both frames cover, ``(W - |tx|)(H - |ty|) / (W H)``; through a stride-2 layer the warp is
  reported in image pixels; the random-pair null pairs image ``i`` with ``i - 1`` (image 0 with
  the last); planted channel swaps are found by the permutation search and a planted channel
  scaling by the linear map, whose ridge leaves exactly ``(r / (1 + r))^2``.

Tolerances: a lattice-exact warp leaves only float64 rounding of bilinear weights (~1e-16 on O(1)
values, ~1e-32 squared, relative); ``EXACT = 1e-20`` is far below any real misalignment (one pixel
costs > 1e-2 on these random maps). Orderings that hold by construction (the identity and the
expected warp are candidates of the search) are checked to ``1e-12`` relative: the same sums taken in
another order.

The numeric tests run on every device of the ``device`` fixture (``conftest.py``): inputs are built on
the CPU as before and moved with ``.to(device)``; results are compared on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import invariance
from invariance import (
    MIN_REGION,
    RF_COVERS_IMAGE,
    LayerAccumulator,
    LayerFrame,
    LayerResult,
    SearchConfig,
    comparison_region,
    extract_features,
    interpolation_floor,
    measure_layer,
    transformed_valid,
    warp,
)
from invariance import geometry as G

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
EXACT = 1e-20
CFG = SearchConfig(n_angles=36, refine_steps=10, top_k=2, shortlist=4)


def norm(family: str, params, size, device="cpu") -> torch.Tensor:
    """The normalised (input -> output) matrix of a centred-frame transformation (computed on the CPU,
    then moved to ``device``)."""
    return G.centred_to_normalized(G.to_matrix(family, torch.tensor(params, dtype=DT)), size).to(device)


def content(b: int, c: int, size: int, margin: int, seed: int = 0) -> torch.Tensor:
    """Random maps ``(b, c, size, size)`` in [0.1, 1.1) inside a zero margin of ``margin`` pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(b, c, size, size, dtype=DT)
    inner = size - 2 * margin
    x[..., margin:size - margin, margin:size - margin] = 0.1 + torch.rand(b, c, inner, inner, generator=g, dtype=DT)
    return x


# ----------------------------------------------------------------------------- transformed_valid


@settings(max_examples=20)
@given(tx=st.integers(-4, 4), ty=st.integers(-4, 4), h=st.integers(5, 10), w=st.integers(5, 10))
def test_transformed_valid_of_an_integer_shift_is_the_shifted_frame(tx, ty, h, w, device):
    """``warp(f, T)(q) = f(q - t)``: pixel ``q = (j, i)`` came from inside the frame iff
    ``0 <= j - tx < w`` and ``0 <= i - ty < h``. Integer shifts sample pixel centres exactly, so
    the 0/1 rule has no border case."""
    got = transformed_valid(norm("translation", [float(tx), float(ty)], (h, w), device), (h, w)).cpu()
    i = torch.arange(h)[:, None]
    j = torch.arange(w)[None, :]
    want = (j - tx >= 0) & (j - tx < w) & (i - ty >= 0) & (i - ty < h)
    assert got.dtype == torch.bool and torch.equal(got, want)


@pytest.mark.parametrize("angle, size", [(90.0, (9, 9)), (180.0, (9, 9)), (-90.0, (10, 10)), (180.0, (7, 12))])
def test_transformed_valid_of_a_lattice_rotation_is_the_whole_frame(angle, size, device):
    """Quarter turns of a square grid and half turns of any grid map pixel centres onto pixel
    centres (about the centre of the field of view): every pixel came from inside."""
    assert bool(transformed_valid(norm("rotation", [angle], size, device), size).all())


def test_transformed_valid_of_45_degrees_cuts_the_corners(device):
    """Under 45° the source of a corner pixel (centred ``(+-c, +-c)``, ``c = (n - 1) / 2``) lies on an axis
    at ``sqrt(2) c > n / 2`` from the centre: outside. The centre pixel's source is itself."""
    n = 11
    v = transformed_valid(norm("rotation", [45.0], (n, n), device), (n, n)).cpu()
    assert not any(bool(v[i, j]) for i in (0, n - 1) for j in (0, n - 1))
    assert bool(v[n // 2, n // 2])


def test_transformed_valid_per_image_matrices_stack_the_single_answers(device):
    size = (8, 9)
    mats = torch.stack([norm("translation", [2.0, 0.0], size), norm("translation", [0.0, -3.0], size)]).to(device)
    got = transformed_valid(mats, size)
    assert got.shape == (2, 8, 9)
    assert torch.equal(got[0], transformed_valid(mats[0], size))
    assert torch.equal(got[1], transformed_valid(mats[1], size))


# ----------------------------------------------------------------------------- comparison_region


def stride1(size: int, r: float) -> LayerFrame:
    """A traced stride-1 frame of receptive-field radius ``r`` (a stack of same-padded convolutions)."""
    return LayerFrame((1.0, 1.0), (0.0, 0.0), (size, size), (size, size), True, (r, r))


@pytest.mark.parametrize("r, positions", [
    (0.0, 144),   # identity frame: the interior is the whole map
    (3.0, 36),    # 12 - 2 * 3 = 6 per axis
    (4.0, 16),    # centres 4..7: a small interior is still the interior (never the padding band)
    (5.5, 4),     # pixels within 5.5 of centres 5 and 6 lie in 0..11: 2 x 2
    (6.0, 0),     # centre 5 reaches pixel -1, centre 6 pixel 12: no position sees only the image
])
def test_the_interior_is_applied_by_default_whenever_the_frame_is_traced(r, positions, device):
    """Positions whose receptive field (the pixel centres within ``[c - r, c + r]``) lies inside ``[0, 11]``
    per axis, whatever share of the map they are."""
    region, moving, use = comparison_region(stride1(12, r), device=device)
    assert use is True
    assert int(region.sum()) == positions and torch.equal(region, moving)
    assert region.dtype == DT and region.device.type == device.type


@pytest.mark.parametrize("r, verdict", [(5.5, True), (5.0, False)])
def test_a_receptive_field_that_covers_the_image_gives_no_verdict_with_its_reason(r, verdict, device):
    """r = 5.5 on a 12-map leaves centres 5 and 6 per axis: 2 x 2 = MIN_REGION interior positions, a
    verdict (identical maps read 0 there). r = 5 on an 11-map leaves the centre only,
    1 < MIN_REGION: every image has no verdict, with the reason naming the receptive field (never a
    score of the band that sees the padding)."""
    size = 12 if verdict else 11
    frame = LayerFrame((1.0, 1.0), (0.0, 0.0), (size, size), (size, size), True, (r, r))
    region, _, _ = comparison_region(frame)
    assert (int(region.sum()) >= MIN_REGION) is verdict
    f = torch.rand(3, 2, size, size, generator=torch.Generator().manual_seed(4), dtype=DT).to(device)
    eye = torch.eye(3, dtype=DT, device=device)
    res = measure_layer(f, f.clone(), frame, eye, family="translation", image_valid=torch.ones(size, size))
    if verdict:
        assert res.reasons == [None] * 3 and float(res.spatial.max()) < 1e-12
    else:
        assert res.reasons == [RF_COVERS_IMAGE] * 3 and bool(res.spatial.isnan().all())


def test_forcing_the_interior_on_and_off(device):
    frame = stride1(12, 4.0)
    on, _, use_on = comparison_region(frame, interior=True, device=device)
    off, _, use_off = comparison_region(stride1(12, 3.0), interior=False, device=device)
    assert use_on and int(on.sum()) == 16 and bool(on[4:8, 4:8].all())
    assert not use_off and int(off.sum()) == 144


def test_an_assumed_frame_compares_up_to_the_border_and_refuses_a_forced_interior(device):
    """An assumed frame (receptive field unknown) cannot say where the interior is."""
    frame = LayerFrame.assumed((6, 6), (12, 12))
    region, _, use = comparison_region(frame, device=device)
    assert not use and int(region.sum()) == 36
    with pytest.raises(ValueError, match="^interior: "):
        comparison_region(frame, interior=True)


@settings(max_examples=20)
@given(r=st.integers(0, 2), seed=st.integers(0, 2**16), p=st.floats(0.5, 1.0))
def test_the_moving_region_is_the_valid_image_eroded_by_the_receptive_field(r, seed, p, device):
    """With the interior on, a position is valid iff every pixel of its ``(2r + 1)``-box is inside
    the image and valid: the erosion of ``image_valid`` (outside the image counts as invalid),
    i.e. a min-pool with zero padding. The reference's region is the erosion of all-ones."""
    size = 10
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(size, size, generator=g) < p
    region, moving, use = comparison_region(stride1(size, float(r)), interior=True, image_valid=valid.to(device),
                                            device=device)
    region, moving = region.cpu(), moving.cpu()

    def erode(v: torch.Tensor) -> torch.Tensor:
        k = 2 * r + 1
        padded = F.pad(v.double()[None, None], (r, r, r, r), value=0.0)
        return (-F.max_pool2d(-padded, k, stride=1))[0, 0]

    assert use
    assert torch.equal(moving, erode(valid))
    assert torch.equal(region, erode(torch.ones(size, size, dtype=torch.bool)))


def test_the_moving_region_without_the_interior_is_the_pixel_under_each_centre(device):
    """Identity frame, interior off: each position is its own pixel."""
    valid = torch.rand(7, 9, generator=torch.Generator().manual_seed(1)) < 0.5
    frame = LayerFrame.identity((7, 9))
    _, moving, _ = comparison_region(frame, interior=False, image_valid=valid.to(device), device=device)
    assert torch.equal(moving.bool().cpu(), valid)
    per_image = torch.stack([valid, ~valid])
    _, moving_b, _ = comparison_region(frame, interior=False, image_valid=per_image.to(device), device=device)
    assert moving_b.shape == (2, 7, 9) and torch.equal(moving_b.bool().cpu(), per_image)


@pytest.mark.parametrize("radius", [0.5, 1.0])
def test_the_evaluation_disk_is_the_pixel_centres_within_the_radius(radius, device):
    """``M``: pixel centres ``x_n = (2 j + 1) / W - 1`` (normalised frame) with ``x_n^2 + y_n^2 <=
    radius^2``; no centre of a 12 x 12 grid lies on these circles (odd^2 + odd^2 is 2 mod 4, the
    radius^2 * 144 are 36 and 144), so the count has no border ambiguity. With the interior it is
    intersected with the interior (border of 1 for ``r = 1``)."""
    n = 12
    c = (2 * torch.arange(n, dtype=DT) + 1) / n - 1
    disk = (c[:, None] ** 2 + c[None, :] ** 2) <= radius ** 2
    region, _, _ = comparison_region(LayerFrame.identity((n, n)), mask_radius=radius, device=device)
    assert torch.equal(region.bool().cpu(), disk)
    region_i, _, use = comparison_region(stride1(n, 1.0), mask_radius=radius, device=device)
    inner = torch.zeros(n, n, dtype=torch.bool)
    inner[1:-1, 1:-1] = True
    assert use and torch.equal(region_i.bool().cpu(), disk & inner)


# ----------------------------------------------------------------------------- interpolation floor


@pytest.mark.parametrize("shift", [(2.0, -3.0), (-1.0, 0.0)])
def test_the_floor_of_an_integer_translation_is_zero(shift, device):
    """Integer shifts move pixel centres onto pixel centres on both grid parities (the image and
    its one-row/column zero padding): both round trips, and so the floor, are exact."""
    x = content(2, 1, 13, 4).to(device)
    floor = interpolation_floor(x, norm("translation", list(shift), (13, 13), device), "translation", config=CFG)
    assert floor.shape == (2,) and floor.dtype == DT
    assert float(floor.max()) < EXACT


def test_the_floor_of_a_zoom_by_2_is_the_round_trip_on_the_other_grid_parity(device):
    """Zoom by 2 about the centre of a 13 x 13 image: the zoomed image samples centred points
    ``q / 2`` (interpolated), warping back samples it at ``2 q``, integer pixels that were copied,
    not interpolated: the round trip is exact (a lattice coincidence). On the padded 14 x 14 grid
    the centred coordinates are half-integers, so both warps interpolate and the round trip is
    not exact. The floor is the larger: the padded round trip, the same computation, so equal to
    rounding (1e-12 relative). ``> 1e-6`` only has to exceed rounding (1e-20) by far to show the
    padded round trip is not exact."""
    x = content(2, 1, 13, 3, seed=2).to(device)
    centred = G.to_matrix("scale", torch.tensor([2.0], dtype=DT))
    t_odd = G.centred_to_normalized(centred, (13, 13)).to(device)
    xp = F.pad(x, (0, 1, 0, 1))
    t_even = G.centred_to_normalized(centred, (14, 14)).to(device)
    odd = interpolation_floor(x, t_odd, "scale", config=CFG, transformed=warp(x, t_odd))
    even = interpolation_floor(xp, t_even, "scale", config=CFG, transformed=warp(xp, t_even))
    floor = interpolation_floor(x, t_odd, "scale", config=CFG)
    assert float(odd.max()) < EXACT
    assert float(even.min()) > 1e-6
    torch.testing.assert_close(floor.cpu(), even.cpu(), rtol=1e-12, atol=EXACT)


def test_the_floor_of_images_rolled_without_a_border_is_zero(device):
    """``transformed=torch.roll(x)``: every pixel counts as valid; warping back by the integer shift
    reads ``x`` itself wherever its source lies inside the map (the wrapped part's source lies
    outside and is not scored)."""
    x = 0.1 + torch.rand(2, 2, 10, 10, dtype=DT, generator=torch.Generator().manual_seed(3))
    moved = torch.roll(x, (1, 2), dims=(-2, -1))
    t = norm("translation", [2.0, 1.0], (10, 10), device)
    floor = interpolation_floor(x.to(device), t, "translation", config=CFG, transformed=moved.to(device))
    assert float(floor.max()) < EXACT


# ----------------------------------------------------------------------------- measure_layer


@pytest.mark.parametrize("tx, ty", [(3, -2), (-1, 4), (0, 0)])
def test_an_identity_network_aligns_an_integer_translation_exactly(tx, ty, device):
    """Maps = images (identity frame), content inside a 4-pixel zero margin, shifted by ``(tx, ty)``:
    the expected warp ``h^-1`` (a shift by ``(-tx, -ty)``) is exact, so the spatial and expected errors
    are rounding and the found parameters are ``(-tx, -ty)``. The region is the whole map (the
    identity frame's interior is everything); the warp back keeps the positions ``q`` whose source
    ``q + t`` lies in the part of the moving map that came from inside: ``(W - |tx|)(H - |ty|)`` of
    ``W H``. The invariance error is the definition's ratio over ``R_id``, the valid part of the
    moving map (same sums, 1e-12 relative)."""
    size = 13
    x = content(2, 2, size, 4).to(device)
    t = norm("translation", [float(tx), float(ty)], (size, size), device)
    fh = warp(x, t)
    r = measure_layer(x, fh, LayerFrame.identity((size, size)), t, family="translation", config=CFG,
                      layer="maps", transform=f"translation:{tx},{ty}")
    assert isinstance(r, LayerResult) and (r.layer, r.search, r.param_family) == ("maps", "translation", "translation")
    assert r.n_images == 2 and r.n_excluded == 0 and r.reasons == [None, None]
    assert float(r.spatial.max()) < EXACT and float(r.expected.max()) < EXACT
    torch.testing.assert_close(r.params.cpu(), torch.tensor([[-tx, -ty]] * 2, dtype=DT), atol=1e-9, rtol=0)
    assert r.param_names == ("tx", "ty")
    assert r.interior is True and r.region_size == size * size
    want_overlap = (size - abs(tx)) * (size - abs(ty)) / size ** 2
    torch.testing.assert_close(r.overlap.cpu(), torch.full((2,), want_overlap, dtype=DT), atol=1e-12, rtol=0)
    valid = transformed_valid(t, (size, size)).to(DT)
    e_inv = ((fh - x).pow(2) * valid).sum((1, 2, 3)) / (x.pow(2) * valid).sum((1, 2, 3))
    torch.testing.assert_close(r.invariance.cpu(), e_inv.cpu(), rtol=1e-12, atol=EXACT)
    if (tx, ty) != (0, 0):
        assert float(r.invariance.min()) > 1e-2  # a shifted random map is far from itself
    assert r.permutation is None and r.linear is None and r.null is None and r.floor is None


def test_a_stride_2_layer_reports_the_warp_in_image_pixels(device):
    """2 x 2 average pooling (stride 2, offset 0.5: the layer's centre is the image's centre): an
    image shift by ``(4, -2)`` shifts the map by ``(2, -1)`` map pixels, exactly (the pooling
    windows move by whole windows). The spatial error is rounding; ``params`` are in the image's
    centred frame, ``(-4, 2)``; ``matrices`` in the layer's normalised frame, a shift by ``(-2, 1)``
    layer pixels."""
    x = content(2, 1, 16, 4, seed=5).to(device)
    t = norm("translation", [4.0, -2.0], (16, 16), device)
    net = torch.nn.Sequential(torch.nn.AvgPool2d(2)).to(device)
    f, frames = extract_features(net, x, "0")
    fh, _ = extract_features(net, warp(x, t), "0")
    frame = frames["0"]
    assert frame.stride == (2.0, 2.0) and frame.size == (8, 8)
    r = measure_layer(f["0"], fh["0"], frame, t, family="translation", config=CFG)
    assert float(r.spatial.max()) < EXACT
    torch.testing.assert_close(r.params.cpu(), torch.tensor([[-4.0, 2.0]] * 2, dtype=DT), atol=1e-9, rtol=0)
    layer_shift = G.from_matrix("translation", G.normalized_to_centred(r.matrices, (8, 8)))
    torch.testing.assert_close(layer_shift.cpu(), torch.tensor([[-2.0, 1.0]] * 2, dtype=DT), atol=1e-9, rtol=0)


def test_per_image_transformations_give_per_image_answers(device):
    """``t_img (B, 3, 3)``: image ``i`` is shifted by its own ``t_i`` and gets back ``-t_i``."""
    x = content(3, 1, 12, 3, seed=7).to(device)
    shifts = [(2.0, 0.0), (0.0, -3.0), (-1.0, 1.0)]
    t = torch.stack([norm("translation", list(s), (12, 12)) for s in shifts]).to(device)
    fh = torch.cat([warp(x[i:i + 1], t[i]) for i in range(3)])
    r = measure_layer(x, fh, LayerFrame.identity((12, 12)), t, family="translation", config=CFG)
    assert float(r.spatial.max()) < EXACT and float(r.expected.max()) < EXACT
    torch.testing.assert_close(r.params.cpu(), -torch.tensor(shifts, dtype=DT), atol=1e-9, rtol=0)


def test_an_image_without_signal_gets_nan_and_a_reason_not_zero(device):
    """No signal, no verdict: the all-zero image's errors are NaN (not 0.000) with the reason; the
    other image is measured as if alone."""
    x = content(2, 1, 12, 3, seed=8)
    x[1] = 0
    x = x.to(device)
    t = norm("translation", [1.0, 1.0], (12, 12), device)
    r = measure_layer(x, warp(x, t), LayerFrame.identity((12, 12)), t, family="translation", config=CFG)
    assert r.n_excluded == 1 and r.reasons[0] is None and "no signal" in r.reasons[1]
    for errors in (r.invariance, r.expected, r.spatial):
        assert math.isnan(float(errors[1]))
    assert float(r.spatial[0]) < EXACT


def test_the_random_pair_null_pairs_each_image_with_the_previous_one(device):
    """Images ``(a, a, b, a)``: the null of image ``i`` is its maps against the transformed maps of
    image ``i - 1`` (image 0 against the last). Pairs of equal images (0 with 3, 1 with 0) align
    exactly like the images themselves (rounding); pairs of different random images (2 with 1,
    3 with 2) do not (anything far above rounding shows they were not paired with themselves)."""
    a, b = content(1, 1, 12, 3, seed=10), content(1, 1, 12, 3, seed=11)
    x = torch.cat([a, a, b, a]).to(device)
    t = norm("translation", [2.0, -1.0], (12, 12), device)
    r = measure_layer(x, warp(x, t), LayerFrame.identity((12, 12)), t, family="translation", config=CFG, null=True)
    assert float(r.spatial.max()) < EXACT
    assert float(r.null[0]) < EXACT and float(r.null[1]) < EXACT
    assert float(r.null[2]) > 1e-6 and float(r.null[3]) > 1e-6


def test_a_planted_channel_swap_is_found_by_the_permutation_search(device):
    """``F_h = shift(F)`` with its two channels swapped: no warp aligns the channels (the spatial
    error of two independent random channels is O(1)), the warp and the swap do (rounding):
    ``permutations = [1, 0]`` (``aligned[c] = warped[perm[c]]``), one orbit ``[[0, 1]]``."""
    x = content(3, 2, 12, 3, seed=12).to(device)
    t = norm("translation", [1.0, 2.0], (12, 12), device)
    fh = warp(x, t).flip(1)
    r = measure_layer(x, fh, LayerFrame.identity((12, 12)), t, family="translation", config=CFG,
                      channels=("spatial", "permutation"))
    assert float(r.permutation.max()) < EXACT
    assert float(r.spatial.min()) > 1e-2
    assert r.permutations.tolist() == [[1, 0]] * 3 and r.orbits == [[0, 1]]


@pytest.mark.parametrize("scale", [2.0, -0.5])
def test_a_planted_channel_scaling_leaves_exactly_the_ridge_shrinkage(scale, device):
    """One channel, ``F_h = a * shift(F)``; after the warp back, ``x = a y`` on the region. The map ``A``
    scoring an image is the ridge fit on the other fold (4 images, 2 folds: ``n = 2`` images), each
    image weighted by ``1 / ||y||^2``: ``S_xx = n a^2``, ``S_yx = n a``, ``lambda = r * trace(S_xx) / C +
    1e-12`` (``r = 1e-4``, ``C = 1``), so ``A = n a / (n a^2 (1 + r) + 1e-12)`` and the held-out error is
    ``(1 - a A)^2 = ((n a^2 r + 1e-12) / (n a^2 (1 + r) + 1e-12))^2`` ~ ``(r / (1 + r))^2`` whatever ``a``
    (1e-9 relative: normal equations of a few O(1) sums). In sample (per-image least squares with a
    vanishing ridge) it is rounding; ``spatial >= permutation >= linear fit`` holds."""
    rr, n = 1e-4, 2
    x = content(4, 1, 12, 3, seed=13).to(device)
    t = norm("translation", [-2.0, 1.0], (12, 12), device)
    r = measure_layer(x, scale * warp(x, t), LayerFrame.identity((12, 12)), t, family="translation", config=CFG,
                      channels=("spatial", "permutation", "linear"))
    a2 = n * scale ** 2
    want = ((a2 * rr + 1e-12) / (a2 * (1 + rr) + 1e-12)) ** 2
    torch.testing.assert_close(r.linear.cpu(), torch.full((4,), want, dtype=DT), rtol=1e-9, atol=0)
    assert float(r.linear_fit.max()) < 1e-18
    assert bool((r.spatial >= r.permutation - 1e-12).all() and (r.permutation >= r.linear_fit - 1e-12).all())


@settings(max_examples=6)
@given(angle=st.floats(-180, 180), seed=st.integers(0, 100))
def test_the_spatial_error_never_exceeds_the_expected_warps(angle, seed, device):
    """The expected warp ``h^-1`` is a candidate of the search, scored exactly, and always keeps the
    minimum overlap (its overlap is the baseline ``O_exp >= kappa O_exp``): ``spatial <= expected`` per
    image (1e-12 relative: the same sum in another order)."""
    x = content(2, 1, 12, 2, seed=seed).to(device)
    t = norm("rotation", [angle], (12, 12), device)
    r = measure_layer(x, warp(x, t), LayerFrame.identity((12, 12)), t, family="rigid", config=CFG)
    assert bool((r.spatial <= r.expected * (1 + 1e-12) + EXACT).all()), (r.spatial, r.expected)


@settings(max_examples=6)
@given(tx=st.floats(-3, 3), ty=st.floats(-3, 3), seed=st.integers(0, 100))
def test_under_translations_the_spatial_error_never_exceeds_the_invariance_error(tx, ty, seed, device):
    """The identity is always a candidate; under a translation it keeps as much of the region as the
    expected warp (both cover the part of the map the shifted frame covers: ``(W - |tx|)``-wide,
    fractional columns counting by their valid share), so it is feasible and ``spatial <=
    invariance`` (1e-12 relative)."""
    x = content(2, 1, 12, 0, seed=seed).to(device)
    t = norm("translation", [tx, ty], (12, 12), device)
    r = measure_layer(x, warp(x, t), LayerFrame.identity((12, 12)), t, family="translation", config=CFG)
    assert bool((r.spatial <= r.invariance * (1 + 1e-12) + EXACT).all()), (r.spatial, r.invariance)


def test_an_unknown_family_is_refused_naming_the_choices():
    x = torch.rand(1, 1, 8, 8, dtype=DT)
    with pytest.raises(ValueError, match=r"^family: unknown search family 'spin'; valid choices: translation"):
        measure_layer(x, x, LayerFrame.identity((8, 8)), torch.eye(3, dtype=DT), family="spin")


# ----------------------------------------------------------------------------- LayerAccumulator


def test_the_accumulator_with_per_image_transforms_equals_one_call(device):
    """Batches of a per-image ``t_img`` (each batch takes its own expected warps) and the permutation
    search: the same result as one :func:`measure_layer` call (every image's search is independent
    of its batch-mates; 1e-12 absolute on errors of O(1) and below)."""
    x = content(5, 2, 12, 2, seed=14).to(device)
    angles = [90.0, -30.0, 180.0, 45.0, 10.0]
    t = torch.stack([norm("rotation", [a], (12, 12)) for a in angles]).to(device)
    fh = torch.cat([warp(x[i:i + 1], t[i]) for i in range(5)])
    frame = LayerFrame.identity((12, 12))
    kw = dict(family="rigid", config=CFG, channels=("spatial", "permutation"), null=True)
    one = measure_layer(x, fh, frame, t, **kw)
    acc = LayerAccumulator(frame, t, 5, device=device, **kw)
    assert not acc.second_pass
    for sl in (slice(0, 2), slice(2, 5)):
        acc.add(x[sl], fh[sl], sl)
    got = acc.result()
    for name in ("invariance", "expected", "spatial", "permutation", "null", "overlap", "params"):
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(one, name).cpu(), atol=1e-12, rtol=0)
    assert torch.equal(got.permutations.cpu(), one.permutations.cpu()) and got.orbits == one.orbits
    assert float(one.spatial[0]) < EXACT and float(one.spatial[2]) < EXACT  # 90° and 180°: lattice maps


def test_the_accumulator_needs_the_second_pass_for_the_held_out_linear_error(device):
    x = content(4, 2, 10, 2, seed=15).to(device)
    t = norm("translation", [1.0, 0.0], (10, 10), device)
    acc = LayerAccumulator(LayerFrame.identity((10, 10)), t, 4, family="translation", config=CFG,
                           channels=("spatial", "linear"), device=device)
    assert acc.second_pass
    acc.add(x, warp(x, t), slice(0, 4))
    with pytest.raises(ValueError, match="^score: .*second pass"):
        acc.result()


def test_the_core_is_the_public_api():
    """The names the brief lists are exported from the package and are this module's objects."""
    from invariance import _metric

    for name in _metric.__all__:
        assert getattr(invariance, name) is getattr(_metric, name)
