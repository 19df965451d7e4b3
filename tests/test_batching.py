"""Tests of :func:`invariance.measure`'s batching: results never depend on how images are batched.

The law: every image's search depends only on that image's maps (the refinement's start jitter
is the same for every image), the random-pair null pairs image ``i`` with image ``i - 1`` (image
0 with the last) whatever the batches, and the linear map's normal equations are sums over
images. So measuring in batches of any size, or with the layers split into groups, must give
the same per-image numbers as one batch. Searches and nulls are per-image computations on the
same inputs: equal to 1e-12 (float64). The linear map's sums are taken in another order:
its held-out errors agree to 1e-9 (relative rounding of a ridge solve with a condition number
far below 1e6 on these maps).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from invariance import LayerAccumulator, LayerFrame, SearchConfig, measure, measure_layer, parse_bytes, warp
from invariance import geometry as G

DT = torch.float64
CFG = SearchConfig(n_angles=12, refine_steps=3)
KEYS = ("invariance_error", "expected_error", "spatial_error", "permutation_error", "linear_fit_error")


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1)).to(DT)


def _images(n=5):
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, 16, 16, dtype=DT)
    x[:, :, 3:13, 3:13] = torch.rand(n, 1, 10, 10, generator=g, dtype=DT)
    return x


def _run(**kw):
    return measure(_net(), _images(), "rotation:90; translation:2,1", layers="0,2", config=CFG, n_boot=0,
                   progress=False, **kw)


@pytest.fixture(scope="module")
def one_batch():
    return _run()


def _same(a, b):
    assert [(r["layer"], r["transform"]) for r in a.records] == [(r["layer"], r["transform"]) for r in b.records]
    for ra, rb in zip(a.records, b.records):
        for k in KEYS:
            va, vb = torch.tensor(ra["per_image"][k]), torch.tensor(rb["per_image"][k])
            assert torch.allclose(va, vb, rtol=0, atol=1e-12, equal_nan=True), (ra["layer"], ra["transform"], k)
        lin_a, lin_b = torch.tensor(ra["per_image"]["linear_error"]), torch.tensor(rb["per_image"]["linear_error"])
        assert torch.allclose(lin_a, lin_b, rtol=1e-9, atol=1e-12, equal_nan=True)
        assert math.isclose(ra["random_pair_null"], rb["random_pair_null"], rel_tol=0, abs_tol=1e-12)
        assert ra["best_params"]["per_image"] == rb["best_params"]["per_image"]
        assert ra["interpolation_floor"] == pytest.approx(rb["interpolation_floor"], abs=1e-12)


@settings(max_examples=4)
@given(batch=st.integers(1, 4))
def test_batch_size_never_changes_a_result(one_batch, batch):
    rep = _run(batch_size=batch)
    assert rep.meta["batching"]["images_per_batch"] == batch
    _same(one_batch, rep)


def test_a_small_memory_budget_batches_images_and_groups_layers(one_batch):
    """64 kB: two images' maps of both layers (4 x 16 x 16 x 3 x 8 B and 4 x 8 x 8 x 4 x 8 B,
    times two for the transformed images) exceed half the budget, so the layers are measured in
    two groups; the search bytes per image (``search_bytes_per_image``: 56 B x 2 channels x a
    48 x 48 FFT canvas x 2 for float64, 516 kB, for the 1-channel input's floor) exceed the
    budget, so one image per batch."""
    rep = _run(memory_budget="64kB")
    assert rep.meta["batching"] == {"images_per_batch": 1, "layer_groups": 2, "memory_budget": 64000}
    _same(one_batch, rep)


def test_the_default_budget_takes_small_problems_in_one_batch(one_batch):
    assert one_batch.meta["batching"]["images_per_batch"] == 5
    assert one_batch.meta["batching"]["layer_groups"] == 1


def _six_maps(angle: float):
    """Six images' maps and transformed maps (stride 2), their frame and the rotation by ``angle``."""
    t = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([angle], dtype=DT)), (16, 16))
    net, x = _net(), _images(6)
    with torch.no_grad():
        f, fh = net(x), net(warp(x, t))
    frame = LayerFrame(stride=(2.0, 2.0), offset=(0.0, 0.0), size=(8, 8), input_size=(16, 16), exact=False)
    return f, fh, frame, t


def test_accumulator_pairs_images_across_batches_like_one_batch():
    """The null of image i is against the transformed maps of image i - 1, across batch borders."""
    f, fh, frame, t = _six_maps(90.0)
    one = measure_layer(f, fh, frame, t, family="rigid", config=CFG, null=True, channels=("spatial", "linear"))
    acc = LayerAccumulator(frame, t, 6, family="rigid", config=CFG, null=True, channels=("spatial", "linear"))
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]
    for sl in parts:
        acc.add(f[sl], fh[sl], sl)
    for sl in parts:
        acc.score(f[sl], fh[sl], sl)
    got = acc.result()
    assert torch.allclose(got.null, one.null, atol=1e-12)
    assert torch.allclose(got.spatial, one.spatial, atol=1e-12)
    assert torch.allclose(got.linear, one.linear, rtol=1e-9, atol=1e-12)


def test_only_batch_borders_search_the_null_apart(monkeypatch):
    """The null's pairs share their batch's exhaustive stage (``align_with_null``), the wrap-around
    pair (image 0 against the last image) the last batch's; only a pair across a batch border
    (a later batch's first image against the previous batch's last) is a search of its own: two
    for three batches, none for one, whatever the image count."""
    import invariance._metric as M

    f, fh, frame, t = _six_maps(30.0)
    apart = []
    real = M.align

    def counted(*a, **k):
        apart.append(a[0].shape[0])
        return real(*a, **k)

    monkeypatch.setattr(M, "align", counted)
    for parts, borders in (([slice(0, 6)], 0), ([slice(0, 1), slice(1, 4), slice(4, 6)], 2)):
        apart.clear()
        acc = LayerAccumulator(frame, t, 6, family="rigid", config=CFG, null=True)
        for sl in parts:
            acc.add(f[sl], fh[sl], sl)
        null = acc.result().null
        assert apart == [1] * borders
        assert bool(torch.isfinite(null).all())


def test_accumulator_refuses_a_missing_batch():
    t = torch.eye(3, dtype=DT)
    frame = LayerFrame.identity((8, 8))
    acc = LayerAccumulator(frame, t, 4, family="translation")
    f = torch.rand(2, 2, 8, 8, dtype=DT)
    acc.add(f, f, slice(0, 2))
    with pytest.raises(ValueError, match="index: 2 images were added, expected n_images = 4"):
        acc.result()


@pytest.mark.parametrize("bad, match", [("lots", "cannot read 'lots'"), ("2 parsecs", "cannot read"),
                                        (0, "positive"), ("-1GB", "cannot read")])
def test_memory_budget_errors_name_the_argument(bad, match):
    with pytest.raises(ValueError, match=f"memory_budget: .*{match}"):
        parse_bytes(bad)


def test_measure_checks_batch_size():
    with pytest.raises(ValueError, match="batch_size: must be an integer >= 1"):
        _run(batch_size=0)


def test_the_progress_bar_counts_images_and_layers_batch_by_batch(monkeypatch):
    """The bar's total is transforms x images x (layers + the floor), and it advances after every
    batch of every layer, so a long layer shows progress and an ETA; before, it advanced once per
    (transformation, layer)."""
    import tqdm.auto

    bars = []

    class Recorder:
        def __init__(self, *a, total=None, **k):
            self.total, self.updates = total, []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)

        def set_postfix_str(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    _run(batch_size=2)
    (bar,) = bars
    assert bar.total == 2 * 5 * (2 + 1)  # 2 transformations, 5 images, 2 layers + the floor
    assert sum(bar.updates) == bar.total
    # per transformation: 3 batches (2 + 2 + 1 images) for each of the 2 layers, the floor in one batch
    assert bar.updates.count(2) >= 2 * 2 * 2 and len(bar.updates) >= 2 * (3 * 2 + 1)
