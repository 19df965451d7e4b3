"""Training, exact resumption, checkpoints, evaluation, the analysis statistics and the stn command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from invariance import CheckpointError, load_checkpoint, load_model
from invariance import geometry as G
from stn import (
    PAPER_TABLE,
    RunError,
    TrainConfig,
    TransformedDataset,
    build_model,
    check_claims,
    evaluate,
    get_protocol,
    load_run,
    train,
)
from stn import _cli as cli
from stn._analysis import canonical_pose, circular_std, feature_map_alignment
from stn.testing import write_fake_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return str(write_fake_dataset(tmp_path_factory.mktemp("data"), n=80))


def _cfg(root, **kw):
    base = dict(arch="STN-SL1", dataset="mnist", transform="rotation", epochs=2, batch_size=16, limit=48,
                lr=0.05, data_root=root, eval_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(msg):
    pass


def _state(path):
    ck = load_checkpoint(path)
    return ck["state_dict"], ck["optimizer"]["state"]


def _assert_identical(a, b):
    (sa, oa), (sb, ob) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])


@pytest.mark.parametrize("arch,classifier,transform", [("STN-SL1", "mnist", "rotation"),
                                                       ("STN-C1", "svhn", "translation")])
def test_resume_gives_bit_identical_weights(tmp_path, fake_root, arch, classifier, transform):
    """The svhn classifier has dropout, so this also checks that the RNG state is restored."""
    kw = dict(arch=arch, classifier=classifier, transform=transform, milestones=[1], loc_lr_mult=1.0)
    if transform != "rotation":
        kw["size"] = 28
    full = train(_cfg(fake_root, **kw), tmp_path / "full", device="cpu", progress=False, log=_quiet)
    train(_cfg(fake_root, **kw), tmp_path / "part", device="cpu", progress=False, log=_quiet, stop_after=1)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["epoch"] == 1
    torch.manual_seed(12345)  # a different global RNG state must not matter after resuming
    resumed = train(_cfg(fake_root, **kw), tmp_path / "part", resume=True, device="cpu", progress=False,
                    log=_quiet)
    _assert_identical(_state(tmp_path / "full" / "checkpoint.pt"), _state(tmp_path / "part" / "checkpoint.pt"))
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in resumed["history"]]
    assert full["history"][1]["lr"] == pytest.approx(0.005)  # the milestone applied after epoch 1
    assert resumed["finished"] and resumed["epochs_done"] == 2


def test_without_restoring_the_rng_dropout_would_differ(tmp_path, fake_root):
    """So that the test above can fail: an epoch started from another RNG state ends elsewhere."""
    cfg = _cfg(fake_root, arch="CNN", classifier="svhn", epochs=1)
    train(cfg, tmp_path / "a", device="cpu", progress=False, log=_quiet)
    torch.manual_seed(1)
    model = build_model(**load_checkpoint(tmp_path / "a" / "checkpoint.pt")["config"])
    model.train()
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))


def test_metrics_checkpoint_and_existing_run(tmp_path, fake_root):
    out = tmp_path / "run"
    m = train(_cfg(fake_root, epochs=1, arch="STN-C0"), out, device="cpu", progress=False, log=_quiet)
    disk = json.loads((out / "metrics.json").read_text())
    assert disk["history"][0]["epoch"] == 1 and 0 <= disk["test_error"] <= 1 and disk["finished"]
    assert m["config"]["arch"] == "STN-C0" and disk["n_train"] == 48
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["builder"] == "stn:build_model" and ck["train_config"]["epochs"] == 1
    assert len(ck["data_seeds"]) == 1
    assert isinstance(load_model(str(out / "checkpoint.pt")), torch.nn.Module)  # invariance can rebuild it
    with pytest.raises(RunError, match="--resume"):
        train(_cfg(fake_root, epochs=1, arch="STN-C0"), out, device="cpu", progress=False, log=_quiet)
    with pytest.raises(RunError, match="other settings .*lr"):
        train(_cfg(fake_root, epochs=2, arch="STN-C0", lr=0.1), out, resume=True, device="cpu", progress=False,
              log=_quiet)
    # more epochs may be added on resume
    m2 = train(_cfg(fake_root, epochs=2, arch="STN-C0"), out, resume=True, device="cpu", progress=False, log=_quiet)
    assert m2["epochs_done"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_checkpoint_gives_a_clear_error(tmp_path, fake_root, damage, capsys):
    out = tmp_path / "run"
    train(_cfg(fake_root, epochs=1, arch="CNN"), out, device="cpu", progress=False, log=_quiet)
    ck = out / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint"):
        load_run(out, device="cpu")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(_cfg(fake_root, epochs=2, arch="CNN"), out, resume=True, device="cpu", progress=False, log=_quiet)
    assert cli.main(["evaluate", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "corrupt or truncated checkpoint" in err and "Traceback" not in err


def test_evaluate_a_folder_without_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_run(tmp_path, device="cpu")


def test_evaluate_reports_error_pose_and_alignment(tmp_path, fake_root):
    out = tmp_path / "c1"
    train(_cfg(fake_root, epochs=1, arch="STN-C1", transform="scale", size=28, test_limit=8), out, device="cpu",
          progress=False, log=_quiet)
    res = evaluate(out, device="cpu", alignment_images=4)
    assert res["n_test"] == 8 and len(res["correct"]) == 8
    assert res["test_error"] == pytest.approx(1 - res["correct"].count("1") / 8)
    assert res["canonical_pose"]["quantity"] == "log2 scale"
    fa = res["feature_alignment"]
    assert fa["search_family"] == "scale_translation" and fa["n_images"] == 4
    # the search includes the identity and the expected transformation: never worse than either
    assert fa["spatial_error"]["mean"] <= fa["invariance_error"]["mean"] + 1e-9
    assert fa["spatial_error"]["mean"] <= fa["expected_error"]["mean"] + 1e-9
    assert json.loads((out / "evaluation.json").read_text())["arch"] == "STN-C1"


def test_canonical_pose_statistic():
    proto = get_protocol("rotation")
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    applied = torch.tensor([[-80.0], [10.0], [60.0], [5.0], [-40.0], [85.0]], dtype=torch.float64)
    ident = G.identity_matrix(6, dtype=torch.float64)
    # predicted = exact inverse, then a class-specific canonical pose (30 / -45 degrees)
    canon = torch.tensor([[30.0]] * 3 + [[-45.0]] * 3, dtype=torch.float64)
    pred = G.centred_to_normalized(G.to_matrix("rotation", canon - applied), (28, 28))
    perfect = canonical_pose(proto, labels, applied, pred)
    assert perfect["mean_spread"] < 1e-6
    assert perfect["per_class"]["0"]["mean"] == pytest.approx(30.0) and perfect["per_class"]["1"]["mean"] == \
        pytest.approx(-45.0)
    none = canonical_pose(proto, labels, applied, ident)
    assert none["mean_spread"] == pytest.approx(none["applied_only_mean_spread"]) and none["mean_spread"] > 30
    # translation: spread in pixels; scale: in octaves
    t = canonical_pose(get_protocol("translation"), labels, torch.tensor([[2.0, 0]] * 3 + [[0, 0]] * 3).double(),
                       G.identity_matrix(6, dtype=torch.float64))
    assert t["mean_spread"] == 0
    s = canonical_pose(get_protocol("scale"), labels, torch.tensor([[0.5], [2.0], [1.0]] * 2).double(),
                       G.identity_matrix(6, dtype=torch.float64))
    assert s["mean_spread"] == pytest.approx(math.sqrt(2 / 3))


def test_circular_std_wraps():
    assert circular_std(torch.tensor([170.0, -170.0])) == pytest.approx(10.0, abs=0.1)
    assert circular_std(torch.tensor([0.0, 180.0])) > 100


def test_feature_alignment_needs_an_stn_c_architecture():
    ds = TransformedDataset(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.arange(2), get_protocol("rotation"))
    with pytest.raises(ValueError, match="needs an STN-C architecture"):
        feature_map_alignment(build_model("STN-SL1", family="rotation"), ds)


def test_claims_verdicts():
    assert [c["holds"] for c in check_claims(PAPER_TABLE)] == [True, True, True]
    bad = {a: dict(v) for a, v in PAPER_TABLE.items()}
    bad["STN-DL1"]["rotation"] = 1.5  # worse than STN-C1, better than the CNN
    bad["STN-C1"]["translation"] = 2.0  # a large gap under translation, and worse than the CNN
    assert [c["holds"] for c in check_claims(bad)] == [False, False, False]


# ----------------------------------------------------------------------------- the command


@pytest.mark.parametrize("args,needle", [
    (["--arch", "STN-Q1", "--dataset", "mnist", "--transform", "rotation"], "valid choices: CNN, STN-C<depths>"),
    (["--arch", "CNN", "--dataset", "cifar", "--transform", "rotation"], "choose from 'mnist', 'fashion-mnist'"),
    (["--arch", "CNN", "--dataset", "mnist", "--transform", "shear"], "choose from 'rotation', 'translation'"),
    (["--arch", "CNN", "--dataset", "mnist", "--transform", "rotation", "--family", "warp"],
     "valid choices: translation, rotation, scale"),
])
def test_cli_errors_list_valid_choices(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args, "--epochs", "1", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_train_evaluate_and_resume_on_fake_data(tmp_path, fake_root, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--arch", "STN-DL1", "--dataset", "mnist", "--transform", "translation", "--size", "28",
            "--out", out, "--limit", "32", "--batch-size", "16", "--data-root", fake_root, "--device", "cpu",
            "--no-progress"]
    assert cli.main([*base, "--epochs", "1"]) == 0
    assert cli.main([*base, "--epochs", "1"]) == 1
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*base, "--epochs", "2", "--resume"]) == 0
    assert cli.main(["evaluate", out, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "STN-DL1 on mnist/translation (2 epochs): test error" in text and "canonical pose" in text


@pytest.mark.data
def test_cli_end_to_end_on_real_mnist(tmp_path, data_root, capsys):
    out = str(tmp_path / "sl1")
    assert cli.main(["train", "--arch", "STN-SL1", "--dataset", "mnist", "--transform", "rotation", "--epochs", "1",
                     "--out", out, "--limit", "512", "--test-limit", "256", "--data-root", data_root,
                     "--device", "cpu", "--no-progress"]) == 0
    assert cli.main(["evaluate", out, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "STN-SL1 on mnist/rotation (1 epochs): test error" in text and "256 test images" in text
    m = json.loads((tmp_path / "sl1" / "metrics.json").read_text())
    assert m["n_train"] == 512 and "stratified 8000/2000" in m["train_data"]


def test_reproduce_writes_the_table_and_resumes(tmp_path, fake_root, monkeypatch):
    from stn import _reproduce as rep

    tiny = rep.Mode(name="quick", sizes={"rotation": None, "scale": 28, "translation": 28},
                    epochs={"rotation": 1, "scale": 1, "translation": 1},
                    milestones={"rotation": [], "scale": [], "translation": []}, limit=32, test_limit=8,
                    batch_size=16, alignment_images=2, note="tiny test mode")
    monkeypatch.setitem(rep.MODES, "quick", tiny)
    logs: list[str] = []
    report = rep.reproduce(quick=True, out=tmp_path / "runs", results=tmp_path / "res", device="cpu",
                           data_root=fake_root, log=logs.append)
    md = (tmp_path / "res" / "reproduction.md").read_text()
    js = json.loads((tmp_path / "res" / "reproduction.json").read_text())
    assert "Mode: quick" in md and "| STN-SL1 |" in md and "(0.98)" in md  # ours beside the paper's
    assert len(js["runs"]) == 15 and js["datasets"][0]["dataset"] == "mnist"
    assert [c["holds"] for c in js["paper_claims"]] == [True, True, True]
    assert len(report["datasets"][0]["claims"]) == 3
    assert js["runs"]["mnist-rotation-STN-C1"]["feature_alignment"]["n_images"] == 2
    # a second call skips every finished run; an unfinished one is resumed
    (tmp_path / "runs" / "mnist-scale-CNN" / "metrics.json").unlink()
    logs.clear()
    rep.reproduce(quick=True, out=tmp_path / "runs", results=tmp_path / "res", device="cpu", data_root=fake_root,
                  log=logs.append)
    assert sum("skipped" in line for line in logs) == 14
    assert any("mnist-scale-CNN: already trained" in line or "mnist-scale-CNN: training" in line for line in logs)


def test_reproduce_one_protocol_runs_only_its_column(tmp_path, fake_root, monkeypatch):
    """``transforms=["rotation"]`` trains the five rotation runs only; the report keeps the claims that need
    only rotation (input STNs beat STN-C1; every STN beats the CNN) and drops the translation-gap claim."""
    from stn import _reproduce as rep

    tiny = rep.Mode(name="quick", sizes={"rotation": None, "scale": 28, "translation": 28},
                    epochs={"rotation": 1, "scale": 1, "translation": 1},
                    milestones={"rotation": [], "scale": [], "translation": []}, limit=32, test_limit=8,
                    batch_size=16, alignment_images=2, note="tiny test mode")
    monkeypatch.setitem(rep.MODES, "quick", tiny)
    report = rep.reproduce(quick=True, out=tmp_path / "runs", results=tmp_path / "res", device="cpu",
                           data_root=fake_root, transforms=["rotation"], log=lambda _: None)
    assert sorted(report["runs"]) == sorted(f"mnist-rotation-{a}" for a in rep.ARCHS)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(report["runs"])
    ds = report["datasets"][0]
    assert ds["transforms"] == ["rotation"]
    claims = [c["claim"] for c in ds["claims"]]
    assert len(claims) == 2, claims
    assert claims[0] == "input-transforming STNs (STN-C0, STN-DL1, STN-SL1) beat STN-C1 under rotation"
    assert claims[1] == "every STN beats the CNN (rotation)"
    assert "| STN-SL1 |" in (tmp_path / "res" / "reproduction.md").read_text()
    with pytest.raises(ValueError, match="transforms: unknown protocol.*valid choices: rotation, scale, translation"):
        rep.plan(tiny, transforms=["shear"])
