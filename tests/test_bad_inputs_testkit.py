"""Bad inputs to the test kit (:mod:`invariance.testing`), one test per class: each ends with a
one-line ``TypeError`` / ``ValueError`` that names the argument and the valid range, raised
where the mistake is made (a strategy when it is built, an assertion before it measures
anything), never with a traceback from deep inside hypothesis, torch or the search, and never
with a verdict.

Everything is small (16 x 16 float64 images, a 4-channel circular convolution) so the module
runs in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from invariance import testing as it

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)

HERE = Path(__file__).resolve()
KIT = Path(it.__file__).resolve()


def circular_net() -> nn.Module:
    """Exactly translation covariant: a circular convolution commutes with every integer shift
    (the same sums, in the same order, at shifted positions)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular")).double()


def images(n: int = 2) -> torch.Tensor:
    return it.example_images(n, 16, dtype=torch.float64)


class MustNotRun(nn.Module):
    """A model whose forward pass fails loudly: an argument error must come before any measurement."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1).double()

    def forward(self, x):
        raise RuntimeError("the model ran: the arguments were not checked first")


class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1).double()

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean((-2, -1))


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1).double()

    def forward(self, x):
        return {"logits": self.conv(x).mean((-2, -1))}


class Pair(nn.Module):
    """A submodule that returns a tuple (as an attention block or an LSTM does)."""

    def forward(self, x):
        return x, x


class WithTupleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1).double()
        self.pair = Pair()
        self.flat = nn.Flatten()

    def forward(self, x):
        a, b = self.pair(self.conv(x))
        return self.flat(a + b)


class ReturnsScalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1).double()

    def forward(self, x):
        return self.conv(x).sum()  # a loss, not one output per image


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- 1. strategies


NAN, INF = float("nan"), float("inf")

BAD_STRATEGIES = [
    # (id, factory, error type, words the message must contain)
    ("rotations reversed", lambda: it.rotations(10, -10), ValueError, ["max_angle:", ">= min_angle (10)", "-10"]),
    ("rotations nan bound", lambda: it.rotations(NAN, 10), ValueError, ["min_angle:", "finite", "nan"]),
    ("rotations infinite bound", lambda: it.rotations(-INF, 10), ValueError, ["min_angle:", "finite", "inf"]),
    ("rotations negative min_abs", lambda: it.rotations(min_abs=-1), ValueError, ["min_abs:", "[0, 180)"]),
    ("rotations min_abs out of range", lambda: it.rotations(min_abs=200), ValueError, ["min_abs:", "[0, 180)"]),
    ("rotations min_abs unreachable", lambda: it.rotations(-10, 10, min_abs=20), ValueError,
     ["min_abs:", "no angle in [-10, 10]", "20"]),
    ("rotations min_abs unreachable mod 360", lambda: it.rotations(350, 370, min_abs=20), ValueError,
     ["min_abs:", "mod 360"]),
    ("scalings reversed", lambda: it.scalings(1, -1), ValueError, ["max_log2:", ">= min_log2 (1)"]),
    ("scalings infinite bound", lambda: it.scalings(-1, INF), ValueError, ["max_log2:", "finite", "-1022..1023"]),
    ("scalings overflowing bound", lambda: it.scalings(-1, 2000), ValueError, ["max_log2:", "-1022..1023"]),
    ("scalings min_abs unreachable", lambda: it.scalings(-0.5, 0.5, min_abs_log2=1), ValueError,
     ["min_abs_log2:", "no u in [-0.5, 0.5]"]),
    ("scalings zero factor", lambda: it.scalings(values=[2.0, 0.0]), ValueError, ["values[1]:", "> 0"]),
    ("scalings negative factor", lambda: it.scalings(values=[-1.0]), ValueError, ["values[0]:", "> 0"]),
    ("scalings no factor", lambda: it.scalings(values=[]), ValueError, ["values:", "non-empty"]),
    ("translations negative", lambda: it.translations(-1), ValueError, ["max_shift:", ">= 0", "-1"]),
    ("translations nan", lambda: it.translations(NAN), ValueError, ["max_shift:", "finite", "nan"]),
    ("translations negative float", lambda: it.translations(-1, integer=False), ValueError, ["max_shift:", ">= 0"]),
    ("transformations unknown family", lambda: it.transformations("spiral"), ValueError,
     ["family:", "rigid", "'spiral'"]),
    ("transformations negative shift", lambda: it.transformations("rigid", max_shift=-1), ValueError,
     ["max_shift:", ">= 0"]),
    ("transformations negative log2", lambda: it.transformations("similarity", max_log2=-1), ValueError,
     ["max_log2:", "0..1023"]),
    ("transformations singular affine", lambda: it.transformations("affine", max_deform=0.7), ValueError,
     ["max_deform:", "[0, 0.5)", "1 - 2 max_deform"]),
    ("transformations unknown option", lambda: it.transformations("rigid", max_angle=10), TypeError,
     ["max_angle:", "family 'rigid'", "max_shift"]),
    ("image_sizes reversed", lambda: it.image_sizes(40, 10), ValueError, ["max_size:", ">= min_size (40)", "10"]),
    ("image_sizes zero", lambda: it.image_sizes(0, 0), ValueError, ["min_size:", ">= 1", "0"]),
    ("image_sizes negative", lambda: it.image_sizes(-3, 5), ValueError, ["min_size:", ">= 1"]),
    ("image_sizes fractional", lambda: it.image_sizes(1.5, 5), TypeError, ["min_size:", "integer"]),
    ("image_sizes unknown parity", lambda: it.image_sizes(10, 20, parity="prime"), ValueError,
     ["parity:", "'odd', 'even' or None"]),
    ("image_sizes parity not in range", lambda: it.image_sizes(10, 10, parity="odd"), ValueError,
     ["parity:", "no odd size in [10, 10]"]),
    ("dtypes integer", lambda: it.dtypes(torch.float32, torch.int64), TypeError, ["choices:", "torch.int64", "float"]),
    ("dtypes not a dtype", lambda: it.dtypes("float32"), TypeError, ["choices:", "str"]),
    ("images batch 0", lambda: it.images(0), ValueError, ["batch:", ">= 1", "0"]),
    ("images batch range reversed", lambda: it.images((3, 1)), ValueError, ["batch[1]:", ">= batch[0] (3)"]),
    ("images batch range from 0", lambda: it.images((0, 2)), ValueError, ["batch[0]:", ">= 1"]),
    ("images channels 0", lambda: it.images(channels=0), ValueError, ["channels:", ">= 1"]),
    ("images integer dtype", lambda: it.images(dtype=torch.int32), TypeError, ["dtype:", "torch.int32", "float"]),
    ("images sizes not a strategy", lambda: it.images(sizes=(16, 16)), TypeError, ["sizes:", "strategy", "tuple"]),
    ("images zero sizes", lambda: it.images(sizes=it.image_sizes(0, 0)), ValueError, ["min_size:", ">= 1"]),
    ("images content_radius 0", lambda: it.images(content_radius=0), ValueError, ["content_radius:", "(0, 1]"]),
    ("images content_radius nan", lambda: it.images(content_radius=NAN), ValueError, ["content_radius:", "(0, 1]"]),
    ("images sigma 0", lambda: it.images(sigma_range=(0, 1)), ValueError, ["sigma_range[0]:", "> 0"]),
    ("images sigma reversed", lambda: it.images(sigma_range=(3, 1)), ValueError,
     ["sigma_range[1]:", ">= sigma_range[0] (3)"]),
    ("example_images size 0 (was ZeroDivisionError)", lambda: it.example_images(2, 0), ValueError,
     ["size:", ">= 1"]),
    ("example_images negative size", lambda: it.example_images(2, (-3, 4)), ValueError, ["size:", "positive"]),
    ("example_images no images", lambda: it.example_images(0), ValueError, ["n:", ">= 1"]),
    ("example_images integer dtype", lambda: it.example_images(2, 16, dtype=torch.int64), TypeError,
     ["dtype:", "torch.int64"]),
]


@pytest.mark.parametrize("factory, error, words", [c[1:] for c in BAD_STRATEGIES], ids=[c[0] for c in BAD_STRATEGIES])
def test_strategies_refuse_bad_ranges_when_built(factory, error, words):
    """Building the strategy (no draw: ``factory`` only builds) raises a one-line error naming the
    argument and its valid range. Before, most of these were built silently and failed at the
    first draw, inside hypothesis (``InvalidArgument``, ``Unsatisfiable``, ``OverflowError``, a
    ``ZeroDivisionError`` in the image generator), or drew invalid values (zero-sized images,
    integer dtypes, singular affine maps)."""
    with pytest.raises(error) as exc:
        factory()
    msg = one_line(exc)
    for word in words:
        assert word in msg, (word, msg)


@settings(max_examples=15, deadline=None)
@given(odd=it.image_sizes(11, 11, parity="odd"), turn=it.rotations(170, 190, min_abs=175),
       shift=it.translations(0), affine=it.transformations("affine", max_deform=0.45),
       x=it.images(batch=(2, 2), channels=2, sizes=it.image_sizes(1, 3), sigma_range=(1.0, 1.0)))
def test_strategies_accept_the_edges_of_their_ranges(odd, turn, shift, affine, x):
    """The checks refuse only what is empty or invalid: a one-value size range of the right parity,
    a rotation range whose allowed part is [175, 185] (|angle| wrapped to (-180, 180] >= 175), a
    zero shift, ``max_deform`` just below 0.5 (determinant of ``1 + D``, ``|D_ij| <= 0.45``, at
    least ``(1 - 0.45)^2 - 0.45^2 = 1 - 2 * 0.45 = 0.1``), 1 px images, equal sigma bounds."""
    assert odd == (11, 11)
    a = turn.params[0]
    assert 170 <= a <= 190 and abs(180.0 - (180.0 - a) % 360.0) >= 175
    assert shift.params == (0.0, 0.0)
    assert float(torch.det(affine.matrix((32, 32))[:2, :2])) >= 0.1 - 1e-12
    assert x.shape[:2] == (2, 2) and 1 <= x.shape[-1] <= 3 and bool(torch.isfinite(x).all())


# ----------------------------------------------------------------------------- 2. tolerances


def test_a_negative_margin_is_refused_not_passed():
    """``assert_not_spatially_alignable`` requires ``spatial > max(margin * allowed, min_error)``.
    A circular convolution under an integer shift aligns exactly: in float32 its spatial error is
    rounding (~1e-14 here), below ``ATOL[float32] = 1e-6`` (relative precision 1e-3, squared;
    module docstring) but above 0. With ``margin = -1`` the requirement became
    ``spatial > max(-allowed, 0) = 0``, which that rounding meets, so the assertion *passed* on an
    exactly alignable layer. A margin below 1 breaks the documented gap between the two verdicts
    (a layer could pass both), so it must be refused, by name, with the valid range."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="circular"))
    x = it.example_images(2, 16)
    errs = it.assert_spatially_alignable(net, x, "translation:2,-1", "0")  # the known answer: alignable
    assert float(errs.spatial.max()) <= it.ATOL[torch.float32]
    with pytest.raises(ValueError) as exc:
        it.assert_not_spatially_alignable(net, x, "translation:2,-1", "0", margin=-1)
    msg = one_line(exc)
    assert msg.startswith("margin:") and ">= 1" in msg and "-1" in msg
    with pytest.raises(ValueError, match=r"^margin: .*>= 1.*0\.5"):
        it.assert_not_spatially_alignable(net, x, "translation:2,-1", "0", margin=0.5)
    # the smallest valid margin gives the right verdict on this layer: alignable, so it fails
    with pytest.raises(AssertionError, match="spatially alignable \\(expected not to be\\)"):
        it.assert_not_spatially_alignable(net, x, "translation:2,-1", "0", margin=1)


BAD_TOLERANCES = [
    ("rtol", NAN, "rtol:"), ("rtol", INF, "rtol:"), ("rtol", -2.0, "rtol:"),
    ("atol", NAN, "atol:"), ("atol", INF, "atol:"), ("atol", -1.0, "atol:"),
]


@pytest.mark.parametrize("name, value, start", BAD_TOLERANCES, ids=[f"{n}={v}" for n, v, _ in BAD_TOLERANCES])
def test_assertions_refuse_nan_infinite_and_negative_tolerances(name, value, start):
    """``allowed = floor * (1 + rtol) + atol``: an infinite tolerance passes every layer, NaN fails
    every layer (NaN compares false), and a negative one fails a layer that aligns exactly (its
    error is 0 and the floor is 0 under an integer shift). Each is refused, by name, before the
    model runs (``MustNotRun``); the range is stated (finite, >= 0)."""
    x = images(1)
    calls = [
        lambda: it.assert_spatially_alignable(MustNotRun(), x, "translation:1,0", "conv", **{name: value}),
        lambda: it.assert_not_spatially_alignable(MustNotRun(), x, "rotation:45", "conv", **{name: value}),
        lambda: it.assert_invariant(MustNotRun(), x, "rotation:90", **{name: value}),
    ]
    for call in calls:
        with pytest.raises(ValueError) as exc:
            call()
        msg = one_line(exc)
        assert msg.startswith(start) and "finite" in msg and ">= 0" in msg, msg


def test_margin_and_min_error_and_allowed_refuse_nonsense():
    """``margin`` NaN or infinite, ``min_error`` NaN or negative (an error is a ratio of energies,
    >= 0), and :meth:`AlignmentErrors.allowed` with a NaN ``rtol`` are refused by name; an
    infinite ``min_error`` would fail every layer and is refused too."""
    x = images(1)
    for kw, start in [({"margin": NAN}, "margin:"), ({"margin": INF}, "margin:"), ({"min_error": NAN}, "min_error:"),
                      ({"min_error": -0.1}, "min_error:"), ({"min_error": INF}, "min_error:")]:
        with pytest.raises(ValueError) as exc:
            it.assert_not_spatially_alignable(MustNotRun(), x, "rotation:45", "conv", **kw)
        msg = one_line(exc)
        assert msg.startswith(start) and "finite" in msg, msg
    errs = it.alignment_errors(circular_net(), images(1), "translation:1,0", "0")
    with pytest.raises(ValueError, match=r"^rtol: must be a finite number >= 0, got nan$"):
        errs.allowed(rtol=NAN)
    with pytest.raises(ValueError, match=r"^atol: must be a finite number >= 0, got -1"):
        errs.allowed(atol=-1.0)
    for call in (lambda: it.alignment_errors(MustNotRun(), x, "rotation:45", "conv", mask_radius=-1.0),
                 lambda: it.interpolation_floor(x, "rotation:45", mask_radius=NAN)):
        with pytest.raises(ValueError) as exc:
            call()
        assert one_line(exc).startswith("mask_radius:") and "> 0" in str(exc.value)


# ----------------------------------------------------------------------------- 3. models and layers


def test_models_and_layers_that_do_not_return_one_tensor_are_named():
    """A model whose output is a tuple or a dict (``assert_invariant`` without ``layer``), a layer
    whose module returns a tuple or a flat vector, an output without the batch dimension, and a
    layer name the model does not have: one line naming ``model`` or ``layer``, the model's
    class and what came back (its type), instead of ``AttributeError: 'tuple' object has no
    attribute 'reshape'`` or the feature extractor's ``layers:`` error."""
    x = images(1)
    with pytest.raises(TypeError) as exc:
        it.assert_invariant(ReturnsTuple(), x, "rotation:90")
    msg = one_line(exc)
    assert msg.startswith("model: ReturnsTuple returned a tuple of 2") and "layer=" in msg
    with pytest.raises(TypeError) as exc:
        it.assert_invariant(ReturnsDict(), x, "rotation:90")
    msg = one_line(exc)
    assert msg.startswith("model: ReturnsDict returned a dict") and "'logits'" in msg
    with pytest.raises(ValueError) as exc:
        it.assert_invariant(ReturnsScalar(), x, "rotation:90")
    msg = one_line(exc)
    assert msg.startswith("model: ReturnsScalar") and "shape ()" in msg and "batch" in msg

    for call in (lambda: it.alignment_errors(WithTupleLayer(), x, "rotation:90", "pair"),
                 lambda: it.assert_spatially_alignable(WithTupleLayer(), x, "rotation:90", "pair"),
                 lambda: it.assert_invariant(WithTupleLayer(), x, "rotation:90", layer="pair"),
                 lambda: it.border_band(WithTupleLayer(), "pair", x)):
        with pytest.raises(TypeError) as exc:
            call()
        msg = one_line(exc)
        assert msg.startswith("layer: module 'pair' of WithTupleLayer returned a tuple of 2"), msg
        assert "(B, C, H, W)" in msg
    with pytest.raises(ValueError) as exc:
        it.alignment_errors(WithTupleLayer(), x, "rotation:90", "flat")
    msg = one_line(exc)
    assert msg.startswith("layer: module 'flat'") and "shape (2, 512)" in msg and "(B, C, H, W)" in msg

    for call in (lambda: it.alignment_errors(circular_net(), x, "rotation:90", "conv9"),
                 lambda: it.assert_invariant(circular_net(), x, "rotation:90", layer="conv9"),
                 lambda: it.border_band(circular_net(), "conv9", x)):
        with pytest.raises(ValueError) as exc:
            call()
        msg = one_line(exc)
        assert msg.startswith("layer: Sequential has no module named 'conv9'"), msg
        assert "valid choices: input, 0" in msg
    with pytest.raises(TypeError) as exc:
        it.alignment_errors(circular_net(), x, "rotation:90", 0)
    msg = one_line(exc)
    assert msg.startswith("layer:") and "str" in msg and "int" in msg
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got function$"):
        it.assert_spatially_alignable(lambda t: t, x, "rotation:90", "0")


INFINITESIMAL = [it.assert_infinitesimally_alignable, it.assert_infinitesimally_covariant]
BAD_LIE_ARGUMENTS = [
    # (id, keyword arguments, error type, the message's start, words it must contain)
    ("max_share nan", {"max_share": NAN}, ValueError, "max_share:", ["finite", ">= 0"]),
    ("max_share infinite", {"max_share": INF}, ValueError, "max_share:", ["finite", ">= 0"]),
    ("max_share negative", {"max_share": -0.1}, ValueError, "max_share:", [">= 0", "-0.1"]),
    ("atol negative", {"atol": -1.0}, ValueError, "atol:", ["finite", ">= 0"]),
    ("atol nan", {"atol": NAN}, ValueError, "atol:", ["finite"]),
    ("unknown option", {"config": None}, TypeError, "config:",
     ["not an option of assert_infinitesimally_covariant", "valid choices: search, mask_radius, interior"]),
    ("calibrate off", {"calibrate": False}, TypeError, "calibrate:", ["grid floor", "valid choices"]),
    ("unknown search", {"search": "spiral"}, ValueError, "search:", ["'spiral'", "valid choices", "rigid"]),
    ("negative mask_radius", {"mask_radius": -1.0}, ValueError, "mask_radius:", ["> 0"]),
]


@pytest.mark.parametrize("kwargs, error, start, words", [c[1:] for c in BAD_LIE_ARGUMENTS],
                         ids=[c[0] for c in BAD_LIE_ARGUMENTS])
def test_the_infinitesimal_assertions_refuse_bad_arguments_before_running(kwargs, error, start, words):
    """``assert_infinitesimally_covariant`` bounds ``s² <= max_share * r² + atol``: a NaN or infinite
    tolerance passes or fails every layer, a negative one fails an exactly covariant layer (its
    ``s²`` is 0). Options other than those of the Lie derivative's region and search are named
    (``calibrate=False`` would drop the grid floor and ``s²`` the assertion compares), as are an
    unknown search family and a bad mask radius: each a one-line error, before the model runs
    (``MustNotRun``)."""
    with pytest.raises(error) as exc:
        it.assert_infinitesimally_covariant(MustNotRun(), images(1), "rotation:5", "conv", **kwargs)
    msg = one_line(exc)
    assert msg.startswith(start), msg
    for word in words:
        assert word in msg, (word, msg)
    if start in ("config:", "calibrate:", "search:", "mask_radius:"):  # the shared checks: the same for both
        with pytest.raises(error) as exc:
            it.assert_infinitesimally_alignable(MustNotRun(), images(1), "rotation:5", "conv", **kwargs)
        assert one_line(exc).startswith(start)


def test_the_infinitesimal_assertions_name_bad_models_layers_and_transformations():
    """A layer the model does not have, a layer that does not return one ``(B, C, H, W)`` tensor, a
    model whose dtype differs from the images', a SPEC with two transformations and a reflection
    (no real logarithm): one line naming ``layer``, ``images`` or ``transform``, as in the rest of
    the kit, never a verdict."""
    x = images(1)
    cases = [  # (model, images, transform, layer), the error, the start of its one line
        ((circular_net(), x, "rotation:5", "conv9"), ValueError,
         "layer: Sequential has no module named 'conv9'; valid choices: input, 0"),
        ((WithTupleLayer(), x, "rotation:5", "pair"), TypeError,
         "layer: module 'pair' of WithTupleLayer returned a tuple of 2"),
        ((circular_net(), x.float(), "rotation:5", "0"), TypeError,
         "images: dtype torch.float32 differs from the model's parameters"),
        ((circular_net(), x, "rotation:5;rotation:10", "0"), ValueError,
         "transform: expected one transformation, got 2"),
        ((circular_net(), x, "affine:-1,0,0,0,1,0", "0"), ValueError, "transform: a reflection"),
    ]
    for fn in INFINITESIMAL:
        for args, error, start in cases:
            with pytest.raises(error) as exc:
                fn(*args)
            assert one_line(exc).startswith(start)


@pytest.mark.parametrize("fn, tolerance", [(it.assert_infinitesimally_alignable, "rtol"),
                                           (it.assert_infinitesimally_covariant, "max_share")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_the_infinitesimal_assertions_hide_their_frames(fn, tolerance):
    """As the other assertions: pytest shows the caller's line for an argument error, and for a
    failure, not the kit's internals."""
    with pytest.raises(ValueError) as exc:
        fn(MustNotRun(), images(1), "rotation:5", "conv", **{tolerance: -1.0})
    assert _kit_frames(exc) == []
    with pytest.raises(AssertionError) as exc:  # rotating generic filters: not covariant, not at its floor
        fn(circular_net(), images(2), "rotation:5", "0", **{tolerance: 0.0})
    assert _kit_frames(exc) == []


# ----------------------------------------------------------------------------- 4. images


BAD_IMAGES = [
    ("list", [[0.0]], TypeError, ["images:", "torch.Tensor", "list"]),
    ("numpy", np.zeros((1, 1, 16, 16)), TypeError, ["images:", "torch.Tensor", "ndarray"]),
    ("integer", torch.zeros(1, 1, 16, 16, dtype=torch.int64), TypeError, ["images:", "floating-point", "int64"]),
    ("3-D", torch.zeros(1, 16, 16, dtype=torch.float64), ValueError, ["images:", "(B, C, H, W)", "(1, 16, 16)"]),
    ("5-D", torch.zeros(1, 1, 1, 16, 16, dtype=torch.float64), ValueError, ["images:", "(B, C, H, W)"]),
    ("NaN", torch.full((1, 1, 16, 16), float("nan"), dtype=torch.float64), ValueError, ["images:", "NaN"]),
]


@pytest.mark.parametrize("bad, error, words", [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES])
def test_images_that_are_not_float_bchw_tensors_are_named(bad, error, words):
    """Every entry point of the kit that takes ``images`` refuses a non-tensor, an integer tensor
    (integer pixels would be truncated by the warp), a tensor that is not 4-D or one with NaN
    with a one-line error naming ``images`` (``TypeError`` for the type, ``ValueError`` for the
    shape or values). Before, ``interpolation_floor`` and ``border_band`` failed with
    ``AttributeError: 'list' object has no attribute 'shape'``, integer images read as a shape
    error and NaN images were blamed on the search's ``reference``."""
    net = circular_net()
    calls = [
        lambda: it.alignment_errors(net, bad, "rotation:90", "0"),
        lambda: it.assert_spatially_alignable(net, bad, "rotation:90", "0"),
        lambda: it.assert_not_spatially_alignable(net, bad, "rotation:90", "0"),
        lambda: it.assert_invariant(net, bad, "rotation:90"),
        lambda: it.interpolation_floor(bad, "rotation:90"),
        lambda: it.border_band(net, "0", bad),
        lambda: it.assert_infinitesimally_alignable(net, bad, "rotation:5", "0"),
        lambda: it.assert_infinitesimally_covariant(net, bad, "rotation:5", "0"),
    ]
    for call in calls:
        with pytest.raises(error) as exc:
            call()
        msg = one_line(exc)
        for word in words:
            assert word in msg, (word, msg)


def test_transformed_images_must_match_the_images():
    """``transformed`` (images transformed some other way) is compared position by position with
    ``images``: a non-tensor, another shape or another dtype is refused by name."""
    x = images(2)
    net = circular_net()
    with pytest.raises(TypeError) as exc:
        it.alignment_errors(net, x, "translation:1,0", "0", transformed=[1.0])
    assert one_line(exc).startswith("transformed:") and "list" in str(exc.value)
    with pytest.raises(ValueError) as exc:
        it.assert_invariant(net, x, "translation:1,0", transformed=x[:1])
    assert one_line(exc).startswith("transformed: shape (1, 1, 16, 16)")
    with pytest.raises(TypeError) as exc:
        it.interpolation_floor(x, "translation:1,0", transformed=x.float())
    assert one_line(exc).startswith("transformed: dtype torch.float32")


# ----------------------------------------------------------------------------- 5. tracebacks and messages


def _kit_frames(exc: pytest.ExceptionInfo) -> list[str]:
    """The frames of ``invariance/testing.py`` that pytest would show (``__tracebackhide__`` applied)."""
    return [str(e.path) for e in exc.traceback.filter(exc) if Path(str(e.path)).resolve() == KIT]


@pytest.mark.parametrize("fn", [it.assert_spatially_alignable, it.assert_not_spatially_alignable,
                                it.assert_invariant], ids=lambda f: f.__name__)
def test_assertions_hide_their_frames(fn):
    """Each public assertion sets ``__tracebackhide__ = True`` in its frame (read from the frame of
    a call that raised), so pytest shows the caller's line, not the kit's internals."""
    with pytest.raises(ValueError) as exc:
        fn(MustNotRun(), images(1), "rotation:90", "conv", rtol=-1.0)
    frames = [e.frame for e in exc.traceback if e.frame.code.name == fn.__name__]
    assert len(frames) == 1 and frames[0].f_locals.get("__tracebackhide__") is True
    assert _kit_frames(exc) == []


def test_failures_show_the_measured_error_the_bound_and_its_derivation():
    """A failing assertion (the circular convolution is covariant, so rotating generic filters by
    90 degrees is not undone by any warp, and a shift is not invariance) prints the measured error
    and the bound per image, says how the bound is made (the formula, rtol, atol and where atol
    came from, what the floor is), and pytest shows no frame of the kit; the same for an argument
    error raised before measuring."""
    net, x = circular_net(), images(1)
    with pytest.raises(AssertionError) as exc:
        it.assert_spatially_alignable(net, x, "rotation:90", "0")
    msg = str(exc.value)
    errs = it.alignment_errors(net, x, "rotation:90", "0")
    assert f"{float(errs.spatial[0]):.4g}" in msg and f"{float(errs.allowed()[0]):.4g}" in msg
    for word in ("allowed = floor * (1 + rtol) + atol", "rtol=1", "atol=1e-12 (ATOL[float64]",
                 "floor = the same search on the images themselves"):
        assert word in msg, word
    assert _kit_frames(exc) == []

    with pytest.raises(AssertionError) as exc:
        it.assert_not_spatially_alignable(net, x, "translation:2,-1", "0", atol=1e-9)
    msg = str(exc.value)
    for word in ("required = max(margin * (floor * (1 + rtol) + atol), min_error)", "margin=2", "rtol=1",
                 "atol=1e-09 (given)", "min_error=0", "floor = the same search"):
        assert word in msg, word
    assert _kit_frames(exc) == []

    with pytest.raises(AssertionError) as exc:
        it.assert_invariant(net, x, "translation:2,-1")
    msg = str(exc.value)
    for word in ("invariance = ||G(T x) - G(x)||^2 / ||G(x)||^2", "allowed = floor * (1 + rtol) + atol",
                 "atol=1e-12 (ATOL[float64]", "floor = the same search", "<- FAILS"):
        assert word in msg, word
    assert _kit_frames(exc) == []

    for call in (lambda: it.assert_not_spatially_alignable(net, x, "translation:2,-1", "0", margin=-1),
                 lambda: it.assert_spatially_alignable(net, x, "translation:2,-1", "nope"),
                 lambda: it.assert_invariant(ReturnsTuple(), x, "rotation:90")):
        with pytest.raises((TypeError, ValueError)) as exc:
            call()
        assert _kit_frames(exc) == [], str(exc.value)
        assert Path(str(exc.traceback.filter(exc)[0].path)).resolve() == HERE


def test_the_alignable_bound_is_the_documented_formula():
    """``allowed()`` is ``floor * (1 + rtol) + atol`` exactly (float64), with ``atol`` from
    :data:`ATOL` of the images' dtype when not given: the number the failure message prints."""
    errs = it.alignment_errors(circular_net(), images(1), "rotation:90", "0")
    floor = float(errs.floor[0])
    assert float(errs.allowed()[0]) == floor * 2 + it.ATOL[torch.float64]
    assert float(errs.allowed(0.5, 0.0)[0]) == floor * 1.5
    assert math.isfinite(float(errs.spatial[0]))
