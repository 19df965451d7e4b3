"""Verdicts rest on content (docs/definitions.md, "What a verdict needs").

A warp is feasible only when its region ``R_g`` keeps ``n_min = max(MIN_REGION, min_overlap * O_exp)``
positions and ``max(min_signal * S, min_overlap * S_exp)`` of the reference's signal (``S`` its energy
about its mean on ``M * I``; ``O_exp``, ``S_exp`` what the expected warp's region keeps); an image whose
expected warp carries less than ``min_signal * S`` has no verdict.
The reproductions of the cases that used to read as aligned: a 4x zoom laid background on background
(2e-33), a shrinking warp compared one or two positions of 64 under ``scale:0.8`` at a stride-4 layer,
a user candidate that shrinks the moving map to a point was accepted at 0. Each test recomputes the
rule's terms on its own (the expected warp's region, the signal plane) from the layer's frame and
checks every verdict against them, so a search that slipped below the minimum would fail here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import invariance
from invariance import MIN_REGION, SearchConfig, comparison_region, extract_features, measure_layer, warp
from invariance import geometry as G
from invariance._metric import transformed_valid
from invariance._search import warp_valid
from invariance._zoo import load_digits

DT = torch.float64
KAPPA, SIGMA = SearchConfig().min_overlap, SearchConfig().min_signal


def stride2_net(seed: int = 0) -> nn.Module:
    """Two 3x3 stride-2 convolutions with biases and ReLUs (a stride-4 map at the end), random weights."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.05)
    return net.double().eval()


def digits(n: int, pad: int) -> torch.Tensor:
    """``n`` shipped digits in [0, 1], padded with ``pad`` zero pixels on every side."""
    x = load_digits()[0][:n].to(DT)[:, None] / 255.0
    return nn.functional.pad(x, (pad, pad, pad, pad))


def rule_terms(f: torch.Tensor, frame, t_img: torch.Tensor):
    """The feasibility rule's terms of one layer, written out: (region M*I, moving valid region,
    n_min, signal plane per image, signal share each image's verdict needs, whether it has one)."""
    size = frame.input_size
    region, mvalid, _ = comparison_region(frame, image_valid=transformed_valid(t_img, size))
    v_exp = warp_valid(mvalid, frame.to_layer(G.inverse(t_img)))
    o_exp = float((region * v_exp).sum())
    n_min = max(MIN_REGION, KAPPA * o_exp)
    mu = (f * region).sum((-2, -1), keepdim=True) / region.sum()
    plane = ((f - mu) ** 2).sum(1) * region
    s_exp = (plane * v_exp).sum((-2, -1)) / plane.sum((-2, -1))  # the expected warp's share, per image
    return region, mvalid, n_min, plane, torch.clamp(KAPPA * s_exp, min=SIGMA), (s_exp >= SIGMA) & (o_exp >= MIN_REGION)


def check_verdicts(res, f, frame, t_img) -> int:
    """Every image with a verdict keeps at least ``n_min`` positions and ``min_signal`` of the signal,
    re-measured here at the returned warp; the reported ``positions`` / ``signal`` are those values.
    Returns the number of verdicts."""
    region, mvalid, n_min, plane, need, has_verdict = rule_terms(f, frame, t_img)
    verdicts = 0
    for i, reason in enumerate(res.reasons):
        if not has_verdict[i]:
            assert reason is not None  # the expected warp compares too little: no verdict
        if reason is not None:
            assert math.isnan(float(res.spatial[i]))
            continue
        verdicts += 1
        v = warp_valid(mvalid, res.matrices[i].to(DT))
        kept = float((region * v).sum())
        share = float((plane[i] * v).sum() / plane[i].sum())
        assert kept >= n_min, f"image {i}: {kept} positions kept, the rule needs {n_min}"
        assert share >= float(need[i]), f"image {i}: {share:.3f} of the signal kept, the rule needs {float(need[i])}"
        assert float(res.positions[i]) == pytest.approx(kept, abs=1e-9)
        assert float(res.signal[i]) == pytest.approx(share, abs=1e-9)
    return verdicts


def layer_results(net, images, spec: str, layers, config="quick"):
    tr = invariance.parse_transforms(spec)[0]
    size = tuple(images.shape[-2:])
    t = tr.matrix(size, DT)
    feats, frames = extract_features(net, torch.cat([images, warp(images, t)]), layers)
    b = images.shape[0]
    for name in frames:
        f = feats[name].to(DT)
        res = measure_layer(f[:b], f[b:], frames[name], t, family=invariance.DEFAULT_SEARCH[tr.family],
                            config=config, layer=name, transform=spec)
        yield name, res, f[:b], frames[name], t


def test_a_4x_zoom_is_not_read_as_aligned():
    """Two stride-2 layers, two shipped digits padded to 56 px, ``scale:4``: the transformed image
    shows the centre sixteenth of the original, and at the network's output a shift that laid its
    background on the original's background used to read 2e-33 (the expected warp: 0.30-0.48).
    Every verdict now compares at least a quarter of the reference's signal, which the zoomed image
    shows 4x larger through two 3x3 stride-2 filters: the error is at least 0.1 (a third of the
    expected warp's), or there is no verdict. (The first layer alone, one 3x3 filter, is nearly
    alignable near the expected warp, about 0.07 on half the signal: a real answer, not a sliver.)"""
    for name, res, f, frame, t in layer_results(stride2_net(), digits(2, 14), "scale:4", ["3"]):
        check_verdicts(res, f, frame, t)
        for i, e in enumerate(res.spatial.tolist()):
            assert math.isnan(e) or e >= 0.1, f"layer {name}, image {i}: spatial error {e:.3g} under a 4x zoom"


def test_a_zoom_out_at_a_stride4_layer_compares_the_documented_positions():
    """``scale:0.8`` at the stride-4 layer of two stride-2 convolutions (32 px digits, an 8x8 map):
    shrinking warps used to compare 0.97-2 positions of 64 (errors 0.000-0.012). The expected warp
    (a 1.25x enlargement) covers the interior, so every image keeps a verdict, at no fewer than
    ``max(MIN_REGION, min_overlap * O_exp)`` positions."""
    for _, res, f, frame, t in layer_results(stride2_net(), digits(3, 2), "scale:0.8", ["3"]):
        assert tuple(f.shape[-2:]) == (8, 8) and frame.stride == (4.0, 4.0)
        assert check_verdicts(res, f, frame, t) == 3


@pytest.mark.parametrize("scale", [0.5, 0.7, 1.4, 2.0, 2.8, 4.0])
def test_the_shipped_cnn_never_keeps_under_the_minimum(scale):
    """The shipped MNIST CNN, every layer, scales 0.5..4 on shipped digits: every verdict keeps the
    documented positions and signal (re-measured here), and the layers whose receptive field covers
    the 28 px image (pool2, relu2) have no verdict, with the reason that says so."""
    net = invariance.load_model("mnist-cnn").double().eval()
    for name, res, f, frame, t in layer_results(net, digits(2, 0), f"scale:{scale}", "all"):
        check_verdicts(res, f, frame, t)
        if name in ("pool2", "relu2"):
            assert res.reasons == [invariance.RF_COVERS_IMAGE] * 2


def test_a_user_candidate_obeys_the_same_rule():
    """A candidate that shrinks the moving map to 2% of its size compares a fraction of one position:
    it used to be accepted at 0. It is scored like any warp and refused; the answer keeps the
    documented minimum."""
    g = torch.Generator().manual_seed(0)
    ref = torch.zeros(2, 3, 16, 16, dtype=DT)
    ref[..., 4:12, 4:12] = torch.rand(2, 3, 8, 8, generator=g, dtype=DT)
    mov = torch.flip(ref, (-1,)) + 0.3 * torch.rand(2, 3, 16, 16, generator=g, dtype=DT)
    tiny = G.centred_to_normalized(G.to_matrix("scale", torch.tensor([0.02], dtype=DT)), (16, 16))
    out = invariance.align(ref, mov, "rigid", config="fast", extra_candidates=tiny)
    assert out.reasons == [None, None]
    assert bool((out.positions >= KAPPA * 256).all()), out.positions
    assert bool((out.signal >= SIGMA).all()), out.signal
    assert bool((out.errors > 1e-3).all())  # a flip plus noise has no aligning rigid warp


def test_no_warp_feasible_gives_no_verdict_with_its_reason():
    """Only a 2-column strip of the moving map is valid (24 positions), while a warp must keep
    ``n_min = 0.5 * 144 = 72`` positions of the 12x12 region (no expected warp: ``O_exp = sum M``).
    No translation can: the image has no verdict, with the reason, never an error from 24 positions."""
    ref = torch.zeros(1, 1, 12, 12, dtype=DT)
    ref[0, 0, 5:7, 5:7] = 1.0
    moving_mask = torch.zeros(12, 12)
    moving_mask[:, :2] = 1
    out = invariance.align(ref, ref.clone(), "translation", moving_mask=moving_mask,
                           config=SearchConfig(refine_steps=0))
    assert out.reasons == [invariance._search.NO_FEASIBLE_WARP]
    assert math.isnan(float(out.errors[0]))


def test_the_half_pixel_miss_of_a_fresh_network_is_found():
    """The first case of the fresh battery (``benchmarks/bench_fresh_battery.py``; a random network
    conv3x3 -> conv5x5/s2/d2 -> tanh -> maxpool -> conv3x3, its 12 x 12 map under ``rotation:45``
    on smooth blobs): the optimum sits on a half-pixel line, where every integer shift of the
    coarse grid reads 0.42-0.68, and the search returned 0.393 where the dense reference finds
    0.339 (a miss of 5.3e-2). With the coarse grid's best linear parts searched again at half-pixel
    offsets, the search is within the battery's target, 1e-3, of the reference on both images."""
    from invariance.reference import brute_force_align, fresh_battery

    c = fresh_battery(n_architectures=1)[0]
    assert c.family == "rigid" and tuple(c.reference.shape[-2:]) == (12, 12)
    kw = dict(mask=c.mask, moving_mask=c.moving_mask, expected=c.expected)
    fast = invariance.align(c.reference, c.moving, c.family, **kw)
    ref = brute_force_align(c.reference, c.moving, c.family, angle_step=1.0, offsets=2, **kw)
    assert bool((fast.errors <= ref.errors + 1e-3).all()), (fast.errors, ref.errors)


#: Misses of the fresh battery (``benchmarks/bench_fresh_battery.py``, seed 2026) before the pattern
#: search's pairwise moves and the 5-degree similarity grid: (the case's name up to the image kind,
#: image, the dense reference's error and its warp in the layer's centred frame, as
#: ``invariance.reference.brute_force_align`` returned them with the grids recorded in
#: ``benchmarks/results/fresh_battery.md``, the search's error then).
FRESH_MISSES = [
    ("arch 2070 (conv3x3/s2x6 leaky_relu, conv5x5/s1x6 silu, conv5x5/s1/d2x4 leaky_relu maxpool) rotation:-73",
     1, 0.12336696382404995, [-7.047893329172723, -1.2769300666935914, -0.412318510223463], 0.1244),
    ("arch 2055 (conv7x7/s2x8 relu, conv7x7/s1/d2x6 gelu) rotation:17",
     0, 0.2586356836021983, [-79.68439685399363, -0.41807273326043143, 4.578588020107352], 0.2601),
    ("arch 2040 (conv7x7/s2/d2x6 relu, conv3x3/s2x8 leaky_relu, conv3x3/s1x8 silu) scale:1.7",
     1, 0.2969688555567312, [1.6822958886646298, 3.2322664034511357, 6.256782932125727], 0.3002),
    ("arch 2037 (conv7x7/s1/d2x4 silu, conv3x3/s2x6 relu, conv5x5/s1x6 leaky_relu maxpool, conv3x3/s1x6 tanh) "
     "similarity:30,1.25,1.5,-1", 0, 0.10472084651125212,
     [-6.061953504932831, 0.7179027117054946, -0.5325996871998515, -0.41231934933045533], 0.1111),
]


@pytest.fixture(scope="module")
def fresh_cases():
    from invariance.reference import fresh_battery

    return {c.name.rsplit(" ", 1)[0]: c for c in fresh_battery(2026, n_architectures=30)}


@pytest.mark.parametrize("name, image, ref_error, ref_params, old_error", FRESH_MISSES,
                         ids=[m[0].split(" (")[0] + " " + m[0].rsplit(" ", 1)[1] for m in FRESH_MISSES])
def test_the_fresh_battery_misses_are_found(fresh_cases, name, image, ref_error, ref_params, old_error):
    """The search's worst misses of the fresh battery, 1.1e-3 to 6.4e-3 above the dense reference's
    optimum: a polish that moved one parameter at a time stalled in valleys that run diagonally
    (rotation with shift, 1-2 degrees short), and a 10-degree similarity grid missed the optimum's
    basin (-161 degrees where -6 degrees is better). The reference's warp is re-scored here (its
    error recomputed by :func:`invariance.region_error`, so the case is the one recorded); the
    search must come within the battery's target, 1e-3, of it, and its warp must keep the rule's
    positions and signal (re-measured here)."""
    c = fresh_cases[name]
    size = tuple(c.reference.shape[-2:])
    fam = invariance.SEARCH_FAMILIES[c.family][0]
    ref_m = G.centred_to_normalized(G.to_matrix(fam, torch.tensor(ref_params, dtype=DT)), size)
    i = slice(image, image + 1)
    assert float(invariance.region_error(c.reference[i], c.moving[i], ref_m, mask=c.mask,
                                         moving_mask=c.moving_mask)[0]) == pytest.approx(ref_error, abs=1e-9)
    out = invariance.align(c.reference[i], c.moving[i], c.family, mask=c.mask, moving_mask=c.moving_mask,
                           expected=c.expected.reshape(-1, 3, 3)[min(image, c.expected.reshape(-1, 3, 3).shape[0] - 1)])
    assert float(out.errors[0]) <= ref_error + 1e-3, (float(out.errors[0]), ref_error, old_error)
    # the rule, written out: positions and signal against the expected warp's
    region, mvalid = c.mask.double(), c.moving_mask.double()
    v_exp = warp_valid(mvalid, c.expected.reshape(-1, 3, 3)[0].double())
    f = c.reference[image]
    plane = ((f - (f * region).sum((-2, -1), keepdim=True) / region.sum()) ** 2).sum(0) * region
    v = warp_valid(mvalid, out.matrices[0].double())
    assert float((region * v).sum()) >= max(MIN_REGION, KAPPA * float((region * v_exp).sum()))
    assert float((plane * v).sum()) >= max(SIGMA * float(plane.sum()), KAPPA * float((plane * v_exp).sum()))
