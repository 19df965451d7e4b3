"""Sweeps (invariance.sweep): plans, shards that merge into one call, resuming after a killed
worker, bad specs refused before anything runs, and the results table.

The equality tests are exact by construction, not tuned: every image's errors are independent of
its batch-mates (the search runs per image, with the same refinement jitter for every image), and a
shard measures the image before its first one so that the random-pair null pairs each image with
the same partner as one call; the means and bootstrap intervals are recomputed from the same
per-image values with the same seed. So a sharded sweep must equal the unsharded one to rounding
(1e-12), and a resumed sweep must equal an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from invariance import load_model, load_weights, sweep

pq = pytest.importorskip("pyarrow.parquet", reason="the sweep's table needs pyarrow (the `sweep` extra)")

SPEC = """
[options]
transformations = ["rotation:90", "translation:3,0"]
channels = ["spatial", "lie"]
n_boot = 100
quick = true

[[models]]
name = "wm"
model = "toy-wm"
layers = ["detect"]

[[models]]
name = "cnn"
model = "mnist-cnn-random"
layers = [0.0, 0.4]

[[images]]
name = "glyphs"
source = "glyphs"
n = 7
size = 28
shards = {shards}
"""


def _spec(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _run_in_process(folder: Path) -> None:
    for t in sweep.load_tasks(folder):
        sweep.run_task(folder, t.id)


def _table(folder: Path) -> list[dict]:
    sweep.report(folder, figures=False)
    return pq.read_table(folder / "results.parquet").to_pylist()


def _assert_same_rows(a: list[dict], b: list[dict], tol: float = 1e-12) -> None:
    assert len(a) == len(b) and a
    for r, s in zip(a, b):
        assert (r["model"], r["layer"], r["transform"]) == (s["model"], s["layer"], s["transform"])
        for k, v in r.items():
            w = s[k]
            if isinstance(v, float):
                assert (math.isnan(v) and math.isnan(w)) or abs(v - w) <= tol, (r["model"], r["layer"], k, v, w)
            elif isinstance(v, list) and v and isinstance(v[0], float):
                x, y = np.asarray(v, float), np.asarray(w, float)
                assert x.shape == y.shape, k
                assert np.array_equal(np.isnan(x), np.isnan(y)), k
                assert np.nanmax(np.abs(x - y), initial=0.0) <= tol, (r["model"], r["layer"], k)
            else:
                assert v == w, (k, v, w)


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The unsharded sweep, run in this process (the reference of the other tests)."""
    tmp = tmp_path_factory.mktemp("whole")
    folder = tmp / "sweep"
    tasks = sweep.plan(_spec(tmp, SPEC.format(shards=1)), folder)
    assert len(tasks) == 4  # 2 models x 2 transformations x 1 shard
    _run_in_process(folder)
    return folder, _table(folder)


def test_plan_resolves_relative_depths_and_content_addresses_tasks(tmp_path, whole):
    tasks = sweep.plan(_spec(tmp_path, SPEC.format(shards=1)), tmp_path / "again")
    assert [t.id for t in tasks] == [t.id for t in sweep.load_tasks(whole[0])]  # same spec, same ids
    cnn = next(t for t in tasks if t.key["model"]["name"] == "cnn")
    # relative depths 0.0 and 0.4 of the CNN's 6 spatial maps: the first and round(0.4 * 5) = the third
    assert cnn.key["layers"] == ["conv1", "relu1"] and cnn.info["n_maps"] == 6
    changed = sweep.plan(_spec(tmp_path, SPEC.format(shards=1).replace("n_boot = 100", "n_boot = 99")),
                         tmp_path / "other")
    assert not {t.id for t in changed} & {t.id for t in tasks}  # any option is part of the address


def test_shards_merge_into_the_record_of_one_call(tmp_path, whole):
    """2 shards of 7 images (3 and 4), run by the local executor's worker processes, give the
    unsharded table to rounding: every error, interval, floor, null and per-image value, those of
    the ``lie`` channel (the infinitesimal view, whose null also pairs image i with image i - 1)
    included."""
    folder = tmp_path / "sharded"
    tasks = sweep.plan(_spec(tmp_path, SPEC.format(shards=2)), folder)
    assert len(tasks) == 8
    st = sweep.run(folder, "local", workers=2, progress=False)
    assert st.counts() == {"done": 8, "pending": 0, "failed": 0}
    rows = _table(folder)
    _assert_same_rows(rows, whole[1])
    assert all(len(r["spatial_per_image"]) == 7 for r in rows)
    assert any(r["random_pair_null"] > 0 for r in rows)  # the null was merged, not left out
    rotated = [r for r in rows if r["transform"] == "rotation:90"]
    assert rotated and all(r["lie_aligned"] > 0 and r["lie_null"] > 0 for r in rotated)
    # the Parquet dataset of per-task rows, readable while a sweep runs: one row per shard and layer
    per_task = pq.read_table(folder / "rows").to_pylist()
    assert len(per_task) == 2 * len(rows) and {r["shard"] for r in per_task} == {0, 1}


def test_a_killed_worker_loses_only_its_task_and_a_second_run_finishes(tmp_path, whole):
    folder = tmp_path / "killed"
    sweep.plan(_spec(tmp_path, SPEC.format(shards=1)), folder)
    proc = subprocess.Popen([sys.executable, "-m", "invariance", "sweep", "run", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = None
    deadline = time.time() + 120
    while marker is None and time.time() < deadline:  # the first worker's marker: its pid
        found = sorted((folder / "running").glob("*.json")) if (folder / "running").is_dir() else []
        marker = found[0] if found else None
        time.sleep(0.05)
    assert marker is not None, "no worker started"
    killed = marker.stem
    os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out.decode()[-2000:]  # the run says a task failed
    st = sweep.status(folder)
    assert st.failed == {killed: "worker killed by SIGKILL"} and len(st.done) == 3
    assert not (folder / "results" / f"{killed}.json").exists()  # nothing half-written
    assert "killed by SIGKILL" in str(st)
    st = sweep.run(folder, "local", progress=False)  # runs the killed task only
    assert st.counts() == {"done": 4, "pending": 0, "failed": 0}
    assert len(list((folder / "results").glob("*.json"))) == 4  # no task duplicated
    _assert_same_rows(_table(folder), whole[1])


def test_report_writes_the_table_the_csv_the_summary_and_the_figures(whole):
    folder, rows = whole
    paths = sweep.report(folder)
    assert {p.name for p in paths.values()} == {"results.parquet", "results.csv", "summary.md", "error_by_depth.png",
                                                "models_by_transform.png"}
    assert {(r["model"], r["transform"]) for r in rows} == {(m, t) for m in ("wm", "cnn")
                                                            for t in ("rotation:90", "translation:3,0")}
    summary = (folder / "summary.md").read_text()
    assert "## rotation:90 on glyphs (7 images)" in summary and "| cnn | 237,386 | relu1 |" in summary
    # a translation by a multiple of every layer's stride is exact: at the floor, far below the null
    shift = [r for r in rows if r["transform"] == "translation:3,0" and r["model"] == "wm"]
    assert shift and all(r["spatial_error"] < 1e-6 < r["random_pair_null"] for r in shift)
    csv_rows = (folder / "results.csv").read_text().splitlines()
    assert len(csv_rows) == len(rows) + 1 and "spatial_per_image" in csv_rows[0]


def test_status_and_report_of_an_unfinished_sweep(tmp_path):
    folder = tmp_path / "s"
    sweep.plan(_spec(tmp_path, SPEC.format(shards=1)), folder)
    st = sweep.status(folder)
    assert st.counts() == {"done": 0, "pending": 4, "failed": 0}
    with pytest.raises(ValueError, match="no .* has all its tasks done"):
        sweep.report(folder)
    with pytest.raises(ValueError, match="has no plan"):
        sweep.status(tmp_path / "nothing")
    with pytest.raises(ValueError, match="executor: 'ray'; valid choices: local, slurm"):
        sweep.run(folder, "ray")


_GOOD = SPEC.format(shards=1)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace("[options]", "[options"), r"spec: spec.toml is not valid TOML"),
    (lambda s: s.replace('model = "toy-wm"', 'model = "toy-nope"'), r"models\[0\] 'wm': model: unknown model"),
    (lambda s: s.replace('layers = ["detect"]', 'layers = ["detectt"]'),
     r"models\[0\] 'wm': no spatial layer 'detectt'; valid: detect"),
    (lambda s: s.replace("layers = [0.0, 0.4]", "layers = [0.5, 1.5]"),
     r"models\[1\] 'cnn': relative depths must lie in \[0, 1\]"),
    (lambda s: s.replace('"rotation:90"', '"rotate:90"'), r"options.transformations 'rotate:90'"),
    (lambda s: s.replace('layers = ["detect"]', 'layers = ["detect"]\nweights = "missing.pt"'),
     r"models\[0\] 'wm': weights file 'missing.pt' not found"),
    (lambda s: s.replace('name = "cnn"', 'name = "wm"'), r"models: duplicate name 'wm'"),
    (lambda s: s + '\n[[images]]\nname = "glyphs"\nsource = "blobs"\n', r"images: duplicate name 'glyphs'"),
    (lambda s: s.replace("quick = true", "quick = true\nspeed = 3"), r"options: unknown key 'speed'"),
    (lambda s: s.replace('source = "glyphs"', 'source = "nowhere"'), r"images\[0\] 'glyphs': images: unknown SOURCE"),
    (lambda s: s.replace("shards = 1", "shards = 9"), r"images\[0\] 'glyphs': shards = 9 but the set holds 7"),
    (lambda s: s.replace('channels = ["spatial", "lie"]', 'channels = ["spatial", "permutation"]').replace(
        "shards = 1", "shards = 2"), r"shards > 1 with channel 'permutation'"),
    (lambda s: s.replace("n_boot = 100", "n_boot = -1"), r"options.n_boot: must be an integer >= 0"),
    (lambda s: s.replace('model = "mnist-cnn-random"', 'model = "torchvision:resnet18"'),
     r"models\[1\] 'cnn': model: .*torchvision"),
])
def test_a_bad_spec_is_refused_with_one_line_naming_the_entry_and_nothing_is_written(tmp_path, edit, message):
    folder = tmp_path / "s"
    with pytest.raises(sweep.SpecError, match=message) as exc:
        sweep.plan(_spec(tmp_path, edit(_GOOD)), folder)
    assert "\n" not in str(exc.value).strip()
    assert not (folder / "plan").exists()


def test_the_command_line(tmp_path):
    spec = _spec(tmp_path, _GOOD.replace('model = "toy-wm"', 'model = "toy-nope"'))
    r = subprocess.run([sys.executable, "-m", "invariance", "sweep", "plan", str(spec), "--out", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("invariance: error: spec: models[0] 'wm': model: unknown model")
    assert len(r.stderr.strip().splitlines()) == 1
    spec = _spec(tmp_path, _GOOD)
    r = subprocess.run([sys.executable, "-m", "invariance", "sweep", "plan", str(spec), "--out", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "planned 4 task(s)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "invariance", "sweep", "status", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "4 tasks: 0 done, 4 pending, 0 failed" in r.stdout


def test_load_weights_reads_a_state_dict_and_runs_nothing(tmp_path):
    net = torch.nn.Conv2d(1, 2, 3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    other = load_weights(torch.nn.Conv2d(1, 2, 3), tmp_path / "w.pt")
    assert torch.equal(other.weight, net.weight)
    with pytest.raises(ValueError, match="does not fit the model"):
        load_weights(torch.nn.Conv2d(1, 3, 3), tmp_path / "w.pt")
    torch.save({"w": torch.nn.ReLU()}, tmp_path / "obj.pt")
    with pytest.raises(ValueError, match="holds Python objects"):
        load_weights(net, tmp_path / "obj.pt")
    bad = {k: v.clone() for k, v in net.state_dict().items()}
    bad["weight"][0, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="'weight' holds NaN"):
        load_weights(net, tmp_path / "nan.pt")


def test_zoo_models_need_their_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ValueError, match=r"timm:convnext_nano needs the package timm \(pip install"):
        load_model("timm:convnext_nano")
