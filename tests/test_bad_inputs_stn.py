"""Bad inputs to ``stn`` (and to the IDX reader it trains from), one test per class: each ends with a
one-line error that names the argument (``--flag`` on the command line, the parameter in the Python
API) and what is valid, or with a documented behaviour that the user can see.

Exit codes as everywhere in ``stn`` (see ``stn/_cli.py``): 2 for a value refused before anything
is read or trained, 1 for a fault found later (a run folder with nothing to resume, a malformed
data file). Everything is tiny (40 fake digits, a CNN, one epoch), so the module runs in seconds.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from invariance import datasets
from invariance.datasets import DatasetNotFoundError, IDXFormatError, load_split, read_idx
from stn import LocalisationHead, RunError, STNClassifier, TrainConfig, build_model, evaluate, train
from stn import _cli as stn_cli
from stn.testing import train_argv, write_fake_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def call(argv, capsys) -> tuple[int, str, str]:
    """Run ``stn`` in-process: (exit code, stdout, stderr)."""
    try:
        code = stn_cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# fake_root (40 fake digits) and run_dir (a trained one-epoch CNN run) are fixtures of conftest.py


def _cfg(root, **kw) -> TrainConfig:
    base = dict(arch="CNN", dataset="mnist", transform="rotation", epochs=1, batch_size=16, limit=32,
                test_limit=16, data_root=root)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- 1 and 7: training settings

# flag, value on the command line, TrainConfig field, value in the API, words the message must hold
BAD_SETTINGS = [
    ("--gamma", "-1", "gamma", -1.0, ["finite number > 0", "got -1.0"]),
    ("--gamma", "0", "gamma", 0.0, ["finite number > 0", "got 0.0"]),
    ("--gamma", "inf", "gamma", float("inf"), ["finite number > 0", "got inf"]),
    ("--lr", "nan", "lr", float("nan"), ["finite number > 0", "got nan"]),
    ("--lr", "-0.1", "lr", -0.1, ["finite number > 0", "got -0.1"]),
    ("--momentum", "-0.5", "momentum", -0.5, ["finite number >= 0", "got -0.5"]),
    ("--momentum", "inf", "momentum", float("inf"), ["finite number >= 0", "got inf"]),
    ("--weight-decay", "-1", "weight_decay", -1.0, ["finite number >= 0", "got -1.0"]),
    ("--loc-lr-mult", "-1", "loc_lr_mult", -1.0, ["finite number >= 0", "got -1.0"]),
    ("--loc-lr-mult", "nan", "loc_lr_mult", float("nan"), ["finite number >= 0", "got nan"]),
    ("--batch-size", "0", "batch_size", 0, ["integer >= 1", "got 0"]),
    ("--epochs", "0", "epochs", 0, ["integer >= 1", "got 0"]),
    ("--size", "2", "size", 2, ["between 4 and the canvas size 28", "got 2"]),
    ("--seed", "-1", "seed", -1, ["integer in 0..4294967295", "got -1"]),
    ("--test-limit", "0", "test_limit", 0, ["integer >= 1", "got 0", "unset for the whole split"]),
    # class 7: refused before, but the message named neither the flag nor the range
    ("--limit", "0", "limit", 0, ["integer >= 1", "got 0", "unset for the whole split"]),
    ("--limit", "-3", "limit", -3, ["integer >= 1", "got -3"]),
    ("--eval-every", "-1", "eval_every", -1, ["integer >= 0", "got -1", "0: test only after the last"]),
    ("--milestones", "-5", "milestones", [-5], ["strictly increasing whole epochs >= 1", "got -5"]),
    ("--milestones", "0", "milestones", [0], ["strictly increasing whole epochs >= 1", "got 0"]),
    ("--milestones", "3,1", "milestones", [3, 1], ["strictly increasing", "got 3,1"]),
    ("--milestones", "2,2", "milestones", [2, 2], ["strictly increasing", "got 2,2"]),
]


@pytest.mark.parametrize("flag, value, field, api_value, words", BAD_SETTINGS,
                         ids=[f"{c[0]}={c[1]}" for c in BAD_SETTINGS])
def test_training_settings_out_of_range_are_refused_naming_the_flag(tmp_path, fake_root, capsys, flag, value,
                                                                    field, api_value, words):
    """``TrainConfig`` checks every number where it enters (so the API and the command line agree):
    the command line says ``--flag: ...`` (exit 2, before the data are read: no run folder), the API
    ``field: ...``; both say what the valid range is and what was given."""
    out = tmp_path / "run"
    code, text, err = call(train_argv(out, fake_root, flag, value), capsys)
    assert code == 2 and text == ""
    line = one_line(err)
    assert line.startswith(f"stn train: error: {flag}: "), line
    assert all(w in line for w in words), line
    assert not out.exists()
    with pytest.raises(ValueError) as info:
        _cfg(fake_root, **{field: api_value})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{field}: ") and all(w in msg for w in words), msg


@pytest.mark.parametrize("field, value, words", [
    ("milestones", [1.5], ["whole epochs", "1.5"]),
    ("milestones", "10,15", ["list of"]),
    ("epochs", 2.5, ["integer >= 1", "2.5"]),
    ("batch_size", True, ["integer >= 1", "True"]),
    ("lr", "0.1", ["number > 0", "'0.1'"]),
])
def test_training_settings_of_the_wrong_type_are_refused_in_the_api(fake_root, field, value, words):
    """``milestones=[1.5]`` used to become epoch 1 silently, ``epochs=2.5`` failed inside the
    training loop; now a ``TypeError`` that names the field, at once."""
    with pytest.raises(TypeError) as info:
        _cfg(fake_root, **{field: value})
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{field}: ") and all(w in msg for w in words), msg


def test_milestones_that_are_not_whole_numbers_are_a_usage_error(tmp_path, fake_root, capsys):
    code, _, err = call(train_argv(tmp_path / "run", fake_root, "--milestones", "1.5"), capsys)
    assert code == 2
    line = one_line(err)
    assert "--milestones" in line and "whole epochs >= 1 in increasing order" in line and "'1.5'" in line, line


@pytest.mark.parametrize("argv", [
    lambda out, root: train_argv(out, root, "--threads", "0"),
    lambda out, root: ["evaluate", out, "--threads", "0"],
    lambda out, root: ["evaluate", out, "--alignment-images", "-1"],
    lambda out, root: ["reproduce", "--budget", "tiny", "--threads", "-2", "--out", out, "--results", out],
], ids=["train-threads", "evaluate-threads", "evaluate-alignment-images", "reproduce-threads"])
def test_counts_below_one_are_a_usage_error_naming_the_flag(tmp_path, fake_root, capsys, argv):
    """``--threads 0`` used to fail later, as ``threads: ...`` with exit code 1; the parser refuses it."""
    code, _, err = call(argv(tmp_path / "run", fake_root), capsys)
    assert code == 2
    line = one_line(err)
    assert ("--threads" in line or "--alignment-images" in line) and "must be a positive integer" in line, line
    assert not (tmp_path / "run").exists()


def test_valid_settings_are_kept_and_stored_as_given(fake_root):
    """The checks refuse only what is out of range: increasing milestones, zero momentum and weight
    decay, a zero localisation multiplier (frozen transformers) and ``eval_every=0`` are valid."""
    cfg = _cfg(fake_root, milestones=[2, 5], momentum=0, weight_decay=0, loc_lr_mult=0, eval_every=0, gamma=2)
    assert cfg.milestones == [2, 5] and cfg.momentum == 0.0 and cfg.gamma == 2.0 and cfg.eval_every == 0
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- 2: --resume with nothing

@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_resume_with_nothing_to_resume_is_refused(tmp_path, fake_root, capsys, folder):
    """``--resume`` into a folder without ``checkpoint.pt`` used to start a new run silently. Now one
    line naming ``--resume`` and the folder, exit 1 (like the other run-folder errors: an existing
    run without ``--resume``), checked before the data are read, and no folder is made."""
    out = tmp_path / "run"
    if folder == "empty":
        out.mkdir()
    code, text, err = call(train_argv(out, fake_root, "--resume"), capsys)
    assert code == 1 and text == ""
    line = one_line(err)
    assert line.startswith(f"stn train: error: --resume: nothing to resume in {out}"), line
    assert "drop --resume to start a new run" in line
    if folder == "empty":
        assert out.is_dir() and not any(out.iterdir())
    else:
        assert not out.exists()
    with pytest.raises(RunError, match=r"^resume: nothing to resume in .*checkpoint\.pt"):
        train(_cfg(fake_root), out, resume=True, device="cpu", progress=False, log=lambda _: None)


# ----------------------------------------------------------------------------- 3: a damaged metrics.json

DAMAGED_METRICS = {"invalid JSON": b'{"config": ', "a JSON list": b"[1, 2]", "missing keys": b'{"history": []}',
                   "not UTF-8": b"\xff\xfe\x00"}


@pytest.mark.parametrize("damage", list(DAMAGED_METRICS))
def test_evaluate_does_not_read_metrics_json(run_dir, tmp_path, capsys, damage):
    """Deliberately ignored: ``stn evaluate`` rebuilds the model, its training configuration, its
    epoch count and whether it finished from ``checkpoint.pt`` alone (``stn._train.evaluate`` never
    opens ``metrics.json``, a summary written for people and for ``stn reproduce``), so a damaged
    ``metrics.json`` cannot change an evaluation: the result is the intact folder's, to the bit
    (same per-image correctness string), and ``evaluate``'s docstring says so."""
    intact = evaluate(run_dir, device="cpu", write=False)
    out = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (out / "metrics.json").write_bytes(DAMAGED_METRICS[damage])
    code, text, err = call(["evaluate", out, "--device", "cpu", "--no-write", "--json"], capsys)
    assert code == 0, err
    res = json.loads(text)
    assert res["correct"] == intact["correct"] and res["test_error"] == intact["test_error"]
    assert res["epochs"] == 1 and res["finished"] is True
    assert "metrics.json" in (evaluate.__doc__ or "")


@pytest.mark.parametrize("damage", list(DAMAGED_METRICS))
def test_a_damaged_metrics_json_is_named_and_rewritten_where_it_is_read(run_dir, tmp_path, fake_root, capsys,
                                                                          damage):
    """Where ``metrics.json`` is read (what ``stn train`` returns, ``stn reproduce``'s table):
    ``read_metrics`` refuses it with one line that names the file; ``stn train --resume`` of the
    finished run used to fail with a bare ``Expecting value: line 1 column 1`` and now rewrites it
    from the checkpoint and says so; ``stn reproduce`` treats the run as unfinished (before: a list
    crashed it with an AttributeError) and lets train rewrite it."""
    from stn._reproduce import _finished
    from stn._train import read_metrics

    out = Path(shutil.copytree(run_dir, tmp_path / "run"))
    good = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_bytes(DAMAGED_METRICS[damage])
    with pytest.raises(RunError) as info:
        read_metrics(out)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{out / 'metrics.json'}: "), msg
    assert _finished(out, TrainConfig.from_dict(good["config"])) is False
    code, text, err = call(train_argv(out, fake_root, "--resume"), capsys)
    assert code == 0, err
    assert f"{out / 'metrics.json'}: " in text and "rewritten from checkpoint.pt" in text, text
    again = read_metrics(out)
    assert again["history"] == good["history"] and again["finished"] and again["config"] == good["config"]


# ----------------------------------------------------------------------------- 4: reproduce --budget tiny

def test_the_tiny_budget_falls_back_only_when_no_data_set_is_found():
    """The decision: only the ``tiny`` budget (a smoke run) runs on the shipped digits, only when no
    data set is found at all, never with an explicit ``data_root`` (an explicit folder that lacks
    the data is an error everywhere) and never over a malformed data file."""
    from stn._budget import BUDGETS, _fallback_reason

    missing = DatasetNotFoundError("mnist test files not found; looked in: $INVARIANCE_DATA (not set)", [])
    assert _fallback_reason(BUDGETS["tiny"], None, missing) == str(missing)
    assert _fallback_reason(BUDGETS["gpu"], None, missing) is None
    assert _fallback_reason(BUDGETS["tiny"], "/data", missing) is None
    assert _fallback_reason(BUDGETS["tiny"], None, IDXFormatError("x.gz", "truncated")) is None
    assert _fallback_reason(BUDGETS["tiny"], None, RuntimeError("CUDA error")) is None


@pytest.fixture
def no_data_anywhere(tmp_path, monkeypatch):
    """No data set in any of the places searched without ``--data-root``."""
    monkeypatch.delenv("INVARIANCE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path / "system")


def test_tiny_budget_with_a_data_root_without_data_is_refused(tmp_path, capsys, no_data_anywhere):
    """It used to run on the shipped digits and exit 0 whatever was wrong with the data (any
    exception fell back); an explicit ``--data-root`` without the data is now one line, exit 1,
    and no output folder is left behind."""
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["reproduce", "--budget", "tiny", "--transforms", "rotation", "--device", "cpu", "--data-root", empty,
            "--out", tmp_path / "runs", "--results", tmp_path / "res"]
    code, _, err = call(argv, capsys)
    assert code == 1
    line = one_line(err)
    assert line.startswith("stn reproduce: error: --data-root: ") and str(empty) in line and "not found" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "res").exists()


def test_tiny_budget_without_any_data_says_it_runs_on_the_shipped_digits(tmp_path, capsys, monkeypatch,
                                                                          no_data_anywhere):
    """The deliberate fall-back of the CI smoke run (``benchmarks/gpu_suite.sh --tiny``), now visible:
    a ``warning:`` line on stderr, ``data_fallback`` in reproduction.json and a bold line at the top
    of reproduction.md (before: only a phrase in the last line of the report). The budget is made
    smaller still (one seed, one step) so that the run takes a second or two."""
    from stn import _budget

    small = replace(_budget.BUDGETS["tiny"], seeds={"rotation": (0,), "scale": (0,), "translation": (0,)},
                    max_steps={"rotation": 1, "scale": 1, "translation": 1}, test_limit=20, repeats=1,
                    probe_size=8)
    monkeypatch.setitem(_budget.BUDGETS, "tiny", small)
    argv = ["reproduce", "--budget", "tiny", "--transforms", "rotation", "--device", "cpu",
            "--out", tmp_path / "runs", "--results", tmp_path / "res"]
    code, _, err = call(argv, capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert "500 digits shipped with the package instead of mnist" in warnings[0]
    assert "mnist test files not found" in warnings[0]
    rep = json.loads((tmp_path / "res" / "reproduction.json").read_text())
    assert rep["data_fallback"].startswith("mnist test files not found")
    assert rep["columns"]["rotation"]["data"].startswith("the 500 shipped digits instead of mnist")
    md = (tmp_path / "res" / "reproduction.md").read_text().splitlines()
    assert md[4].startswith("**Data: the 500 digits shipped with the package, not mnist**"), md[:6]


# ----------------------------------------------------------------------------- 5: builders

BUILDERS = [
    ("in-channels-0", lambda: build_model("CNN", in_channels=0), "in_channels", ["integer >= 1", "got 0"]),
    ("in-channels-float", lambda: build_model("CNN", in_channels=1.5), "in_channels", ["integer >= 1", "1.5"]),
    ("n-classes-0", lambda: build_model("STN-C1", n_classes=0), "n_classes", [">= 2", "got 0"]),
    ("n-classes-1", lambda: build_model("CNN", n_classes=1), "n_classes", [">= 2", "got 1"]),
    ("image-size-0", lambda: build_model("CNN", image_size=(0, 28)), "image_size", ["positive", "(0, 28)"]),
    ("image-size-negative", lambda: build_model("STN-SL1", image_size=[-28, -28]), "image_size", ["positive"]),
    ("image-size-float", lambda: build_model("CNN", image_size=[28.5, 28]), "image_size", ["two integers"]),
    ("class-in-channels-0", lambda: STNClassifier("STN-C0", in_channels=0), "in_channels", ["integer >= 1"]),
    ("class-n-classes-0", lambda: STNClassifier("CNN", n_classes=0), "n_classes", [">= 2"]),
    ("class-image-size-0", lambda: STNClassifier("CNN", image_size=(28, 0)), "image_size", ["positive"]),
    ("loc-channels-0", lambda: build_model("STN-C0", loc_channels=0), "loc_channels", ["integer >= 1"]),
    ("dropout-2", lambda: build_model("CNN", classifier="svhn", dropout=2.0), "dropout", ["in 0..1", "2.0"]),
    ("head-in-channels-0", lambda: LocalisationHead(0, (28, 28)), "in_channels", ["integer >= 1"]),
    ("head-in-size-0", lambda: LocalisationHead(1, (0, 28)), "in_size", ["positive"]),
    ("head-hidden-0", lambda: LocalisationHead(1, (28, 28), hidden=0), "hidden", ["integer >= 1"]),
]


@pytest.mark.parametrize("name", [b[0] for b in BUILDERS])
def test_builders_refuse_empty_or_negative_sizes_naming_the_argument(name):
    """0 input channels, 0 classes (``nn.Linear(n, 0)`` builds), a non-positive image size: refused
    at construction, with the argument's name (before: built silently, or ``size: ...``)."""
    _, make, arg, words = next(b for b in BUILDERS if b[0] == name)
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{arg}: ") and all(w in msg for w in words), msg


# ----------------------------------------------------------------------------- 6: forward on the wrong shape

@pytest.mark.parametrize("arch, kw, shape, expected", [
    ("STN-SL1", {}, (2, 3, 28, 28), "(B, 1, 28, 28)"),
    ("STN-SL1", {}, (2, 1, 32, 32), "(B, 1, 28, 28)"),
    ("STN-C1", {}, (1, 28, 28), "(B, 1, 28, 28)"),
    ("CNN", {}, (2, 1, 60, 60), "(B, 1, 28, 28)"),
    ("STN-C0", {"image_size": (60, 60)}, (2, 1, 28, 28), "(B, 1, 60, 60)"),
    ("CNN", {"classifier": "svhn", "in_channels": 3}, (2, 1, 28, 28), "(B, 3, 28, 28)"),
])
def test_forward_on_the_wrong_image_shape_is_one_line_naming_images(arch, kw, shape, expected):
    """A torch traceback from deep inside a convolution or a linear layer before; now the model
    checks the shape (only the shape: a tuple comparison) and names ``images``, the shape it was
    built for and the shape it got. Images of the right shape still run."""
    model = build_model(arch, family="rotation", **kw).eval()
    with pytest.raises(ValueError) as info:
        model(torch.zeros(shape))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"images: expected shape {expected}") and str(shape) in msg, msg
    if model.spec.kind == "C":
        with pytest.raises(ValueError, match=r"^images: expected shape"):
            model.forward_with_feature_maps(torch.zeros(shape))
    good = (2, *model.shapes[0])
    with torch.no_grad():
        assert model(torch.zeros(good)).shape == (2, 10)


# ----------------------------------------------------------------------------- 8: malformed IDX files

def _damage(root: Path, kind: str) -> tuple[Path, list[str]]:
    """Damage one file of the fake data set; returns (the file named, the words of the problem)."""
    images = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    labels = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    raw_images = gzip.decompress(images.read_bytes())
    raw_labels = gzip.decompress(labels.read_bytes())
    if kind == "bad magic":
        images.write_bytes(gzip.compress(b"\x01\x02" + raw_images[2:]))
        return images, ["not an IDX file", "bad magic number 0x01020803"]
    if kind == "truncated":
        images.write_bytes(gzip.compress(raw_images[:-100]))
        return images, ["truncated", "expected 31360 bytes of data, found 31260"]
    if kind == "label count":
        n = len(raw_labels) - 8  # 40 labels: keep 39, with a header that says so
        labels.write_bytes(gzip.compress(raw_labels[:4] + (n - 1).to_bytes(4, "big") + raw_labels[8:-1]))
        return images, ["holds 40 images but", f"{labels} holds 39 labels"]
    if kind == "gz not gzip":
        images.write_bytes(b"<html>503 Service Unavailable</html>\n")
        return images, ["not gzip-compressed although its name ends in .gz", "not an IDX file either"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bad magic", "truncated", "label count", "gz not gzip"])
def test_a_malformed_idx_file_is_one_line_naming_the_file(tmp_path, capsys, kind):
    """``load_split`` raises ``IDXFormatError`` naming the file and the problem (a ``.gz`` that is
    not gzip now says so: before, only ``bad magic number``); ``stn train --data-root DIR`` prints
    that line after ``--data-root:`` (before: without naming the flag), exit 1, no run folder."""
    root = write_fake_dataset(tmp_path / "data", n=40)
    path, words = _damage(root, kind)
    with pytest.raises(IDXFormatError) as info:
        load_split("mnist", "train", root=root)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and all(w in msg for w in words), msg
    if kind != "label count":  # one file alone is a valid IDX file then
        with pytest.raises(IDXFormatError, match="^" + str(path)):
            read_idx(path)
    out = tmp_path / "run"
    code, text, err = call(train_argv(out, root), capsys)
    assert code == 1 and text == ""
    line = one_line(err)
    assert line == f"stn train: error: --data-root: {msg}", line
    assert not out.exists()


@pytest.mark.parametrize("value", ["shear", "rotation,bogus", ","])
def test_an_unknown_reproduce_protocol_is_a_usage_error(value, tmp_path, capsys):
    """``stn reproduce --transforms shear`` used to exit 1 from inside the run; an unknown protocol is a
    usage error (exit 2) naming the flag and the valid choices, and nothing is created."""
    code, out, err = call(["reproduce", "--transforms", value, "--out", tmp_path / "runs"], capsys)
    line = one_line(err)
    assert code == 2 and "--transforms" in line and "valid choices: rotation, scale, translation" in line, line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "reproduce"])
def test_an_unknown_device_is_a_usage_error_naming_the_flag(command, tmp_path, capsys):
    """``--device tpu`` used to end as a run error (exit 1) naming ``device:``; it is a usage error
    (exit 2) naming ``--device``, found before any data is read, by the project's one resolver."""
    argv = {"train": ["train", "--arch", "CNN", "--dataset", "mnist", "--transform", "rotation", "--epochs", "1",
                      "--out", tmp_path / "r"],
            "evaluate": ["evaluate", tmp_path],
            "reproduce": ["reproduce", "--quick", "--out", tmp_path / "runs"]}[command]
    code, out, err = call([*argv, "--device", "tpu"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith(f"stn {command}: error: --device: unknown device 'tpu'"), line
    assert "valid choices: cpu, cuda, cuda:N, auto" in line and not (tmp_path / "r").exists()
