"""The typed record and the report (``invariance/_record.py``, ``invariance/_report.py``).

A record is a frozen value built in one place from the measurement core's per-image result; the
table, the CSV, the figures and JSON read its fields. Known answers: the fields equal what the
core measured (means of the per-image values, the bootstrap interval of those values); a report
saved by the previous release (schema 1, ``tests/data/report-schema1``, written by commit
cf7644a) loads with every number it holds; a saved report loads back equal to itself.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import invariance
from invariance import SCHEMA, Estimate, LayerRecord, Report, Transform, bootstrap_ci, measure
from invariance._report import CSV_COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA1 = ROOT / "tests" / "data" / "report-schema1"


@pytest.fixture(scope="module")
def report() -> Report:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    x = invariance.toys.make_images("blobs", 4, 20, seed=0)
    return measure(net, x, "rotation:90; scale:1.5", layers="1,2", channels=("spatial", "permutation", "linear"),
                   n_boot=50, progress=False, model_name="test-net")


def test_records_are_frozen_typed_values(report):
    rec = report.records[0]
    assert isinstance(rec, LayerRecord) and isinstance(rec.errors.spatial, Estimate)
    assert rec.transform == Transform("rotation", (90.0,)) and rec.search == rec.best_warp.family == "rigid"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.layer = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.errors.spatial.mean = 0.0


def test_an_estimate_is_the_mean_and_bootstrap_of_its_per_image_values(report):
    """Known answer: each Estimate's mean is the mean of its per-image values over the images with a
    verdict, and its interval is :func:`invariance.bootstrap_ci` of those values (n_boot and seed of
    the call): nothing is computed anywhere else."""
    for rec in report.records:
        for kind, e in rec.errors.items():
            v = np.array(e.per_image)
            assert len(v) == 4 and e.n_excluded == int((~np.isfinite(v)).sum())
            assert e.mean == pytest.approx(float(v[np.isfinite(v)].mean()), rel=1e-12), kind
            assert e.ci == pytest.approx(bootstrap_ci(v, 50, seed=0), rel=1e-12), kind


def test_transforms_that_differ_by_4e_7_degrees_give_two_records():
    """A transformation's identity is its parameters: labels no longer merge two of them."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    a, b = Transform("rotation", (30.0,)), Transform("rotation", (30.0000004,))
    assert a != b and a.label != b.label
    rep = measure(net, torch.rand(2, 1, 12, 12), [a, b], layers="0", channels="spatial", n_boot=0, progress=False)
    assert [r.transform for r in rep.records] == [a, b]
    assert set(rep.calibration["interpolation_floor"]) == {a.label, b.label}


def test_equal_transforms_are_measured_once():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    rep = measure(net, torch.rand(2, 1, 12, 12), ["rotation:30", Transform("rotation", (30.0,))], layers="0",
                  channels="spatial", n_boot=0, progress=False)
    assert len(rep.records) == 1


def test_save_and_load_give_back_the_same_report(report, tmp_path):
    report.save(tmp_path)
    back = Report.load(tmp_path)
    assert back == report  # every field, every per-image value (JSON keeps floats exactly)
    assert json.loads((tmp_path / "report.json").read_text())["schema"] == SCHEMA
    assert back.table() == report.table()


def test_a_report_saved_by_the_previous_release_loads():
    """``tests/data/report-schema1`` was saved by the release before the typed record (schema 1: flat
    string keys). Every number it holds is in the typed record it loads into."""
    old = json.loads((SCHEMA1 / "report.json").read_text())
    rep = Report.load(SCHEMA1)
    assert len(rep.records) == len(old["records"]) == 4
    for flat, rec in zip(old["records"], rep.records):
        assert rec.layer == flat["layer"] and rec.transform.label == flat["transform"]
        for kind in ("invariance", "expected", "spatial", "permutation", "linear"):
            e = getattr(rec.errors, kind)
            assert e.mean == flat[kind + "_error"] and list(e.ci) == flat[kind + "_error_ci"]
            assert list(e.per_image) == flat["per_image"][kind + "_error"]
        assert list(rec.best_warp.median) == flat["best_params"]["median"]
        assert rec.calibration.null.mean == flat["random_pair_null"]
        assert rec.calibration.floor.mean == old["calibration"]["interpolation_floor"][flat["transform"]]["mean"]
        assert rec.linear_warning == flat.get("linear_warning")
        assert rec["spatial_error"] == flat["spatial_error"]  # the deprecated mapping access reads the same


def test_the_deprecated_mapping_access_reads_the_fields(report):
    for rec in report.records:
        assert rec["spatial_error"] == rec.errors.spatial.mean
        assert rec["spatial_error_ci"] == list(rec.errors.spatial.ci)
        assert rec["transform"] == rec.transform.label and rec["layer"] == rec.layer
        assert rec["random_pair_null"] == rec.calibration.null.mean
        assert rec.get("interpolation_floor") == rec.calibration.floor.mean


def test_csv_rows_are_the_records_fields(report, tmp_path):
    report.to_csv(tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(report.records)
    for row, rec in zip(rows, report.records):
        assert row["model"] == "test-net" and row["transform"] == rec.transform.label
        assert json.loads(row["params"]) == list(rec.transform.params)
        assert float(row["spatial_error"]) == rec.errors.spatial.mean
        assert float(row["spatial_error_lo"]) == rec.errors.spatial.ci[0]
        assert float(row["interpolation_floor"]) == rec.calibration.floor.mean
        assert int(row["region_size"]) == rec.comparison.region_size


def test_the_table_shows_each_records_numbers(report):
    table = report.table().splitlines()
    for rec, line in zip(report.records, table[2:]):
        assert line.startswith(rec.transform.label) and f"{rec.errors.spatial.mean:.3f}" in line
        lo, hi = rec.errors.spatial.ci
        assert f"[{lo:.3f},{hi:.3f}]" in line


def test_a_report_of_an_unknown_schema_is_refused(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"schema": "invariance-report/99", "records": []}))
    with pytest.raises(ValueError, match="unknown schema 'invariance-report/99'"):
        Report.load(tmp_path)


def test_the_schema_page_is_current():
    """docs/report-schema.md is generated from the types (``python scripts/report_schema.py``)."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "report_schema.py"), "--check"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_no_verdict_is_nan_with_a_reason_in_the_record():
    """A dead layer (all zeros) gives NaN with a reason, carried by the Estimate and the record."""
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1, bias=False))
    with torch.no_grad():
        net[0].weight.zero_()
    rep = measure(net, torch.rand(2, 1, 12, 12), "rotation:90", layers="0", channels="spatial", n_boot=0,
                  progress=False)
    rec = rep.records[0]
    assert math.isnan(rec.errors.spatial.mean) and rec.n_excluded == 2 and rec.excluded_reasons


# ----------------------------------------------------------------------------- calibration at a glance

def hand_made(transforms: list[str], layers=("a", "b"), spatial=0.3, null=0.5, floor=0.02) -> Report:
    """Records with known numbers: spatial ``spatial * (depth + 1)`` with interval +-0.05, the null
    and the floor with intervals +-0.01."""
    recs = []
    for t in transforms:
        fam = t.split(":")[0]
        for depth, layer in enumerate(layers):
            sp = spatial * (depth + 1)
            recs.append({"layer": layer, "depth": depth, "transform": t, "family": fam, "search": "rigid",
                         "spatial_error": sp, "spatial_error_ci": [sp - 0.05, sp + 0.05],
                         "invariance_error": 0.9, "invariance_error_ci": [0.85, 0.95],
                         "expected_error": 0.8, "expected_error_ci": [0.75, 0.85],
                         "random_pair_null": null, "random_pair_null_ci": [null - 0.01, null + 0.01],
                         "best_params": {"median": [0.0, 0.0, 0.0]}, "channel_orbits": [], "overlap": 0.9,
                         "region_size": 100})
    floors = {t: {"mean": floor, "ci": [floor - 0.01, floor + 0.01]} for t in transforms}
    return Report(records=recs, calibration={"interpolation_floor": floors})


def test_the_layer_figure_shows_every_transformation_with_floor_null_and_intervals():
    """Nine transformations (the figure used to keep the first six): nine panels, each plotting the
    errors it was given, its intervals, the null and the floor (read back from the figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"rotation:{a}" for a in range(10, 100, 10)]
    rep = hand_made(labels)
    fig = rep.plot_layers()
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == labels
    for ax in panels:
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        assert list(lines["spatial"].get_ydata()) == pytest.approx([0.3, 0.6])
        assert list(lines["random-pair null"].get_ydata()) == pytest.approx([0.5, 0.5])
        assert list(lines["interpolation floor"].get_ydata()) == pytest.approx([0.02, 0.02])
        bands = [c.get_paths()[0].vertices[:, 1] for c in ax.collections]  # the intervals, as filled bands
        assert any(min(b) == pytest.approx(0.25) and max(b) == pytest.approx(0.65) for b in bands)
        assert any(min(b) == pytest.approx(0.49) and max(b) == pytest.approx(0.51) for b in bands)
    plt.close(fig)


def test_the_sweep_figure_shows_the_floor_and_each_layers_null_and_interval():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = hand_made(["rotation:0", "rotation:45", "rotation:90"])
    fig = rep.plot_sweep()
    (ax,) = fig.axes
    lines = ax.get_lines()
    by_label = {ln.get_label(): ln for ln in lines}
    assert list(by_label["a"].get_xdata()) == [0.0, 45.0, 90.0] and list(by_label["a"].get_ydata()) == [0.3] * 3
    assert list(by_label["b"].get_ydata()) == pytest.approx([0.6] * 3)
    assert list(by_label["interpolation floor"].get_ydata()) == [0.02] * 3
    nulls = [ln for ln in lines if ln.get_linestyle() == ":" and len(ln.get_xdata())]
    assert len(nulls) == 2 and all(list(ln.get_ydata()) == [0.5] * 3 for ln in nulls)
    plt.close(fig)


@pytest.mark.parametrize("spatial, floor, null, mark", [
    (0.30, 0.02, 0.50, ""),          # between the floor and the null: a verdict
    (0.05, 0.02, 0.50, "at floor"),  # interval [0.00, 0.10] reaches the floor's [0.01, 0.03]
    (0.47, 0.02, 0.50, "at null"),   # interval [0.42, 0.52] reaches the null's [0.49, 0.51]
])
def test_the_table_marks_errors_at_the_floor_or_the_null(spatial, floor, null, mark):
    rep = hand_made(["rotation:30"], layers=("a",), spatial=spatial, floor=floor, null=null)
    rec = rep.records[0]
    assert rec.mark == mark and rec.ratio_to_null == pytest.approx(spatial / null)
    row = rep.table().splitlines()[2]
    assert f"{null:.3f} [{null - 0.01:.3f},{null + 0.01:.3f}]" in row   # the null with its interval
    assert f"{floor:.3f} [{floor - 0.01:.3f},{floor + 0.01:.3f}]" in row
    assert f"{spatial / null:.2f}" in row and (mark or " - ") in row and "0.90" in row and "100" in row
