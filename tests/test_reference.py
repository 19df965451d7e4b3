"""The dense reference search :func:`invariance.reference.brute_force_align` and its battery.

Known answers (the reference on its own):

* an integer shift of a map inside a zero margin is on the reference's lattice (every integer
  shift is tried, sub-pixel offset 0): found exactly, error float64 rounding, parameters ``-t``;
* ``torch.rot90(map, k)`` of a square map is a lattice permutation at a grid angle (multiples of
  15°): found at ``-90 k`` (mod 360), error rounding; a half turn of a non-square map too;
* a reference with no energy gets NaN (no verdict), never 0.

Relations with the fast search :func:`invariance.align`, as the code makes them:

* both evaluate the **same error** ``e(g)`` of docs/definitions.md (the reference shares only
  ``warp``, the geometry and the validity rule): :func:`invariance.region_error` at the reference's
  warp gives the reference's error to rounding (1e-12 relative: the same sums in another order);
* the reference always scores the identity and the expected warp exactly, so it never exceeds
  them (same 1e-12);
* neither candidate set contains the other, so "never worse" is not guaranteed by construction;
  it holds where the reference's dense grid reaches the global basin (always, on these small
  smooth maps: its angle step is a fraction of a basin's width, it tries every integer shift) and
  then the reference is worse only by how far its Nelder-Mead polish stops from the basin's
  minimum. It stops when the simplex is within ``xatol = 1e-4`` in every parameter (degrees,
  pixels, scale factor); near the minimum ``e = e* + delta^T H delta / 2`` with ``H`` at most
  ~36 per unit of scale (a scale change ``ds`` moves a point 6 px from the centre by ``6 ds`` px,
  and the error of these smooth maps grows by <= ~1 per px^2), so ``e_ref - e* <= 36 * 1e-8 / 2 <
  1e-6``; since ``e_fast >= e*``, ``e_ref <= e_fast + 1e-6``. (The opposite gap, the fast search's
  loss to the reference, is bounded by 1e-3 on the battery: tests/test_one_core.py.)

The battery: its cases carry the maps and the expected warp ``h^-1`` in each layer's frame
(rotation by ``-angle``, translation by ``-t``, scale by ``1 / s``); :func:`run_battery` returns
both searches' errors and the worst gap ``fast - reference``.

Small maps (12 x 12, 2 channels, float64) and coarse grids keep the module to a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from invariance import align, aligned, region_error, transformed_valid, warp
from invariance import geometry as G
from invariance.reference import BatteryCase, ReferenceAlignment, battery, brute_force_align, run_battery

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
EXACT = 1e-20  # lattice-exact warps: bilinear weights off by ~1e-16, squared ~1e-32 relative
SAME = 1e-12  # the same error summed in another order
POLISH = 1e-6  # how far the reference's Nelder-Mead may stop above its basin's minimum (module docstring)


def random_maps(n: int = 12, margin: int = 0, seed: int = 0, c: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, c, n, n, dtype=DT)
    x[..., margin:n - margin, margin:n - margin] = 0.1 + torch.rand(1, c, n - 2 * margin, n - 2 * margin, generator=g,
                                                                    dtype=DT)
    return x


def smooth_maps(seed: int, n: int = 12, c: int = 2) -> torch.Tensor:
    """Gaussian noise blurred by a sigma = 1 px Gaussian (circularly): smooth, without symmetry."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c, n, n, generator=g, dtype=DT)
    k = torch.exp(-torch.arange(-2, 3, dtype=DT) ** 2 / 2)
    k = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None].expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="circular"), k, groups=c)


def angle_diff(a, b) -> float:
    return abs((float(a) - float(b) + 180.0) % 360.0 - 180.0)


# ----------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("dx, dy", [(2, -1), (-3, 3), (0, 0)])
def test_an_integer_shift_is_found_exactly(dx, dy):
    """``moving = roll(reference, (dy, dx))`` of content inside a 3-pixel zero margin is the
    reference shifted by ``(dx, dy)``; the warp back ``(-dx, -dy)`` is an integer shift, on the
    reference's lattice: error rounding, parameters exact."""
    ref = random_maps(12, margin=3, seed=1)
    mov = torch.roll(ref, (dy, dx), dims=(-2, -1))
    out = brute_force_align(ref, mov, "translation", offsets=1)
    assert isinstance(out, ReferenceAlignment) and out.matrices.shape == (1, 3, 3)
    assert float(out.errors[0]) < EXACT
    torch.testing.assert_close(out.params, torch.tensor([[-dx, -dy]], dtype=DT), atol=1e-9, rtol=0)


def test_an_integer_shift_is_found_exactly_by_the_rigid_family():
    """The same with rotations on the grid: angle 0 (a grid angle) and the integer shift."""
    ref = random_maps(12, margin=3, seed=2)
    out = brute_force_align(ref, torch.roll(ref, (1, -2), dims=(-2, -1)), "rigid", angle_step=45, offsets=1,
                            polish=1)
    assert float(out.errors[0]) < EXACT
    torch.testing.assert_close(out.params, torch.tensor([[0.0, 2.0, -1.0]], dtype=DT), atol=1e-9, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_quarter_turn_by_rot90_is_found_at_its_angle(k):
    """``torch.rot90(x, k)`` turns by ``90 k`` degrees counter-clockwise as displayed (the geometry's
    convention), so the warp back is ``-90 k``: a grid angle of the 15° grid, and a permutation of
    the pixel centres of a square map (every pixel valid, nothing interpolated): error rounding."""
    ref = random_maps(12, seed=3)
    out = brute_force_align(ref, torch.rot90(ref, k, (-2, -1)), "rotation", angle_step=15, polish=1)
    assert float(out.errors[0]) < EXACT
    assert angle_diff(out.params[0, 0], -90.0 * k) < 1e-9


def test_a_half_turn_of_a_non_square_map_is_found():
    """180° about the centre maps the pixel centres of any H x W grid onto themselves."""
    ref = random_maps(12, seed=4)[..., :9, :]
    out = brute_force_align(ref, torch.rot90(ref, 2, (-2, -1)), "rotation", angle_step=15, polish=1)
    assert float(out.errors[0]) < EXACT and angle_diff(out.params[0, 0], 180.0) < 1e-9


def test_a_reference_without_energy_gets_nan():
    """No signal, no verdict: every candidate's denominator is 0, so no error is finite."""
    out = brute_force_align(torch.zeros(1, 1, 8, 8, dtype=DT), random_maps(8, c=1), "translation", offsets=1)
    assert math.isnan(float(out.errors[0]))


def test_an_unknown_family_names_the_valid_choices():
    x = random_maps(8)
    with pytest.raises(ValueError, match=r"^family: unknown search family 'spin'; valid choices: translation, "):
        brute_force_align(x, x, "spin")


# ----------------------------------------------------------------------------- against the fast search


CASES = {  # name: (search family, transformation family, params, reference options)
    "rotation:30": ("rigid", "rotation", [30.0], dict(angle_step=10, offsets=2)),
    "scale:1.5": ("scale_translation", "scale", [1.5], dict(offsets=2, log2_step=1 / 8, log2_range=1.0)),
}


@pytest.fixture(scope="module", params=list(CASES))
def generic(request):
    """Smooth maps under a rotation / a rescaling (not lattice maps: the optimum is an interpolation
    compromise), with the moving map's valid region and the expected warp: both searches' results."""
    family, tfamily, params, options = CASES[request.param]
    ref = smooth_maps(seed=0)
    t = G.centred_to_normalized(G.to_matrix(tfamily, torch.tensor(params, dtype=DT)), (12, 12))
    mov = warp(ref, t)
    valid = transformed_valid(t, (12, 12)).to(DT)
    expected = G.inverse(t)
    out = brute_force_align(ref, mov, family, moving_mask=valid, expected=expected, **options)
    fast = align(ref, mov, family, moving_mask=valid, expected=expected)
    return dict(ref=ref, mov=mov, valid=valid, expected=expected, out=out, fast=fast, family=family)


def test_the_reference_error_is_the_definitions_error_at_its_warp(generic):
    """:func:`invariance.region_error` (the fast path's exact scoring) at the reference's warp gives
    the reference's error: the two codes implement one definition."""
    g = generic
    norm = G.centred_to_normalized(g["out"].matrices, (12, 12))
    again = region_error(g["ref"], g["mov"], norm, moving_mask=g["valid"])
    torch.testing.assert_close(again, g["out"].errors, rtol=SAME, atol=0)


def test_the_reference_never_exceeds_the_identity_and_the_expected_warp(generic):
    """Both are scored exactly as candidates: the expected warp keeps its own overlap ``O_exp`` (the
    baseline of the minimum overlap), and the identity keeps at least ``kappa = 0.5`` of it (asserted:
    the identity's overlap is the moving map's valid region), so both are feasible and the reference
    is at most their error."""
    g = generic
    _, kept = aligned(g["mov"], g["expected"], g["valid"])
    assert float(g["valid"].sum()) >= 0.5 * float(kept.sum())
    e = float(g["out"].errors[0])
    at_expected = float(region_error(g["ref"], g["mov"], g["expected"], moving_mask=g["valid"])[0])
    at_identity = float(region_error(g["ref"], g["mov"], torch.eye(3, dtype=DT), moving_mask=g["valid"])[0])
    assert e <= at_expected * (1 + SAME) and e <= at_identity * (1 + SAME)


def test_the_reference_is_never_worse_than_the_fast_search(generic):
    """``e_ref <= e_fast + 1e-6`` (module docstring: the Nelder-Mead stopping rule's bound). Both
    are feasible, finite errors of a real misfit (interpolation leaves ~1e-2)."""
    g = generic
    e_ref, e_fast = float(g["out"].errors[0]), float(g["fast"].errors[0])
    assert math.isfinite(e_ref) and math.isfinite(e_fast) and e_ref > 1e-6
    assert e_ref <= e_fast + POLISH, (e_ref, e_fast)


# ----------------------------------------------------------------------------- the battery


@pytest.fixture(scope="module")
def cases() -> dict[str, BatteryCase]:
    return {c.name: c for c in battery(1, size=16)}


def test_the_battery_holds_its_documented_cases(cases):
    """A random CNN under 4 rotations, 2 scalings, a sub-pixel translation, a shear and a rotation of a
    non-square image; the shipped CNN's six layers under 45°. Each case: reference and moving maps
    of one shape, regions of the map's size, the search family of the transformation
    (rotation -> rigid, scale -> scale_translation, affine -> affine)."""
    want = ([f"random-cnn {s}" for s in ("rotation:30", "rotation:45", "rotation:90", "rotation:135", "scale:0.7",
                                         "scale:1.5", "translation:1.5,-0.5")]
            + ["random-cnn shear affine:1,0.3,0,0,1,0", "random-cnn non-square rotation:30"]
            + [f"mnist-cnn {layer} rotation:45" for layer in ("conv1", "pool1", "relu1", "conv2", "pool2", "relu2")])
    assert list(cases) == want
    families = {"rotation": "rigid", "scale": "scale_translation", "translation": "translation", "affine": "affine"}
    for name, c in cases.items():
        spec = name.split()[-1]
        assert c.family == families[spec.split(":")[0]], name
        assert c.reference.shape == c.moving.shape and c.reference.shape[0] == 1 and c.reference.dtype == DT
        assert c.mask.shape == c.moving_mask.shape == c.reference.shape[-2:]
        assert c.expected.shape == (3, 3)
    assert cases["random-cnn non-square rotation:30"].reference.shape[-2:] == (16, 21)
    assert cases["mnist-cnn pool1 rotation:45"].reference.shape[-2:] == (24, 24)  # 28 px digits on a 48 px canvas


@pytest.mark.parametrize("name, family, params", [
    ("random-cnn rotation:30", "rigid", [-30.0, 0.0, 0.0]),
    ("random-cnn translation:1.5,-0.5", "translation", [-1.5, 0.5]),
    ("random-cnn scale:1.5", "scale_translation", [1 / 1.5, 0.0, 0.0]),
    # 2 x 2 pooling of a 48 x 48 image: the 24 x 24 map's centre is the image's centre, one map pixel
    # is two image pixels; a rotation about the centre is the same rotation of the map
    ("mnist-cnn pool1 rotation:45", "rigid", [-45.0, 0.0, 0.0]),
])
def test_each_case_expects_the_inverse_transformation_in_its_layers_frame(cases, name, family, params):
    c = cases[name]
    got = G.from_matrix(family, G.normalized_to_centred(c.expected, tuple(c.reference.shape[-2:])))
    torch.testing.assert_close(got, torch.tensor(params, dtype=DT), atol=1e-9, rtol=0)


def test_run_battery_reports_both_errors_and_the_worst_gap():
    """On a planted integer shift both searches are exact, and the row says so: the per-image errors
    of each, ``worst_gap = max(fast - reference)``, the shape and the seconds each took."""
    ref = random_maps(12, margin=3, seed=5)
    mov = torch.roll(ref, (2, 1), dims=(-2, -1))
    ones = torch.ones(12, 12, dtype=DT)
    expected = G.centred_to_normalized(G.to_matrix("translation", torch.tensor([-1.0, -2.0], dtype=DT)), (12, 12))
    case = BatteryCase("planted shift", "translation", ref, mov, ones, ones, expected)
    (row,) = run_battery([case], reference_options=dict(offsets=1))
    assert (row["name"], row["family"], row["shape"]) == ("planted shift", "translation", [1, 2, 12, 12])
    assert max(row["fast"]) < EXACT and max(row["reference"]) < EXACT
    assert row["worst_gap"] == max(f - r for f, r in zip(row["fast"], row["reference"]))
    assert row["fast_seconds"] >= 0 and row["reference_seconds"] >= 0


def test_the_fresh_battery_is_drawn_from_its_seed():
    """The fresh battery of ``benchmarks/bench_fresh_battery.py``: the same seed draws the same networks,
    transformations and images (a re-run checks the same cases); the default draws 100 images over
    25 architectures, every one with a last-layer stride >= 2 and an interior of >= 16 positions,
    and spans the space it promises (kernels 3, 5 and 7, dilation, both poolings, several
    activations, every search family of the transformations)."""
    from invariance.reference import fresh_battery

    a, b = fresh_battery(7, n_architectures=3), fresh_battery(7, n_architectures=3)
    assert [c.name for c in a] == [c.name for c in b]
    assert all(torch.equal(x.reference, y.reference) and torch.equal(x.moving, y.moving) for x, y in zip(a, b))
    full = fresh_battery()
    assert sum(c.reference.shape[0] for c in full) == 100
    names = " ".join(c.name for c in full)
    assert len({c.name.split(" (")[0] for c in full}) == 25
    for word in ("conv3x3", "conv5x5", "conv7x7", "/d2", "maxpool", "avgpool", "gelu", "tanh", "leaky_relu"):
        assert word in names, word
    assert {c.family for c in full} == {"rigid", "scale_translation", "similarity", "translation"}
    assert all(int(c.mask.sum()) >= 16 for c in full)
