"""Coverage of real architectures: torchvision and timm models, random weights, small inputs.

Run by ``make test-models`` (a separate environment with the ``models`` extra: torchvision and
timm pinned with the torch they need); skipped, with that reason, where they are not installed.

For one layer of known stride per family, two laws:

* **Frames match the architecture.** The stride and offset of feature pixel 0 follow from the
  layers by ``a' = a s, b' = b + a (d (k - 1) / 2 - p)`` (docs/definitions.md); each expected
  value below is worked out by hand from the architecture's definition (e.g. resnet's 7 x 7 /
  2 / 3 stem and 3 x 3 / 2 / 1 max pool: stride 4, offset 0; VGG's 2 x 2 / 2 pools: offset 1/2
  then 3/2; ConvNeXt's 4 x 4 / 4 patchify stem: offset 3/2).
* **A translation by a multiple of the stride is an integer shift of the maps.** The images are
  zero outside a central square and shifted within that margin; at initialisation every bias
  and BatchNorm shift is zero and every activation maps 0 to 0, so the maps are zero wherever
  the content's receptive fields do not reach, and shifting the image by ``k`` strides shifts
  the maps by exactly ``k`` pixels, as long as the zero padding at the image's border only
  ever meets zeros: the 88-pixel margin around 16 x 16 content must exceed the layer's
  receptive-field radius plus the shift, which each case asserts (the widest, convnext_nano
  ``stages.1``, reaches 75.5 pixels; resnet18 ``layer2`` 3 + 2 + 16 + 4 + 24 = 49). In float64
  the spatial error is then rounding: ``<= 1e-20`` relative (squared errors of O(1) maps
  computed with ~1e-15 relative rounding; 1e-16 with LayerNorms, see ``EXACT_LAYERNORM``), the
  same as the interpolation floor of the input (0 for integer shifts), and the expected warp
  (from the frame) does as well, which it cannot if the stride or offset were wrong.

Merges of two grids (timm resnet18d's average-pooling shortcut) have no single frame, and a
vision transformer's attention heads are not feature maps: both are checked to be reported so.
"""

from __future__ import annotations

import pytest
import torch

from invariance import FeatureExtractor, SearchConfig, extract_features, measure

REASON = "torchvision and timm are not installed here: `make test-models` runs this module with them"
tvm = pytest.importorskip("torchvision.models", reason=REASON)
timm = pytest.importorskip("timm", reason=REASON)

DT = torch.float64
EXACT = 1e-20
# LayerNorm with eps = 1e-6 amplifies its input's absolute rounding by up to 1 / sqrt(eps) = 1e3
# where the channel variance is tiny (the tails of the content's receptive fields): squared errors
# grow by up to 1e6 per LayerNorm, so networks with LayerNorms (ConvNeXt) are held to 1e-16,
# still 13 orders below a stride or offset error (>= 1e-3 on these maps)
EXACT_LAYERNORM = 1e-16

# (library, model, layer, stride, offset, layout)
CASES = [
    ("torchvision", "resnet18", "layer2", 8, 0.0, "BCHW"),
    ("torchvision", "resnet50", "layer1", 4, 0.0, "BCHW"),
    ("torchvision", "vgg11_bn", "features.7", 4, 1.5, "BCHW"),
    ("torchvision", "mobilenet_v3_small", "features.1", 4, 0.0, "BCHW"),
    ("torchvision", "efficientnet_b0", "features.2", 4, 0.0, "BCHW"),
    ("torchvision", "densenet121", "features.transition1", 8, 2.0, "BCHW"),
    ("torchvision", "regnet_x_400mf", "trunk_output.block1", 4, 0.0, "BCHW"),
    ("torchvision", "convnext_tiny", "features.1.0.block.1", 4, 1.5, "BHWC"),
    ("torchvision", "convnext_tiny", "features.2", 8, 3.5, "BCHW"),
    ("timm", "convnext_nano", "stages.1", 8, 3.5, "BCHW"),
    ("timm", "efficientnet_b0", "blocks.1", 4, 0.0, "BCHW"),
    ("timm", "resnet18d", "layer1", 4, 0.0, "BCHW"),
]


def build(library: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if library == "torchvision":
        model = getattr(tvm, name)(weights=None)
    else:
        model = timm.create_model(name, pretrained=False)
    return model.eval().to(DT)


MARGIN = 88


def centred_images(n: int = 2, size: int = 192, margin: int = MARGIN) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 3, size, size, dtype=DT)
    x[..., margin:-margin, margin:-margin] = torch.rand(n, 3, size - 2 * margin, size - 2 * margin, generator=g,
                                                         dtype=DT)
    return x


@pytest.mark.parametrize("library, name, layer, stride, offset, layout", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_frames_match_the_architecture_and_stride_shifts_align_exactly(library, name, layer, stride, offset, layout):
    model = build(library, name)
    x = centred_images()
    _, frames = extract_features(model, x[:1], layer)
    fr = frames[layer]
    assert fr.exact, fr
    assert fr.stride == (stride, stride) and fr.offset == (offset, offset), fr
    assert fr.layout == layout
    shift = (stride, -stride)  # one stride right, one up
    assert MARGIN >= max(fr.rf_radius) + stride, "the premise of exactness: content never meets the border"
    report = measure(model, x, f"translation:{shift[0]},{shift[1]}", layers=layer, search="translation",
                     channels=("spatial",), n_boot=0, progress=False)
    rec = report.records[0]
    tol = EXACT_LAYERNORM if any(isinstance(m, torch.nn.LayerNorm) for m in model.modules()) else EXACT
    assert rec.n_excluded == 0
    assert max(rec.errors.spatial.per_image) <= rec.calibration.floor.mean + tol, rec
    assert max(rec.errors.expected.per_image) <= tol, rec
    assert list(rec.best_warp.median) == [-shift[0], -shift[1]]


def test_an_average_pooling_shortcut_has_no_single_frame():
    """resnet18d's layer2 adds a 3 x 3 / 2 convolution (pixel i at 2i) and a 2 x 2 / 2 average pool
    (pixel i at 2i + 1/2): no single frame, so it is not reported as traced."""
    _, frames = extract_features(build("timm", "resnet18d"), centred_images(1), "layer1,layer2")
    assert frames["layer1"].exact and not frames["layer2"].exact


def test_vision_transformer_attention_heads_are_not_measured():
    model = build("timm", "vit_tiny_patch16_224")
    x = torch.rand(1, 3, 224, 224, dtype=DT)
    ex = FeatureExtractor(model, "all")
    feats, frames = ex(x)
    assert list(feats) == ["patch_embed.proj"] and frames["patch_embed.proj"].stride == (16, 16)
    assert "blocks.0.attn.q_norm" in ex.not_maps and len(ex.not_maps) == 24
    with pytest.raises(ValueError, match="is not a spatial feature map"):
        extract_features(model, x, "blocks.0.attn.q_norm")


CONTROLS = ["resnet18", "resnet50", "mobilenet_v3_small", "convnext_tiny"]


@pytest.mark.parametrize("name", CONTROLS)
def test_a_one_stride_shift_reads_zero_or_no_verdict_at_every_listed_layer(name):
    """The control of the definitions' interior rule, at every layer ``invariance layers`` lists: two
    128 px images with content in the central 48 x 48 pixels, shifted by one stride of each layer
    (right and up). On the receptive-field interior a layer's values depend only on image pixels,
    so the shift moves the maps by exactly one position: the spatial error is rounding (``EXACT``,
    or ``EXACT_LAYERNORM`` with LayerNorms), as is the expected warp's. A layer whose receptive field
    covers the image has no verdict, with that reason. What must never happen (it did when the
    interior was switched off for layers where it kept under a quarter of the map): a verdict
    scored on the band that sees the padding, 1.55e-2 where the interior gives 4e-15.
    The 1x1 squeeze-excitation gates of mobilenet and dropout or identity duplicates are not
    listed (they are no spatial maps). Those gates scale every position by an average over the
    whole map, positions that see the padding included, so after the gate the interior is
    covariant only up to the gate's change (1e-15 measured): mobilenet is held to the issue's
    1e-6, still 4 orders below the 1.55e-2 of a padding band."""
    model = build("torchvision", name)
    x = centred_images(2, 128, 40)
    ex = FeatureExtractor(model, "all")
    _, frames = ex(x[:1])
    assert all(f.size[0] * f.size[1] >= 4 for f in frames.values())
    if name == "mobilenet_v3_small":
        assert any(".fc" in n or "scale" in n or "avgpool" in n for n in ex.not_spatial), ex.not_spatial
    tol = EXACT_LAYERNORM if any(isinstance(m, torch.nn.LayerNorm) for m in model.modules()) else EXACT
    tol = 1e-6 if name == "mobilenet_v3_small" else tol
    by_stride: dict[float, list[str]] = {}
    for n, f in frames.items():
        assert f.exact and f.stride[0] == f.stride[1], (n, f)
        by_stride.setdefault(f.stride[0], []).append(n)
    verdicts = 0
    for stride, layers in by_stride.items():
        s = int(stride)
        report = measure(model, x, f"translation:{s},{-s}", layers=layers, search="translation",
                         channels=("spatial",), n_boot=0, calibrate=False, progress=False,
                         config=SearchConfig(refine_steps=0))
        for rec in report.records:
            for e in rec.errors.spatial.per_image:
                assert e != e or e <= tol, (rec.layer, stride, e)
            for e in rec.errors.expected.per_image:
                assert e != e or e <= tol, (rec.layer, stride, e)
            if rec.n_excluded:
                assert rec.excluded_reasons, rec.layer
            verdicts += 2 - rec.n_excluded
    assert verdicts > 0  # the shallow layers have an interior at 128 px


def test_zoo_models_have_the_same_random_weights_in_every_process():
    """``torchvision:NAME`` / ``timm:NAME`` draw their random weights with seed 0 (a sweep's tasks
    build them in separate processes and must measure the same network), without touching the
    caller's random state."""
    from invariance import load_model

    state = torch.random.get_rng_state()
    a = load_model("torchvision:resnet18").state_dict()
    b = load_model("torchvision:resnet18").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="timm has no model 'convnext_nan'; did you mean convnext_nano"):
        load_model("timm:convnext_nan")


@pytest.mark.parametrize("spec", ["rotation:1", "scale:1.03"])
def test_lie_derivative_of_resnet18_matches_finite_differences(spec):
    """resnet18 (random weights, float64, eval-mode BatchNorm): the forward-mode Lie derivative of
    every listed layer equals the symmetric difference quotient of actual bilinear warps at ±1e-6
    to 1e-4 relative, as for the toy networks (tests/test_lie.py). A faint smooth ramp under the
    content keeps max-pool windows free of exact ties (where the network has no derivative)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_lie import _finite_difference

    import invariance
    from invariance.toys import make_blob_images

    torch.manual_seed(0)
    net = tvm.resnet18(weights=None).eval().double()
    x = make_blob_images(2, 64, seed=0, dtype=DT).expand(-1, 3, -1, -1).contiguous()
    ramp = torch.linspace(0, 1, 64, dtype=DT)
    x = x + 0.05 * (ramp[:, None] + 0.3) * (ramp[None, :] ** 2 + 0.2)
    layers = ["conv1", "maxpool", "layer1", "layer2"]
    fd = _finite_difference(net, x, spec, layers=layers)
    got = invariance.lie_derivative(net, x, spec, layers=layers, interior=False)
    assert set(fd) == set(layers)
    for k in layers:
        assert got[k].method == "forward-mode AD"
        assert torch.allclose(got[k].lie, fd[k], rtol=1e-4, atol=1e-14), (k, got[k].lie, fd[k])


def test_beyond_the_grid_resnet18_reads_zero_under_translation_and_not_under_rotation():
    """s² (docs/definitions.md) is the network's commutator with the velocity field: 0 for a
    translation through strides, max-pools, BatchNorms and residual sums (float64 rounding,
    <= 1e-20 relative), while under a rotation resnet18's oriented random filters leave a share of
    r² orders above that (>= 1e-3 of r² here; 0.12-0.76 measured at 128 px)."""
    import invariance
    from invariance.toys import make_blob_images

    torch.manual_seed(0)
    net = tvm.resnet18(weights=None).eval().double()
    x = make_blob_images(2, 64, seed=0, dtype=DT).expand(-1, 3, -1, -1).contiguous()
    layers = ["conv1", "maxpool", "layer1", "layer2"]
    shift = invariance.lie_derivative(net, x, "translation:0.7,-0.4", layers=layers, interior=False)
    turn = invariance.lie_derivative(net, x, "rotation:5", layers=layers, interior=False)
    for k in layers:
        assert bool((shift[k].specific < 1e-20).all()), (k, shift[k].specific)
        assert bool((turn[k].specific > 1e-3 * turn[k].lie).all()), (k, turn[k].specific / turn[k].lie)
