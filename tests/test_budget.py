"""The budgeted training path (stn._budget) and the GPU suite's CPU smoke run (benchmarks/gpu_suite.sh --tiny)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from invariance import load_digits
from stn import (
    StepSchedule,
    TransformedDataset,
    build_model,
    evaluate_repeats,
    get_protocol,
    reproduce_budget,
    train_together,
)

ROOT = Path(__file__).resolve().parents[1]


def _data(seed=0, n=64, name="rotation"):
    imgs, labels = load_digits()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))[:n]
    return TransformedDataset(imgs[perm], labels[perm], get_protocol(name), seed=seed)


def _weights(m):
    return torch.cat([p.detach().flatten() for p in m.state_dict().values() if p.is_floating_point()])


def test_schedule_waits_for_takeoff():
    """Known answers of the rule in StepSchedule's docstring (steps 1000, earliest 0.5, latest 0.85,
    hold 0.25): no cut before the take-off; take-off at 400 -> first cut at 650, second at 825; a
    model without a transformer is cut at 500 and 750; one that never takes off at 850 and 925."""
    s = StepSchedule(steps=1000, lr=0.1)
    assert s.factor(849, None, has_transformer=True) == 1.0
    assert s.factor(850, None, has_transformer=True) == pytest.approx(0.1)
    assert s.factor(925, None, has_transformer=True) == pytest.approx(0.01)
    assert [s.factor(k, 400, has_transformer=True) for k in (649, 650, 824, 825)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01])
    assert [s.factor(k, None, has_transformer=False) for k in (499, 500, 749, 750)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0, "lr": 0.1}, "steps"), ({"steps": 10, "lr": 0.0}, "lr"),
    ({"steps": 10, "lr": 0.1, "earliest": 0.9, "latest": 0.5}, "earliest"),
    ({"steps": 10, "lr": 0.1, "takeoff": 1.5}, "takeoff"),
])
def test_schedule_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepSchedule(**kwargs)


def test_models_trained_together_follow_their_own_trajectory():
    """A model trained beside others on the shared batches ends with exactly the weights it gets when
    trained alone: sharing the rendered batch changes nothing but the cost (CPU, bit-identical)."""
    ds = _data()
    sched = StepSchedule(steps=3, lr=0.02)
    torch.manual_seed(0)
    alone = build_model("STN-SL1", family="rotation")
    torch.manual_seed(0)
    beside = build_model("STN-SL1", family="rotation")
    other = build_model("CNN", family="rotation")
    train_together({0: (ds, {"a": alone})}, sched, batch_size=16, log_every=3, progress=False, log=None)
    train_together({0: (ds, {"b": beside, "c": other})}, sched, batch_size=16, log_every=3, progress=False, log=None)
    assert torch.equal(_weights(alone), _weights(beside))


def test_interrupted_training_resumes_bit_identically(tmp_path):
    """Stopped after its first step (a time limit of 0 s) and resumed from the checkpoint, a run ends
    with the same weights and history as an uninterrupted one (CPU: bit-identical)."""
    ds = _data()
    sched = StepSchedule(steps=4, lr=0.02)
    torch.manual_seed(0)
    straight = build_model("STN-C1", family="rotation")
    h1 = train_together({0: (ds, {"m": straight})}, sched, batch_size=16, log_every=2, progress=False, log=None)
    torch.manual_seed(0)
    resumed = build_model("STN-C1", family="rotation")
    ck = tmp_path / "state.pt"
    part = train_together({0: (ds, {"m": resumed})}, sched, batch_size=16, log_every=2, checkpoint=ck,
                          time_limit=0.0, progress=False, log=None)
    assert part["m"][-1]["step"] == 1 and ck.exists()
    torch.manual_seed(123)  # a fresh model: everything must come from the checkpoint
    fresh = build_model("STN-C1", family="rotation")
    h2 = train_together({0: (ds, {"m": fresh})}, sched, batch_size=16, log_every=2, checkpoint=ck,
                        progress=False, log=None)
    assert torch.equal(_weights(straight), _weights(fresh))
    assert [e["step"] for e in h2["m"]] == [1, 2, 4]
    assert h2["m"][-1]["train_loss"] == h1["m"][-1]["train_loss"]


def test_checkpoint_of_another_training_is_refused(tmp_path):
    ds = _data()
    ck = tmp_path / "state.pt"
    train_together({0: (ds, {"m": build_model("CNN")})}, StepSchedule(steps=1, lr=0.01), batch_size=8,
                   log_every=1, checkpoint=ck, progress=False, log=None)
    with pytest.raises(ValueError, match="checkpoint"):
        train_together({0: (ds, {"m": build_model("CNN")})}, StepSchedule(steps=2, lr=0.01), batch_size=8,
                       log_every=1, checkpoint=ck, progress=False, log=None)


def test_repeated_test_error_is_the_mean_over_repeats():
    """With equal repeats, the pooled error equals the mean of the per-repeat errors; every repeat
    uses its own fixed draw (the errors are reproducible run to run)."""
    test = TransformedDataset(*[t[:40] for t in load_digits()], get_protocol("rotation"), split="test")
    torch.manual_seed(0)
    m = build_model("CNN", family="rotation")
    a = evaluate_repeats(m, test, 3)
    b = evaluate_repeats(m, test, 3)
    assert a["test_error"] == pytest.approx(sum(a["repeat_errors"]) / 3, abs=1e-12)
    assert a["repeat_errors"] == b["repeat_errors"] and a["n_predictions"] == 120
    assert len(a["correct"]) == 120


def test_unknown_budget_and_transform_are_named():
    with pytest.raises(ValueError, match="budget: unknown budget 'huge'; valid choices: gpu, tiny"):
        reproduce_budget("huge")
    with pytest.raises(ValueError, match="transforms"):
        reproduce_budget("tiny", transforms=["shear"])


def test_gpu_suite_runs_end_to_end_on_the_cpu(tmp_path):
    """``benchmarks/gpu_suite.sh --tiny``: every part of the GPU suite runs on the CPU and writes its
    results: the suite summary (the plan and 6 parts, all ok; resnet50 skipped without
    torchvision), each with its time, the plan's estimate and its cap; the plan (the device's
    prices, and the op counts it priced: FFT work for the search benchmarks, dense work for
    training); the search, FFT-bound and training benchmarks; and the budgeted reproduction with 3
    columns x 5 architectures (2 seeds under rotation), the paper's claims with verdicts, the
    canonical pose per model and its figure."""
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--tiny", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    summary = (tmp_path / "suite.md").read_text()
    assert run.returncode == 0, summary + run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| part")]
    assert [r[0].strip() for r in rows] == ["plan", "cuda-tests", "search-bench", "fft-bound", "train-bench",
                                            "reproduction", "resnet50"]
    results = [r[1].strip() for r in rows]
    assert all(r == "ok" for r in results[:-1]), summary
    torchvision = importlib.util.find_spec("torchvision") is not None
    assert results[-1] == "ok" if torchvision else results[-1].startswith("skipped: torchvision"), summary
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["tiny"] and plan["device"] == "cpu" and set(plan["parts"]) == {r[0].strip() for r in rows}
    assert all(plan["prices"][k] > 0 for k in ("launch", "fft", "mm", "bandwidth", "process_start"))
    parts = plan["parts"]
    assert parts["search-bench"]["counts"]["fft_flops"] > 0 and parts["fft-bound"]["counts"]["fft_flops"] > 0
    assert parts["train-bench"]["counts"]["dense_flops"] > 0 and parts["reproduction"]["counts"]["dense_flops"] > 0
    for r in rows[2:6]:  # the estimated parts: the estimate in the summary is the plan's
        assert r[3].strip() == f"{parts[r[0].strip()]['estimate']:.0f}" and r[4].strip() == "600"
    assert (tmp_path / "cuda-tests.xml").exists()
    fft = json.loads((tmp_path / "fft_bound_tiny.json").read_text())
    assert fft["complete"] and len(fft["results"]) == 2
    train = json.loads((tmp_path / "train_throughput_tiny.json").read_text())
    assert train["ratio"] > 0 and set(train["plain_images_per_s"]) == {"CNN", "STN-C0", "STN-C1", "STN-DL1",
                                                                        "STN-SL1"}
    assert json.loads((tmp_path / "search_tiny.json").read_text())["complete"]
    rep = json.loads((tmp_path / "reproduction.json").read_text())
    assert rep["budget"] == "tiny" and list(rep["columns"]) == ["rotation", "scale", "translation"]
    assert len(rep["columns"]["rotation"]["cells"]) == 10 and len(rep["columns"]["scale"]["cells"]) == 5
    assert all(0 <= rep["table"][a][t] <= 100 for a in rep["table"] for t in rep["table"][a])
    assert len(rep["claims"]) == 3 and all(isinstance(c["holds"], bool) for c in rep["claims"])
    cell = rep["columns"]["rotation"]["cells"]["STN-SL1/seed1"]
    assert cell["canonical_pose"]["applied_only_mean_spread"] > 0 and cell["history"]
    assert (tmp_path / "canonical_pose.png").stat().st_size > 1000
    assert "## The paper's claims" in (tmp_path / "reproduction.md").read_text()


def test_the_gpu_suites_caps_add_up_to_its_lease():
    """The caps of a GPU run add up to at most the suite's share of a 15-minute lease (10 minutes;
    the first lease's machine started in 46 s): the suite fits by construction, whatever the plan
    estimates."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite_plan.py"), "--caps"],
                         capture_output=True, text=True, check=True).stdout
    caps = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}
    assert set(caps) == {"plan", "cuda-tests", "search-bench", "fft-bound", "train-bench", "reproduction",
                         "resnet50"}
    assert sum(caps.values()) <= 10 * 60


def test_a_part_that_runs_out_of_time_is_recorded_as_capped(tmp_path):
    """A part stopped by its cap is "capped" in the summary (not a failure: the suite exits 0), and
    the suite goes on. The tiny reproduction takes several seconds (it trains 15 models), far more
    than a 1-second cap."""
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--tiny", "--out", str(tmp_path),
                          "--parts", "reproduction", "--cap", "reproduction=1", "--cap", "plan=1"],
                         capture_output=True, text=True, env=env, timeout=300)
    summary = (tmp_path / "suite.md").read_text()
    assert run.returncode == 0, summary + run.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| part")}
    assert set(rows) == {"plan", "reproduction"}, summary
    assert rows["reproduction"].startswith("capped at 1 s") and rows["plan"].startswith("capped at 1 s"), summary


def test_the_plan_counts_only_the_parts_run_and_checkpoints_after_each(monkeypatch):
    """``--parts`` reaches the plan: a part not run is marked skipped and never counted (on the first
    GPU lease counting every part outran the plan's cap), and the plan hands its state to
    ``checkpoint`` after each part it counts, incomplete until the last, so a capped plan leaves
    what it has. Counting is replaced by a stub: the law is about the order and the records."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _ops
    import suite_plan

    counted = []

    def stub(name):
        def work(tiny, dev, *rest):
            counted.append(name)
            return (_ops.OpCount(), 0.0) if name == "reproduction" else _ops.OpCount()
        return work

    for name in ("search_bench", "fft_bound", "train_bench", "reproduction"):
        monkeypatch.setattr(suite_plan, f"work_{name}", stub(name.replace("_", "-")))
    monkeypatch.setattr(suite_plan, "start_seconds", lambda: 0.0)
    states = []
    p = suite_plan.plan(True, "cpu", suite_plan.caps(True, {}), progress=lambda s: None,
                        parts_run=["reproduction", "fft-bound"],
                        checkpoint=lambda st: states.append((st["complete"], sorted(
                            k for k, v in st["parts"].items() if v["estimate"] is not None and "skipped" not in v))))
    assert counted == ["reproduction", "fft-bound"]
    assert states == [(False, ["reproduction"]), (False, ["fft-bound", "reproduction"])]
    assert p["complete"] and {k for k, v in p["parts"].items() if "skipped" in v} == {
        "cuda-tests", "search-bench", "train-bench", "resnet50"}


def test_the_plan_sizes_resnet50_from_its_timed_work_within_its_share_of_the_cap(monkeypatch):
    """The resnet50 part is sized from two timed calls of its work (stubbed here: 2 s fixed, 0.5 s
    per image): the most images whose estimate, process starts included, stays within
    ``RESNET50_FILL`` of the cap; one more image would not (the law, not a recorded number)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import suite_plan

    monkeypatch.setattr(suite_plan, "time_resnet50", lambda tiny, dev: (2.0, 0.5))
    monkeypatch.setattr(suite_plan, "start_seconds", lambda: 5.5)
    cap = suite_plan.caps(False, {})
    p = suite_plan.plan(False, "cpu", cap, progress=lambda s: None, parts_run=["resnet50"])
    r = p["parts"]["resnet50"]
    budget = suite_plan.RESNET50_FILL * cap["resnet50"]
    starts = suite_plan.PROCESSES["resnet50"] * 5.5
    assert r["estimate"] == pytest.approx(starts + 2.0 + 0.5 * r["images"])
    assert r["estimate"] <= budget < r["estimate"] + 0.5, r
    assert r["timed_images"] == list(suite_plan.RESNET50_TIMED[False])


def test_a_benchmark_writes_each_result_as_it_finishes(tmp_path):
    """What a capped part leaves: the FFT-bound benchmark rewrites its results after every map
    size, so they are on disk (marked incomplete) before the next size starts. Read while the
    benchmark still runs: as soon as it prints the first size's table."""
    with subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_fft_bound.py"), "--tiny",
                           "--out", str(tmp_path)], stdout=subprocess.PIPE, text=True) as proc:
        try:
            for line in proc.stdout:
                if line.startswith("**Incomplete**"):
                    break
            partial = json.loads((tmp_path / "fft_bound_tiny.json").read_text())
        finally:
            proc.kill()
    assert partial["complete"] is False and [r["layer"] for r in partial["results"]] == ["tiny"]


@pytest.mark.parametrize("args, message", [
    (["--parts", "nope"], "--parts: unknown part 'nope'; valid parts: cuda-tests,"),
    (["--cap", "nope=3"], "--cap: unknown part 'nope'; valid parts: plan, cuda-tests,"),
    (["--cap", "plan=soon"], "--cap: expected PART=SECONDS with a positive integer"),
])
def test_the_gpu_suite_names_a_bad_argument(tmp_path, args, message):
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--tiny", "--out", str(tmp_path), *args],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_the_gpu_settings_run_on_the_cpu_too():
    """bfloat16 autocast and channels-last (the GPU budget's settings) take the same code path on
    the CPU: the shared-batch loop trains with them (the loss after 12 steps is below the first
    steps' on a fixed subset of digits) and the weights stay finite float32."""
    ds = _data(n=64)
    torch.manual_seed(0)
    m = build_model("STN-SL1", family="rotation")
    h = train_together({0: (ds, {"m": m})}, StepSchedule(steps=12, lr=0.05), batch_size=32, log_every=4,
                       amp=True, channels_last=True, progress=False, log=None)
    losses = [e["train_loss"] for e in h["m"]]
    assert losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 and bool(torch.isfinite(p).all()) for p in m.parameters())
