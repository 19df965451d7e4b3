"""The 12-model sweep (benchmarks/sweeps/zoo12.toml) locally, with a killed worker, and on Slurm.

1. ``sweep run --executor local`` in a subprocess; one worker is killed with SIGKILL mid-task; a
   second ``sweep run`` finishes the sweep.
2. The same plan with ``--executor slurm`` (needs a running cluster: ``SLURM_CONF`` set, e.g. by
   ``scripts/slurm_cluster.sh start DIR``); one array element is cancelled with ``scancel``
   mid-task; a second run resubmits it.
3. Both ``results.parquet`` tables compared value by value; the local sweep's table, summary and
   figures copied to ``benchmarks/results/sweep_zoo12/``.

Needs the models environment (torchvision, timm) and the sweep extra:
``.venv-models/bin/python benchmarks/bench_sweep_zoo.py [--skip-slurm]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from _machine import cpu_model, write_results
from bench_sweep_shards import max_difference

from invariance import sweep

HERE = Path(__file__).parent
SPEC = HERE / "sweeps" / "zoo12.toml"


def _wait_for_marker(folder: Path, timeout: float = 600) -> Path:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted((folder / "running").glob("*.json")) if (folder / "running").is_dir() else []
        if found:
            return found[0]
        time.sleep(0.05)
    raise SystemExit("no task started")


def local(folder: Path) -> dict:
    sweep.plan(SPEC, folder)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "invariance", "sweep", "run", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(20)  # a few tasks done first
    marker = _wait_for_marker(folder)
    os.kill(json.loads(marker.read_text())["pid"], signal.SIGKILL)
    proc.wait()
    first = sweep.status(folder)
    second = sweep.run(folder, "local", progress=True)
    return {"killed": marker.stem, "after_kill": str(first).splitlines()[0],
            "killed_reason": first.failed.get(marker.stem), "rerun": str(second).splitlines()[0],
            "results": len(list((folder / "results").glob("*.json"))), "seconds": round(time.perf_counter() - t0)}


def slurm(folder: Path) -> dict:
    sweep.plan(SPEC, folder)
    t0 = time.perf_counter()
    sweep.run(folder, "slurm", wait=False, array_parallelism=2)
    time.sleep(15)
    marker = _wait_for_marker(folder)
    job = json.loads(marker.read_text())["slurm_job"]
    subprocess.run(["scancel", job], check=True)
    array = job.split("_")[0]
    while subprocess.run(["squeue", "-h", "-r", "-j", array], capture_output=True, text=True).stdout.strip():
        time.sleep(2)
    first = sweep.status(folder)
    second = sweep.run(folder, "slurm", array_parallelism=2)
    return {"cancelled": marker.stem, "slurm_job": job, "after_cancel": str(first).splitlines()[0],
            "rerun": str(second).splitlines()[0], "results": len(list((folder / "results").glob("*.json"))),
            "seconds": round(time.perf_counter() - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-slurm", action="store_true")
    a = p.parse_args()
    out = HERE / "results" / "sweep_zoo12"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        res = {"local": local(d / "local")}
        sweep.report(d / "local")
        one = pq.read_table(d / "local" / "results.parquet").to_pylist()
        if not a.skip_slurm:
            res["slurm"] = slurm(d / "slurm")
            sweep.report(d / "slurm", figures=False)
            worst, n = max_difference(one, pq.read_table(d / "slurm" / "results.parquet").to_pylist())
            res["local_vs_slurm"] = {"values_compared": n, "max_abs_difference": worst}
        out.mkdir(parents=True, exist_ok=True)
        for f in ("results.parquet", "results.csv", "summary.md", "error_by_depth.png", "models_by_transform.png"):
            shutil.copy(d / "local" / f, out / f)
    res["rows"] = len(one)
    res["machine"] = f"{cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end"
    lines = ["# The 12-model sweep: local (a worker killed) and Slurm (an element cancelled)", "",
             "Command: `.venv-models/bin/python benchmarks/bench_sweep_zoo.py` with a one-node Slurm "
             f"(`scripts/slurm_cluster.sh start`). Spec: `benchmarks/sweeps/zoo12.toml`. "
             f"Machine: {res['machine']}.", "",
             f"- local: {res['local']['after_kill']} after SIGKILL of the worker of task {res['local']['killed']} "
             f"(reason recorded: {res['local']['killed_reason']!r}); second run: {res['local']['rerun']}; "
             f"{res['local']['results']} result files; {res['local']['seconds']} s in all."]
    if "slurm" in res:
        s, c = res["slurm"], res["local_vs_slurm"]
        lines += [f"- slurm: {s['after_cancel']} after `scancel {s['slurm_job']}` (task {s['cancelled']}); second "
                  f"run: {s['rerun']}; {s['results']} result files; {s['seconds']} s in all.",
                  f"- local against slurm: {c['values_compared']:,} values compared, largest difference "
                  f"{c['max_abs_difference']:.3g}."]
    lines += ["", "The table, summary and figures of the local sweep are in `sweep_zoo12/`.", ""]
    write_results(HERE / "results", "sweep_zoo12", res, "\n".join(lines))


if __name__ == "__main__":
    main()
