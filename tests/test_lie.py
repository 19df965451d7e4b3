"""The infinitesimal view (the ``lie`` channel): known answers, an independent finite-difference
check, the controls of docs/definitions.md and the second-order law e_sp(θ) ≈ θ² a²."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import invariance
from invariance import geometry as G
from invariance import toys
from invariance._lie import lie_generator
from invariance._metric import comparison_region
from invariance._warp import warp


def _finite_difference(net, x, spec, eps=1e-6, layers="all"):
    """Per layer, r² from actual bilinear warps at ±ε: (W_{h_ε^-1} Γ(T_{h_ε} f) - W_{h_-ε^-1} Γ(T_{h_-ε} f)) / 2ε.
    It shares no code with the forward-mode path (no image derivative, no central-difference gradient)."""
    tr = invariance.parse_transforms(spec)[0]
    gen = lie_generator(G.to_matrix(tr.family, torch.tensor(tr.params, dtype=torch.float64)))
    ex = invariance.FeatureExtractor(net, layers)

    def at(t):
        tn = G.centred_to_normalized(torch.linalg.matrix_exp(t * gen), x.shape[-2:])
        maps, frames = ex(warp(x, tn.to(x.dtype)))
        return {k: warp(v, frames[k].to_layer(G.inverse(tn)).to(v.dtype)) for k, v in maps.items()}, frames

    (plus, frames), (minus, _) = at(eps), at(-eps)
    f, _ = ex(x)
    out = {}
    for k in plus:
        lie = (plus[k] - minus[k]) / (2 * eps)
        region = comparison_region(frames[k], interior=False, dtype=torch.float64)[0]
        out[k] = (lie * lie * region).sum((1, 2, 3)) / (f[k] * f[k] * region).sum((1, 2, 3))
    return out


@pytest.mark.parametrize("net", ["mnist", "p4", "c8", "isotropic"])
@pytest.mark.parametrize("spec", ["rotation:1", "scale:1.05", "translation:0.7,-0.4"])
def test_lie_matches_finite_differences(net, spec):
    """The forward-mode Lie derivative equals the symmetric difference quotient of the actual
    warps to 1e-4 relative (float64, ε = 1e-6: the quotient's own error is O(ε) from the bilinear
    cross term and O(ε²) otherwise, far below 1e-4). The images carry a faint smooth ramp: on an
    exactly flat background a max-pool window holds tied values, where the network has no
    derivative (forward mode takes one of them, the quotient their mean)."""
    model = {"mnist": lambda: invariance.random_mnist_cnn(seed=1), "p4": toys.P4Net, "c8": toys.C8Net,
             "isotropic": toys.IsotropicNet}[net]().double()
    x = toys.make_blob_images(3, 28, seed=2, dtype=torch.float64)
    ramp = torch.linspace(0, 1, 28, dtype=torch.float64)
    x = x + 0.05 * (ramp[:, None] + 0.3) * (ramp[None, :] ** 2 + 0.2)
    fd = _finite_difference(model, x, spec)
    got = invariance.lie_derivative(model, x, spec, interior=False)
    for k, r2 in fd.items():
        assert got[k].method == "forward-mode AD"
        assert torch.allclose(got[k].lie, r2, rtol=1e-4, atol=1e-14), (k, got[k].lie, r2)


def test_translation_commutes_with_linear_layers_and_the_floor_is_the_grid():
    """A stride-1 convolution commutes with the central difference: its Lie derivative under a
    translation is 0 to rounding. Past a ReLU the response is the grid's (the kinks), and the
    floor, built from the same translation, equals the aligned value."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU()).double()
    x = toys.make_blob_images(3, 40, seed=0, dtype=torch.float64)
    out = invariance.lie_derivative(net, x, "translation:1.5,0.5")
    assert bool((out["0"].lie < 1e-20).all())
    assert torch.allclose(out["1"].aligned, out["1"].floor, rtol=1e-9)
    assert bool((out["1"].lie > 1e-6).all())


def test_beyond_the_grid_a_translation_is_exactly_nothing():
    """s² (docs/definitions.md): L - K = J(Σ v_k δ_k) - Σ v_k J(δ_k) is 0 when the velocity is
    constant (J is linear), through every layer: strides, max-pools and ReLUs included (float64
    rounding: <= 1e-20 relative)."""
    x = toys.make_blob_images(3, 28, seed=0, dtype=torch.float64)
    out = invariance.lie_derivative(invariance.random_mnist_cnn(seed=1).double(), x, "translation:0.6,-1.3",
                                    interior=False)
    for k, r in out.items():
        assert bool((r.specific < 1e-20).all()), (k, r.specific)
        assert bool((r.lie > 1e-8).all()) or k in ("input", "conv1")


def test_beyond_the_grid_separates_covariant_from_generic_layers():
    """s²/r² under rotation. Isotropic filters commute with a rotation field to first order (the
    commutator of a filter w with v(p) = A p is Σ_o w(o) (A o)·∇, whose second-moment term
    c·tr(Aᵀ H) vanishes for an isotropic w and antisymmetric A): at the isotropic control's
    nonlinear layers s²/r² <= 0.1 (measured 0.001-0.03). Under a scaling A = I the same term is
    c·ΔF: not covariant, s²/r² >= 0.5 (measured 0.77-0.89). Oriented filters (C4, C8 lifting
    layers, a random CNN) have no such cancellation: the mean s² >= 0.3 x the mean r² at every
    layer (measured 0.52-1.0)."""
    x = toys.make_blob_images(4, 48, seed=1, dtype=torch.float64)
    iso = toys.IsotropicNet().double()
    rot = invariance.lie_derivative(iso, x, "rotation:5", layers="relu1,conv2,relu2")
    scale = invariance.lie_derivative(iso, x, "scale:1.05", layers="relu1,conv2,relu2")
    for k in rot:
        assert bool((rot[k].specific <= 0.1 * rot[k].lie).all()), (k, rot[k].specific / rot[k].lie)
        assert bool((scale[k].specific >= 0.5 * scale[k].lie).all()), (k, scale[k].specific / scale[k].lie)
    generic = [invariance.lie_derivative(toys.P4Net().double(), x, "rotation:5"),
               invariance.lie_derivative(toys.C8Net().double(), x, "rotation:5"),
               invariance.lie_derivative(invariance.random_mnist_cnn(seed=1).double(), x[..., 10:38, 10:38],
                                         "rotation:5", layers="conv1,pool1,relu1,conv2")]
    for out in generic:
        for k, r in out.items():
            if k != "input":  # a layer's mean: a warp explains more of an oriented filter on some images
                assert float(r.specific.mean()) >= 0.3 * float(r.lie.mean()), (k, r.specific / r.lie)


def test_isotropic_net_is_infinitesimally_alignable_and_generic_ones_are_not():
    """Rotation: the isotropic control's aligned value sits on its grid floor (within testing.LIE_RTOL);
    the lifting layers of the C4 and C8 networks (channels turn into each other: no warp explains
    it) and the first layer of a random CNN are more than 10x above theirs (a linear layer's floor
    is 0)."""
    x = toys.make_blob_images(3, 40, seed=1, dtype=torch.float64)
    for layer in ("relu1", "relu2"):
        invariance.testing.assert_infinitesimally_alignable(toys.IsotropicNet().double(), x, "rotation:5", layer)
    p4 = invariance.lie_derivative(toys.P4Net().double(), x, "rotation:5")["lift"]
    c8 = invariance.lie_derivative(toys.C8Net().double(), x, "rotation:5")["lift"]
    cnn = invariance.lie_derivative(invariance.random_mnist_cnn(seed=1).double(), x[..., 6:34, 6:34],
                                    "rotation:5")["conv1"]
    for r in (p4, c8, cnn):
        assert bool((r.aligned > 10 * r.floor + 1e-12).all())
    with pytest.raises(AssertionError, match="not infinitesimally alignable"):
        invariance.testing.assert_infinitesimally_alignable(toys.P4Net().double(), x, "rotation:5", "lift")


LAW_ANGLES = tuple(4.0 * 2 ** (k / 2) for k in range(6))
"""The angles of the second-order law (degrees): 4 to 22.6, a factor sqrt(2) apart. The error
~ θ² doubles from one to the next while the floor stays, so at the smallest resolved angle (above
the first) the error is 20-40x its floor."""

LAW_FLOOR_FACTOR = 20
"""The law is checked where the error is at least this many times its interpolation floor."""

LAW_SEARCH = invariance.SearchConfig.preset("fast", n_angles=12, top_k=1, shortlist=1, refine_keep=1,
                                            polish_starts=1, subpixel_top=0, hop_steps=())
"""One refinement from the best of a 30-degree grid and the expected warp (always scored): enough
near the identity, where e_sp <= e_exp = O(θ²) and no other basin comes close. A weaker search can
only raise e_sp and the floor: it makes the law harder to pass, never easier."""


def _smooth_net(sigma: float, channels: int, mix_seed: int, gain: float) -> tuple[torch.nn.Module, str]:
    """``toys.GaussianJetNet(sigma)``'s scale-normalised 2-jet, a 1x1 mix of its six channels into
    ``channels >= 2`` (standard normal weights from ``mix_seed``, plus 2 on the gradient Lx, Ly
    into outputs 0 and 1: every mix keeps an oriented part) and, for ``gain > 0``, a tanh of
    ``gain`` times the mix: a linear or a smooth nonlinear layer. Returns the net and the name of
    its last layer."""
    jet = toys.GaussianJetNet(sigma).jet
    mix = torch.nn.Conv2d(jet.out_channels, channels, 1, bias=False)
    with torch.no_grad():
        w = torch.randn(mix.weight.shape, generator=torch.Generator().manual_seed(mix_seed))
        w[0, 1] += 2.0
        w[1, 2] += 2.0
        mix.weight.copy_(w * (gain if gain > 0 else 1.0))
    net = torch.nn.Sequential(jet, mix, *([torch.nn.Tanh()] if gain > 0 else []))
    return net, str(len(net) - 1)


@pytest.mark.usefixtures("one_thread")  # 64 px maps of one image: a thread pool costs more than it saves
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), blob=st.floats(2.0, 3.0), sigma=st.floats(2.5, 3.0),
       channels=st.integers(3, 6), mix_seed=st.integers(0, 2**31 - 1),
       gain=st.one_of(st.just(0.0), st.floats(0.5, 2.0)))
def test_second_order_law_on_smooth_maps(seed, blob, sigma, channels, mix_seed, gain):
    """e_sp(θ) / θ² -> a² and e_exp(θ) / θ² -> r² (docs/definitions.md, "Second order") as a
    property: over drawn smooth images (one 64 px image of blobs ``blob`` to 1.5 ``blob`` px wide,
    zero margin) and drawn smooth layers (:func:`_smooth_net`: jet scale ``sigma``, a channel mix,
    linear or tanh), under rotations, at the smallest angle θ of :data:`LAW_ANGLES` where the
    error is :data:`LAW_FLOOR_FACTOR` times its interpolation floor, both quotients, averaged over
    ``±θ``, are within 20% of the Lie derivative's values.

    Why ±θ, and why 20%. The finite error is ``e(θ) = ||θ R1 + θ² R2 + E||²``, with ``R1`` the
    Lie derivative's unexplained part (``||R1||² = a²``) and ``E`` the resampling error
    (``||E||² <= floor * (1 + rtol) = 2 floor``, the kit's bound for a covariant layer):

    * the cross term ``2θ <R1, E>`` is odd in θ (the bilinear error depends on the sub-pixel offset
      ``δ`` through ``δ (1 - δ)``, the same for ``±θ``, while ``R1`` flips sign) and its relative
      size is up to ``2 sqrt(2 floor / e)``: ~0.6 at 20x the floor, by Cauchy-Schwarz. A one-sided
      quotient is therefore *not* within 20% at 20x the floor in general (measured 0.77-1.27 on
      25 draws of this strategy); the mean of ``±θ`` cancels the term, leaving a remainder even in θ;
    * ``||E||²`` adds at most ``2 floor``: <= 10% of the error at 20x the floor;
    * the next order: rotating the image rotates the jet's order-n channels by nθ, so
      ``e_exp(θ) = θ² r² (1 - O((2θ)² / 12))``, <= 5% at 22.6 degrees (the ladder's top); the tanh
      adds a smooth term of the same order.

    10% + 5% leaves room for the tanh's term within 20% (measured on 140 random draws: 0.94-1.07 for
    e_sp, 0.98-1.05 for e_exp). ``a²`` and ``r²`` are those of
    ``rotation:1``: per degree squared, as θ is in degrees. Both sides are measured on one disk
    (``mask_radius``) where every receptive field of the rotated image lies inside the image for
    any angle (radius ``H/2 - sqrt(2) r - 1`` px, ``r`` the receptive field's half-width), so the
    finite comparison covers every position the Lie derivative sees (the overlap is checked).

    The drawn space is where the same terms allow the test. Rotations only: under a rescaling the
    scale-normalised jet has no steering structure, its even remainder has a coefficient of order
    1-3 in ``log s``, and 20x the floor is reached at ``|log s|`` = 0.14-0.28 or not at all (on
    these images), where the sum exceeds 20% (measured up to +22%). Blobs of 2-3 px, jets of
    sigma 2.5-3 and a mix that keeps the gradient channels: ``a² θ²`` must reach 20x the floor by
    22.6 degrees. The images' finest feature is their 3 px edge taper, whose floor does not shrink
    with wider blobs while ``a²`` (the jet's oriented energy) does, and a mix with much isotropic
    weight (the smoothed image L, the Laplacian) has little ``a²`` relative to its energy: outside
    these ranges many draws do not resolve. Within them about 1 in 70 still does not (17x the floor
    at 22.6 degrees): such a draw is rejected (``assume``), as the law has nothing to resolve there;
    a ratio outside 20% on a resolved draw is a failure, and so is a run where hypothesis finds too
    few resolved draws. Smooth layers only: a ReLU's kink is not smooth at the grid's scale (its
    bilinear resampling error is first order in the kink's sub-pixel offset).
    """
    x = toys.make_blob_images(1, 64, seed=seed, sigma_range=(blob, 1.5 * blob), content_radius=0.5)
    net, layer = _smooth_net(sigma, channels, mix_seed, gain)
    rf = max(invariance.extract_features(net, x, layer)[1][layer].rf_radius)
    radius = 1 - (2**0.5 * rf + 1) / (x.shape[-1] / 2)
    unit = invariance.lie_derivative(net, x, "rotation:1", layers=layer, mask_radius=radius, calibrate=False)[layer]
    seen: dict = {}

    def at(k):  # the mean over ±θ of the spatial and expected errors, the larger floor, the overlap
        if k not in seen:
            errs = [invariance.testing.alignment_errors(net, x, f"rotation:{s * LAW_ANGLES[k]}", layer,
                                                        mask_radius=radius, config=LAW_SEARCH) for s in (1, -1)]
            seen[k] = (sum(float(e.spatial[0]) for e in errs) / 2, sum(float(e.expected[0]) for e in errs) / 2,
                       max(float(e.floor[0]) for e in errs), min(float(e.overlap[0]) for e in errs))
        return seen[k]

    def resolved(k):
        return at(k)[0] >= LAW_FLOOR_FACTOR * at(k)[2]

    k = 2  # start in the middle of the ladder; walk to the smallest resolved angle
    if resolved(k):
        while k > 0 and resolved(k - 1):
            k -= 1
    else:
        while k + 1 < len(LAW_ANGLES) and not resolved(k):
            k += 1
        assume(resolved(k))  # the law's precondition: below 20x the floor it has nothing to resolve
    theta = LAW_ANGLES[k]
    sp, ex, _, overlap = at(k)
    assert overlap > 0.99, overlap
    ratios = (sp / theta**2 / float(unit.aligned[0]), ex / theta**2 / float(unit.lie[0]))
    assert all(abs(q - 1) < 0.2 for q in ratios), (theta, ratios)


def test_measure_lie_channel_round_trips_and_merges(tmp_path):
    """`measure(channels="spatial,lie")` gives the same per-image values as `lie_derivative`; the
    record survives save/load and a merge of two shards equals the whole."""
    x = toys.make_blob_images(6, 40, seed=4)
    net = toys.IsotropicNet()
    kw = dict(channels="spatial,lie", n_boot=20, progress=False, floor_cache=False, layers="relu1")
    rep = invariance.measure(net, x, "rotation:3", **kw)
    rec = rep.records[0]
    direct = invariance.lie_derivative(net, x, "rotation:3", layers="relu1")["relu1"]
    assert torch.allclose(torch.tensor(rec.lie.aligned.per_image, dtype=torch.float64), direct.aligned, rtol=1e-6)
    assert "lie a2" in rep.table() and rec.lie.mark == "at floor"
    rep.save(tmp_path / "r")
    assert invariance.Report.load(tmp_path / "r").records[0].lie == rec.lie
    halves = [invariance.measure(net, x[:3], "rotation:3", **kw).records[0],
              invariance.measure(net, x[3:], "rotation:3", **kw).records[0]]
    merged = invariance.LayerRecord.merge(halves, [0, 0], 20, 0)
    assert torch.allclose(torch.tensor(merged.lie.lie.per_image), torch.tensor(rec.lie.lie.per_image), rtol=1e-5)


def test_bad_lie_inputs_are_one_line_errors():
    x = toys.make_blob_images(2, 24, seed=0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    with pytest.raises(ValueError, match="^transform: a reflection"):
        invariance.lie_derivative(net, x, "affine:-1,0,0,0,1,0")
    with pytest.raises(ValueError, match="^transform: the Lie derivative takes one transformation"):
        invariance.lie_derivative(net, x, "rotation:1;rotation:2")
    with pytest.raises(ValueError, match="^channels: unknown channel matching lei"):
        invariance.measure(net, x, "rotation:1", channels="spatial,lei")


def test_a_dead_layer_has_no_verdict_not_a_number_that_looks_fine():
    """A layer that is zero on every image (a ReLU after a very negative bias) has no signal: every
    value of the channel is NaN with the reason, the null included."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU())
    with torch.no_grad():
        net[0].bias.fill_(-100.0)
    out = invariance.lie_derivative(net, toys.make_blob_images(3, 24, seed=0), "rotation:3")["1"]
    for v in (out.lie, out.aligned, out.share, out.floor, out.null):
        assert bool(v.isnan().all())
    assert all(r is not None and r.startswith("no signal") for r in out.reasons)


def test_the_lie_figure_shows_each_transformation_with_floor_null_and_intervals(tmp_path):
    """`Report.save` writes lie_by_layer.png for records of the `lie` channel; each panel plots the
    record's r², a², grid floor and null (read back from the figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = toys.make_blob_images(4, 40, seed=5)
    rep = invariance.measure(toys.IsotropicNet(), x, "rotation:3;scale:1.05", channels="spatial,lie", n_boot=20,
                             progress=False, floor_cache=False, layers="conv1,relu1")
    fig = rep.plot_lie()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["rotation:3", "scale:1.05"]
    for ax, tr in zip(panels, ("rotation:3", "scale:1.05")):
        recs = rep.select(transform=tr)
        lines = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
        for label, kind in (("Lie derivative r²", "lie"), ("unexplained a²", "aligned"), ("grid floor", "floor"),
                            ("null", "null"), ("beyond the grid s²", "specific")):
            assert lines[label] == pytest.approx([getattr(r.lie, kind).mean for r in recs])
        assert len(ax.collections) == 5  # one interval band per curve
    plt.close(fig)
    assert "lie_by_layer.png" in {p.name for p in rep.save(tmp_path / "r").values()}
