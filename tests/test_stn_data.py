"""Transformed data sets: parameter ranges, determinism, re-drawing per epoch, shapes, geometry."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from invariance import transform_images
from stn import PROTOCOLS, TransformedDataset, get_protocol, load_transformed

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def _digits(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 28, 28, dtype=torch.uint8)
    x[:, 4:24, 4:24] = torch.randint(1, 256, (n, 20, 20), generator=g, dtype=torch.uint8)
    return x, torch.arange(n) % 10


def _ds(name, size=None, split="train", seed=0, n=40, **kw):
    x, y = _digits(n)
    return TransformedDataset(x, y, get_protocol(name, size, **kw), seed=seed, split=split)


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), epoch=st.integers(0, 50))
def test_parameter_ranges(seed, epoch):
    r = _ds("rotation", seed=seed, n=200).draws(epoch).params
    assert r.shape == (200, 1) and r.abs().max() <= 90 and r.abs().max() > 60 and r.std() > 30
    t = _ds("translation", seed=seed, n=200).draws(epoch).params
    assert t.shape == (200, 2) and torch.equal(t, t.round()) and t.abs().max() == 16
    s = _ds("scale", seed=seed, n=200).draws(epoch).params
    assert s.min() >= 0.5 and s.max() <= 4.0 and s.min() < 0.6 and s.max() > 3.3
    assert (torch.log2(s) < 0.5).float().mean() > 0.3  # uniform in log2 scale, not in scale
    d = _ds("translation", seed=seed, n=200).draws(epoch)
    assert d.clutter_src.shape == (200, 6) and (d.clutter_src != torch.arange(200)[:, None]).all()
    assert d.clutter_to.min() >= 0 and d.clutter_to.max() <= 60 - 6
    assert d.clutter_from.min() >= 4 and d.clutter_from.max() <= 24 - 6


@pytest.mark.parametrize("name,side,n_params", [("rotation", 28, 1), ("translation", 60, 2), ("scale", 112, 1)])
def test_shapes(name, side, n_params):
    ds = _ds(name)
    batches = list(ds.batches(0, 16))
    assert [b[0].shape for b in batches] == [(16, 1, side, side), (16, 1, side, side), (8, 1, side, side)]
    assert all(b[0].dtype == torch.float32 and b[2].shape == (len(b[1]), n_params) for b in batches)
    assert all(0 <= b[0].min() and b[0].max() <= 1 for b in batches)
    x, y, p = ds[3]
    assert x.shape == (1, side, side) and y.shape == () and p.shape == (n_params,)


def test_reduced_protocol_shapes_and_description():
    ds = _ds("scale", size=48)
    x, _, _ = next(ds.batches(0, 4))
    assert x.shape == (4, 1, 48, 48)
    assert "resized to 48x48" in ds.protocol.describe()
    with pytest.raises(ValueError, match="between 4 and the canvas size 60"):
        get_protocol("translation", 61)


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_deterministic_and_redrawn_every_epoch(name):
    a, b = _ds(name, seed=3), _ds(name, seed=3)
    xa = torch.cat([x for x, _, _ in a.batches(2, 16)])
    xb = torch.cat([x for x, _, _ in b.batches(2, 16)])
    assert torch.equal(xa, xb)
    assert torch.equal(a.draws(2).params, b.draws(2).params)
    assert not torch.equal(a.draws(2).params, a.draws(3).params)  # re-drawn every epoch
    assert not torch.equal(a.draws(2).order, a.draws(3).order)  # and reshuffled
    assert not torch.equal(a.draws(2).params, _ds(name, seed=4).draws(2).params)  # the seed matters


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_test_split_is_fixed_and_in_order(name):
    ds = _ds(name, split="test", seed=1)
    assert torch.equal(ds.draws(0).params, ds.draws(7).params)
    assert torch.equal(ds.draws(5).order, torch.arange(len(ds)))
    assert not torch.equal(ds.draws(0).params, _ds(name, split="train", seed=1).draws(0).params)
    x0 = torch.cat([x for x, _, _ in ds.batches(0, 16)])
    x1 = torch.cat([x for x, _, _ in ds.batches(9, 16)])
    assert torch.equal(x0, x1)


def test_every_image_once_per_epoch_with_its_label():
    x, y = _digits(40)
    ds = TransformedDataset(x, y * 0 + torch.arange(40), get_protocol("rotation"), seed=0)
    labels = torch.cat([lab for _, lab, _ in ds.batches(4, 7)])
    assert sorted(labels.tolist()) == list(range(40))
    assert torch.equal(labels, ds.draws(4).order)


def test_rotation_render_uses_the_returned_parameters():
    ds = _ds("rotation", split="test")
    x, _, p = next(ds.batches(0, 8))
    expected = transform_images(ds.images[:8, None], "rotation", p)
    torch.testing.assert_close(x, expected)


def test_translation_without_clutter_is_an_exact_roll_by_the_returned_shift():
    ds = _ds("translation", split="test")
    d = ds.draws(0)
    idx = torch.arange(6)
    x, p = ds.render(idx, d, clutter=False)
    padded = torch.nn.functional.pad(ds.images[idx, None], (16, 16, 16, 16))
    for i in range(6):
        tx, ty = (int(v) for v in p[i])
        torch.testing.assert_close(x[i], torch.roll(padded[i], (ty, tx), dims=(-2, -1)), rtol=0, atol=1e-5)


def test_clutter_is_added_by_maximum_and_comes_from_other_images():
    ds = _ds("translation", split="test")
    d = ds.draws(0)
    idx = torch.arange(8)
    plain, _ = ds.render(idx, d, clutter=False)
    cluttered, _ = ds.render(idx, d)
    assert (cluttered >= plain - 1e-6).all() and (cluttered > plain + 1e-3).any()
    # each patch at its place holds (at least) the source patch
    i, k = 2, 0
    (r0, c0), (r1, c1) = d.clutter_from[i, k].tolist(), d.clutter_to[i, k].tolist()
    src = ds.images[d.clutter_src[i, k], r0:r0 + 6, c0:c0 + 6]
    assert (cluttered[i, 0, r1:r1 + 6, c1:c1 + 6] >= src - 1e-6).all()


@pytest.mark.parametrize("size", [None, 40])
def test_returned_translation_is_in_pixels_of_the_returned_image(size):
    """The centroid of a rendered digit moves by the returned shift, also on a reduced canvas."""
    x = torch.zeros(4, 28, 28, dtype=torch.uint8)
    x[:, 12:16, 12:16] = 255  # a centred square
    ds = TransformedDataset(x, torch.arange(4), get_protocol("translation", size), seed=5, split="test")
    img, p = ds.render(torch.arange(4), ds.draws(0), clutter=False)
    s = img.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    w = img[:, 0]
    cx = (w * xs).sum((1, 2)) / w.sum((1, 2)) - (s - 1) / 2
    cy = (w * ys).sum((1, 2)) / w.sum((1, 2)) - (s - 1) / 2
    torch.testing.assert_close(torch.stack([cx, cy], 1), p, rtol=0, atol=0.05)


def test_scale_scales_digit_and_clutter_together():
    x = torch.zeros(2, 28, 28, dtype=torch.uint8)
    x[:, 10:18, 10:18] = 255
    ds = TransformedDataset(x, torch.arange(2), get_protocol("scale", clutter=0), seed=0, split="test")
    img, p = ds.render(torch.arange(2), ds.draws(0))
    area = img[:, 0].sum((1, 2))
    torch.testing.assert_close(area, 64 * p[:, 0] ** 2, rtol=0.05, atol=0)


def test_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid choices: rotation, translation, scale"):
        get_protocol("shear")
    with pytest.raises(ValueError, match="valid choices: mnist, fashion-mnist"):
        load_transformed("cifar", "train", get_protocol("rotation"))
    with pytest.raises(ValueError, match="valid choices: train, test"):
        TransformedDataset(*_digits(4), get_protocol("rotation"), split="val")


@pytest.mark.data
def test_real_mnist_split(data_root):
    ds = load_transformed("mnist", "test", get_protocol("translation", 40), root=data_root, limit=64)
    x, y, p = next(ds.batches(0, 64))
    assert x.shape == (64, 1, 40, 40) and y.max() <= 9 and p.abs().max() <= 16 * 40 / 60 + 1e-5
    assert "stratified 8000/2000" in ds.description or "official" in ds.description
