"""The sweep on a real Slurm cluster (``make test-cluster`` starts a one-node cluster with Debian's
slurm-wlm and munge, runs this module, and stops it).

Without a cluster (``sbatch`` missing or ``sinfo`` failing) the tests are skipped with that
reason, except under ``make test-cluster`` (``INVARIANCE_REQUIRE_SLURM=1``), where a missing
cluster is a failure.

The equalities are exact by construction (see tests/test_sweep.py): a task's result depends on
its key only (model, layers, transformation, images, options, threads), not on where it ran, so
the Slurm table must equal the local one to rounding (1e-12), also after an array element was
cancelled with ``scancel`` and the sweep was run again.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from invariance import sweep

pq = pytest.importorskip("pyarrow.parquet", reason="the sweep's table needs pyarrow (the `sweep` extra)")
pytest.importorskip("submitit", reason="the Slurm executor needs submitit (the `sweep` extra)")


def _cluster_up() -> str | None:
    """Why there is no usable cluster, or None."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (make test-cluster starts a one-node Slurm)"
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if r.returncode != 0 or "idle" not in r.stdout and "mix" not in r.stdout and "alloc" not in r.stdout:
        said = " ".join((r.stderr or r.stdout).split())
        return f"sinfo sees no node ({said[:200]})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    why = _cluster_up()
    if why is not None:
        if os.environ.get("INVARIANCE_REQUIRE_SLURM") == "1":
            pytest.fail(f"make test-cluster: {why}")
        pytest.skip(why)


def _models() -> str:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return ""
    return """
[[models]]
name = "resnet18"
model = "torchvision:resnet18"
layers = [0.1, 0.3]
images = ["rgb"]
"""


# a network that can take its time (a pause in every forward pass while SLOW_PAUSE is set, as in the
# cancellation test only; Slurm's jobs inherit the submitting process' environment): an array element
# running it can be cancelled mid-task, not after it has ended. A task makes three forward passes
# (the probe, the images, the transformed images); with 0.5 s pauses one once ended between its
# start marker and the scancel (a loaded machine), so each pause is 2 s: the scancel has about 6 s
SLOW = """
import os
import time
import torch


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 5, padding=2)

    def forward(self, x):
        time.sleep(float(os.environ.get("SLOW_PAUSE", "0")))
        return self.conv(x)
"""

SPEC = """
[options]
transformations = ["rotation:90", "translation:4,0"]
channels = ["spatial"]
n_boot = 100
quick = true

[[models]]
name = "slow"
model = "slow.py:Slow"
layers = ["conv"]
images = ["glyphs"]

[[models]]
name = "cnn"
model = "mnist-cnn-random"
layers = [0.0, 0.4]
images = ["glyphs"]
{models}
[[images]]
name = "glyphs"
source = "glyphs"
n = 6
size = 28
shards = 2

[[images]]
name = "rgb"
source = "blobs"
n = 4
size = 64
channels = 3
"""


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    """One spec file (and its slow.py) for every sweep here: the same tasks, the same rows."""
    tmp = tmp_path_factory.mktemp("spec")
    (tmp / "slow.py").write_text(SLOW)
    path = tmp / "spec.toml"
    path.write_text(SPEC.format(models=_models()))
    return path


def _plan(spec: Path, folder: Path) -> Path:
    sweep.plan(spec, folder)
    return folder


def _table(folder: Path) -> list[dict]:
    sweep.report(folder, figures=False)
    return pq.read_table(folder / "results.parquet").to_pylist()


def _assert_same(a: list[dict], b: list[dict], tol: float = 1e-12) -> None:
    assert len(a) == len(b) and a
    for r, s in zip(a, b):
        for k, v in r.items():
            w = s[k]
            if isinstance(v, float):
                assert (math.isnan(v) and math.isnan(w)) or abs(v - w) <= tol, (r["model"], r["layer"], k, v, w)
            elif isinstance(v, list) and v and isinstance(v[0], float):
                x, y = np.asarray(v, float), np.asarray(w, float)
                assert x.shape == y.shape and np.array_equal(np.isnan(x), np.isnan(y)), k
                assert np.nanmax(np.abs(x - y), initial=0.0) <= tol, (r["model"], r["layer"], k)
            else:
                assert v == w, (k, v, w)


@pytest.fixture(scope="module")
def local(tmp_path_factory, spec) -> list[dict]:
    """The sweep run here, task by task in this process (tests/test_sweep.py checks that the local
    executor's worker processes give the same table)."""
    folder = _plan(spec, tmp_path_factory.mktemp("local") / "sweep")
    for t in sweep.load_tasks(folder):
        sweep.run_task(folder, t.id)
    assert not sweep.status(folder).pending
    return _table(folder)


def test_slurm_gives_the_local_table(tmp_path, spec, local):
    folder = _plan(spec, tmp_path / "slurm")
    st = sweep.run(folder, "slurm", time_limit=10, array_parallelism=2)
    assert st.counts() == {"done": len(st.tasks), "pending": 0, "failed": 0}
    hosts = {json.loads(p.read_text())["meta"]["sweep"]["host"] for p in (folder / "results").glob("*.json")}
    assert hosts  # each result says where it ran
    arrays = list((folder / "slurm").glob("*/array.json"))
    assert len(arrays) == 1 and len(json.loads(arrays[0].read_text())["tasks"]) == len(st.tasks)
    _assert_same(_table(folder), local)


def _squeue(array: str) -> list[str]:
    r = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i %T"], capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if line.strip()]


def test_a_cancelled_array_element_runs_again_and_the_table_is_the_same(tmp_path, spec, local, monkeypatch):
    monkeypatch.setenv("SLOW_PAUSE", "2.0")
    folder = _plan(spec, tmp_path / "cancelled")
    sweep.run(folder, "slurm", time_limit=10, array_parallelism=2, wait=False)
    array = json.loads(next((folder / "slurm").glob("*/array.json")).read_text())["array"]
    first = sweep.load_tasks(folder)[0]  # the slow network's first task: the first array element
    assert first.key["model"]["name"] == "slow"
    marker, deadline = folder / "running" / f"{first.id}.json", time.time() + 180
    while not marker.is_file() and time.time() < deadline:  # it has started its task
        time.sleep(0.1)
    assert marker.is_file(), "the first array element did not start"
    cancelled = marker.stem
    job = json.loads(marker.read_text())["slurm_job"]
    assert job and job.startswith(array + "_")
    subprocess.run(["scancel", job], check=True)
    deadline = time.time() + 300
    while _squeue(array) and time.time() < deadline:  # the rest of the array runs to its end
        time.sleep(1)
    assert not _squeue(array)
    st = sweep.status(folder)
    assert cancelled in st.running  # started, never ended: cancelled mid-task
    assert cancelled not in st.done and len(st.done) == len(st.tasks) - 1, str(st)
    st = sweep.run(folder, "slurm", time_limit=10)  # resubmits the cancelled task only
    assert st.counts() == {"done": len(st.tasks), "pending": 0, "failed": 0}
    second = sorted((folder / "slurm").glob("*/array.json"))[-1]
    assert list(json.loads(second.read_text())["tasks"]) == [cancelled]
    assert len(list((folder / "results").glob("*.json"))) == len(st.tasks)  # nothing duplicated
    _assert_same(_table(folder), local)
