"""Tests of :mod:`invariance._features`: feature extraction by layer name and per-layer frames.

The frame of a layer is the affine map ``x = a * j + b`` (per axis) from feature-pixel index
``j`` to the input-pixel position of that feature pixel's window centre (see the module
docstring). It is pinned three ways:

* known answers written out by hand (valid 9x9 conv, stride-2 conv, 2x2 max-pool, their
  composition, functional pooling inside ``forward``, anisotropic stride / dilation);
* an independent oracle that shares no code with the tracer: a network whose every layer
  *averages* its window, fed with coordinate ramps, outputs the window centre itself, so
  ``out_x[j] == a_x * j + b_x`` wherever no padding was involved (:func:`test_frame_matches_window_centre_oracle`);
* exact lattice identities of whole networks: a 180-degree rotation of the image with
  point-symmetric filters is ``torch.rot90(., 2)`` of every feature map when every stride grid
  is symmetric (odd sizes), and an image shift by a multiple of the stride is an integer shift
  of the map; :meth:`LayerFrame.to_layer` must reproduce both.

All comparisons are in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from invariance import INPUT, FeatureExtractor, LayerFrame, extract_features, list_layers, warp
from invariance import geometry as G

DT = torch.float64
# float64 convolutions of O(1) values over <= a few hundred terms: rounding ~1e-14; 1e-10 leaves
# four orders of magnitude of headroom and is still far below any geometric error (>= 1e-3).
TOL = dict(atol=1e-10, rtol=0.0)



def rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def frame_of(model: nn.Module, layer: str, size, channels: int = 1) -> LayerFrame:
    _, frames = extract_features(model.double(), rand(1, channels, *size), layer)
    return frames[layer]


def assert_frame(fr: LayerFrame, stride, offset, size, input_size, exact=True):
    assert fr.stride == pytest.approx(stride, abs=1e-12)
    assert fr.offset == pytest.approx(offset, abs=1e-12)
    assert tuple(fr.size) == tuple(size)
    assert tuple(fr.input_size) == tuple(input_size)
    assert fr.exact is exact


# ----------------------------------------------------------------------------- known answers


def test_valid_9x9_conv_on_28x28():
    """``a = 1``, ``b = (9 - 1) / 2 = 4``; w = 20 gives ``alpha = 20/28``, ``beta = (19 + 8 + 1)/28 - 1 = 0``."""
    fr = frame_of(nn.Sequential(nn.Conv2d(1, 2, 9)), "0", (28, 28))
    assert_frame(fr, (1, 1), (4, 4), (20, 20), (28, 28))
    expected = torch.tensor([[20 / 28, 0, 0], [0, 20 / 28, 0], [0, 0, 1]], dtype=DT)
    torch.testing.assert_close(fr.matrix(DT), expected, **TOL)


def test_stride2_conv_k3_p1():
    """``a = 2``, ``b = 0 + 1 * ((3 - 1)/2 - 1) = 0``: feature pixel j sits on input pixel 2j."""
    fr = frame_of(nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1)), "0", (10, 14))
    assert_frame(fr, (2, 2), (0, 0), (5, 7), (10, 14))


def test_maxpool2():
    """A 2x2 window starting at 2j has its centre at ``2j + 0.5``."""
    fr = frame_of(nn.Sequential(nn.MaxPool2d(2)), "0", (8, 12))
    assert_frame(fr, (2, 2), (0.5, 0.5), (4, 6), (8, 12))


def test_composition_of_the_mnist_layout():
    """conv9 -> pool2 -> conv7 -> pool2 on 28x28 (the paper's classifier):

    conv1 ``(1, 4)``; pool1 ``(2, 4 + 0.5)``; conv2 ``(2, 4.5 + 2 * 3) = (2, 10.5)``;
    pool2 ``(4, 10.5 + 2 * 0.5) = (4, 11.5)``. Sizes 20, 10, 4, 2.
    """
    net = nn.Sequential(nn.Conv2d(1, 2, 9), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(2, 2, 7), nn.MaxPool2d(2))
    _, frames = extract_features(net.double(), rand(1, 1, 28, 28), "0,1,2,3,4")
    assert_frame(frames["0"], (1, 1), (4, 4), (20, 20), (28, 28))
    assert_frame(frames["1"], (2, 2), (4.5, 4.5), (10, 10), (28, 28))
    assert_frame(frames["2"], (2, 2), (4.5, 4.5), (10, 10), (28, 28))  # elementwise keeps the frame
    assert_frame(frames["3"], (2, 2), (10.5, 10.5), (4, 4), (28, 28))
    assert_frame(frames["4"], (4, 4), (11.5, 11.5), (2, 2), (28, 28))


class FunctionalPools(nn.Module):
    """Pooling written as function calls in ``forward`` (no module to hook)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)
        self.d = nn.Conv2d(2, 2, 3, stride=2, padding=1)

    def forward(self, x):
        y = F.max_pool2d(self.c(x), kernel_size=2)  # keyword argument, stride defaults to k
        y = torch.max_pool2d(y, 2, 2)  # the torch-level op
        y = F.avg_pool2d(y, 3, stride=1, padding=1)  # keeps the frame
        return self.d(y)


def test_functional_pooling_in_forward_is_traced():
    """c: ``(1, 1)``; max 2: ``(2, 1.5)``; max 2: ``(4, 1.5 + 2 * 0.5) = (4, 2.5)``; avg 3/1/1: same;
    d (k3 s2 p1): ``(8, 2.5 + 4 * 0) = (8, 2.5)``. Input 30 -> 28 -> 14 -> 7 -> 7 -> 4."""
    _, frames = extract_features(FunctionalPools().double(), rand(1, 1, 30, 30), "c,d")
    assert_frame(frames["c"], (1, 1), (1, 1), (28, 28), (30, 30))
    assert_frame(frames["d"], (8, 8), (2.5, 2.5), (4, 4), (30, 30))


def test_anisotropic_kernel_stride_padding_dilation():
    """Kernel (3, 5), stride (2, 3), padding (1, 0), dilation (1, 2) on 11x17 (H x W):

    x (W axis): ``a = 3``, ``b = 2 * (5 - 1)/2 - 0 = 4``, w = (17 - 9)//3 + 1 = 3;
    y (H axis): ``a = 2``, ``b = (3 - 1)/2 - 1 = 0``, h = (11 + 2 - 3)//2 + 1 = 6.
    Frames are ``(x, y)`` ordered, sizes ``(h, w)``: swapping the axes anywhere fails this.
    """
    net = nn.Sequential(nn.Conv2d(1, 2, (3, 5), stride=(2, 3), padding=(1, 0), dilation=(1, 2)))
    fr = frame_of(net, "0", (11, 17))
    assert_frame(fr, (3, 2), (4, 0), (6, 3), (11, 17))


def test_same_padding_with_even_kernel():
    """``padding='same'`` with kernel (H, W) = (4, 3): torch pads the H axis 1 before and 2 after,
    so the window of output row i is ``[i - 1, i + 2]`` with centre ``i + 0.5``; the W axis is
    symmetric (centre j). Cross-checked with the window-average oracle on the ramps."""
    net = nn.Sequential(nn.Conv2d(2, 2, (4, 3), padding="same", groups=2, bias=False)).double()
    with torch.no_grad():
        net[0].weight.fill_(1 / 12)
    yy, xx = torch.meshgrid(torch.arange(9, dtype=DT), torch.arange(12, dtype=DT), indexing="ij")
    with warnings.catch_warnings():  # torch's own (warn-once) note about even kernels
        warnings.filterwarnings("ignore", message=".*padding='same'", category=UserWarning)
        feats, frames = extract_features(net, torch.stack([xx, yy])[None], "0")
    assert_frame(frames["0"], (1, 1), (0.0, 0.5), (9, 12), (9, 12))
    out = feats["0"][0]
    torch.testing.assert_close(out[0, 1:-2, 1:-1], xx[1:-2, 1:-1], **TOL)
    torch.testing.assert_close(out[1, 1:-2, 1:-1], yy[1:-2, 1:-1] + 0.5, **TOL)


def test_unknown_ops_give_the_assumed_frame():
    """After ``interpolate`` or adaptive pooling the tracer cannot know the geometry: the map is
    assumed to cover the image's field of view (``a = H / h``, ``b = (a - 1) / 2``), exact=False."""

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 1, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d((3, 4))

        def forward(self, x):
            return self.pool(F.interpolate(self.c(x), scale_factor=2.0))

    _, frames = extract_features(Up().double(), rand(1, 1, 9, 16), "c,pool")
    assert frames["c"].exact
    assert_frame(frames["pool"], (4, 3), (1.5, 1), (3, 4), (9, 16), exact=False)


# ----------------------------------------------------------------------------- the oracle


_layer = st.one_of(
    st.tuples(st.just("conv"), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3),
              st.integers(0, 2), st.integers(0, 2), st.integers(1, 2), st.integers(1, 2)),
    st.tuples(st.just("avg"), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
              st.integers(0, 1), st.integers(0, 1), st.just(1), st.just(1)),
)


class Averager(nn.Module):
    """Every layer averages its window: conv with uniform weights (2 groups: x and y ramps) or avg-pool."""

    def __init__(self, spec):
        super().__init__()
        layers = []
        for kind, kh, kw, sh, sw, ph, pw, dh, dw in spec:
            if kind == "conv":
                conv = nn.Conv2d(2, 2, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw),
                                 groups=2, bias=False)
                with torch.no_grad():
                    conv.weight.fill_(1.0 / (kh * kw))
                layers.append(conv)
            else:
                layers.append(nn.AvgPool2d((kh, kw), stride=(sh, sw), padding=(min(ph, kh // 2), min(pw, kw // 2))))
            layers.append(nn.Identity())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


@settings(max_examples=15)
@given(spec=st.lists(_layer, min_size=1, max_size=3), h=st.integers(20, 40), w=st.integers(20, 40))
def test_frame_matches_window_centre_oracle(spec, h, w):
    """Oracle independent of the tracer: a network of window *averages* maps the ramps
    ``X(i, j) = j`` and ``Y(i, j) = i`` to the (composite) window centres, so at every output
    pixel whose computation never touched padding (where the all-ones image stays exactly 1)
    ``out_X[i, j] = a_x j + b_x`` and ``out_Y[i, j] = a_y i + b_y``. Averages of exactly
    representable values in float64: the 1e-10 tolerance is rounding only; a frame off by a
    half pixel or an axis swap is off by >= 0.5."""
    from hypothesis import assume

    model = Averager(spec).double()
    yy, xx = torch.meshgrid(torch.arange(h, dtype=DT), torch.arange(w, dtype=DT), indexing="ij")
    ramps = torch.stack([xx, yy])[None]
    try:
        with torch.no_grad():
            ones = model(torch.ones(1, 2, h, w, dtype=DT))
    except RuntimeError:  # output smaller than the kernel somewhere: not a valid network
        assume(False)
    feats, frames = extract_features(model, ramps, "net")
    out, fr = feats["net"][0], frames["net"]
    assert fr.exact
    assert tuple(fr.size) == tuple(out.shape[-2:])
    interior = (ones[0] - 1).abs().amax(0) < 1e-12
    assume(bool(interior.any()))
    ii, jj = torch.meshgrid(torch.arange(out.shape[-2], dtype=DT), torch.arange(out.shape[-1], dtype=DT),
                            indexing="ij")
    (ax, ay), (bx, by) = fr.stride, fr.offset
    torch.testing.assert_close(out[0][interior], (ax * jj + bx)[interior], **TOL)
    torch.testing.assert_close(out[1][interior], (ay * ii + by)[interior], **TOL)


@settings(max_examples=25)
@given(ax=st.sampled_from([1.0, 2.0, 3.0, 4.0]), ay=st.sampled_from([1.0, 2.0, 8.0]),
       bx=st.floats(-3, 6), by=st.floats(-3, 6), h=st.integers(1, 12), w=st.integers(1, 12))
def test_layer_frame_matrix_maps_pixel_centres(ax, ay, bx, by, h, w):
    """``Phi`` (layer-normalised -> image-normalised) sends the centre of feature pixel ``(j, i)``
    to the image position ``(a_x j + b_x, a_y i + b_y)``, both expressed with
    :func:`invariance.geometry.pixel_to_normalized` of their own grid."""
    hh, ww = int(ay * h + 7), int(ax * w + 5)
    fr = LayerFrame((ax, ay), (bx, by), (h, w), (hh, ww))
    jj, ii = torch.meshgrid(torch.arange(w, dtype=DT), torch.arange(h, dtype=DT), indexing="xy")
    pix = torch.stack([jj.flatten(), ii.flatten()], -1)
    layer_n = G.pixel_to_normalized(pix, (h, w))
    image_n = G.pixel_to_normalized(torch.stack([ax * pix[:, 0] + bx, ay * pix[:, 1] + by], -1), (hh, ww))
    torch.testing.assert_close(G.apply_to_points(fr.matrix(DT), layer_n), image_n, atol=1e-12, rtol=0)
    # to_layer and to_image are inverse to each other
    T = G.centred_to_normalized(G.to_matrix("rigid", torch.tensor([37.0, 1.5, -2.0], dtype=DT)), (hh, ww))
    torch.testing.assert_close(fr.to_image(fr.to_layer(T)), T, atol=1e-10, rtol=0)


def test_identity_and_assumed_frames():
    """The input's frame is the identity; an assumed frame of a map with the image's size is too."""
    assert LayerFrame.identity((7, 9)).is_identity
    assert LayerFrame.assumed((7, 9), (7, 9)).is_identity
    assert not LayerFrame((2.0, 2.0), (0.0, 0.0), (4, 5), (7, 9)).is_identity


# ----------------------------------------------------------------------------- a residual network


class Block(nn.Module):
    """Residual block with BatchNorm; the output is a fresh tensor (functional ReLU)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.block1 = Block(c, c, 1)
        self.block2 = Block(c, 2 * c, 2)
        self.block3 = Block(2 * c, 2 * c, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * c, 3)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def make_resnet(seed=0, symmetric=False, bn_zero_at_zero=False) -> ResNet:
    """Random weights and BatchNorm statistics; ``symmetric``: point-symmetric filters
    (``w == flip(w)``); ``bn_zero_at_zero``: BN maps 0 to 0 (mean 0, beta 0) so zero margins stay zero."""
    torch.manual_seed(seed)
    net = ResNet().double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and symmetric:
                m.weight.copy_((m.weight + m.weight.flip(-1, -2)) / 2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                if bn_zero_at_zero:
                    m.running_mean.zero_()
                    m.bias.zero_()
                else:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.bias.uniform_(-0.1, 0.1)
    return net


SPATIAL = ["stem.0", "stem.1", "stem.2", "block1", "block2", "block3"]
STRIDES = {"stem.0": 1, "stem.1": 1, "stem.2": 1, "block1": 1, "block2": 2, "block3": 4}


def test_resnet_all_layers_lists_block_outputs_and_traces_frames():
    """layers='all' lists every module whose output is a spatial map, block outputs included, in
    execution order; strides 1, 2, 4 with offset 0 (k3 p1 and k1 p0 both keep b = 0) on a
    non-square input."""
    net = make_resnet()
    x = rand(2, 1, 17, 25)
    names = list_layers(net, x)
    assert names[0] == INPUT
    for blk in ("block1", "block2", "block3"):
        assert blk in names
    assert [n for n in names if n in SPATIAL] == SPATIAL  # execution order
    assert "fc" not in names  # 2-D output
    feats, frames = extract_features(net, x, "all")
    assert list(feats) == names[1:]
    for name in SPATIAL + ["block2.conv1", "block2.shortcut.0", "block3.bn2"]:
        s = STRIDES.get(name, 2 if name.startswith("block2") else 4)
        fr = frames[name]
        assert fr.exact, name
        assert fr.stride == (s, s) and fr.offset == (0.0, 0.0), name
        assert tuple(fr.size) == tuple(feats[name].shape[-2:])
    assert tuple(feats["block3"].shape[-2:]) == (5, 7)
    # the adaptive pooling's 1 x 1 output is no spatial map: left out of "all", with the reason
    ex = FeatureExtractor(net, "all")
    ex(x)
    assert "pool" not in names and ex.not_spatial["pool"].startswith("1x1 map")


def test_batchnorm_runs_in_eval_mode_and_training_flag_is_restored():
    """Features equal the eval-mode forward (running statistics), the model's training flag and
    its running statistics are untouched by the extraction."""
    net = make_resnet(seed=1)
    net.train()
    stats = {k: v.clone() for k, v in net.state_dict().items()}
    x = rand(3, 1, 9, 13)
    feats, _ = extract_features(net, x, "block2")
    assert net.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, stats[k], atol=0, rtol=0)
    net.eval()
    with torch.no_grad():
        want = net.block2(net.block1(net.stem(x)))
    torch.testing.assert_close(feats["block2"], want, **TOL)


def test_resnet_rotation_180_rotates_features_exactly():
    """With point-symmetric filters, symmetric padding and odd sizes (17 x 25 -> 9 x 13 -> 5 x 7,
    every stride grid symmetric about the centre), rotating the image by 180 degrees rotates every
    feature map by 180 degrees exactly (BatchNorm, ReLU and the residual sums are pointwise).
    :meth:`LayerFrame.to_layer` of the image rotation must be that same lattice map: it equals
    the rotation itself (``beta = 0``) and warping the original maps by it gives the maps of the
    rotated image."""
    net = make_resnet(seed=2, symmetric=True)
    x = rand(2, 1, 17, 25, seed=3)
    xr = torch.rot90(x, 2, (-2, -1))
    R = G.centred_to_normalized(G.to_matrix("rotation", torch.tensor([180.0], dtype=DT)), (17, 25))
    torch.testing.assert_close(warp(x, R), xr, **TOL)  # the image rotation is the lattice one
    feats, frames = extract_features(net, x, SPATIAL)
    feats_r, _ = extract_features(net, xr, SPATIAL)
    for name in SPATIAL:
        f, fr = feats[name], frames[name]
        torch.testing.assert_close(feats_r[name], torch.rot90(f, 2, (-2, -1)), **TOL)
        L = fr.to_layer(R)
        torch.testing.assert_close(L, G.centred_to_normalized(
            G.to_matrix("rotation", torch.tensor([180.0], dtype=DT)), fr.size), **TOL)
        torch.testing.assert_close(warp(f, L), feats_r[name], **TOL)
        assert float(f.abs().max()) > 1e-3  # a non-trivial map


def test_resnet_translation_by_stride_multiples_is_an_integer_shift_of_the_maps():
    """Bias-free convs and BatchNorm with ``BN(0) = 0``: zero stays zero, and with a zero margin of
    22 px, wider than the 8 px shift plus the 12 px receptive-field radius of block3 (1 + 2 + 1 +
    2 + 2 + 4), the zero padding only ever meets zeros, so shifting the image
    by ``(8, -4)`` pixels shifts a stride-s map by ``(8/s, -4/s)`` pixels exactly; the frame-aware
    ``to_layer`` of the image shift must warp the original maps onto the shifted ones."""
    net = make_resnet(seed=4, bn_zero_at_zero=True)
    x = F.pad(rand(2, 1, 9, 17, seed=5), (22, 22, 22, 22))  # 53 x 61
    shift = (8.0, -4.0)
    xs = torch.roll(x, (-4, 8), dims=(-2, -1))
    T = G.centred_to_normalized(G.to_matrix("translation", torch.tensor(shift, dtype=DT)), (53, 61))
    torch.testing.assert_close(warp(x, T), xs, **TOL)
    feats, frames = extract_features(net, x, SPATIAL)
    feats_s, _ = extract_features(net, xs, SPATIAL)
    for name in SPATIAL:
        s = STRIDES[name]
        want = torch.roll(feats[name], (int(-4 // s), int(8 // s)), dims=(-2, -1))
        torch.testing.assert_close(feats_s[name], want, **TOL)
        torch.testing.assert_close(warp(feats[name], frames[name].to_layer(T)), feats_s[name], **TOL)


# ----------------------------------------------------------------------------- extraction details


def test_features_equal_the_modules_outputs_and_batches_agree():
    """Hooked features are the modules' outputs; ``batch_size`` splitting changes nothing; the
    input layer is the input itself; dtype follows the model and the input."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2)).double()
    x = rand(5, 2, 11, 8)
    feats, frames = extract_features(net, x, ["input", "0", "2"])
    assert list(feats) == ["input", "0", "2"]
    with torch.no_grad():
        torch.testing.assert_close(feats["0"], net[0](x), **TOL)
        torch.testing.assert_close(feats["2"], net(x), **TOL)
    torch.testing.assert_close(feats["input"], x, atol=0, rtol=0)
    assert frames["input"].is_identity
    assert all(f.dtype == DT for f in feats.values())
    feats2, frames2 = extract_features(net, x, "input,0,2", batch_size=2)
    for k in feats:
        torch.testing.assert_close(feats2[k], feats[k], atol=0, rtol=0)
        assert frames2[k] == frames[k]


def test_float32_model_and_tiny_maps():
    """float32 stays float32; a map reduced to 1 x 1 is still a layer with an exact frame."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2))
    feats, frames = extract_features(net, torch.rand(1, 1, 4, 4), "1")
    assert feats["1"].dtype == torch.float32 and tuple(feats["1"].shape) == (1, 2, 1, 1)
    assert_frame(frames["1"], (2, 2), (1.5, 1.5), (1, 1), (4, 4))


def test_inplace_activation_does_not_overwrite_the_captured_conv_output():
    """torchvision-style ``ReLU(inplace=True)``: the conv layer's features must still be the conv
    output (with negative values), and layers='all' must list both layers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True)).double()
    x = randn(2, 1, 8, 8)
    with torch.no_grad():
        want = net[0](x)
    assert float(want.min()) < 0
    feats, _ = extract_features(net, x, "0,1")
    torch.testing.assert_close(feats["0"], want, **TOL)
    assert list_layers(net, x) == ["input", "0", "1"]


@pytest.mark.parametrize("mode", ["circular", "reflect", "zeros_module"])
def test_padding_modes_are_traced(mode):
    """A stride-2, k3, p1 convolution on 9 px has the frame ``(2, 0)`` whatever the padding mode;
    the assumed frame would say ``a = 9/5 = 1.8``, ``b = 0.4``."""
    if mode == "zeros_module":
        net = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(1, 2, 3, stride=2))
        layer = "1"
    else:
        net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1, padding_mode=mode))
        layer = "0"
    fr = frame_of(net, layer, (9, 9))
    assert_frame(fr, (2, 2), (0, 0), (5, 5), (9, 9))


@pytest.mark.parametrize("op", ["flip", "transpose"])
def test_geometric_ops_of_unchanged_size_are_not_claimed_exact(op):
    """After ``torch.flip(., -1)`` feature pixel j sits at image column W - 1 - j, which no frame
    ``a j + b`` with a > 0 describes: the layer must not be reported as exactly traced."""

    class Geo(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 1, 3, padding=1)
            self.d = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            y = self.c(x)
            return self.d(torch.flip(y, dims=[-1]) if op == "flip" else y.transpose(-1, -2))

    _, frames = extract_features(Geo().double(), rand(1, 1, 8, 8), "d")
    assert not frames["d"].exact, frames["d"]


def test_reused_module_is_listed_once():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 1, 3, padding=1)
            self.c2 = nn.Conv2d(1, 1, 3, padding=1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.c2(self.relu(self.c1(x))) + x)

    names = list_layers(Reuse(), torch.rand(1, 1, 6, 6))
    assert len(names) == len(set(names)), names


# ----------------------------------------------------------------------------- errors


def test_unknown_layer_name_lists_valid_choices():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"unknown layer name.*'conv9'.*valid choices: input, 0, 1"):
        FeatureExtractor(net, "0,conv9")


def test_non_4d_layer_is_rejected_with_a_one_line_error():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with pytest.raises(ValueError, match=r"layer '2' has a non-4-D output \(1, 3\)") as info:
        extract_features(net, torch.rand(1, 1, 6, 6), "0,2")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(0, 1, 6, 6), "empty batch"),
        (torch.full((1, 1, 6, 6), math.nan), "NaN"),
        (torch.rand(1, 6, 6), r"\(B, C, H, W\)"),
        (torch.ones(1, 1, 6, 6, dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_images_are_rejected(images, match):
    with pytest.raises((ValueError, TypeError), match=match):
        extract_features(nn.Sequential(nn.Conv2d(1, 2, 3)), images, "0")


def test_non_module_model_is_rejected():
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureExtractor(lambda x: x, "all")


# ----------------------------------------------------------------------------- real-network patterns


class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out: ``out += identity; relu_(out)`` in place, so the
    block returns the very tensor its ``bn2`` returned, changed after ``bn2``'s hook ran."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def test_residual_block_output_is_captured_after_its_in_place_add():
    """The block's output (after the in-place residual add and ReLU) is listed under the block's
    name and equals what the block returns, while ``bn2`` keeps its value before the add; both
    exactly (the same float operations)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _BasicBlock(), _BasicBlock()).eval()
    x = torch.rand(2, 1, 12, 12)
    names = list_layers(net, x)
    assert "1" in names and "2" in names, names
    feats, frames = extract_features(net, x, "all")
    with torch.no_grad():
        a = net[0](x)
        b = net[1](a.clone())
        bn2 = net[1].bn2(net[1].conv2(net[1].relu(net[1].bn1(net[1].conv1(a)))))
    torch.testing.assert_close(feats["1"], b, rtol=0, atol=0)
    torch.testing.assert_close(feats["1.bn2"], bn2, rtol=0, atol=0)
    assert not torch.equal(feats["1"], feats["1.bn2"])
    assert frames["1"].stride == (1.0, 1.0) and frames["1"].exact


class _ConvNeXtBlock(nn.Module):
    """A ConvNeXt block as torchvision writes it: depthwise conv, then LayerNorm and the MLP on
    ``x.permute(0, 2, 3, 1)`` (channels last), permuted back, plus the residual."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def test_channels_last_outputs_are_transposed_with_the_traced_frame():
    """Outputs in (B, H, W, C) of a traced map (ConvNeXt's LayerNorm and MLP) are measured as
    (B, C, H, W) with the traced frame (stride 2 of the stem here), marked ``BHWC``, equal to the
    module's output transposed; and an integer shift by a multiple of the stride aligns them
    with the shift found exactly (float64: rounding only)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 2, stride=2), _ConvNeXtBlock()).double().eval()
    x = F.pad(torch.rand(3, 1, 16, 16, dtype=torch.float64), (12, 12, 12, 12))
    feats, frames = extract_features(net, x, "1.norm,1.fc2,1")
    with torch.no_grad():
        y = net[1].dw(net[0](x)).permute(0, 2, 3, 1)
        expected = net[1].norm(y).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats["1.norm"], expected, rtol=0, atol=0)
    for name in ("1.norm", "1.fc2"):
        assert frames[name].layout == "BHWC" and frames[name].exact and frames[name].stride == (2.0, 2.0)
        assert frames[name].size == (20, 20)
    assert frames["1"].layout == "BCHW" and frames["1"].stride == (2.0, 2.0)
    import invariance

    rep = invariance.measure(net, x, "translation:4,0", layers="1.norm", channels="spatial", n_boot=0,
                             progress=False)
    rec = rep.records[0]
    assert rec["spatial_error"] < 1e-12, rec["spatial_error"]
    assert rec["best_params"]["median"] == pytest.approx([-4.0, 0.0], abs=1e-6)


def test_the_frame_tracer_keeps_no_intermediate_alive():
    """While features are extracted, an intermediate map that the network no longer needs is freed
    (the tracer forgets a tensor's frame when it dies instead of keeping every output alive), so
    extraction needs the memory of a plain forward pass, not of every layer at once."""
    import weakref

    net = nn.Sequential(*[nn.Conv2d(2, 2, 3, padding=1) for _ in range(6)]).eval()
    first: list = []
    net[0].register_forward_hook(lambda m, i, o: first.append(weakref.ref(o)))
    alive_at_the_end: list = []
    net[5].register_forward_hook(lambda m, i, o: alive_at_the_end.append(first[0]() is not None))
    feats, frames = extract_features(net, torch.rand(2, 1, 12, 12).expand(2, 2, 12, 12).contiguous(), "5")
    assert alive_at_the_end == [False]
    assert frames["5"].exact and frames["5"].stride == (1.0, 1.0)


def test_upsampling_is_traced_and_checked_by_an_impulse():
    """A bilinear ``nn.Upsample`` after a stride-2 convolution is traced: stride 1 and offset -1/2
    (output pixel i reads input coordinate (i + 1/2)/2 - 1/2 of a grid at offset 0). Oracle: the
    response to an impulse at image pixel p through symmetric filters is centred, so its centroid
    q in the map satisfies stride * q + offset = p (exactly, up to float rounding)."""
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    net = nn.Sequential(conv, nn.Upsample(scale_factor=2, mode="bilinear")).double()
    x = torch.zeros(2, 1, 24, 24, dtype=torch.float64)
    x[:, 0, 10, 12] = 1.0  # p = (x 12, y 10)
    feats, frames = extract_features(net, x, "1")
    fr = frames["1"]
    assert fr.stride == (1.0, 1.0) and fr.offset == (-0.5, -0.5) and fr.exact
    m = feats["1"][0, 0]
    ys, xs = torch.meshgrid(torch.arange(24.0, dtype=torch.float64), torch.arange(24.0, dtype=torch.float64),
                            indexing="ij")
    qx, qy = float((m * xs).sum() / m.sum()), float((m * ys).sum() / m.sum())
    assert fr.stride[0] * qx + fr.offset[0] == pytest.approx(12.0, abs=1e-9)
    assert fr.stride[1] * qy + fr.offset[1] == pytest.approx(10.0, abs=1e-9)


class _TinyUNet(nn.Module):
    """A U-Net step: a skip branch at full resolution concatenated with a downsampled, then
    nearest-upsampled branch (whose grid is only approximately the skip's)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        e = self.enc(x)
        return self.dec(torch.cat([e, self.up(self.down(e))], 1))


def test_a_merge_with_an_untraced_or_approximate_branch_has_no_exact_frame():
    """The concatenation of the skip branch with the upsampled branch is not labelled with the skip
    branch's frame as if exact: the nearest upsampling's frame is approximate, so the merge (and
    what follows) is marked not exact; with the upsampling untraced (a custom op), the merge gets
    no traced frame at all."""
    x = torch.rand(2, 1, 16, 16)
    _, frames = extract_features(_TinyUNet(), x, "enc,up,dec")
    assert frames["enc"].exact and not frames["up"].exact and not frames["dec"].exact

    class Rolled(_TinyUNet):
        def forward(self, x):
            e = self.enc(x)
            return self.dec(torch.cat([e, torch.roll(e, 1, dims=-1)], 1))  # an op of unknown frame

    _, frames = extract_features(Rolled(), x, "enc,dec")
    assert frames["enc"].exact and not frames["dec"].exact and frames["dec"].rf_radius is None


class _AvgPoolShortcut(nn.Module):
    """timm resnet18d's downsampling block: main branch conv 3x3 stride 2 (pixel i at 2i), shortcut
    average pool 2x2 stride 2 (pixel i at 2i + 1/2) then 1x1 conv, merged by an in-place add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(2, 2)
        self.proj = nn.Conv2d(2, 4, 1)
        self.merge = nn.Identity()

    def forward(self, x):
        out = self.conv(x)
        out += self.proj(self.pool(x))
        return self.merge(out)


def test_an_in_place_merge_of_two_grids_has_no_single_frame():
    """The branches' grids differ by half a pixel, so the sum has no single frame; before the fix
    the in-place add kept the main branch's exact frame (offset 0)."""
    _, frames = extract_features(_AvgPoolShortcut(), torch.rand(2, 2, 16, 16), "conv,proj,merge")
    assert frames["conv"].exact and frames["conv"].offset == (0.0, 0.0)
    assert frames["proj"].exact and frames["proj"].offset == (0.5, 0.5)
    assert not frames["merge"].exact


class _TinyViT(nn.Module):
    """Patch embedding (a traced 4 x 4 stride-4 conv), tokens, and an attention whose query heads
    ``(B, heads, tokens, dims)`` are a 4-D module output without a spatial frame."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.proj = nn.Conv2d(3, d, 4, 4)
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm = nn.Identity()
        self.heads = heads

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        b, n, c = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q_norm(q)
        return ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


def test_attention_heads_are_not_feature_maps():
    """A ViT's (B, heads, tokens, dims) outputs are left out of "all" (listed in not_maps) and refused
    by name; before the fix they were measured as 16 x 8 "maps" with an assumed frame."""
    ex = FeatureExtractor(_TinyViT(), "all")
    feats, frames = ex(torch.rand(2, 3, 16, 16))
    assert list(feats) == ["proj"] and frames["proj"].exact
    assert ex.not_maps == {"q_norm": (2, 2, 16, 8)}
    with pytest.raises(ValueError, match="layer 'q_norm' output .* is not a spatial feature map"):
        extract_features(_TinyViT(), torch.rand(2, 3, 16, 16), "q_norm")
