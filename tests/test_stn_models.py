"""The architectures: names, construction from a configuration, sharing, iterative composition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invariance import geometry as G
from invariance import load_model, save_checkpoint
from stn import resample
from stn._models import ArchSpec, build_model, classifier_layers, parse_arch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)

ARCHS = ["CNN", "STN-C0", "STN-C1", "STN-C2", "STN-DL1", "STN-SL1", "STN-DL2", "STN-SL2",
         "STN-C012", "STN-SL012", "STN-DL012", "STN-SL11", "STN-C11"]


def _set_rotation(model, angles_deg):
    """Make every transformer predict a constant rotation (weights zero, bias = the angle)."""
    with torch.no_grad():
        for tr, a in zip(model.transformers, angles_deg):
            tr.regressor.bias.fill_(math.radians(a))


@pytest.mark.parametrize("name,expected", [
    ("CNN", ArchSpec("CNN")), ("cnn", ArchSpec("CNN")), ("STN-C0", ArchSpec("C", (0,))),
    ("STN-DL1", ArchSpec("DL", (1,))), ("STN-SL0123", ArchSpec("SL", (0, 1, 2, 3))),
    ("STN-SL11", ArchSpec("SL", (1, 1))), ("stn-c0123", ArchSpec("C", (0, 1, 2, 3))),
])
def test_parse_arch(name, expected):
    assert parse_arch(name) == expected
    assert parse_arch(expected.name) == expected


@pytest.mark.parametrize("bad", ["STN", "STN-C", "STN-X1", "ResNet", "STN-CL1", ""])
def test_unknown_architecture_lists_the_valid_forms(bad):
    with pytest.raises(ValueError, match=r"valid choices: CNN, STN-C<depths>, STN-DL<depths>, STN-SL<depths>"):
        parse_arch(bad)


def test_too_deep_or_unsorted_architectures_are_rejected():
    with pytest.raises(ValueError, match="has only 2 layers"):
        build_model("STN-C0123")
    with pytest.raises(ValueError, match="increasing order"):
        parse_arch("STN-C10")
    build_model("STN-C0123", classifier="svhn", image_size=(16, 16))  # eight layers: fine


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_runs_and_starts_as_the_identity(arch):
    torch.manual_seed(0)
    m = build_model(arch, family="affine").double()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    logits, tr = m.forward_with_transforms(x)
    assert logits.shape == (3, 10)
    # zero-initialised transformers: the classifier sees the input (and its maps) unchanged
    plain = m.head(m.features(x, len(m.layers)))
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-9)
    if arch == "CNN":
        assert tr.composed is None and m.localisation_parameters() == []
    else:
        torch.testing.assert_close(tr.composed, torch.eye(3, dtype=torch.float64).expand(3, 3, 3))


def test_classifier_shapes_and_sizes():
    _, _, shapes = classifier_layers("mnist", 1, (60, 60), 10)
    assert shapes == [(1, 60, 60), (64, 30, 30), (64, 15, 15)]
    _, _, shapes = classifier_layers("svhn", 3, (64, 64), 10)
    assert [s[0] for s in shapes] == [3, 48, 64, 128, 160, 192, 192, 192, 192]
    assert [s[1] for s in shapes] == [64, 64, 32, 32, 16, 16, 8, 8, 4]
    with pytest.raises(ValueError, match="valid choices: mnist, svhn"):
        classifier_layers("vgg", 1, (28, 28), 10)


def test_stn_c0_with_a_hand_set_rotation_rotates_the_input():
    m = build_model("STN-C0", family="rotation").double()
    _set_rotation(m, [90.0])
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    logits, tr = m.forward_with_transforms(x)
    expected = m.head(m.features(torch.rot90(x, 1, dims=(-2, -1)), 2))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(G.from_matrix("rotation", G.normalized_to_centred(tr.composed, (28, 28))),
                               torch.full((2, 1), 90.0, dtype=torch.float64))


def _capture_classifier_input(model, x):
    """The input the classifier's first layer sees last (after the localisation passes)."""
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        out = model.forward_with_transforms(x)
    finally:
        handle.remove()
    return seen[-1], out


@settings(max_examples=10)
@given(a1=st.floats(-60, 60), a2=st.floats(-60, 60), arch=st.sampled_from(["STN-SL11", "STN-DL01", "STN-SL012"]))
def test_iterative_variants_resample_the_original_input_once(a1, a2, arch):
    torch.manual_seed(0)
    m = build_model(arch, family="rotation").double()
    angles = [a1, a2, 10.0][: len(m.transformers)]
    _set_rotation(m, angles)
    x = torch.zeros(2, 1, 28, 28, dtype=torch.float64)
    x[:, 0, 5:12, 14:22] = torch.rand(2, 7, 8, dtype=torch.float64)
    seen, (_, tr) = _capture_classifier_input(m, x)
    composed = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([sum(angles)], dtype=torch.float64)),
                                       (28, 28))
    torch.testing.assert_close(tr.composed, composed.expand(2, 3, 3))
    once = resample(x, composed.expand(2, 3, 3))
    torch.testing.assert_close(seen, once, rtol=0, atol=1e-12)


def test_resampling_twice_would_differ_so_the_test_above_can_fail():
    x = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    x[0, 0, 5:12, 14:22] = torch.rand(7, 8, dtype=torch.float64)
    r = lambda a: G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([a], dtype=torch.float64)), (28, 28))
    twice = resample(resample(x, r(23.0)[None]), r(31.0)[None])
    once = resample(x, (r(31.0) @ r(23.0))[None])
    assert (twice - once).abs().max() > 1e-3


def test_stn_c11_resamples_the_depth_one_map_once():
    torch.manual_seed(0)
    m = build_model("STN-C11", family="rotation").double()
    _set_rotation(m, [20.0, 15.0])
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    before, after = m.forward_with_feature_maps(x)[2][1]
    comp = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([35.0], dtype=torch.float64)), (14, 14))
    torch.testing.assert_close(after, resample(before, comp.expand(2, 3, 3)), rtol=0, atol=1e-12)


def test_sl_shares_the_classifier_layers_and_dl_has_its_own():
    torch.manual_seed(0)
    sl, dl = build_model("STN-SL1", family="affine"), build_model("STN-DL1", family="affine")
    n_conv9 = lambda mod: sum(1 for x in mod.modules() if isinstance(x, torch.nn.Conv2d) and x.kernel_size == (9, 9))
    assert n_conv9(sl.transformers) == 0 and n_conv9(dl.transformers) == 1
    assert {id(p) for p in sl.localisation_parameters()}.isdisjoint(id(p) for p in sl.classifier_parameters())
    x = torch.rand(2, 1, 28, 28)
    for m, shares in ((sl, True), (dl, False)):
        with torch.no_grad():
            m.transformers[0].regressor.weight.normal_(0, 0.1)
            before = m.forward_with_transforms(x)[1].composed.clone()
            m.layers[0][0].weight.mul_(1.5)  # change the classifier's first layer
            after = m.forward_with_transforms(x)[1].composed
        assert (not torch.allclose(before, after)) is shares


def test_checkpoint_round_trip_through_invariance_load_model(tmp_path):
    torch.manual_seed(0)
    m = build_model("STN-SL1", family="similarity", image_size=[40, 40])
    with torch.no_grad():
        m.transformers[0].regressor.weight.normal_(0, 0.05)
    path = save_checkpoint(tmp_path / "ck.pt", m, builder="stn:build_model", config=m.config)
    again = load_model(str(path))
    x = torch.rand(2, 1, 40, 40)
    torch.testing.assert_close(again(x), m.eval()(x))
    assert again.spec.name == "STN-SL1" and again.family == "similarity"
