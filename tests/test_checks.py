"""Laws of :mod:`invariance.checks`, the argument checks every module shares.

Each check accepts exactly the values its docstring names and returns them normalised (``int``,
``float``, ``(h, w)`` of ints, a ``torch.device``); anything else raises ``TypeError`` (wrong type)
or ``ValueError`` (wrong value) with a one-line message that starts with the argument's name and
states the valid range or choices. Where the rule is a law over a set of values (every integer in
range, every finite float, every string that is not a device name) it is checked with hypothesis;
the messages are pinned exactly where the range text is simple to state. No tolerance is involved:
every comparison is exact.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from invariance.checks import (
    SEED_MAX,
    check_finite,
    check_float,
    check_images,
    check_int,
    check_matrix,
    check_model_channels,
    check_number,
    check_seed,
    check_size,
    resolve_device,
)

names = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
bounds = st.none() | st.integers(-1000, 1000)
# values that are not numbers at all (bools are ints to Python, so they are listed separately)
not_numbers = st.one_of(st.text(max_size=8), st.none(), st.lists(st.integers(), max_size=3),
                        st.binary(max_size=4), st.just(object()), st.just(1 + 2j))
bools = st.sampled_from([True, False, np.True_, np.False_])


def message(info: pytest.ExceptionInfo, name: str) -> str:
    """The error's message, checked to be one line that starts with ``name: ``."""
    text = str(info.value)
    assert "\n" not in text, text
    assert text.startswith(f"{name}: "), text
    return text


def range_text(lo: int | None, hi: int | None) -> str:
    """How the checks state integer bounds: `` in lo..hi``, `` >= lo``, `` <= hi`` or nothing."""
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def inside(v, lo, hi) -> bool:
    return (lo is None or v >= lo) and (hi is None or v <= hi)


# ----------------------------------------------------------------------------- check_int


@given(v=st.integers(), lo=bounds, hi=bounds, name=names)
def test_check_int_accepts_exactly_the_integers_in_range(v, lo, hi, name):
    """Any integer: returned as itself (an ``int``) iff ``lo <= v <= hi``, else a ``ValueError`` that
    states the range and the value."""
    if inside(v, lo, hi):
        got = check_int(v, name, minimum=lo, maximum=hi)
        assert got == v and type(got) is int
        return
    with pytest.raises(ValueError) as info:
        check_int(v, name, minimum=lo, maximum=hi)
    assert message(info, name) == f"{name}: must be an integer{range_text(lo, hi)}, got {v}"


@given(v=st.integers(-(2**31), 2**31 - 1), kind=st.sampled_from(["numpy-int64", "numpy-int32", "tensor-int64",
                                                                 "tensor-int32", "tensor-uint8"]))
def test_check_int_normalises_integer_scalars_to_int(v, kind):
    """numpy integers and 0-d integer tensors are integers: returned as the same ``int``."""
    if kind == "tensor-uint8":
        v = v % 256
    value = {"numpy-int64": np.int64, "numpy-int32": np.int32,
             "tensor-int64": lambda x: torch.tensor(x, dtype=torch.int64),
             "tensor-int32": lambda x: torch.tensor(x, dtype=torch.int32),
             "tensor-uint8": lambda x: torch.tensor(x, dtype=torch.uint8)}[kind](v)
    got = check_int(value, "n")
    assert got == v and type(got) is int


@given(v=st.one_of(bools, st.floats(allow_nan=True, allow_infinity=True), not_numbers), lo=bounds, hi=bounds,
       name=names)
def test_check_int_rejects_everything_else_with_a_type_error(v, lo, hi, name):
    """Bools, floats (``3.0``, NaN and inf included), strings, None, lists, complex: ``TypeError``,
    even when the value would be in range as a number."""
    with pytest.raises(TypeError) as info:
        check_int(v, name, minimum=lo, maximum=hi)
    assert message(info, name) == f"{name}: must be an integer{range_text(lo, hi)}, got {v!r}"


def test_check_int_rejects_float_tensors_and_integral_floats():
    for v in (3.0, torch.tensor(3.0), np.float64(3.0), torch.tensor([3])):
        with pytest.raises(TypeError, match=r"^n: must be an integer >= 1, got "):
            check_int(v, "n", minimum=1)


def test_check_int_docstring_known_answers():
    assert check_int(3, "n_boot", minimum=1) == 3
    with pytest.raises(ValueError, match=r"^n_boot: must be an integer >= 1, got 0$"):
        check_int(0, "n_boot", minimum=1)


# ----------------------------------------------------------------------------- check_number


finite = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**15), 10**15)


@given(v=finite, lo=bounds, hi=bounds, positive=st.booleans())
def test_check_number_accepts_exactly_the_finite_numbers_in_range(v, lo, hi, positive):
    """Any finite real (float or int): returned as ``float(v)`` iff ``lo <= v <= hi`` and, with
    ``positive``, ``v > 0``; otherwise a ``ValueError``."""
    ok = inside(v, lo, hi) and (not positive or v > 0)
    if ok:
        got = check_number(v, "x", minimum=lo, maximum=hi, positive=positive)
        assert got == float(v) and type(got) is float
        return
    with pytest.raises(ValueError) as info:
        check_number(v, "x", minimum=lo, maximum=hi, positive=positive)
    assert message(info, "x").endswith(f", got {float(v)!r}")


@given(v=finite, lo=bounds, hi=bounds, name=names)
def test_check_number_states_its_bounds(v, lo, hi, name):
    """The message of a value out of ``[lo, hi]`` states the bounds (integers as written)."""
    if inside(v, lo, hi):
        return
    with pytest.raises(ValueError) as info:
        check_number(v, name, minimum=lo, maximum=hi)
    assert message(info, name) == f"{name}: must be a finite number{range_text(lo, hi)}, got {float(v)!r}"


@given(v=finite, name=names)
def test_check_number_positive_states_greater_than_zero(v, name):
    if v > 0:
        assert check_number(v, name, positive=True) == float(v)
        return
    with pytest.raises(ValueError) as info:
        check_number(v, name, positive=True)
    assert message(info, name) == f"{name}: must be a finite number > 0, got {float(v)!r}"


@pytest.mark.parametrize("v", [math.nan, math.inf, -math.inf, np.float64("nan"), np.float32("inf"),
                               torch.tensor(math.nan), torch.tensor(-math.inf, dtype=torch.float64)])
@pytest.mark.parametrize("kw", [{}, {"minimum": -1e300, "maximum": 1e300}, {"positive": True}],
                         ids=["unbounded", "bounded", "positive"])
def test_check_number_rejects_nan_and_infinities_whatever_the_bounds(v, kw):
    with pytest.raises(ValueError) as info:
        check_number(v, "step", **kw)
    text = message(info, "step")
    assert text.startswith("step: must be a finite number") and text.endswith(("nan", "inf"))


@given(v=st.one_of(bools, not_numbers), name=names)
def test_check_number_rejects_bools_strings_and_non_numbers_with_a_type_error(v, name):
    with pytest.raises(TypeError) as info:
        check_number(v, name, minimum=0, maximum=1)
    assert message(info, name) == f"{name}: must be a number in 0..1, got {v!r}"


@given(v=st.floats(-1e6, 1e6) | st.integers(-(10**6), 10**6),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.int64]))
def test_check_number_reads_0d_tensors_and_numpy_scalars(v, dtype):
    """A 0-d tensor or a numpy scalar is its number: returned as the float of its value."""
    t = torch.tensor(v, dtype=dtype)
    assert check_number(t, "x") == float(t.item())
    assert check_number(np.float64(v), "x") == float(np.float64(v))


def test_check_number_rejects_a_0d_bool_tensor():
    with pytest.raises(TypeError, match=r"^flag: must be a number, got True$"):
        check_number(torch.tensor(True), "flag")


def test_check_number_known_answers():
    assert check_number(0.5, "min_overlap", minimum=0, maximum=1) == 0.5
    assert check_number(1, "min_overlap", minimum=0, maximum=1) == 1.0  # the bounds are inclusive
    with pytest.raises(ValueError, match=r"^min_overlap: must be a finite number in 0\.\.1, got 1\.5$"):
        check_number(1.5, "min_overlap", minimum=0, maximum=1)
    with pytest.raises(ValueError, match=r"^mask_radius: must be a finite number > 0, got nan$"):
        check_number(float("nan"), "mask_radius", positive=True)
    with pytest.raises(ValueError, match=r"^lr: must be a finite number >= 0\.5, got 0\.25$"):
        check_number(0.25, "lr", minimum=0.5)  # non-integer bounds as %g
    with pytest.raises(ValueError, match=r"^lr: must be a finite number <= 1e\+20, got 1e\+21$"):
        check_number(1e21, "lr", maximum=1e20)


# ----------------------------------------------------------------------------- check_seed


@given(seed=st.integers())
def test_check_seed_accepts_exactly_the_unsigned_32_bit_integers(seed):
    if 0 <= seed <= SEED_MAX:
        assert check_seed(seed) == seed
        return
    with pytest.raises(ValueError) as info:
        check_seed(seed)
    assert message(info, "seed") == f"seed: must be an integer in 0..4294967295, got {seed}"


def test_check_seed_bounds_names_and_types():
    assert SEED_MAX == 2**32 - 1
    assert check_seed(0) == 0 and check_seed(SEED_MAX) == SEED_MAX
    assert check_seed(np.uint32(SEED_MAX)) == SEED_MAX
    for bad in (-1, SEED_MAX + 1):
        with pytest.raises(ValueError, match=r"^data_seed: must be an integer in 0\.\.4294967295, got "):
            check_seed(bad, "data_seed")
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match=r"^seed: must be an integer in 0\.\.4294967295, got "):
            check_seed(bad)


# ----------------------------------------------------------------------------- resolve_device


def test_resolve_device_known_answers():
    assert resolve_device(None) is None  # follow the inputs
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert isinstance(resolve_device("cpu"), torch.device)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0)], ids=str)
def test_resolve_device_gives_cuda_exactly_when_it_is_present(name):
    """With a GPU, ``cuda`` names a device; without one it is refused, naming what is available."""
    if torch.cuda.is_available():
        assert resolve_device(name).type == "cuda"
        return
    with pytest.raises(ValueError) as info:
        resolve_device(name, "dev")
    assert message(info, "dev") == ("dev: CUDA requested but torch.cuda.is_available() is False; "
                                    "valid choices: cpu, auto")


def test_resolve_device_refuses_a_cuda_index_that_does_not_exist():
    n = torch.cuda.device_count()
    with pytest.raises(ValueError) as info:
        resolve_device(f"cuda:{n + 7}")
    text = message(info, "device")
    assert ("does not exist" in text) if torch.cuda.is_available() else ("CUDA requested" in text)


# strings near the valid names (drawn from their letters) as well as arbitrary ones; the ``cuda:<digits>``
# strings are the indices, tested above
device_like = st.text(alphabet="cpudaCUt:0123 -", max_size=8) | st.text(max_size=10)


@given(name=device_like.filter(lambda s: s not in ("cpu", "cuda", "auto") and not re.fullmatch(r"cuda:\d+", s)))
def test_resolve_device_refuses_every_other_name_listing_the_choices(name):
    """Every string but ``cpu``, ``cuda``, ``cuda:N`` and ``auto`` is refused, naming the choices."""
    with pytest.raises(ValueError) as info:
        resolve_device(name)
    assert message(info, "device") == f"device: unknown device {name!r}; valid choices: cpu, cuda, cuda:N, auto"


@pytest.mark.parametrize("name", ["CPU", "gpu", "cuda:", "cuda:x", " cpu", "cpu ", "cuda:-1", "mps", ""])
def test_resolve_device_refuses_near_misses(name):
    with pytest.raises(ValueError, match=r"^device: unknown device .*; valid choices: cpu, cuda, cuda:N, auto$"):
        resolve_device(name)


def test_resolve_device_refuses_other_device_types_and_non_names():
    with pytest.raises(ValueError) as info:
        resolve_device(torch.device("meta"))
    assert message(info, "device") == "device: unsupported device 'meta'; valid choices: cpu, cuda, cuda:N, auto"
    for bad in (0, 1.5, b"cpu", ["cpu"]):
        with pytest.raises(TypeError) as info:
            resolve_device(bad)
        assert message(info, "device") == ("device: expected a device name (cpu, cuda, cuda:N, auto) or a "
                                           f"torch.device, got {type(bad).__name__}")


# ----------------------------------------------------------------------------- check_size


@given(h=st.integers(-5, 10**6), w=st.integers(-5, 10**6),
       form=st.sampled_from(["tuple", "list", "numpy", "0d-tensors", "1d-tensor"]))
def test_check_size_accepts_exactly_two_positive_integers(h, w, form):
    """``(H, W)`` as a tuple, a list, numpy integers, 0-d integer tensors or a 1-d integer tensor:
    returned as a tuple of two ``int`` iff both are positive; otherwise the message gives them."""
    size = {"tuple": (h, w), "list": [h, w], "numpy": (np.int64(h), np.int64(w)),
            "0d-tensors": (torch.tensor(h), torch.tensor(w)), "1d-tensor": torch.tensor([h, w])}[form]
    if h > 0 and w > 0:
        got = check_size(size)
        assert got == (h, w) and type(got) is tuple and all(type(v) is int for v in got)
        return
    with pytest.raises(ValueError) as info:
        check_size(size, "out_size")
    assert message(info, "out_size") == f"out_size: H and W must be positive, got {(h, w)}"


@pytest.mark.parametrize("size", [(2.0, 3), (3, 2.5), (True, 3), (3, False), ("3", 4), (3, None),
                                  (torch.tensor(3.0), 4)], ids=str)
def test_check_size_refuses_non_integers(size):
    with pytest.raises(ValueError) as info:
        check_size(size)
    assert message(info, "size") == f"size: expected two integers (H, W), got {size!r}"


@pytest.mark.parametrize("size", [(3,), (1, 2, 3), (), "ab", b"ab", 5, None], ids=repr)
def test_check_size_refuses_other_lengths_and_non_sequences(size):
    with pytest.raises(ValueError) as info:
        check_size(size)
    assert message(info, "size") == f"size: expected (H, W), got {size!r}"


# ----------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_tensor_checks_accept_floating_point_tensors(dtype):
    x = torch.zeros(2, 3, 4, 5, dtype=dtype)
    assert check_float(x, "x") is None
    assert check_images(x) is None
    assert check_finite(x, "x") is None
    assert check_matrix(torch.eye(3, dtype=dtype).expand(2, 4, 3, 3), "m") is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_tensor_checks_refuse_other_dtypes_with_a_type_error(dtype):
    x = torch.zeros(2, 3, 4, 5, dtype=dtype)
    for check, name in ((lambda v: check_float(v, "x"), "x"), (check_images, "images"),
                        (lambda v: check_matrix(v, "m"), "m")):
        with pytest.raises(TypeError) as info:
            check(x)
        assert message(info, name).endswith(f"floating-point tensor, got dtype {dtype}")


@pytest.mark.parametrize("value", [np.zeros((1, 1, 2, 2)), [[1.0]], 1.0, None], ids=lambda v: type(v).__name__)
def test_tensor_checks_refuse_non_tensors(value):
    for check, name in ((lambda v: check_float(v, "x"), "x"), (lambda v: check_images(v, "maps"), "maps"),
                        (check_matrix, "matrix")):
        with pytest.raises(TypeError) as info:
            check(value)
        assert message(info, name) == f"{name}: expected a torch.Tensor, got {type(value).__name__}"


@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=12))
def test_check_finite_raises_exactly_when_a_value_is_nan_or_infinite(values):
    x = torch.tensor(values, dtype=torch.float32)
    if all(math.isfinite(v) for v in values):
        assert check_finite(x, "params") is None
        return
    with pytest.raises(ValueError) as info:
        check_finite(x, "params")
    assert message(info, "params") == "params: contains NaN or infinite values"


@pytest.mark.parametrize("shape", [(3, 3), (5, 3, 3), (2, 4, 3, 3)])
def test_check_matrix_accepts_any_batch_of_3x3(shape):
    assert check_matrix(torch.zeros(shape)) is None


@pytest.mark.parametrize("shape", [(3,), (2, 2), (3, 4), (4, 3), (3, 3, 2), (0,)])
def test_check_matrix_refuses_other_shapes(shape):
    with pytest.raises(ValueError) as info:
        check_matrix(torch.zeros(shape), "matrices")
    assert message(info, "matrices") == f"matrices: expected shape (..., 3, 3), got {shape}"


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 4), r"expected shape \(B, C, H, W\), got \(2, 3, 4\)"),
    ((1, 1, 2, 3, 4), r"expected shape \(B, C, H, W\), got \(1, 1, 2, 3, 4\)"),
    ((0, 1, 4, 4), r"empty batch \(B = 0\)"),
    ((1, 0, 4, 4), r"empty channel or spatial dimension in shape \(1, 0, 4, 4\)"),
    ((1, 1, 0, 4), r"empty channel or spatial dimension in shape \(1, 1, 0, 4\)"),
    ((1, 1, 4, 0), r"empty channel or spatial dimension in shape \(1, 1, 4, 0\)"),
])
def test_check_images_refuses_wrong_ranks_and_empty_dimensions(shape, match):
    with pytest.raises(ValueError) as info:
        check_images(torch.zeros(shape), "reference")
    assert message(info, "reference")
    assert info.match("^reference: " + match + "$")


def test_check_images_checks_the_rank_before_the_dtype():
    """A wrong rank is reported first (the more basic mistake), whatever the dtype."""
    with pytest.raises(ValueError, match=r"^images: expected shape \(B, C, H, W\)"):
        check_images(torch.zeros(3, 4, dtype=torch.int64))


# ----------------------------------------------------------------------------- check_model_channels


def test_check_model_channels_compares_with_the_first_convolution():
    """The first ``Conv2d`` in module order decides (here nested, after a non-convolution)."""
    model = nn.Sequential(nn.Identity(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 1, 3)))
    assert check_model_channels(model, torch.zeros(1, 3, 8, 8)) is None
    with pytest.raises(ValueError) as info:
        check_model_channels(model, torch.zeros(1, 1, 8, 8))
    assert message(info, "images") == ("images: the model's first convolution '1.0' expects 3 channel(s), "
                                       "got images with 1")


@pytest.mark.parametrize("channels", [1, 2, 7])
def test_check_model_channels_accepts_anything_without_a_convolution(channels):
    """No ``Conv2d``: nothing to compare, every channel count passes."""
    model = nn.Sequential(nn.AvgPool2d(2), nn.Flatten())
    assert check_model_channels(model, torch.zeros(1, channels, 4, 4)) is None
