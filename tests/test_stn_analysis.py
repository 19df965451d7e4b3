"""What a trained STN does (stn/_analysis.py): the canonical-pose statistic and the feature-map
alignment of STN-C1, on tiny models whose answer is known without training.

* An STN whose transformer is the identity brings every image to the classifier in the pose the
  data gave it, so its canonical-pose spread is the spread of the applied poses (computed here
  independently, with numpy, from the data set's draws); a transformer that applies one constant
  transformation to every image moves every pose by that constant: the spread is unchanged and
  each class's mean pose moves by exactly the constant.
* The first layer of the ``mnist`` classifier (conv 9x9 with ``same`` padding, max-pool 2, ReLU)
  is exactly covariant under image shifts by an even number of pixels that keep the digit inside
  the canvas: such a shift moves the feature maps by a whole map pixel, and bilinear resampling at
  whole-pixel offsets reproduces the values. So ``feature_map_alignment`` of an untrained STN-C1
  on even integer shifts finds spatial, expected and input-floor errors at float32 rounding.

The tests of ``feature_map_alignment`` read its result only through :func:`alignment_numbers`
(its return value is about to become a typed record: adapt that one function).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stn import TransformedDataset, build_model, canonical_pose, evaluate_model, feature_map_alignment, get_protocol

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)

ROUNDING = 1e-8  # float32 rounding bound of an aligned error (derived in test_even_integer_shifts_...)
ERRORS = ("stn_error", "spatial_error", "expected_error", "invariance_error", "input_floor")


def alignment_numbers(result, *, n_images: int, search_family: str, depth: int = 1) -> dict[str, float]:
    """The mean of each error of a ``feature_map_alignment`` result, after checking what every result
    must say: the number of pairs, the search family, the depth, no excluded pair, and a bootstrap
    95% interval around each mean. The one place that knows the shape of the result."""
    assert result["n_images"] == n_images and result["search_family"] == search_family
    assert result["depth"] == depth and result["arch"] == "STN-C1" and result["n_excluded"] == 0
    means = {}
    for k in ERRORS:
        mean, (lo, hi) = result[k].mean, result[k].ci
        assert math.isfinite(mean) and lo <= mean <= hi, (k, result[k])
        means[k] = mean
    return means


# ----------------------------------------------------------------------------- canonical pose


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _reference_spread(name: str, poses: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the per-class spread, from the definitions in stn/_analysis.py's docstring:
    circular std ``sqrt(-2 ln R)`` of the angles (degrees), std of ``log2 s``, ``sqrt(var tx + var ty)``."""
    spreads = []
    for c in np.unique(labels):
        p = poses[labels == c]
        if name == "rotation":
            r = abs(np.exp(1j * np.deg2rad(p[:, 0])).mean())
            spreads.append(np.rad2deg(np.sqrt(-2 * np.log(r))))
        elif name == "scale":
            spreads.append(np.log2(p[:, 0]).std())
        else:
            spreads.append(np.sqrt(p.var(0).sum()))
    return float(np.mean(spreads))


# protocol, image side, the family its transformer predicts, a constant raw regressor output and the
# pose change it makes: +30 degrees; x2 (+1 octave); a shift of (0.25, -0.5) half-widths = (3.5, -7) px
CASES = [("rotation", None, "rotation", [math.radians(30.0)], 30.0),
         ("scale", 28, "scale_translation", [math.log(2.0), 0.0, 0.0], 1.0),
         ("translation", 28, "translation", [0.25, -0.5], [3.5, -7.0])]


@pytest.mark.parametrize("name, size, family, raw, moved", CASES, ids=[c[0] for c in CASES])
def test_identity_transformer_keeps_the_datas_spread_and_a_constant_one_moves_every_pose(name, size, family,
                                                                                         raw, moved):
    """Identity transformer (regressor zeroed): ``mean_spread`` equals ``applied_only_mean_spread``
    and both equal the spread of the data set's drawn poses (24 images, 3 classes). The composed
    matrix is then exactly the identity, so the only differences are float64 rounding in the matrix
    products and in atan2 / log / sqrt on spreads of tens of degrees, a fraction of an octave or
    pixels: relative 1e-9. (Translation at 28 px: the drawn shifts are multiplied by the zoom 28/60
    in float32, which moves them by up to 1e-6 px: absolute 1e-5 px there.)

    A constant raw output (zero weights, bias set): every image gets the same matrix ``P``, so the
    spread is unchanged (to float64 rounding, relative 1e-9) and each class's mean pose moves by
    ``P``'s pose: +30 degrees, +1 octave, (3.5, -7) px, to the float32 rounding of ``P``'s entries
    (relative 1.2e-7: 1e-4 degrees, 1e-6 octaves, 1e-5 px covers it)."""
    protocol = get_protocol(name, size)
    labels = torch.arange(24) % 3
    data = TransformedDataset(_images(24), labels, protocol, split="test")
    torch.manual_seed(0)
    model = build_model("STN-SL1", family=family, image_size=[protocol.size] * 2)
    st = model.transformers[0]
    st.reset_identity()
    ev = evaluate_model(model, data)
    assert torch.equal(ev["composed"], torch.eye(3, dtype=torch.float64).expand(24, 3, 3))
    same = canonical_pose(protocol, ev["labels"], ev["applied"], ev["composed"])
    poses = data.draws(0).params.double().numpy() * (protocol.zoom if name == "translation" else 1.0)
    expected = _reference_spread(name, poses, labels.numpy())
    abs_tol = 1e-5 if name == "translation" else 0.0
    assert same["applied_only_mean_spread"] == pytest.approx(expected, rel=1e-9, abs=abs_tol)
    assert same["mean_spread"] == pytest.approx(same["applied_only_mean_spread"], rel=1e-9)
    assert sorted(same["per_class"]) == ["0", "1", "2"] and all(c["n"] == 8 for c in same["per_class"].values())

    with torch.no_grad():
        st.regressor.bias.copy_(torch.tensor(raw))
    ev = evaluate_model(model, data)
    shifted = canonical_pose(protocol, ev["labels"], ev["applied"], ev["composed"])
    assert shifted["mean_spread"] == pytest.approx(same["mean_spread"], rel=1e-9)
    assert shifted["applied_only_mean_spread"] == same["applied_only_mean_spread"]
    tol = {"rotation": 1e-4, "scale": 1e-6, "translation": 1e-5}[name]
    for c in ("0", "1", "2"):
        before, after = np.array(same["per_class"][c]["mean"]), np.array(shifted["per_class"][c]["mean"])
        assert after - before == pytest.approx(np.array(moved), abs=tol), c
        assert shifted["per_class"][c]["spread"] == pytest.approx(same["per_class"][c]["spread"], rel=1e-9)


# ----------------------------------------------------------------------------- feature-map alignment


class FixedShifts(TransformedDataset):
    """The translation protocol (60x60 canvas) with the shifts chosen by the test instead of drawn."""

    def __init__(self, images: torch.Tensor, shifts: torch.Tensor) -> None:
        super().__init__(images, torch.arange(len(images)), get_protocol("translation"), split="test")
        self.shifts = shifts

    def draws(self, epoch: int = 0):
        return dataclasses.replace(super().draws(epoch), params=self.shifts)


# every shift even, not zero, at most 8 px: the 28x28 digit (canvas rows 16..43) stays inside the
# canvas with the 4-px reach of the 9x9 kernel, so zero padding never meets the digit
EVEN_SHIFTS = torch.tensor([[2.0, -4.0], [6.0, 0.0], [-8.0, 8.0], [0.0, -2.0]])


@pytest.fixture(scope="module")
def stn_c1():
    torch.manual_seed(0)
    return build_model("STN-C1", family="translation", image_size=[60, 60])


def test_even_integer_shifts_are_aligned_to_rounding(stn_c1):
    """Even shifts of 4 random 28x28 images on the 60x60 canvas, an untrained STN-C1 (random first
    layer, identity transformer):

    * expected_error (the warp ``h^-1``: a whole map pixel per 2 image pixels), spatial_error (the
      search's best, never worse than the expected warp) and input_floor (the same at the input) are
      float32 rounding: the resampling grid's coordinates are exact to a few ulp of the map side
      (60 px: 4e-6 px), which moves each value by that fraction of a neighbour difference, and the
      conv's 81-term float32 sums are exact to 81 x 6e-8 relative; the error is the square of such
      relative deviations: (10 x 1.2e-7 x 60)^2 = 5e-9 bounds both, so 1e-8;
    * invariance_error (no warp) is clearly above that bound (100x): the maps moved, so the small
      errors above are the alignment's doing;
    * stn_error: an identity transformer leaves the maps as they are, so it is the no-warp error, to
      the float32 rounding of resampling at the identity grid (a few ulp of 30 px in each of the
      numerator and denominator): relative 1e-4.
    """
    res = feature_map_alignment(stn_c1, FixedShifts(_images(4), EVEN_SHIFTS), n_images=4, batch=4)
    e = alignment_numbers(res, n_images=4, search_family="translation")
    assert e["expected_error"] < ROUNDING and e["spatial_error"] < ROUNDING and e["input_floor"] < ROUNDING, e
    assert e["invariance_error"] > 100 * ROUNDING, e
    assert e["stn_error"] == pytest.approx(e["invariance_error"], rel=1e-4)


def test_odd_shifts_are_not_aligned_to_rounding(stn_c1):
    """The same with every shift made odd (+1 px): half a map pixel, which the 2-pixel pooling grid
    cannot follow, so the maps are no longer shifted copies and the spatial error is clearly (100x)
    above the rounding bound of the test above (what that test would see if the alignment were
    wrong); the search still includes the identity and the expected warp, so it is never worse than
    either (to rounding);
    at the input the odd shifts are still whole pixels, so the input floor stays at rounding."""
    res = feature_map_alignment(stn_c1, FixedShifts(_images(4), EVEN_SHIFTS + 1), n_images=4, batch=4)
    e = alignment_numbers(res, n_images=4, search_family="translation")
    assert e["spatial_error"] > 100 * ROUNDING and e["expected_error"] > 100 * ROUNDING, e
    assert e["spatial_error"] <= e["expected_error"] + ROUNDING
    assert e["spatial_error"] <= e["invariance_error"] + ROUNDING
    assert e["input_floor"] < ROUNDING, e


def test_alignment_uses_at_most_the_images_it_has(stn_c1):
    """``n_images`` larger than the data set uses every image once (2 here), in batches of any size."""
    data = FixedShifts(_images(2, seed=1), EVEN_SHIFTS[:2])
    one = alignment_numbers(feature_map_alignment(stn_c1, data, n_images=10, batch=1), n_images=2,
                            search_family="translation")
    both = alignment_numbers(feature_map_alignment(stn_c1, data, n_images=2, batch=2), n_images=2,
                             search_family="translation")
    # the same pairs; only the batching differs, which changes float32 conv rounding (relative 1e-6)
    assert one == pytest.approx(both, rel=1e-6, abs=ROUNDING)
