"""The theory, checked empirically: property-based tests on analytic toy networks and random CNNs.

Statement (docs/definitions.md, "The question"): a purely spatial warp of the feature maps undoes a
translation of the image always, a rotation only when the features are rotation invariant, a
rescaling in general never. ``docs/proof.md`` writes the argument out and maps each step to a
test below. Every threshold is derived in the test's docstring; the shared vocabulary is:

* **floor**: the interpolation floor, the spatial error of the images themselves (the input
  layer, the identity network) under the same transformation, mask and search, computed with
  ``align(x, x_h, ...)`` by :func:`invariance.testing.interpolation_floor` (the larger over
  both grid parities: a zoom by 2 about the centre pixel of an odd-sized grid has an exact
  round trip although the zoomed image is interpolated).
* **band**: ``floor * (1 + rtol) + atol`` with ``rtol = 1`` and the dtype's ``atol``
  (:mod:`invariance.testing` derives both): the largest error that resampling explains. "At
  the floor" means ``<= band``; "not alignable" means ``> 2 * band`` (a gap between the two).

Images keep their content away from the borders (a zero margin: exactly zero outside a
central disk, :func:`invariance.toys.make_blob_images`, :func:`invariance.toys.make_glyph_images`)
because the theory is about the plane: content that leaves the field of view, or zero padding
that differs from the image's own surroundings, would add errors the theory does not predict.
For rescalings by ``s > 1`` the content radius is at most ``(1 - r_f / R) / s`` (``r_f`` the
receptive-field radius, ``R`` half the image size) and the evaluation disk is the valid one,
radius ``1 / s`` (:func:`invariance.testing.valid_radius`).

Cost: every property runs 4-8 examples of 1-2 small images (24-52 px) with a reduced search
(every 10° or 1/8 octave plus the expected transformation, 8-15 refinement steps); under the
``ci`` profile the file takes about 60 s of CPU time.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from invariance import FeatureExtractor, SearchConfig, Transform, align, disk_mask, warp
from invariance import testing as it
from invariance import toys as T

# search settings: every 10° (rigid) / every 1/8 octave in [-1.25, 1.25] (scale), plus the
# expected transformation, which alignment_errors always adds as an extra candidate; QUICK
# (coarser, fewer refinement steps) only where the claim is "alignable" (the expected warp is
# then among the candidates, so a coarse grid cannot make the test fail or pass wrongly)
ROT = SearchConfig(n_angles=36, refine_steps=15, top_k=2, shortlist=3)
SCALE = SearchConfig(log2_scales=tuple(k / 8 for k in range(-10, 11)), refine_steps=10, top_k=2, shortlist=3)
QUICK = SearchConfig(n_angles=36, refine_steps=8, top_k=1, shortlist=2,
                     log2_scales=tuple(k / 4 for k in range(-6, 7)),
                     similarity_n_angles=12, similarity_log2_scales=(-0.5, 0.0, 0.5),
                     affine_n_angles=12, affine_log2_scales=(0.0,), affine_log2_aspects=(-0.25, 0.25),
                     affine_aspect_angles=(0.0, 90.0))

dtypes = it.dtypes()


def _net(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- rotation: W -> M


@settings(max_examples=5)
@given(seed=st.integers(0, 2**20), letter=st.sampled_from(["W", "M"]), size=st.integers(40, 52), dtype=dtypes)
def test_wm_rotation_180_moves_the_response_to_the_other_channel(seed, letter, size, dtype):
    """toy-wm, 180°: spatial >= 0.9 for every glyph placement, permutation <= 0.05, the orbit is W <-> M.

    Derivation. On a scene of W glyphs the rectified M channel is exactly 0 (the M detector
    never reaches the 0.7 threshold on a W: ``test_toys.test_wm_rectified_channels_are_exclusive``).
    The rotated scene is a scene of M glyphs, so its W channel is exactly 0. For any warp g,
    ``W_g 0 = 0``, hence ``||W_g F_h - F||^2 = ||F_W||^2 + ||W_g F_h,M||^2 >= ||F||^2``: the
    spatial error is at least 1, exactly, whatever the search does (and a warp that moves
    everything out of the disk reaches 1, so it is 1). The issue's threshold 0.9 leaves 10% for
    leakage through the threshold; since exclusivity holds here we also assert the theorem,
    ``>= 1 - 1e-5`` (two sums of squares rounded to ~1e-7 relative in float32).

    Permutation: conv2d of a 180°-rotated image with the 180°-rotated filter is the original
    response rotated by 180° (``(R w * R f)(x) = (w * f)(R^-1 x)``, exact on the pixel grid for
    odd kernels with symmetric padding), so swapping the channels and rotating by 180° gives
    error 0 up to rounding (``~1e-12``); 0.05 is the issue's bound, far above it.
    """
    net = _net(T.WMNet(), dtype)
    x = T.make_glyph_images(2, size, seed, letters=letter, dtype=dtype)
    errs = it.alignment_errors(net, x, "rotation:180", "rectify", channels="permutation", config=QUICK)
    assert bool((errs.spatial >= 0.9).all()), errs.table()
    assert bool((errs.spatial >= 1 - 1e-5).all()), errs.table()
    assert bool((errs.permutation <= 0.05).all()), errs.table()
    assert errs.permutations.tolist() == [[1, 0]] * 2, errs.table()


# ----------------------------------------------------------------------------- rotation: p4


@settings(max_examples=5)
@given(images=it.images(batch=2, sizes=it.image_sizes(24, 36)), k=st.sampled_from([1, 2, 3]))
def test_p4_lattice_rotation_is_a_cyclic_channel_shift(images, k):
    """toy-p4, rotations by k * 90°: spatial bounded away from 0, permutation at the floor, orbit = the cycle.

    Derivation. With filters ``w_c = R^c w`` (R = rot90), ``(w_c * R^k f) = R^k (w_{c-k} * f)``
    exactly (``test_toys.test_p4_rotating_the_image_rotates_maps_and_shifts_channels``), so
    ``F_h = P^k R^k F`` with P the cyclic channel shift: the permutation ``c -> c + k`` and the
    rotation ``R^-k`` align the maps with rounding error only. The floor is 0 (lattice
    rotation), so "at the floor" is ``<= band = atol``. The permutation the search returns is
    therefore ``perm[c] = c + k mod 4``: for k = 1 the 4-cycle (0 1 2 3), for k = 3 its
    inverse, for k = 2 the two 2-cycles.

    Spatial: a warp alone would have to move channel c - k's values into channel c; it can do
    that only for images symmetric up to a warp, and these blob images have no symmetry. We
    require ``> 2 * band`` (not alignable) and ``>= 0.01``: 10^4 times float32's ``atol``, far
    from any rounding; blob images give 0.03-0.3.
    """
    errs = it.assert_not_spatially_alignable(T.P4Net(), images, f"rotation:{90 * k}", "relu", min_error=0.01,
                                             channels="permutation", config=ROT)
    assert bool((errs.permutation <= errs.allowed()).all()), errs.table()
    expected = [(c + k) % 4 for c in range(4)]
    assert errs.permutations.tolist() == [expected] * images.shape[0], errs.table()
    cycles = {1: [[0, 1, 2, 3]], 2: [[0, 2], [1, 3]], 3: [[0, 3, 2, 1]]}
    assert errs.orbits == cycles[k]


# ----------------------------------------------------------------------------- rotation: isotropic


@settings(max_examples=5)
@given(images=it.images(batch=2, sizes=it.image_sizes(48, 56)), rotation=it.rotations(), dtype=dtypes,
       layer=st.just("relu1"))
def test_isotropic_filters_are_alignable_under_any_rotation(images, rotation, dtype, layer):
    """toy-isotropic, any angle: spatial error at the interpolation floor (``<= band``), at relu1
    (receptive-field radius 12; 48-56 px leave it an interior of 24 x 24 or more).

    Open: relu2 (radius 16) needs 62 px or more for a verdict under 45 degrees, and there, at 23
    degrees on 62-68 px float32 blobs, it reads 5.8e-4 against a band of 4.5e-4 (floor 2.2e-4): the
    second layer's sampled isotropy adds an error the band does not derive. It is left out here
    until that term is derived, not hidden behind a larger ``rtol``.

    Derivation. Every filter is a function of the radius, so in the continuum the network
    commutes with every rotation: ``Gamma R f = R Gamma f``, and ``W_{R^-1}`` aligns the maps
    exactly. On the grid the only errors are the two resamplings (of the image by ``T_h``, of the
    maps by the warp), which the band allows (see :mod:`invariance.testing`); the filters'
    sampled isotropy is exact for the lattice symmetries (``test_toys``) and smooth otherwise
    (sigma >= 1 px). Non-isotropic filters fail the same test (``test_random_cnns_...``).
    """
    it.assert_spatially_alignable(_net(T.IsotropicNet(), dtype), images.to(dtype), rotation, layer, config=QUICK)


# ----------------------------------------------------------------------------- scale


def _blob(size: int, t: float, cx: float, cy: float, dtype) -> torch.Tensor:
    u = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(u, u, indexing="ij")
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * t**2))[None, None].to(dtype)


@settings(max_examples=5)
@given(t=st.floats(1.5, 3.0), u=st.floats(0.5, 1.0), sign=st.sampled_from([1, -1]),
       cx=st.floats(-1.0, 1.0), cy=st.floats(-1.0, 1.0))
def test_scale_error_of_a_gaussian_blob_follows_the_continuum_answer(t, u, sign, cx, cy):
    """toy-scale, ``s = 2^(+-u)``, ``u in [0.5, 1]``: spatial error bounded away from 0 and growing with |log s|.

    Derivation. For a Gaussian blob of width t the known answer is
    :func:`invariance.toys.gaussian_blob_scale_error`: the smallest error over all warps in the
    continuum, ``e_c(s) > 0``, increasing in ``|log s|`` (checked exactly in ``test_toys``). The
    discrete error differs from the continuum one by the resampling error (at most the band,
    as for any layer) plus the sampling of the kernels and the blob (sigma, t >= 1.5 px,
    kernels truncated at 4 sigma: below ``1e-4``). By the triangle inequality on the residual norm,
    ``sqrt(e) >= sqrt(e_c) - sqrt(band + 1e-4)``, which is the lower bound asserted. It is
    bounded away from 0: ``e_c >= 0.03`` for these ranges.

    Growth: in the continuum ``e_c(2^(+-u)) >= 3.2 e_c(2^(+-u/2))`` over these ranges (the
    ratio is 3.2-4.2, about quadratic in ``u``), a gap far wider than the resampling slack, so
    on the same image ``e(2^(+-u)) > e(2^(+-u/2))``, which is asserted.
    """
    size = 48
    x = _blob(size, t, cx, cy, torch.float64)
    net = _net(T.GaussianJetNet(2.0), torch.float64)
    s, s_half = 2.0 ** (sign * u), 2.0 ** (sign * u / 2)
    errs = it.alignment_errors(net, x, Transform("scale", (s,)), "jet", config=SCALE)
    e_c, _ = T.gaussian_blob_scale_error(s, t, 2.0)
    assert e_c >= 0.03
    slack = math.sqrt(float(errs.allowed()[0]) + 1e-4)
    bound = max(math.sqrt(e_c) - slack, 0.0) ** 2
    assert float(errs.spatial[0]) >= bound, (e_c, bound, errs.table())
    half = Transform("scale", (s_half,))
    xh = warp(x, half.matrix((size, size)))
    with torch.no_grad():
        f, fh = net(x), net(xh)
    m = disk_mask((size, size), it.valid_radius(half, (size, size))).double()
    e_half = align(f, fh, "scale_translation", mask=m, config=SCALE,
                   extra_candidates=torch.linalg.inv(half.matrix((size, size)))).errors
    assert float(errs.spatial[0]) > float(e_half[0]), (errs.table(), e_half)


@settings(max_examples=5)
@given(images=it.images(batch=2, sizes=it.image_sizes(44, 52), content_radius=0.35, sigma_range=(2.0, 3.0)),
       scale=it.scalings(values=[0.5, 2**-0.5, 2**0.5, 2.0]))
def test_fixed_scale_filters_are_not_alignable_under_rescaling(images, scale):
    """toy-scale on generic blob images, ``s = 2^(+-1/2), 2^(+-1)``: spatial error > 2 * band.

    Derivation: as for one blob, the warped maps are the jet at ``sigma / s``, a different set of
    values; every blob of width 2-3 px contributes such a mismatch, ``e_c >= 0.03`` at
    ``|log2 s| = 1/2`` (:func:`invariance.toys.gaussian_blob_scale_error`), while resampling
    blobs at least ``2 >= 1 / s`` px wide costs a floor below 0.01, so ``e > 2 * band``. (Blobs
    narrower than ``1 / s`` px are not resolved after shrinking; their floor is large and the
    comparison says nothing.) Content radius 0.35 keeps the rescaled content and the receptive
    field (radius 8 px) inside the field of view for ``s <= 2``; at 44 px or more, the image shrunk
    by 2 less the receptive field still leaves 6 x 6 positions, carrying over 70% of the signal
    (at 36 px: 2 x 2, no verdict).
    """
    it.assert_not_spatially_alignable(T.GaussianJetNet(2.0), images, scale, "jet", config=SCALE)


@settings(max_examples=4)
@given(images=it.images(batch=1, sizes=it.image_sizes(36, 40), content_radius=0.3, sigma_range=(2.0, 3.0)),
       k=st.sampled_from([-2, -1, 1, 2]))
def test_scale_channels_turn_a_rescaling_into_a_channel_shift(images, k):
    """toy-scale-channels, ``s = sqrt(2)^k``: aligned with a channel shift by k scales, the error is at the floor.

    Derivation. Scale normalisation gives ``(W_{1/s} F_h)_{j, alpha} = F_{j - k, alpha}`` in the
    continuum: the jet at ``sigma_j`` of the rescaled image, warped back, is the jet at
    ``sigma_j / s = sigma_{j-k}`` of the original (``test_toys.test_scale_normalised_jet_...``).
    So on the scales present in both (``j - k`` and ``j`` in range) the shifted maps align up
    to resampling: ``<= band``. Without the shift the same channels hold different scales and
    are not alignable (``> 2 * band``), as for the fixed-scale net. Blobs at least 2 px wide
    stay resolved when shrunk by ``1/2`` (see ``test_fixed_scale_filters_...``).
    """
    net = T.ScaleChannelNet()
    s = net.ratio**k
    tr = Transform("scale", (s,))
    size = tuple(images.shape[-2:])
    xh = warp(images, tr.matrix(size).to(images.dtype))
    with torch.no_grad():
        f, fh = net(images), net(xh)
    c, n = len(T.JET_ORDERS), len(net.sigmas)
    lo, hi = (slice(0, c * (n - k)), slice(c * k, None)) if k > 0 else (slice(c * -k, None), slice(0, c * (n + k)))

    radius = it.valid_radius(tr, size)
    m = disk_mask(size, radius).to(images.dtype)
    extra = torch.linalg.inv(tr.matrix(size)).to(images.dtype)
    floor = it.interpolation_floor(images, tr, search="scale_translation", mask_radius=radius, config=SCALE)
    band = floor * (1 + it.DEFAULT_RTOL) + it.ATOL[images.dtype]
    shifted = align(f[:, lo], fh[:, hi], "scale_translation", mask=m, config=SCALE, extra_candidates=extra).errors
    assert bool((shifted <= band).all()), (shifted, band)
    unshifted = align(f[:, lo], fh[:, lo], "scale_translation", mask=m, config=SCALE, extra_candidates=extra).errors
    assert bool((unshifted > 2 * band).all()), (unshifted, band)


# ----------------------------------------------------------------------------- translation


def _circular_stack(seed: int, channels: int, kernel: int, depth: int, dtype) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers, c_in = [], 1
    for _ in range(depth):
        conv = nn.Conv2d(c_in, channels, kernel, padding=kernel // 2, padding_mode="circular")
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
        layers += [conv, nn.ReLU()]
        c_in = channels
    return nn.Sequential(*layers).to(dtype)


@settings(max_examples=8)
@given(seed=st.integers(0, 2**20), size=it.image_sizes(16, 40, square=False), shift=it.translations(4),
       dtype=dtypes, toy=st.booleans(), channels=st.integers(1, 4), kernel=st.sampled_from([1, 3, 5]),
       depth=st.integers(1, 3))
def test_circular_stacks_align_integer_translations_exactly(seed, size, shift, dtype, toy, channels, kernel, depth):
    """toy-circular and random circular-padded stride-1 stacks, integer (circular) shifts: spatial ~ 0.

    Derivation. A stride-1 convolution with circular padding commutes exactly with
    ``torch.roll``, and so do pointwise nonlinearities: ``Gamma roll_t f = roll_t Gamma f`` for
    *any* image, borders included (no margin needed: the images are full-field noise). Shifting
    back by ``-t`` (the warp pads with zeros, so the disk of radius ``1 - |t|`` that never reads
    the wrapped band is the mask) reproduces the maps exactly; the floor is 0 as well, so the
    error is rounding only: ``<= atol`` of the dtype.
    """
    h, w = size
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(2, 1, h, w, generator=g, dtype=torch.float64).to(dtype)
    tx, ty = (int(v) for v in shift.params)
    net = _net(T.CircularNet(), dtype) if toy else _circular_stack(seed, channels, kernel, depth, dtype)
    layer = "relu2" if toy else str(2 * depth - 1)
    rolled = torch.roll(x, (ty, tx), (-2, -1))
    with torch.no_grad():
        dead = not bool(FeatureExtractor(net, [layer])(x)[0][layer].any())
    if dead:  # a random stack can rectify everything away: no signal, no verdict (never "aligned")
        with pytest.raises(AssertionError, match="no verdict"):
            it.assert_spatially_alignable(net, x, shift, layer, transformed=rolled, config=QUICK, rtol=0.0)
        return
    errs = it.assert_spatially_alignable(net, x, shift, layer, transformed=rolled, config=QUICK, rtol=0.0)
    assert bool((errs.floor <= it.ATOL[dtype]).all())


# ----------------------------------------------------------------------------- the input layer


@settings(max_examples=6)
@given(images=it.images(batch=2, sizes=it.image_sizes(24, 32), content_radius=0.4),
       transform=st.one_of(it.rotations(), it.scalings(-1.0, 1.0), it.translations(4, integer=False),
                           it.transformations("similarity"), it.transformations("affine")))
def test_the_input_layer_is_alignable_under_any_transformation(images, transform):
    """The input (identity network), any transformation: spatial error at the floor.

    This is why a spatial transformer that warps the *input* can support invariance. Derivation:
    ``W_{h^-1} T_h f = f`` in the continuum, for every invertible h, so on the grid the only
    error left is resampling, which is what the floor measures; and the search cannot do worse
    than the expected warp ``W_{h^-1}``: ``spatial <= expected``. The kit's floor is the
    larger over both grid parities, so "at the floor" means ``<= band`` here too (the input
    layer's own round trip is one of the two). ``test_measure_reports_the_input_layer_at_the_floor``
    (``test_toys``) checks the same through :func:`invariance.measure`.
    """
    errs = it.assert_spatially_alignable(T.IsotropicNet(), images, transform, "input", config=QUICK)
    assert bool((errs.spatial <= errs.expected + it.ATOL[images.dtype]).all()), errs.table()


# ----------------------------------------------------------------------------- generic CNNs


def _random_cnn(seed: int, channels: int, kernel: int, depth: int, dtype) -> nn.Module:
    """Generic random filters, each with its mean removed.

    A filter's mean is its rotation-invariant (isotropic) part, and on smooth images it
    dominates the response, hiding the part the theory is about; without it the filters are
    still generic (no symmetry with probability 1). No biases: a constant map is trivially
    alignable and would only dilute the errors.
    """
    g = torch.Generator().manual_seed(seed)
    layers, c_in = [], 1
    for _ in range(depth):
        conv = nn.Conv2d(c_in, channels, kernel, padding=kernel // 2, bias=False)
        w = torch.randn(conv.weight.shape, generator=g)
        with torch.no_grad():
            conv.weight.copy_(w - w.mean((-2, -1), keepdim=True))
        layers += [conv, nn.ReLU()]
        c_in = channels
    return nn.Sequential(*layers).to(dtype)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**20), images=it.images(batch=2, sizes=it.image_sizes(28, 36), content_radius=0.35),
       transform=st.sampled_from(["rotation:45", "rotation:90", "rotation:180", "scale:2"]),
       channels=st.integers(3, 6), kernel=st.sampled_from([3, 5]), depth=st.integers(1, 2))
def test_random_cnns_with_generic_filters_are_not_alignable(seed, images, transform, channels, kernel, depth):
    """Random CNNs, 45° / 90° / 180° rotations and rescaling by 2: spatial error > 2 * band.

    Derivation: the general non-invariance statement. A generic filter bank is mapped by a
    rotation to a *different* filter bank (``Gamma R f = R Gamma' f`` with ``Gamma'`` the
    network with rotated filters), so the maps of the rotated image hold other responses in
    each channel (the W/M argument without exclusivity); a rescaling changes the scale at which
    the fixed-size filters see the image (the jet argument). Neither is a spatial warp, so the
    error stays above what resampling explains. Content radius 0.35 keeps the rescaled content
    and the receptive field (<= 4 px) inside the field of view.
    """
    net = _random_cnn(seed, channels, kernel, depth, images.dtype)
    cfg = SCALE if transform.startswith("scale") else ROT
    it.assert_not_spatially_alignable(net, images, transform, str(2 * depth - 1), config=cfg)
