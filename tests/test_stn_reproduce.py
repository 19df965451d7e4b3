"""``stn reproduce`` (stn/_reproduce.py): how the runs are planned, how an interrupted reproduction
resumes, and how the table and its markdown are assembled from the run folders.

The table tests build the run folders by hand (:func:`write_finished_run`): a finished run is
one whose ``metrics.json`` says ``finished`` with the planned configuration and whose
``evaluation.json`` is finished and not older than its ``checkpoint.pt``; ``reproduce`` then
reads the numbers and trains nothing, so the test error of every cell is known exactly. Only
the resumption test trains (tiny fake data, a few seconds). ``tests/test_stn_train.py`` runs a
whole tiny reproduction end to end; this module checks the numbers in it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest

from stn import ARCHS, MODES, PAPER_TABLE, TRANSFORMS, TrainConfig, plan, train
from stn import _reproduce as rep
from stn.testing import write_fake_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)

# a tiny rotation-only mode for the runs that do train (2 epochs, so that one can be interrupted)
TINY = rep.Mode(name="quick", sizes={"rotation": None, "scale": 28, "translation": 28},
                epochs={"rotation": 2, "scale": 1, "translation": 1},
                milestones={"rotation": [], "scale": [], "translation": []}, limit=32, test_limit=8,
                batch_size=16, alignment_images=2, note="tiny test mode")


def _quiet(msg: str) -> None:
    pass


def write_finished_run(run: Path, cfg: TrainConfig, *, wrong: int, n_test: int, spread: float = 1.0) -> None:
    """A finished run folder of ``cfg`` whose test set has ``n_test`` images, the first ``wrong`` of
    them misclassified (so the wrong sets of any two such runs are nested), and whose canonical-pose
    statistic is ``spread``. ``checkpoint.pt`` is a placeholder: for a finished run whose evaluation is
    up to date ``reproduce`` reads only its modification time (it is written first, and dated back)."""
    run.mkdir(parents=True)
    ck = run / "checkpoint.pt"
    ck.write_bytes(b"placeholder")
    past = ck.stat().st_mtime - 60
    os.utime(ck, (past, past))
    metrics = {"config": cfg.to_dict(), "history": [{"epoch": cfg.epochs, "images_per_s": 250.0}],
               "finished": True, "seconds": 20.0, "train_data": "fake train images"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    err = wrong / n_test
    evaluation = {"finished": True, "test_error": err, "test_error_se": math.sqrt(err * (1 - err) / n_test),
                  "n_test": n_test, "epochs": cfg.epochs, "seconds": 5.0,
                  "correct": "0" * wrong + "1" * (n_test - wrong),
                  "canonical_pose": {"quantity": "q", "unit": "u", "mean_spread": spread,
                                     "applied_only_mean_spread": 9.0},
                  "feature_alignment": None, "protocol": cfg.protocol.describe(), "test_data": "fake test images"}
    (run / "evaluation.json").write_text(json.dumps(evaluation))


def snapshot(folder: Path) -> dict:
    """Every file of a folder: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def table_rows(md: str, heading: str) -> dict[str, list[str]]:
    """The rows ``| name | cell | cell |`` of the markdown table right under the line ``heading``."""
    lines = md.splitlines()
    start = lines.index(heading)
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| architecture"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


# ----------------------------------------------------------------------------- planning


def test_quick_plan_is_the_fifteen_mnist_cells_with_each_protocols_settings():
    """The quick mode plans one run per cell of the paper's MNIST table (5 architectures x 3
    protocols, no Fashion-MNIST), named ``mnist-<transform>-<arch>``, every setting taken from the
    mode for that run's protocol; the values spelled out here are those of :data:`MODES` ``quick``."""
    runs = plan(MODES["quick"], data_root="/data")
    assert [name for name, _ in runs] == [f"mnist-{t}-{a}" for t in TRANSFORMS for a in ARCHS]
    for name, cfg in runs:
        t = cfg.transform
        assert name == f"{cfg.dataset}-{t}-{cfg.arch}"
        assert (cfg.size, cfg.epochs, cfg.milestones) == (MODES["quick"].sizes[t], MODES["quick"].epochs[t],
                                                          MODES["quick"].milestones[t])
        assert (cfg.seed, cfg.eval_every, cfg.data_root, cfg.limit, cfg.test_limit) == (0, 0, "/data", None, None)
    cfgs = dict(runs)
    t = cfgs["mnist-translation-STN-C1"]
    assert (t.size, t.epochs, t.milestones, t.loc_lr_mult, t.lr, t.batch_size) == (32, 4, [3], 0.03, 0.02, 64)
    r = cfgs["mnist-rotation-STN-SL1"]
    assert (r.size, r.protocol.size, r.epochs, r.milestones, r.loc_lr_mult) == (None, 28, 7, [5], 1.0)
    s = cfgs["mnist-scale-CNN"]
    assert (s.size, s.epochs, s.milestones, s.resolved_family) == (40, 3, [2], "scale_translation")


def test_full_plan_adds_fashion_mnist_after_mnist():
    """The full mode runs every protocol on Fashion-MNIST too: 30 runs, the 15 MNIST ones first;
    ``fashion=False`` leaves the 15 MNIST runs; ``transforms`` keeps only those protocols' cells."""
    runs = plan(MODES["full"])
    names = [n for n, _ in runs]
    assert len(names) == 30 and len(set(names)) == 30
    assert names[:15] == [f"mnist-{t}-{a}" for t in TRANSFORMS for a in ARCHS]
    assert names[15:] == [f"fashion-mnist-{t}-{a}" for t in TRANSFORMS for a in ARCHS]
    assert all(cfg.epochs == 50 and cfg.milestones == [35, 45] and cfg.size is None for _, cfg in runs)
    assert [n for n, _ in plan(MODES["full"], fashion=False)] == names[:15]
    some = plan(MODES["full"], transforms=["translation", "rotation"])
    assert sorted(n for n, _ in some) == sorted(f"{d}-{t}-{a}" for d in ("mnist", "fashion-mnist")
                                                for t in ("rotation", "translation") for a in ARCHS)


def test_fashion_runs_use_the_fashion_limits_and_only_the_fashion_protocols():
    """``Mode.fashion`` names the protocols also run on Fashion-MNIST, with ``fashion_limit`` /
    ``fashion_test_limit`` as their image limits (MNIST keeps ``limit`` / ``test_limit``)."""
    mode = replace(MODES["quick"], fashion=("scale",), limit=100, test_limit=50, fashion_limit=30,
                   fashion_test_limit=20)
    runs = plan(mode)
    fashion = [(n, c) for n, c in runs if c.dataset == "fashion-mnist"]
    assert [n for n, _ in fashion] == [f"fashion-mnist-scale-{a}" for a in ARCHS]
    assert all((c.limit, c.test_limit) == (30, 20) for _, c in fashion)
    assert all((c.limit, c.test_limit) == (100, 50) for _, c in runs if c.dataset == "mnist")
    assert plan(mode, transforms=["rotation"]) == [(n, c) for n, c in runs if c.transform == "rotation"]


# ----------------------------------------------------------------------------- the table


def test_table_from_run_folders_shows_each_runs_test_error_in_its_cell(tmp_path):
    """Run folders whose test errors are the paper's own (n = 10,000 test images, so 1.71% is 171
    wrong) give a table in which every cell reads ``ours +- SE (paper)`` with ours = paper, the SE
    the binomial ``sqrt(p (1 - p) / n)``; the canonical-pose table shows each run's spread in its
    cell; nothing is trained or re-evaluated (every folder is byte-for-byte unchanged); the claims
    hold as on the paper's numbers, with the gaps 0.28 / 0.15 / 0.06 points of the module docstring.

    Paired standard error: the wrong images of any two runs are nested here, so the per-image
    difference is 1 on ``m = |k_a - k_b|`` images and 0 elsewhere, and ``se = sqrt(m (1 - m/n)) / n``;
    STN-C0 (108 wrong) vs STN-C1 (132 wrong) under rotation: m = 24, se = 0.04893 points,
    z = 0.24 / se = 4.905. Tolerances: float64 rounding of a few operations (relative 1e-12)."""
    n = 10_000
    out, res = tmp_path / "runs", tmp_path / "res"
    spreads = {}
    for name, cfg in plan(MODES["quick"]):
        i, j = ARCHS.index(cfg.arch), TRANSFORMS.index(cfg.transform)
        spreads[name] = (i + 1) + (j + 1) / 10  # 1.1, 1.2, ... 5.3: row = architecture, column = protocol
        write_finished_run(out / name, cfg, wrong=round(100 * PAPER_TABLE[cfg.arch][cfg.transform]), n_test=n,
                           spread=spreads[name])
    before = {p.name: snapshot(p) for p in out.iterdir()}
    logs: list[str] = []
    report = rep.reproduce(quick=True, out=out, results=res, device="cpu", log=logs.append)
    assert sum(line.endswith("finished already, skipped") for line in logs) == 15
    assert not any(": training" in line for line in logs)
    assert {p.name: snapshot(p) for p in out.iterdir()} == before

    md = (res / "reproduction.md").read_text()
    errors = table_rows(md, "## Test error (%) on mnist (ours, paper in brackets)")
    assert list(errors) == list(ARCHS)
    for a in ARCHS:
        expected = []
        for t in TRANSFORMS:
            p = PAPER_TABLE[a][t]
            expected.append(f"{p:.2f} +- {100 * math.sqrt(p / 100 * (1 - p / 100) / n):.2f} ({p:.2f})")
        assert errors[a] == expected, a
    assert errors["CNN"] == ["1.71 +- 0.13 (1.71)", "1.38 +- 0.12 (1.38)", "1.61 +- 0.13 (1.61)"]
    assert "(n = 10000 test images)" in md
    pose = table_rows(md, "### Canonical pose (mean over classes of the per-class spread of the pose reached; "
                          "data alone = the CNN)")
    assert pose == {a: [f"{i + 1}.{j + 1}" for j in range(3)] for i, a in enumerate(ARCHS)}

    js = json.loads((res / "reproduction.json").read_text())
    assert js == json.loads(json.dumps(report))
    for name, cfg in plan(MODES["quick"]):
        cell = js["runs"][name]
        assert cell["test_error"] == pytest.approx(PAPER_TABLE[cfg.arch][cfg.transform], rel=1e-12)
        assert cell["paper"] == PAPER_TABLE[cfg.arch][cfg.transform]
        assert cell["canonical_pose"]["mean_spread"] == spreads[name] and cell["n_test"] == n
    ds = js["datasets"][0]
    assert ds["dataset"] == "mnist" and ds["transforms"] == list(TRANSFORMS) and len(js["datasets"]) == 1
    assert [c["holds"] for c in ds["claims"]] == [c["holds"] for c in js["paper_claims"]] == [True, True, True]
    assert ds["claims"][1]["gaps"] == pytest.approx({"rotation": 1.32 - 3.11 / 3,
                                                     "scale": 0.96 - 2.44 / 3, "translation": 1.16 - 3.31 / 3},
                                                    rel=1e-12)
    assert "  Gaps: R +0.28, S +0.15, T +0.06 points." in md.splitlines()
    c0 = next(c for c in ds["claims"][0]["comparisons"] if c["better"] == "STN-C0" and c["transform"] == "rotation")
    se = 100 * math.sqrt(24 * (1 - 24 / n)) / n
    assert c0["se_points"] == pytest.approx(se, rel=1e-12) and se == pytest.approx(0.048931, abs=1e-6)
    assert c0["z"] == pytest.approx(0.24 / se, rel=1e-9) and c0["significant"] is True
    assert "  - R: STN-C0 1.08 < STN-C1 1.32 (z = 4.9)" in md.splitlines()


def test_a_cell_worse_than_the_paper_shows_in_its_cell_and_flips_its_claim(tmp_path):
    """One cell changed (STN-DL1 under rotation 1.50% instead of 1.05%): that cell, and only that
    cell, reads 1.50 (paper 1.05), and claim 1 (input STNs beat STN-C1 at 1.32) no longer holds;
    the comparison line says so. Only the rotation column is planned, so the translation-gap claim
    (which needs all three protocols) is left out and the table has one column."""
    n = 10_000
    out, res = tmp_path / "runs", tmp_path / "res"
    for name, cfg in plan(MODES["quick"], transforms=["rotation"]):
        wrong = 150 if cfg.arch == "STN-DL1" else round(100 * PAPER_TABLE[cfg.arch]["rotation"])
        write_finished_run(out / name, cfg, wrong=wrong, n_test=n)
    report = rep.reproduce(quick=True, out=out, results=res, device="cpu", transforms=["rotation"], log=_quiet)
    md = (res / "reproduction.md").read_text()
    errors = table_rows(md, "## Test error (%) on mnist (ours, paper in brackets)")
    assert {a: cells[0].split(" +- ")[0] for a, cells in errors.items()} == {
        "CNN": "1.71", "STN-C0": "1.08", "STN-C1": "1.32", "STN-DL1": "1.50", "STN-SL1": "0.98"}
    assert errors["STN-DL1"][0].endswith("(1.05)") and all(len(c) == 1 for c in errors.values())
    claims = report["datasets"][0]["claims"]
    assert [c["holds"] for c in claims] == [False, True]
    assert [c["holds"] for c in claims[0]["comparisons"]] == [True, False, True]  # C0, DL1, SL1 vs C1
    assert "  - R: STN-DL1 1.50 >= STN-C1 1.32 (z = -4.2, significantly the other way)" in md.splitlines()


# ----------------------------------------------------------------------------- resuming


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> str:
    return str(write_fake_dataset(tmp_path_factory.mktemp("data"), n=60))


def test_an_interrupted_reproduction_trains_only_what_is_missing(tmp_path, fake_root, monkeypatch):
    """The rotation column of a tiny mode (2 epochs) after an interruption: STN-C1 and STN-DL1 are
    finished (hand-made folders with 1 and 3 of 8 test images wrong), STN-SL1 stopped after epoch 1,
    the CNN's folder holds a run with other settings (lr 0.1), STN-C0 was never started. A second
    ``reproduce`` skips the two finished runs (their folders unchanged, their numbers 12.50 and
    37.50 in the table), resumes STN-SL1 after epoch 1, moves the CNN's folder aside to
    ``mnist-rotation-CNN.old1`` and trains it afresh, and trains STN-C0; the cells of the runs it
    trained show the test errors of their own evaluation.json."""
    monkeypatch.setitem(rep.MODES, "quick", TINY)
    out, res = tmp_path / "runs", tmp_path / "res"
    cfgs = dict(plan(TINY, fake_root, transforms=["rotation"]))
    write_finished_run(out / "mnist-rotation-STN-C1", cfgs["mnist-rotation-STN-C1"], wrong=1, n_test=8)
    write_finished_run(out / "mnist-rotation-STN-DL1", cfgs["mnist-rotation-STN-DL1"], wrong=3, n_test=8)
    finished = {a: snapshot(out / f"mnist-rotation-{a}") for a in ("STN-C1", "STN-DL1")}
    train(cfgs["mnist-rotation-STN-SL1"], out / "mnist-rotation-STN-SL1", device="cpu", progress=False,
          log=_quiet, stop_after=1)
    other = replace(cfgs["mnist-rotation-CNN"], lr=0.1, epochs=1)
    train(other, out / "mnist-rotation-CNN", device="cpu", progress=False, log=_quiet)
    assert json.loads((out / "mnist-rotation-STN-SL1" / "metrics.json").read_text())["finished"] is False

    logs: list[str] = []
    report = rep.reproduce(quick=True, out=out, results=res, device="cpu", data_root=fake_root,
                           transforms=["rotation"], log=logs.append)

    def said(arch: str, what: str) -> bool:
        return any(f"mnist-rotation-{arch}: {what}" in line for line in logs)

    assert [line for line in logs if line.endswith("finished already, skipped")] == [
        "[3/5] mnist-rotation-STN-C1: finished already, skipped",
        "[4/5] mnist-rotation-STN-DL1: finished already, skipped"]
    assert {a: snapshot(out / f"mnist-rotation-{a}") for a in finished} == finished
    assert said("STN-SL1", "resuming after epoch 1/2") and said("STN-SL1", "training")
    assert said("CNN", "the existing run used other settings; moved to mnist-rotation-CNN.old1")
    assert said("STN-C0", "training") and not said("STN-C0", "resuming") and not said("CNN", "resuming")
    moved = json.loads((out / "mnist-rotation-CNN.old1" / "metrics.json").read_text())
    assert moved["config"]["lr"] == 0.1 and moved["epochs_done"] == 1
    for a in ("CNN", "STN-C0", "STN-SL1"):
        m = json.loads((out / f"mnist-rotation-{a}" / "metrics.json").read_text())
        assert m["finished"] and m["epochs_done"] == 2 and m["config"] == cfgs[f"mnist-rotation-{a}"].to_dict()
        assert len(m["history"]) == 2
    errors = table_rows((res / "reproduction.md").read_text(), "## Test error (%) on mnist (ours, paper in brackets)")
    assert errors["STN-C1"][0].startswith("12.50 +- 11.69 ") and errors["STN-DL1"][0].startswith("37.50 +- 17.12 ")
    for a in ("CNN", "STN-C0", "STN-SL1"):
        ev = json.loads((out / f"mnist-rotation-{a}" / "evaluation.json").read_text())
        assert ev["n_test"] == 8 and ev["epochs"] == 2
        assert errors[a][0].startswith(f"{100 * ev['test_error']:.2f} +- ")
        assert report["runs"][f"mnist-rotation-{a}"]["test_error"] == 100 * ev["test_error"]
    assert sorted(report["runs"]) == sorted(cfgs)
