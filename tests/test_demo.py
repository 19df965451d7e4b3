"""Known answers of :mod:`invariance._demo`'s verdicts, its summary, and its refusal of a bad ``out``.

The demo's verdicts are read off hand-made reports (schema-1 records, converted by
:class:`invariance.Report`), so each claim is checked against the exact inequality it states:

* ``wm_spatial``: every layer after the detectors (``rectify``, ``pool``) has a mean spatial error
  ``>= WM_SPATIAL_MIN``;
* ``wm_permutation``: every such layer has a mean permutation error ``<= WM_PERMUTATION_MAX`` and
  the one channel orbit ``(0 1)`` (the W <-> M swap);
* ``cnn_rotation_scale``: at the deepest layer (``relu2``) the lower end of the rotation's and of
  the scaling's spatial-error CI lies strictly above both the upper end of the translation's CI and
  that transformation's interpolation floor.

Each claim is shown to hold on one report and to fail on another that misses by the smallest
possible margin (the next float, :func:`math.nextafter`); no tolerance is involved, these are
comparisons of the numbers put into the reports. ``run_demo`` itself is not run here (CI runs
``make demo``), except for its refusal of a file as ``out``, which must come before any
computation.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from invariance import Report, _demo, parse_transforms
from invariance._demo import CNN_TRANSFORMS, WM_PERMUTATION_MAX, WM_SPATIAL_MIN, _summary, _verdicts, run_demo

INF = math.inf
LABELS = {t.family: t.label for t in parse_transforms(CNN_TRANSFORMS)}  # family -> label, e.g. "rotation:45"

# a report on which every claim holds, by a wide margin
ROT, SCALE, TRANS = (0.30, 0.40), (0.20, 0.30), (0.01, 0.05)
FLOORS = {"rotation": 0.03, "scale": 0.02}


def wm_record(layer: str, depth: int, spatial: float, permutation: float, orbits=((0, 1),)) -> dict:
    return {"layer": layer, "depth": depth, "transform": "rotation:180", "family": "rotation", "search": "rigid",
            "spatial_error": spatial, "spatial_error_ci": [spatial, spatial],
            "permutation_error": permutation, "permutation_error_ci": [permutation, permutation],
            "channel_orbits": [list(o) for o in orbits], "best_params": {"median": [180.0, 0.0, 0.0]}}


def wm_report(spatial=(1.0, 1.0), permutation=(0.0, 0.0), orbits=((0, 1),)) -> Report:
    """toy-wm's layers: ``detect`` (before the detectors' rectification: not part of the claims, so it
    is given values that would fail both), then ``rectify`` and ``pool`` with the given errors."""
    records = [wm_record("detect", 0, 0.1, 0.5, orbits=())]
    records += [wm_record(layer, depth, s, p, orbits)
                for depth, (layer, s, p) in enumerate(zip(("rectify", "pool"), spatial, permutation), 1)]
    return Report(records=records, meta={"n_images": 10})


def cnn_record(layer: str, depth: int, family: str, ci: tuple[float, float]) -> dict:
    return {"layer": layer, "depth": depth, "transform": LABELS[family], "search": "rigid",
            "spatial_error": (ci[0] + ci[1]) / 2, "spatial_error_ci": list(ci),
            "best_params": {"median": [0.0, 0.0, 0.0]}, "channel_orbits": []}


def cnn_report(rotation=ROT, scale=SCALE, translation=TRANS, floors=None) -> Report:
    """The CNN's layers under the three transformations of ``CNN_TRANSFORMS``. Only the deepest layer,
    ``relu2``, carries the given CIs; a shallower layer (``conv1``) gets CIs on which the claim
    would fail (rotation and scaling equal to the translation), to show that it is not read."""
    floors = FLOORS if floors is None else floors
    cis = {"rotation": rotation, "scale": scale, "translation": translation}
    records = [cnn_record("conv1", 1, fam, TRANS) for fam in LABELS]
    records += [cnn_record("relu2", 4, fam, cis[fam]) for fam in LABELS]
    calibration = {"interpolation_floor": {LABELS[f]: {"mean": m, "ci": [m / 2, 2 * m]} for f, m in floors.items()}}
    return Report(records=records, calibration=calibration, meta={"n_images": 20})


def holds(wm: Report | None = None, cnn: Report | None = None) -> dict[str, bool]:
    v = _verdicts(wm_report() if wm is None else wm, cnn_report() if cnn is None else cnn)
    return {name: verdict["holds"] for name, verdict in v.items()}


def above(x: float) -> float:
    return math.nextafter(x, INF)


def below(x: float) -> float:
    return math.nextafter(x, -INF)


# ----------------------------------------------------------------------------- the constants


def test_the_cnn_transforms_are_one_rotation_one_scaling_one_translation():
    """The CNN verdict indexes the deepest layer's records by family: it needs exactly one
    transformation of each of the three families (a second one would silently replace the first)."""
    assert [t.family for t in parse_transforms(CNN_TRANSFORMS)] == ["rotation", "scale", "translation"]


def test_the_claims_state_their_thresholds():
    v = _verdicts(wm_report(), cnn_report())
    assert list(v) == ["wm_spatial", "wm_permutation", "cnn_rotation_scale"]
    assert f">= {WM_SPATIAL_MIN}" in v["wm_spatial"]["claim"]
    assert f"<= {WM_PERMUTATION_MAX}" in v["wm_permutation"]["claim"]
    assert "relu2" in v["cnn_rotation_scale"]["claim"]
    assert 0 < WM_PERMUTATION_MAX < WM_SPATIAL_MIN <= 1


# ----------------------------------------------------------------------------- the verdicts


def test_every_claim_holds_on_a_report_that_satisfies_them():
    v = _verdicts(wm_report(spatial=(1.0, 0.95), permutation=(0.0, 0.01)), cnn_report())
    assert {k: x["holds"] for k, x in v.items()} == {"wm_spatial": True, "wm_permutation": True,
                                                     "cnn_rotation_scale": True}
    # the values are the means the claims are about: per layer (W/M), per transformation (CNN, relu2)
    assert v["wm_spatial"]["values"] == {"rectify": 1.0, "pool": 0.95}
    assert v["wm_permutation"]["values"] == {"rectify": 0.0, "pool": 0.01}
    means = {LABELS[f]: (lo + hi) / 2 for f, (lo, hi) in (("rotation", ROT), ("scale", SCALE),
                                                         ("translation", TRANS))}
    assert v["cnn_rotation_scale"]["values"] == means


@pytest.mark.parametrize("layer", [0, 1], ids=["rectify", "pool"])
def test_wm_spatial_holds_exactly_from_the_threshold(layer):
    """``>=``: the threshold itself passes; the next float below it fails, on either layer."""
    at = [1.0, 1.0]
    at[layer] = WM_SPATIAL_MIN
    assert holds(wm=wm_report(spatial=tuple(at)))["wm_spatial"] is True
    at[layer] = below(WM_SPATIAL_MIN)
    assert holds(wm=wm_report(spatial=tuple(at))) == {"wm_spatial": False, "wm_permutation": True,
                                                     "cnn_rotation_scale": True}


@pytest.mark.parametrize("layer", [0, 1], ids=["rectify", "pool"])
def test_wm_permutation_holds_exactly_up_to_the_threshold(layer):
    """``<=``: the threshold itself passes; the next float above it fails, on either layer."""
    at = [0.0, 0.0]
    at[layer] = WM_PERMUTATION_MAX
    assert holds(wm=wm_report(permutation=tuple(at)))["wm_permutation"] is True
    at[layer] = above(WM_PERMUTATION_MAX)
    assert holds(wm=wm_report(permutation=tuple(at))) == {"wm_spatial": True, "wm_permutation": False,
                                                         "cnn_rotation_scale": True}


@pytest.mark.parametrize("orbits", [(), ((1, 0),), ((0, 1), (2, 3)), ((0, 1, 2),)],
                         ids=["none", "written-from-1", "two-swaps", "three-cycle"])
def test_wm_permutation_needs_the_one_w_m_swap(orbits):
    """A zero permutation error is not enough: the channels must be matched by the W <-> M swap,
    the single orbit ``(0 1)`` (as ``channel_orbits`` writes it, from its smallest channel)."""
    assert holds(wm=wm_report(orbits=orbits))["wm_permutation"] is False


def test_wm_claims_without_a_verdict_fail():
    """No signal, no verdict: a NaN mean (every image excluded) never passes a claim."""
    nan = math.nan
    assert holds(wm=wm_report(spatial=(1.0, nan)))["wm_spatial"] is False
    assert holds(wm=wm_report(permutation=(nan, 0.0)))["wm_permutation"] is False


@pytest.mark.parametrize("family", ["rotation", "scale"])
def test_cnn_claim_needs_the_lower_bound_strictly_above_the_translations_upper_bound(family):
    """Lower end equal to the translation's upper end: fails (strict ``>``); the next float above
    it, with the floor below, holds."""
    top = TRANS[1]
    assert FLOORS[family] < top
    tie = cnn_report(**{family: (top, 0.4)})
    assert holds(cnn=tie) == {"wm_spatial": True, "wm_permutation": True, "cnn_rotation_scale": False}
    assert holds(cnn=cnn_report(**{family: (above(top), 0.4)}))["cnn_rotation_scale"] is True
    assert holds(cnn=cnn_report(**{family: (below(top), 0.4)}))["cnn_rotation_scale"] is False


@pytest.mark.parametrize("family", ["rotation", "scale"])
def test_cnn_claim_needs_the_lower_bound_strictly_above_the_interpolation_floor(family):
    """The transformation's own floor at the lower end of its CI, or the next float above it:
    fails; the next float below it (and the translation's CI lower still): holds."""
    lo = (ROT if family == "rotation" else SCALE)[0]
    assert TRANS[1] < lo
    for floor, want in ((below(lo), True), (lo, False), (above(lo), False)):
        rep = cnn_report(floors={**FLOORS, family: floor})
        assert holds(cnn=rep)["cnn_rotation_scale"] is want, floor


def test_cnn_claim_reads_the_deepest_layer_and_each_transformations_own_floor():
    """Only ``relu2`` counts (``conv1``'s failing CIs do not matter, see :func:`cnn_report`); a floor
    above the rotation's lower bound fails the claim only when it is the rotation's own: the same
    number as the translation's floor (not compared) leaves it holding."""
    assert holds(cnn=cnn_report())["cnn_rotation_scale"] is True
    high = above(ROT[0])
    assert holds(cnn=cnn_report(floors={**FLOORS, "translation": high}))["cnn_rotation_scale"] is True
    assert holds(cnn=cnn_report(floors={**FLOORS, "rotation": high}))["cnn_rotation_scale"] is False


unit = st.floats(0.0, 2.0, allow_nan=False)


@given(s1=unit, s2=unit, p1=unit, p2=unit)
def test_wm_verdicts_are_their_inequalities(s1, s2, p1, p2):
    """For any errors: ``wm_spatial`` holds iff both layers reach ``WM_SPATIAL_MIN``, ``wm_permutation``
    iff both stay within ``WM_PERMUTATION_MAX`` (the orbit being the swap)."""
    got = holds(wm=wm_report(spatial=(s1, s2), permutation=(p1, p2)))
    assert got["wm_spatial"] is (s1 >= WM_SPATIAL_MIN and s2 >= WM_SPATIAL_MIN)
    assert got["wm_permutation"] is (p1 <= WM_PERMUTATION_MAX and p2 <= WM_PERMUTATION_MAX)


@given(rot=unit, scale=unit, trans=unit, floor_r=unit, floor_s=unit)
def test_the_cnn_verdict_is_its_inequality(rot, scale, trans, floor_r, floor_s):
    """For any lower bounds (rotation, scaling), translation upper bound and floors: the claim holds
    iff ``rot > max(trans, floor_r)`` and ``scale > max(trans, floor_s)``."""
    rep = cnn_report(rotation=(rot, rot + 0.1), scale=(scale, scale + 0.1), translation=(trans / 2, trans),
                     floors={"rotation": floor_r, "scale": floor_s})
    want = rot > max(trans, floor_r) and scale > max(trans, floor_s)
    assert holds(cnn=rep)["cnn_rotation_scale"] is want


# ----------------------------------------------------------------------------- the summary


@pytest.mark.parametrize("quick", [True, False])
def test_summary_lists_every_verdict_and_both_tables(quick):
    """One line per verdict, ``**PASS**`` or ``**FAIL**`` as the verdict says, with its claim and
    values (3 decimals); both tables verbatim, the CNN's under its name; the mode and image counts."""
    wm = wm_report(spatial=(1.0, below(WM_SPATIAL_MIN)))  # wm_spatial fails, the others hold
    rep = cnn_report()
    verdicts = _verdicts(wm, rep)
    assert [v["holds"] for v in verdicts.values()] == [False, True, True]
    text = _summary(wm, rep, verdicts, "a-cnn (hand-made)", quick, 12.3)
    lines = text.splitlines()
    marked = [ln for ln in lines if ln.startswith(("- **PASS**", "- **FAIL**"))]
    assert len(marked) == len(verdicts) == 3
    for line, v in zip(marked, verdicts.values()):
        values = ", ".join(f"{k} {x:.3f}" for k, x in v["values"].items())
        assert line == f"- **{'PASS' if v['holds'] else 'FAIL'}**: {v['claim']} ({values})"
    assert marked[0].startswith("- **FAIL**") and "pool 0.900" in marked[0]  # 0.9 - 1 ulp, at 3 decimals
    assert wm.table() in text and rep.table() in text
    assert text.index("## Verdicts") < text.index(wm.table()) < text.index("## 2. a-cnn (hand-made)") \
        < text.index(rep.table())
    assert f"Mode: {'quick' if quick else 'full'}; 10 W/M scenes, 20 MNIST digits" in text
    assert "12 s." in text


# ----------------------------------------------------------------------------- run_demo's refusal


def _forbidden(*args, **kwargs):
    raise AssertionError("run_demo computed before checking out")


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_run_demo_refuses_a_file_as_out_before_computing(where, tmp_path, monkeypatch, capsys):
    """A file (or a path under one) as ``out``: a one-line ``ValueError`` naming ``out``, raised before
    any model is loaded, anything measured or printed, and the file left as it was."""
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    out = f if where == "file" else f / "report"
    monkeypatch.setattr(_demo, "load_model", _forbidden)
    monkeypatch.setattr(_demo, "measure", _forbidden)
    with pytest.raises(ValueError, match=r"^out: ") as info:
        run_demo(out, quick=True)
    assert "\n" not in str(info.value) and str(f) in str(info.value)
    assert capsys.readouterr().out == ""
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
