"""Tests of :mod:`invariance.toys`: the analytic networks are what their docstrings say they are.

These tests pin the *construction* of each toy (weights, conventions, image generators) with
exact identities, so that the property tests of ``test_theory.py`` test the theory and not a
mis-built toy. Every identity here is exact on the pixel grid (flips, ``torch.rot90``,
``torch.roll``), so comparisons use rounding tolerances only (float64, ``1e-12`` relative).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invariance import SearchConfig, builtin_models, disk_mask, load_model, measure, transform_images
from invariance import toys as T

DT = torch.float64
TOYS = {"toy-wm": T.WMNet, "toy-scale": T.GaussianJetNet, "toy-scale-channels": T.ScaleChannelNet,
        "toy-isotropic": T.IsotropicNet, "toy-p4": T.P4Net, "toy-c8": T.C8Net, "toy-circular": T.CircularNet}


def assert_close(a, b, rel=1e-12):
    scale = max(float(b.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max()) / scale


# ----------------------------------------------------------------------------- registry


def test_every_toy_is_registered_with_generable_default_images():
    models = builtin_models()
    for name, cls in TOYS.items():
        info = models[name]
        assert info.default_images in T.IMAGE_SOURCES
        net = load_model(name)
        assert type(net) is cls and not net.training
        x = T.make_images(info.default_images, 2, seed=0)
        layers = [s.strip() for s in info.default_layers.split(",")]
        names = dict(net.named_modules())
        assert all(layer in names for layer in layers), (name, layers)
        with torch.no_grad():
            out = net(x)
        assert out.dim() == 4 and bool(torch.isfinite(out).all())


def test_make_images_rejects_unknown_sources():
    with pytest.raises(ValueError, match="unknown image source 'digitz'.*glyphs, blobs"):
        T.make_images("digitz", 2)


# ----------------------------------------------------------------------------- images


@settings(max_examples=15)
@given(size=st.integers(40, 64), seed=st.integers(0, 10_000), letters=st.sampled_from(["W", "M", "WM"]))
def test_glyph_scenes_hold_one_letter_inside_the_central_disk(size, seed, letters):
    imgs, params = T.make_glyph_images(3, size, seed, letters=letters, return_params=True)
    assert imgs.shape == (3, 1, size, size) and imgs.dtype == torch.float32
    assert float(imgs.min()) >= 0 and float(imgs.max()) <= 1
    outside = ~disk_mask((size, size), 0.85 + 1.0 / size)
    assert float(imgs[..., outside].abs().max()) == 0.0
    for scene in params:
        assert len({p[0] for p in scene}) == 1 and scene[0][0] in letters
        assert all(0.9 * 6 <= p[3] <= 1.1 * 6 for p in scene)


def test_glyph_generator_is_deterministic_and_seeded():
    a, b = T.make_images("glyphs", 4, seed=3), T.make_images("glyphs", 4, seed=3)
    c = T.make_images("glyphs", 4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@settings(max_examples=10)
@given(cx=st.floats(-5, 5), cy=st.floats(-5, 5), half=st.floats(5.4, 6.6), size=st.integers(31, 48))
def test_an_m_is_a_w_rotated_by_180_degrees(cx, cy, half, size):
    """M glyph at p == rot180(W glyph at -p), exactly (the 180° rotation about the centre is a flip)."""
    w = T.glyph_scene((size, size), [("W", -cx, -cy, half)], dtype=DT)
    m = T.glyph_scene((size, size), [("M", cx, cy, half)], dtype=DT)
    assert_close(m, torch.rot90(w, 2, (0, 1)))


@settings(max_examples=10)
@given(size=st.integers(24, 56), seed=st.integers(0, 10_000), radius=st.floats(0.3, 1.0))
def test_blob_images_are_smooth_and_exactly_zero_outside_their_disk(size, seed, radius):
    x = T.make_blob_images(2, size, seed, content_radius=radius, dtype=DT)
    assert x.shape == (2, 1, size, size) and x.dtype == DT
    assert float(x[..., ~disk_mask((size, size), radius)].abs().max()) == 0.0
    assert float(x.amax((1, 2, 3)).min()) > 0.1


def test_blob_images_follow_the_requested_dtype_and_size():
    assert T.make_images("blobs", 2, (20, 30), dtype=torch.float64).shape == (2, 1, 20, 30)
    assert T.make_images("blobs", 2, 20, dtype=torch.float64).dtype == torch.float64


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("order", T.JET_ORDERS)
def test_gaussian_derivative_kernels_differentiate_polynomials(order):
    """On f = x^2 y^2 / 4 (+ x + y), conv2d with the kernel gives sigma^n d^n(g * f) exactly (moments)."""
    sigma = 1.5
    k = T.gaussian_derivative_kernel(sigma, order, dtype=DT)
    r = k.shape[-1] // 2
    n = 2 * r + 5
    u = torch.arange(n, dtype=DT) - n // 2
    y, x = torch.meshgrid(u, u, indexing="ij")
    f = x**2 + 2 * y**2 + 3 * x * y + x - y
    out = torch.nn.functional.conv2d(f[None, None], k[None, None])[0, 0]
    c = out.shape[0] // 2
    # derivatives of g * f at the centre (0, 0): g * f = f + sigma^2 (1 + 2) (Gaussian second moments)
    exact = {(0, 0): 3 * sigma**2, (1, 0): 1.0, (0, 1): -1.0, (2, 0): 2.0, (1, 1): 3.0, (0, 2): 4.0}[order]
    # ceil(4 sigma) truncation keeps all but exp(-8) of the moments: relative 1e-2 is ample
    assert math.isclose(float(out[c, c]), exact * sigma ** sum(order), rel_tol=1e-2)


def _gaussian_blob(size: int, t: float) -> torch.Tensor:
    u = torch.arange(size, dtype=DT) - (size - 1) / 2
    y, x = torch.meshgrid(u, u, indexing="ij")
    return torch.exp(-(x**2 + y**2) / (2 * t**2))[None, None]


@pytest.mark.parametrize("t", [1.5, 2.0, 3.0])
def test_jet_of_a_gaussian_blob_matches_the_closed_form_the_oracle_uses(t):
    """At the blob's centre: L = t^2/T, sigma^2 Lxx = sigma^2 Lyy = -sigma^2 t^2/T^2, odd orders 0 (T = t^2 + sigma^2).

    These are the values behind :func:`gaussian_blob_scale_error`; sampled kernels (sigma >= 1,
    truncated at 4 sigma) reproduce them to 1e-3 relative.
    """
    sigma = 2.0
    net = T.GaussianJetNet(sigma).double()
    with torch.no_grad():
        out = net(_gaussian_blob(41, t))[0, :, 20, 20]
    big_t = t**2 + sigma**2
    exact = torch.tensor([t**2 / big_t, 0, 0, -sigma**2 * t**2 / big_t**2, 0, -sigma**2 * t**2 / big_t**2], dtype=DT)
    assert float((out - exact).abs().max()) <= 1e-3 * float(exact.abs().max())


def test_scale_normalised_jet_is_the_same_for_the_rescaled_blob_at_the_rescaled_scale():
    """Scale normalisation: blob t at sigma and blob 2t at 2 sigma give the same jet (at the centre)."""
    with torch.no_grad():
        a = T.GaussianJetNet(1.5).double()(_gaussian_blob(41, 2.0))[0, :, 20, 20]
        b = T.GaussianJetNet(3.0).double()(_gaussian_blob(61, 4.0))[0, :, 30, 30]
    assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max())


def test_blob_scale_error_oracle_is_zero_at_identity_and_grows_with_log_scale():
    assert T.gaussian_blob_scale_error(1.0, 2.0)[0] < 1e-9
    for t in (1.5, 2.0, 3.0):
        for sign in (1, -1):
            es = [T.gaussian_blob_scale_error(2.0 ** (sign * u), t)[0] for u in (0.25, 0.5, 0.75, 1.0)]
            assert all(a < b for a, b in zip(es, es[1:])), es


# ----------------------------------------------------------------------------- networks


def test_wm_detectors_are_a_w_template_and_its_180_degree_rotation():
    net = T.WMNet()
    w = net.detect.weight.detach().double()
    assert w.shape[:2] == (2, 1)
    assert_close(w[1, 0], torch.rot90(w[0, 0], 2, (0, 1)))
    k = w.shape[-1]
    template = T.render_polyline(T.W_VERTICES * 6.0, (k, k), dtype=DT)
    assert math.isclose(float((w[0, 0] * template).sum()), 1.0, rel_tol=1e-6)  # self-response
    assert abs(float(w[0, 0].sum())) < 1e-5  # zero mean: blind to uniform brightness
    assert net.rectify.threshold == 0.7


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), letter=st.sampled_from(["W", "M"]), size=st.integers(40, 56))
def test_wm_rectified_channels_are_exclusive(seed, letter, size):
    """The premise of the W/M argument: on a scene of one letter exactly one channel survives ``rectify``.

    Detection needs the matching channel above 0.7 somewhere (it reaches >= 0.78 for half-widths
    5.4-6.6 px) and the other channel <= 0.7 everywhere (it stays <= 0.39), so the second channel
    is exactly 0 after the threshold.
    """
    net = T.WMNet().double()
    x = T.make_glyph_images(2, size, seed, letters=letter, dtype=DT)
    with torch.no_grad():
        r = net.rectify(net.detect(x))
    on, off = (0, 1) if letter == "W" else (1, 0)
    assert bool((r[:, on].amax((1, 2)) > 0.05).all())
    assert float(r[:, off].abs().max()) == 0.0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_p4_rotating_the_image_rotates_maps_and_shifts_channels(k):
    """rot90^k of the image: channel c of the maps == rot90^k of channel c - k of the original (exact)."""
    net = T.P4Net().double()
    w = net.lift.weight.detach()[:, 0]
    for c in range(4):
        assert_close(w[c], torch.rot90(w[0], c, (0, 1)))
    assert not torch.allclose(w[0], torch.rot90(w[0], 2, (0, 1)))  # no rotational symmetry at all
    x = T.make_blob_images(2, 33, seed=k, dtype=DT)
    with torch.no_grad():
        f, fh = net(x), net(torch.rot90(x, k, (-2, -1)))
    assert_close(fh, torch.rot90(torch.roll(f, k, dims=1), k, (-2, -1)))


def test_c8_filters_steer_and_a_45_degree_rotation_is_the_8_cycle():
    """toy-c8: channel k + 2 is channel k turned by 90° sample by sample (steerable Gaussian
    derivatives are exact on the grid), so rot90 of the image rolls the channels by 2 exactly; at
    45° the image's own resampling is the only error: the best channel permutation is the 8-cycle
    and leaves less than a tenth of the spatial error (a warp cannot turn channel k into k + 1)."""
    net = T.C8Net().double()
    w = net.lift.weight.detach()[:, 0]
    for c in range(8):
        assert_close(w[(c + 2) % 8], torch.rot90(w[c], 1, (0, 1)), rel=1e-6)  # float32 weights
    x = T.make_blob_images(3, 41, seed=2, dtype=DT)
    with torch.no_grad():
        f, fh = net(x), net(torch.rot90(x, 1, (-2, -1)))
    assert_close(fh, torch.rot90(torch.roll(f, 2, dims=1), 1, (-2, -1)), rel=1e-6)
    rec = measure(T.C8Net(), x.float(), "rotation:45", channels="spatial,permutation", n_boot=0, progress=False,
                  floor_cache=False).records[-1]
    assert rec.channels.orbits == ((0, 1, 2, 3, 4, 5, 6, 7),) and rec.channels.agreement == 1.0
    assert rec.errors.permutation.mean < rec.errors.spatial.mean / 10


def test_p4_rot90_agrees_with_the_geometry_convention():
    """``rotation:90`` of :func:`transform_images` is ``torch.rot90(k=1)``, so the toys' tests may mix them."""
    x = T.make_blob_images(1, 32, seed=1, dtype=DT)
    assert_close(transform_images(x, "rotation", torch.tensor([90.0], dtype=DT)), torch.rot90(x, 1, (-2, -1)), rel=1e-9)


def test_isotropic_filters_are_symmetric_under_the_lattice_symmetries():
    net = T.IsotropicNet().double()
    for conv in (net.conv1, net.conv2):
        w = conv.weight.detach()
        assert_close(torch.rot90(w, 1, (-2, -1)), w)
        assert_close(w.transpose(-1, -2), w)


def test_isotropic_net_commutes_with_90_degree_rotations():
    net = T.IsotropicNet().double()
    x = T.make_blob_images(2, 30, seed=2, dtype=DT)
    with torch.no_grad():
        assert_close(net(torch.rot90(x, 1, (-2, -1))), torch.rot90(net(x), 1, (-2, -1)))


@settings(max_examples=10)
@given(tx=st.integers(-10, 10), ty=st.integers(-10, 10), h=st.integers(8, 33), w=st.integers(8, 33),
       seed=st.integers(0, 1000))
def test_circular_net_commutes_with_circular_shifts_of_any_image(tx, ty, h, w, seed):
    net = T.CircularNet().double()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, h, w, generator=g, dtype=DT)  # full field of view, no margin
    with torch.no_grad():
        assert_close(net(torch.roll(x, (ty, tx), (-2, -1))), torch.roll(net(x), (ty, tx), (-2, -1)))


def test_scale_channel_net_orders_channels_scale_major():
    net = T.ScaleChannelNet()
    assert len(net.sigmas) == 5 and net.jet.out_channels == 5 * len(T.JET_ORDERS)
    assert net.channel_shift(2.0) == 2 and net.channel_shift(2 ** -0.5) == -1
    with pytest.raises(ValueError, match="not a power"):
        net.channel_shift(1.7)
    single = T.GaussianJetNet(sigma=net.sigmas[2])
    x = T.make_blob_images(1, 40, seed=0)
    with torch.no_grad():
        a = net(x)[:, 12:18].double()
        b = single(x).double()
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())


# ----------------------------------------------------------------------------- the "done when" check


def test_measure_reports_w_m_rotation_on_every_layer_after_the_detectors():
    """``invariance measure --model toy-wm --transform rotation:180 --channels spatial,permutation``.

    On the default glyph scenes: spatial >= 0.9 and permutation <= 0.05 on ``rectify`` and
    ``pool`` (the layers after the detectors), with the W <-> M swap as the channel orbit. The
    thresholds are those of ``test_theory.test_wm_rotation_180_moves_the_response_to_the_other_channel``.
    """
    info = builtin_models()["toy-wm"]
    images = T.make_images(info.default_images, 4, seed=0)
    cfg = SearchConfig(n_angles=36, refine_steps=10, top_k=1, shortlist=3)
    rep = measure(load_model("toy-wm"), images, "rotation:180", layers=info.default_layers,
                  channels="spatial,permutation", config=cfg, n_boot=50, calibrate=False, progress=False)
    after = [r for r in rep.records if r["layer"] in ("rectify", "pool")]
    assert len(after) == 2
    for r in after:
        assert min(r["per_image"]["spatial_error"]) >= 0.9, r["per_image"]["spatial_error"]
        assert max(r["per_image"]["permutation_error"]) <= 0.05, r["per_image"]["permutation_error"]
        assert r["channel_orbits"] == [[0, 1]] and r["permutation_agreement"] == 1.0


def test_measure_reports_the_input_layer_at_the_floor():
    """Through :func:`invariance.measure`: the ``input`` layer's spatial error is at most the
    interpolation floor of the calibration (the floor is the larger of this round trip and the one
    on the other grid parity, docs/definitions.md) and at most its expected-transform error (the
    inverse warp is a candidate), for a rotation, a rescaling and an affine map."""
    images = T.make_images("blobs", 3, 32, seed=2, content_radius=0.4)
    cfg = SearchConfig(n_angles=36, refine_steps=8, top_k=1, shortlist=2, affine_n_angles=8,
                       affine_log2_scales=(0.0,), affine_log2_aspects=(), affine_aspect_angles=())
    rep = measure(T.IsotropicNet(), images, "rotation:37; scale:0.75; affine:1.1,0.2,1,-0.1,0.9,-1",
                  layers="input", channels="spatial", config=cfg, mask_radius=0.7, n_boot=0, progress=False)
    for rec in rep.records:
        assert rec["spatial_error"] <= rec["interpolation_floor"] * (1 + 1e-12)
        per = rec["per_image"]
        assert all(sp <= ex + 1e-6 for sp, ex in zip(per["spatial_error"], per["expected_error"])), per
        assert rec["spatial_error"] < rec["invariance_error"]


def test_glyph_scene_rejects_unknown_letters():
    with pytest.raises(ValueError, match="letter"):
        T.glyph_scene((20, 20), [("X", 0.0, 0.0, 6.0)])
    with pytest.raises(ValueError, match="letters"):
        T.make_glyph_images(1, 48, letters="WX")
    assert np.isfinite(T.gaussian_blob_scale_error(0.5, 2.0)[0])
