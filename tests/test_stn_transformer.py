"""The spatial transformer module: identity at initialisation, conventions, grids, gradients, devices."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from invariance import geometry as G
from invariance import sampling_grid, transform_images
from stn._transformer import (
    STN_FAMILIES,
    LocalisationHead,
    SpatialTransformer,
    raw_to_matrix,
    raw_to_params,
    resample,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _st(family: str, c: int = 1, size=(12, 17), dtype=torch.float64) -> SpatialTransformer:
    return SpatialTransformer(LocalisationHead(c, size, channels=4, hidden=8), family).to(dtype)


@given(family=st.sampled_from(STN_FAMILIES), b=st.integers(1, 3), c=st.integers(1, 3),
       h=st.integers(3, 13), w=st.integers(3, 13), seed=st.integers(0, 2**16))
def test_zero_initialised_transformer_is_the_identity(family, b, c, h, w, seed):
    torch.manual_seed(seed)
    tr = _st(family, c, (h, w))
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    out, m = tr(x)
    assert torch.equal(m, torch.eye(3, dtype=torch.float64).expand(b, 3, 3))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
    assert torch.equal(tr.params(m, (h, w)), G.identity_params(family, dtype=torch.float64).expand(b, -1))


def test_zero_initialised_float32_is_the_identity_within_float_tolerance():
    tr = _st("affine", 2, (9, 14), torch.float32)
    x = torch.rand(4, 2, 9, 14)
    torch.testing.assert_close(tr(x)[0], x, rtol=0, atol=1e-5)


@given(family=st.sampled_from([f for f in STN_FAMILIES if f not in ("affine", "projective")]),
       seed=st.integers(0, 1000), h=st.integers(4, 30), w=st.integers(4, 30))
def test_raw_to_matrix_goes_through_the_geometry_core(family, seed, h, w):
    g = torch.Generator().manual_seed(seed)
    n = G.get_family(family).n_params
    raw = (torch.rand(3, n, generator=g, dtype=torch.float64) - 0.5)
    params = raw_to_params(family, raw, (h, w))
    expected = G.centred_to_normalized(G.to_matrix(family, params), (h, w))
    torch.testing.assert_close(raw_to_matrix(family, raw, (h, w)), expected)


def test_raw_scales_are_documented_ones():
    p = raw_to_params("similarity", torch.tensor([[math.pi / 2, math.log(2.0), 1.0, -0.5]]), (20, 40))
    torch.testing.assert_close(p, torch.tensor([[90.0, 2.0, 20.0, -5.0]]))


@given(seed=st.integers(0, 1000), family=st.sampled_from(["affine", "projective"]))
def test_affine_and_projective_raw_is_identity_plus_r_in_the_normalised_frame(seed, family):
    g = torch.Generator().manual_seed(seed)
    n = G.get_family(family).n_params
    raw = (torch.rand(2, n, generator=g, dtype=torch.float64) - 0.5) * 0.2
    m = raw_to_matrix(family, raw, (10, 16))
    full = torch.cat([raw, torch.zeros(2, 9 - n, dtype=raw.dtype)], 1).reshape(2, 3, 3)
    torch.testing.assert_close(m, torch.eye(3, dtype=raw.dtype) + full)
    # and the parameters are the same transformation in the centred frame
    p = raw_to_params(family, raw, (10, 16))
    torch.testing.assert_close(G.centred_to_normalized(G.to_matrix(family, p), (10, 16)), m)


def test_hand_set_rotation_output_rotates_like_rot90():
    """STN-C0 style: a rotation transformer whose localisation output is set by hand."""
    tr = _st("rotation", 1, (9, 9))
    with torch.no_grad():
        tr.regressor.bias.fill_(math.pi / 2)  # raw radians -> +90 degrees, counter-clockwise
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    x[0, 0, 1, 6] = 1.0  # off-centre, top right
    x[0, 0, 2, 6] = 0.5
    out, m = tr(x)
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(tr.params(m, (9, 9)), torch.tensor([[90.0]], dtype=torch.float64))


@given(angle=st.floats(-180, 180), seed=st.integers(0, 100))
def test_hand_set_rotation_agrees_with_transform_images(angle, seed):
    torch.manual_seed(seed)
    tr = _st("rotation", 2, (11, 16))
    with torch.no_grad():
        tr.regressor.bias.fill_(math.radians(angle))
    x = torch.rand(2, 2, 11, 16, dtype=torch.float64)
    torch.testing.assert_close(tr(x)[0], transform_images(x, "rotation", torch.tensor([angle], dtype=torch.float64)),
                               rtol=0, atol=1e-10)


def test_hand_set_translation_is_an_integer_roll():
    tr = _st("translation", 1, (8, 10))
    with torch.no_grad():
        # tx = 2 px (W = 10), ty = -2 px (H = 8)
        tr.regressor.bias.copy_(torch.tensor([2 / 5, -2 / 4], dtype=torch.float64))
    x = torch.zeros(1, 1, 8, 10, dtype=torch.float64)
    x[0, 0, 3:5, 2:5] = torch.arange(6.0, dtype=torch.float64).reshape(2, 3) + 1
    expected = torch.roll(x, shifts=(-2, 2), dims=(-2, -1))
    torch.testing.assert_close(tr(x)[0], expected, rtol=0, atol=1e-12)


@given(seed=st.integers(0, 1000))
def test_projective_grid_maps_each_pixel_centre_to_its_source(seed):
    """The homogeneous grid (the transformer's projective path) holds, at every output pixel centre
    q (pixel frame, converted to normalised coordinates), the source point A^-1 q computed by the
    geometry core's point mapping; float64 rounding only."""
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(3, dtype=torch.float64) + (torch.rand(2, 3, 3, generator=g, dtype=torch.float64) - 0.5) * 0.3
    a[:, 2, 2] = 1.0
    grid = sampling_grid(a, (7, 9), affine=False)
    yy, xx = torch.meshgrid(torch.arange(7.0, dtype=torch.float64), torch.arange(9.0, dtype=torch.float64),
                            indexing="ij")
    q = G.pixel_to_normalized(torch.stack([xx, yy], -1).reshape(-1, 2), (7, 9))
    src = G.apply_to_points(torch.linalg.inv(a), q.expand(2, -1, -1))
    torch.testing.assert_close(grid.reshape(2, -1, 2), src, rtol=0, atol=1e-12)


def test_projective_with_affine_matrix_equals_affine_path():
    x = torch.rand(2, 1, 10, 13, dtype=torch.float64)
    m = G.centred_to_normalized(G.to_matrix("similarity", torch.tensor([[25.0, 1.3, 1.0, -2.0]] * 2,
                                                                       dtype=torch.float64)), (10, 13))
    torch.testing.assert_close(resample(x, m, projective=True), resample(x, m, projective=False))


def test_gradients_reach_the_localisation_network():
    tr = _st("affine", 1, (12, 12), torch.float32)
    x = torch.rand(3, 1, 12, 12)
    out, _ = tr(x)
    (out * torch.linspace(0, 1, 12)).sum().backward()
    assert tr.regressor.weight.grad is not None and tr.regressor.weight.grad.abs().sum() > 0
    assert tr.regressor.bias.grad.abs().sum() > 0


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid choices: translation, rotation"):
        _st("shear")


def test_resample_checks_shapes():
    with pytest.raises(ValueError, match="expected shape"):
        resample(torch.rand(2, 1, 4, 4), torch.eye(3)[None])


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_device_of_its_inputs(device):
    tr = _st("projective", 1, (10, 10), torch.float32).to(device)
    with torch.no_grad():
        tr.regressor.bias.copy_(torch.tensor([0.1, 0, 0, 0, 0.1, 0, 0.05, 0]))
    x = torch.rand(2, 1, 10, 10, device=device)
    out, m = tr(x)
    assert out.device.type == device and m.device.type == device
    ref = transform_images(x.cpu().double(), "projective",
                           tr.params(m.cpu().double(), (10, 10))).to(torch.float32)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", STN_FAMILIES)
def test_low_precision_transformer_keeps_float32_geometry(family):
    """A bfloat16 transformer (as under CUDA's bfloat16 autocast: the regressor's output is bfloat16,
    and ``linalg.inv`` has no bfloat16 kernel) predicts float32 matrices, exactly those of its raw
    output promoted to float32, and returns a bfloat16 map equal to the float32 sampling of the same
    bfloat16 input rounded once to bfloat16 (so within half a bfloat16 step: 2**-8 relative, bfloat16
    keeping 8 significant bits)."""
    torch.manual_seed(0)
    tr = _st(family, 2, dtype=torch.float32)
    torch.nn.init.normal_(tr.regressor.weight, std=0.05)
    tr = tr.to(torch.bfloat16)
    x = torch.rand(3, 2, 12, 17).to(torch.bfloat16)
    out, m = tr(x)
    assert m.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.equal(m, raw_to_matrix(family, tr.raw(x).float(), (12, 17)))
    ref = resample(x.float(), m, projective=tr.projective)
    torch.testing.assert_close(out.float(), ref, rtol=2.0**-8, atol=0)


@pytest.mark.parametrize("arch", ["STN-C0", "STN-C1", "STN-DL1", "STN-SL1"])
def test_low_precision_models_run(arch):
    """Each STN architecture in bfloat16 (the weights and the input) gives finite logits of the batch's
    shape: its transformers' geometry runs in float32 (the first GPU lease's training failed here)."""
    from stn import build_model

    torch.manual_seed(0)
    m = build_model(arch, family="rotation").to(torch.bfloat16)
    out = m(torch.rand(4, 1, 28, 28).to(torch.bfloat16))
    assert out.shape == (4, 10) and bool(torch.isfinite(out.float()).all())
