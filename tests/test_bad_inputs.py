"""Bad inputs and faults, one case per class: every one ends with a one-line error that names the
argument (exit code 2 for a bad argument or input, 1 for a fault found later such as missing data,
a diverged run or a corrupt checkpoint), or with the documented behaviour; and nothing
half-written stays behind (no output folder for a refused command, no ``.tmp`` file, no
checkpoint of NaN weights, no report folder mixing two saves that reads as one).

Everything is small (15 x 15 images, a 3-channel network, 32 fake digits) so the module runs in
seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import invariance
from invariance import CheckpointError, Report, load_checkpoint, save_checkpoint
from invariance import _cli as inv_cli
from invariance.files import FolderError, atomic_write, remove_stale_temporaries
from stn import _cli as stn_cli
from stn import load_run
from stn.testing import train_argv

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)

NET = textwrap.dedent(
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    NET = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 15 * 15, 2))


    def factory_that_raises():
        raise RuntimeError("boom in the factory")


    class Exits(nn.Module):
        def forward(self, x):
            raise SystemExit(3)


    EXITS = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Exits())
    NAN_NET = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    with torch.no_grad():
        NAN_NET[0].bias.fill_(float("nan"))  # a diverged network: NaN maps
    FLAT = nn.Sequential(nn.Flatten(), nn.Linear(15 * 15, 2))  # no (B, C, H, W) output at all
    """
)
QUICK = ["--quick", "--n-boot", "20", "--channels", "spatial", "--layers", "1"]


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    """A model file, image files of every kind, and odd files."""
    d = tmp_path_factory.mktemp("bad")
    (d / "net.py").write_text(NET)
    (d / "syntax.py").write_text("def f(:\n    pass\n")
    (d / "imports_fail.py").write_text("raise ImportError('a dependency is missing')\nNET = None\n")
    rng = np.random.default_rng(0)
    u8 = (rng.random((3, 15, 15)) * 255).astype(np.uint8)
    np.save(d / "uint8.npy", u8)
    for t in ("int16", "int32", "int64", "uint16"):
        np.save(d / f"{t}.npy", u8.astype(t))
    torch.save(torch.from_numpy(u8.astype(np.int64)), d / "int64.pt")
    np.save(d / "int300.npy", np.full((3, 15, 15), 300, np.int32))
    np.save(d / "negative.npy", -u8.astype(np.int16))
    np.save(d / "complex.npy", u8.astype(np.complex64))
    np.save(d / "float64.npy", u8 / 255.0)
    np.save(d / "float16.npy", (u8 / 255.0).astype(np.float16))
    np.save(d / "bool.npy", u8 > 128)
    np.save(d / "small.npy", (u8 / 255.0).astype(np.float32)[:, :9, :9])
    np.save(d / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save({"images": torch.zeros(3, 15, 15)}, d / "dict.pt")
    torch.save([torch.zeros(3, 15, 15)], d / "list.pt")
    (d / "a_file").write_text("not a folder\n")
    (d / "folder.npy").mkdir()
    np.save(d / "five_d.npy", np.zeros((1, 1, 1, 15, 15), np.float32))
    with (d / "huge_header.npy").open("wb") as f:  # claims 400 GB, holds 64 bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (100_000, 1000, 1000)})
        f.write(b"\0" * 64)
    return d


def call(main, argv, capsys) -> tuple[int, str, str]:
    """Run a command in-process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def temporaries(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*.tmp"))


def measure(d: Path, *extra, images="uint8.npy", model=None, transform="rotation:90") -> list:
    return ["measure", "--model", model or f"{d / 'net.py'}:NET", "--images", d / images, "--transform", transform,
            *QUICK, *extra]


def read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root writes anywhere, but not into /proc)."""
    if os.geteuid() == 0:
        return Path("/proc/invariance-test-out")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


# ----------------------------------------------------------------------------- invariance: refused at once

BAD_MEASURE = {
    # class: (argv builder, argument named, words the message must hold)
    "integer images outside 0..255": (lambda d: measure(d, images="int300.npy"), "--images", ["0..255", "300"]),
    "negative integer images": (lambda d: measure(d, images="negative.npy"), "--images", ["0..255"]),
    "complex images": (lambda d: measure(d, images="complex.npy"), "--images", ["complex"]),
    "a .pt file holding a dict": (lambda d: measure(d, images="dict.pt"), "--images", ["dict", "'images'"]),
    "a .pt file holding a list": (lambda d: measure(d, images="list.pt"), "--images", ["list"]),
    "an object array": (lambda d: measure(d, images="object.npy"), "--images", ["cannot read"]),
    "scale sweep with a fractional count": (lambda d: measure(d, transform="scale:0.5..2:2.7"), "--transform",
                                            ["whole number", "2.7"]),
    "rotation sweep of 1e9 steps": (lambda d: measure(d, transform="rotation:0..1e9:1"), "--transform",
                                    ["cap of 1000", "--max-transforms"]),
    "rotation sweep with a 1e-9 step": (lambda d: measure(d, transform="rotation:0..360:1e-9"), "--transform",
                                        ["cap of 1000", "--max-transforms"]),
    "sweeps above the cap together": (lambda d: measure(d, transform="rotation:0..359:1; rotation:0..359:0.5"),
                                      "--transform", ["cap of 1000"]),
    "a lowered cap": (lambda d: measure(d, "--max-transforms", "4", transform="rotation:0..90:15"), "--transform",
                      ["cap of 4"]),
    "an empty sweep": (lambda d: measure(d, transform="rotation:90..0:45; rotation:10"), "--transform", ["empty"]),
    "a non-finite sweep": (lambda d: measure(d, transform="rotation:0..inf:1"), "--transform", ["finite"]),
    "more images than exist": (lambda d: measure(d, "--n-images", "10"), "--n-images", ["10", "only 3", "1..3"]),
    "negative --n-boot": (lambda d: measure(d, "--n-boot", "-5"), "--n-boot", ["-5"]),
    "a zero --max-transforms": (lambda d: measure(d, "--max-transforms", "0"), "--max-transforms", [">= 1"]),
    "a NaN --mask-radius": (lambda d: measure(d, "--mask-radius", "nan"), "--mask-radius", ["finite", "> 0"]),
    "an infinite --mask-radius": (lambda d: measure(d, "--mask-radius", "inf"), "--mask-radius", ["finite"]),
    # round 2: transformations out of range are refused where they are parsed, naming the range
    "an angle of 1e308 degrees": (lambda d: measure(d, transform="rotation:1e308"), "--transform",
                                  ["-360..360", "1e+308"]),
    "a NaN angle": (lambda d: measure(d, transform="rotation:nan"), "--transform", ["finite"]),
    "an infinite angle": (lambda d: measure(d, transform="rotation:inf"), "--transform", ["finite"]),
    "a zero scale": (lambda d: measure(d, transform="scale:0"), "--transform", ["scale factor", "2**-6..2**6"]),
    "a negative scale": (lambda d: measure(d, transform="scale:-1"), "--transform", ["scale factor", "-1"]),
    "a huge scale": (lambda d: measure(d, transform="scale:1e6"), "--transform", ["scale factor"]),
    "a huge shift": (lambda d: measure(d, transform="translation:1e9,0"), "--transform", ["-4096..4096"]),
    "a singular affine": (lambda d: measure(d, transform="affine:1,0,0,0,0,0"), "--transform", ["singular"]),
    "1500 single transformations": (lambda d: measure(d, transform=";".join(["rotation:1"] * 1500)), "--transform",
                                    ["more than 1000"]),
    "an empty --layers": (lambda d: measure(d, "--layers", ""), "--layers", ["no layer names"]),
    "a blank --layers": (lambda d: measure(d, "--layers", " "), "--layers", ["no layer names"]),
    "a folder named x.npy": (lambda d: measure(d, images="folder.npy"), "--images", ["is a folder"]),
    "5-D images": (lambda d: measure(d, images="five_d.npy"), "--images", ["(B, C, H, W)"]),
    "an .npy header claiming 400 GB": (lambda d: measure(d, images="huge_header.npy"), "--images",
                                       ["truncated", "400,000,000,000"]),
    "a model file without :NAME": (lambda d: measure(d, model=str(d / "net.py")), "--model", ["net.py:NAME"]),
    "a model whose forward calls sys.exit": (
        lambda d: measure(d, "--layers", "all", model=f"{d / 'net.py'}:EXITS"), "--model", ["sys.exit(3)"]),
    "a model whose maps are NaN": (lambda d: measure(d, "--layers", "0", model=f"{d / 'net.py'}:NAN_NET"),
                                   "--model", ["NaN or infinite"]),
    "a negative --memory-budget": (lambda d: measure(d, "--memory-budget", "-1"), "--memory-budget", ["size"]),
    "an empty --channels": (lambda d: measure(d, "--channels", ""), "--channels", ["none given", "valid choices"]),
    "a zero --max-pixels": (lambda d: measure(d, "--max-pixels", "0"), "--max-pixels", [">= 1"]),
    "layers of a model without maps": (lambda d: ["layers", "--model", f"{d / 'net.py'}:FLAT", "--images",
                                                  d / "uint8.npy"], "--model", ["no layer with a (B, C, H, W)"]),
    "a negative --seed": (lambda d: measure(d, "--seed", "-1"), "--seed", ["0.."]),
    "a model file with a syntax error": (lambda d: measure(d, model=f"{d / 'syntax.py'}:f"), "--model",
                                         ["SyntaxError", "line 1"]),
    "a model file whose import fails": (lambda d: measure(d, model=f"{d / 'imports_fail.py'}:NET"), "--model",
                                        ["ImportError", "a dependency is missing"]),
    "a model factory that raises": (lambda d: measure(d, model=f"{d / 'net.py'}:factory_that_raises"), "--model",
                                    ["RuntimeError", "boom in the factory"]),
    "a non-integer --n-images (argparse)": (lambda d: measure(d, "--n-images", "many"), "--n-images", ["many"]),
    "an unknown option (argparse)": (lambda d: measure(d, "--colour", "red"), "--colour", ["unrecognized"]),
    "layers on images the model cannot take": (
        lambda d: ["layers", "--model", f"{d / 'net.py'}:NET", "--images", d / "small.npy"], "--images",
        ["forward pass", "(1, 1, 9, 9)"]),
    "an unknown --device": (lambda d: measure(d, "--device", "tpu"), "--device", ["valid choices: cpu"]),
}


@pytest.mark.parametrize("case", list(BAD_MEASURE))
def test_bad_input_is_one_line_naming_the_argument(d, capsys, case):
    build, argument, words = BAD_MEASURE[case]
    t0 = time.perf_counter()
    code, out, err = call(inv_cli.main, build(d), capsys)
    assert code == 2, (code, err)
    line = one_line(err)
    assert line.startswith("invariance: error: ") and argument in line, line
    for w in words:
        assert w in line, (w, line)
    assert "measuring" not in err and out == ""  # refused before any computation
    assert time.perf_counter() - t0 < 20  # nothing big was allocated
    assert not temporaries(d)


@pytest.mark.parametrize("command", ["measure", "demo"])
@pytest.mark.parametrize("where", ["a file", "a read-only folder", "under a file"])
def test_out_is_checked_before_any_computation(d, tmp_path, capsys, command, where):
    """The model named would fail on import: the error is about --out, so --out came first."""
    out = {"a file": d / "a_file", "a read-only folder": read_only_dir(tmp_path),
           "under a file": d / "a_file" / "report"}[where]
    argv = (measure(d, "--out", out, model=f"{d / 'syntax.py'}:f") if command == "measure"
            else ["demo", "--quick", "--out", out])
    code, stdout, err = call(inv_cli.main, argv, capsys)
    assert code == 2
    line = one_line(err)
    assert "--out" in line and str(out.name if where != "under a file" else "a_file") in line, line
    assert stdout == ""  # the demo prints its first header before computing: it never started
    assert (d / "a_file").read_text() == "not a folder\n"
    assert not out.exists() or where == "a file"


def test_images_from_a_data_set_that_is_not_there(d, tmp_path, capsys, monkeypatch):
    from invariance import datasets

    monkeypatch.setenv("INVARIANCE_DATA", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", tmp_path)
    code, out, err = call(inv_cli.main, measure(d, images="x") + ["--images", "mnist"], capsys)
    assert code == 2 and out == ""
    line = one_line(err)
    assert line.startswith("invariance: error: --images: mnist test files not found") and "INVARIANCE_DATA" in line


# ----------------------------------------------------------------------------- invariance: documented behaviour

@pytest.mark.parametrize("name", ["int16.npy", "int32.npy", "int64.npy", "uint16.npy", "int64.pt"])
def test_integer_images_in_0_255_are_scaled_like_uint8(d, name):
    ref = inv_cli.load_images(str(d / "uint8.npy"))
    got = inv_cli.load_images(str(d / name))
    assert got.dtype == torch.float32 and float(got.max()) <= 1.0
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_boolean_images_are_zero_or_one(d):
    got = inv_cli.load_images(str(d / "bool.npy"))
    assert set(got.unique().tolist()) <= {0.0, 1.0} and float(got.sum()) > 0


@pytest.mark.parametrize("images", ["float64.npy", "float16.npy"])
def test_float64_and_float16_images_run_in_the_models_dtype(d, tmp_path, capsys, images):
    """Converted to the model's dtype (float32), with the same answer as float32 images, up to the
    float16 rounding of the inputs."""
    reports = {}
    for name in (images, "uint8.npy"):
        out = tmp_path / name
        code, _, err = call(inv_cli.main, measure(d, "--out", out, images=name, transform="translation:2,0"),
                            capsys)
        assert code == 0, err
        reports[name] = Report.load(out).records[0].errors.spatial.mean
    tol = 1e-5 if images == "float64.npy" else 2e-2
    assert abs(reports[images] - reports["uint8.npy"]) <= tol + 1e-6, reports


def test_n_images_defaults_to_what_the_file_holds(d, tmp_path, capsys):
    code, _, err = call(inv_cli.main, measure(d, "--out", tmp_path / "r"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "report.json").read_text())["meta"]["n_images"] == 3


# ----------------------------------------------------------------------------- report folders

def small_report() -> Report:
    rec = {"layer": "a", "depth": 0, "transform": "rotation:10", "family": "rotation", "magnitude": 10.0,
           "search": "rigid", "best_params": {"median": [0.0, 0.0, 0.0]}, "channel_orbits": [],
           "spatial_error": 0.1, "spatial_error_ci": [0.05, 0.15]}
    return Report(records=[rec], calibration={}, meta={})


def test_a_report_folder_mixing_two_saves_is_refused(tmp_path):
    """A save killed after the CSV / figures but before report.json (written last) leaves the old
    report.json beside newer files: loading it says so, on one line."""
    rep = small_report()
    rep.save(tmp_path, figures=False)
    assert Report.from_json(tmp_path / "report.json").records == rep.records
    rec = rep.records[0]
    newer = Report(records=[dataclasses.replace(rec, errors=dataclasses.replace(
        rec.errors, spatial=dataclasses.replace(rec.errors.spatial, mean=0.2)))])
    newer.to_csv(tmp_path / "report.csv")  # what a killed save leaves: the new CSV, the old report.json
    with pytest.raises(FolderError) as info:
        Report.from_json(tmp_path / "report.json")
    assert "report.csv" in str(info.value) and "\n" not in str(info.value)
    newer.save(tmp_path, figures=False)  # saving again repairs it
    assert Report.from_json(tmp_path / "report.json").records[0].errors.spatial.mean == 0.2


def test_a_report_json_that_is_not_one_is_a_one_line_error(tmp_path):
    (tmp_path / "report.json").write_text("{\"records\": ")
    with pytest.raises(ValueError, match="not a report.json") as info:
        Report.from_json(tmp_path / "report.json")
    assert "\n" not in str(info.value)


KILLED_WRITE = """
import os, sys, time
from pathlib import Path
from invariance.files import atomic_write, exit_on_sigterm
def slow(f):
    f.write(b"partial")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
if sys.argv[2] == "term":
    with exit_on_sigterm():
        atomic_write(Path(sys.argv[1]) / sys.argv[3], slow)
else:
    atomic_write(Path(sys.argv[1]) / sys.argv[3], slow)
"""


@pytest.mark.parametrize("signal_name", ["term", "kill"])
@pytest.mark.parametrize("target", ["report.json", "checkpoint.pt"])
def test_no_tmp_file_survives_a_killed_write(tmp_path, signal_name, target):
    """SIGTERM: the writer removes its temporary file itself. SIGKILL: nothing can run in the
    killed process; its temporary file is removed by the next write into the folder."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITE, str(tmp_path), signal_name, target],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert len(temporaries(tmp_path)) == 1
        proc.send_signal(signal.SIGTERM if signal_name == "term" else signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    assert not (tmp_path / target).exists()
    if signal_name == "term":
        assert proc.returncode == 143 and temporaries(tmp_path) == []
        return
    assert len(temporaries(tmp_path)) == 1  # the killed process's own file
    if target == "report.json":
        small_report().save(tmp_path, figures=False)
    else:
        save_checkpoint(tmp_path / target, torch.nn.Linear(2, 2), builder="torch.nn:Linear",
                        config={"in_features": 2, "out_features": 2})
    assert temporaries(tmp_path) == []
    assert (tmp_path / target).stat().st_size > 0


def test_temporaries_of_running_processes_are_kept(tmp_path):
    mine = tmp_path / f".report.json.{os.getpid()}.abcd1234.tmp"
    mine.write_bytes(b"")
    dead = tmp_path / ".report.json.999999999.abcd1234.tmp"
    dead.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert mine.exists()


def test_a_failed_write_removes_its_temporary_file(tmp_path):
    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "x.json", broken)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- stn

# fake_root (40 fake digits) and run_dir (a trained one-epoch CNN run) are fixtures of conftest.py


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize("where", ["a file", "a read-only folder", "under a file"])
def test_stn_train_out_is_checked_before_the_data(d, tmp_path, capsys, where):
    """No --data-root and (maybe) no data: the error is about --out, so --out came first."""
    out = {"a file": d / "a_file", "a read-only folder": read_only_dir(tmp_path),
           "under a file": d / "a_file" / "run"}[where]
    argv = [a for a in train_argv(out, "x") if a not in ("--data-root", "x")]
    code, _, err = call(stn_cli.main, argv, capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith("stn train: error: --out: "), line
    assert (d / "a_file").read_text() == "not a folder\n"


def test_stn_data_root_without_the_data_never_falls_back(tmp_path, fake_root, capsys, monkeypatch):
    """INVARIANCE_DATA holds the data, --data-root does not: an error naming --data-root, and no
    run folder (the data are read before the run folder is made)."""
    monkeypatch.setenv("INVARIANCE_DATA", fake_root)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    code, _, err = call(stn_cli.main, train_argv(out, empty), capsys)
    assert code == 1
    line = one_line(err)
    assert line.startswith("stn train: error: --data-root: ") and str(empty) in line and fake_root not in line
    assert not out.exists()
    code, _, err = call(stn_cli.main, train_argv(out, tmp_path / "nowhere"), capsys)
    assert code == 2 and "--data-root" in one_line(err) and "not a folder" in err
    assert not out.exists()


def test_a_diverged_run_stops_and_saves_no_nan_weights(tmp_path, fake_root, capsys):
    out = tmp_path / "run"
    code, _, err = call(stn_cli.main, train_argv(out, fake_root, "--lr", "1e30", "--epochs", "2"), capsys)
    assert code == 1
    line = one_line(err)
    assert "diverged" in line and "--lr" in line and "epoch 1" in line, line
    assert not out.exists()  # nothing was saved, so no run folder either


def test_a_diverged_resumed_run_keeps_the_last_finite_checkpoint(run_dir, tmp_path, fake_root, capsys):
    out = copy_run(run_dir, tmp_path)
    before = (out / "checkpoint.pt").read_bytes()
    # the learning rate is part of the run's settings (a resume must repeat them), so make the
    # resumed epoch diverge through the saved optimiser state: its learning rate becomes 1e30
    ck = load_checkpoint(out / "checkpoint.pt")
    for group in ck["optimizer"]["param_groups"]:
        group["lr"] = 1e30
    model = torch.nn.Module()
    model.state_dict = lambda: ck["state_dict"]  # save_checkpoint takes the weights from state_dict()
    extra = {k: v for k, v in ck.items() if k not in ("format", "builder", "config", "state_dict", "checksum")}
    save_checkpoint(out / "checkpoint.pt", model, ck["builder"], ck["config"], **extra)
    tampered = (out / "checkpoint.pt").read_bytes()
    assert tampered != before
    code, _, err = call(stn_cli.main, train_argv(out, fake_root, "--epochs", "3", "--resume"), capsys)
    assert code == 1 and "diverged" in one_line(err) and "epoch 1 is kept" in err, err
    assert (out / "checkpoint.pt").read_bytes() == tampered  # the finite epoch-1 weights, untouched
    assert temporaries(out) == []


def test_a_checkpoint_with_nan_weights_is_refused(run_dir, tmp_path, capsys):
    out = copy_run(run_dir, tmp_path)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    name = next(iter(ck["state_dict"]))
    ck["state_dict"][name].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):  # save_checkpoint refuses to write it
        model = torch.nn.Module()
        model.state_dict = lambda: ck["state_dict"]
        save_checkpoint(tmp_path / "nan.pt", model, ck["builder"], ck["config"])
    assert not (tmp_path / "nan.pt").exists()
    from invariance import tensor_checksum

    ck.pop("checksum")
    ck["checksum"] = tensor_checksum(ck)  # a consistent file, written by something else
    torch.save(ck, out / "checkpoint.pt")
    code, out_text, err = call(stn_cli.main, ["evaluate", out, "--device", "cpu"], capsys)
    assert code == 1 and out_text == ""
    line = one_line(err)
    assert name in line and "NaN" in line, line
    assert not (out / "evaluation.json").exists()
    code, _, err = call(inv_cli.main, ["layers", "--model", out / "checkpoint.pt"], capsys)
    assert code == 2 and "--model" in one_line(err) and "NaN" in err


def test_a_checkpoint_with_corrupted_weight_bytes_is_refused(run_dir, tmp_path, capsys):
    """Bytes of a weight tensor flipped inside the file: torch.load reads it without complaint,
    the checksum does not match."""
    out = copy_run(run_dir, tmp_path)
    path = out / "checkpoint.pt"
    ck = load_checkpoint(path)
    weight = max(ck["state_dict"].values(), key=lambda t: t.numel())
    raw = bytearray(path.read_bytes())
    needle = weight.contiguous().view(-1)[:16].numpy().tobytes()
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    torch.load(path, weights_only=False)  # still loads: only the checksum notices
    code, _, err = call(stn_cli.main, ["evaluate", out, "--device", "cpu"], capsys)
    assert code == 1
    assert "checksum" in one_line(err)
    assert not (out / "evaluation.json").exists()


def test_a_checkpoint_without_checksum_still_loads(run_dir, tmp_path):
    """Checkpoints written before checksums existed load as before."""
    out = copy_run(run_dir, tmp_path)
    ck = torch.load(out / "checkpoint.pt", weights_only=False)
    ck.pop("checksum")
    torch.save(ck, out / "checkpoint.pt")
    model, cfg, _ = load_run(out, device="cpu")
    assert cfg.arch == "CNN"


@pytest.mark.parametrize("name", ["checkpoint.pt", "copy.pt"])
def test_stn_evaluate_takes_a_checkpoint_file(run_dir, tmp_path, capsys, name):
    out = copy_run(run_dir, tmp_path)
    path = out / name
    if name != "checkpoint.pt":
        shutil.copy(out / "checkpoint.pt", path)
    code, text, err = call(stn_cli.main, ["evaluate", path, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "test error" in text
    written = out / ("evaluation.json" if name == "checkpoint.pt" else "copy.evaluation.json")
    assert json.loads(written.read_text())["arch"] == "CNN"


def test_stn_evaluate_of_nothing(tmp_path, capsys):
    code, _, err = call(stn_cli.main, ["evaluate", tmp_path / "missing", "--device", "cpu"], capsys)
    assert code == 1 and "no such run folder" in one_line(err)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--arch", "CNN"], "required"),
    (["train", "--arch", "CNN", "--dataset", "mnist", "--transform", "rotation", "--epochs", "x", "--out", "o"],
     "--epochs"),
    (["evaluate"], "run"),
    (["reproduce", "--transforms", "rotation", "--results", "RESULTS_FILE"], "--results"),
])
def test_stn_usage_errors_are_one_line(d, capsys, argv, needle):
    argv = [str(d / "a_file") if a == "RESULTS_FILE" else a for a in argv]
    code, _, err = call(stn_cli.main, argv, capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith("stn") and needle in line, line


# ----------------------------------------------------------------------------- the Python API


def _api_cases():
    from invariance import (
        SearchConfig,
        Transform,
        align,
        as_image_batch,
        bootstrap_ci,
        fit_linear,
        load_model,
        measure,
        parse_transforms,
    )

    x = torch.rand(2, 1, 8, 8)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))

    def m(transforms, **kw):
        return measure(net, x, transforms, **{"layers": "0", "channels": "spatial", "progress": False, **kw})

    return [
        ("int-out-of-range", lambda: as_image_batch(torch.full((1, 4, 4), 300, dtype=torch.int32)), "images", "0..255"),
        ("complex", lambda: as_image_batch(torch.ones(1, 4, 4, dtype=torch.complex64)), "images", "complex"),
        ("sweep-fractional-count", lambda: parse_transforms("scale:0.5..2:2.7"), "transform", "whole number"),
        ("sweep-huge", lambda: parse_transforms("rotation:0..1e9:1"), "transform", "cap"),
        ("sweep-tiny-step", lambda: parse_transforms("rotation:0..360:1e-9"), "transform", "cap"),
        ("sweep-empty", lambda: parse_transforms("rotation:90..0:10"), "transform", "empty"),
        ("n-boot-negative", lambda: bootstrap_ci([1.0, 2.0], n_boot=-1), "n_boot", "non-negative"),
        ("measure-n-boot-negative", lambda: measure(net, x, "rotation:90", n_boot=-5, progress=False), "n_boot",
         ">= 0"),
        ("float64-images-float32-model", lambda: measure(net, x.double(), "rotation:90", progress=False), "images",
         "model.to"),
        ("fit-linear-one-fold", lambda: fit_linear(x, x, torch.eye(3).expand(2, 3, 3), folds=1), "folds", ">= 2"),
        ("fit-linear-negative-ridge", lambda: fit_linear(x, x, torch.eye(3).expand(2, 3, 3), ridge=-1.0), "ridge",
         ">= 0"),
        ("n-angles-zero", lambda: SearchConfig(n_angles=0), "n_angles", "integer >= 1"),
        ("float16-maps", lambda: align(x.half(), x.half(), "rotation"), "reference", "float32 or float64"),
        ("mask-and-radius", lambda: align(x, x, "rotation", mask=torch.ones(8, 8), mask_radius=0.5), "mask_radius",
         "not both"),
        ("image-too-large", lambda: measure(net, torch.zeros(1, 1, 1024, 1024), "rotation:90", progress=False),
         "images", "max_image_pixels"),
        ("expected-shape", lambda: align(x, x, "rotation", expected=torch.eye(3).expand(5, 3, 3)), "expected",
         "(3, 3)"),
        # round 2: every measure() argument checked where it enters, before the model runs
        ("measure-seed-negative", lambda: m("rotation:90", seed=-1), "seed", "0..4294967295"),
        ("measure-unknown-device", lambda: m("rotation:90", device="tpu"), "device", "valid choices: cpu"),
        ("measure-config-number", lambda: m("rotation:90", config=3), "config", "SearchConfig or a preset"),
        ("measure-config-unknown-preset", lambda: m("rotation:90", config="fastest"), "preset", "valid choices"),
        ("measure-interior-string", lambda: m("rotation:90", interior="yes"), "interior", "True or False"),
        ("measure-mask-radius-negative", lambda: m("rotation:90", mask_radius=-1), "mask_radius", "> 0"),
        ("measure-mask-radius-inf", lambda: m("rotation:90", mask_radius=float("inf")), "mask_radius", "finite"),
        ("measure-memory-budget-negative", lambda: m("rotation:90", memory_budget=-1), "memory_budget", "positive"),
        ("measure-transforms-number", lambda: m(30), "transforms", "SPEC string"),
        ("measure-transforms-list-of-numbers", lambda: m([30]), "transforms", "got a int"),
        ("measure-max-image-pixels-zero", lambda: m("rotation:90", max_image_pixels=0), "max_image_pixels", ">= 1"),
        ("floor-unknown-grid", lambda: invariance.interpolation_floor(torch.rand(1, 1, 8, 8), torch.eye(3), "rigid",
                                                                      grid="local"),
         "grid", "valid choices: full, near"),
        ("search-config-unknown-option", lambda: SearchConfig(unknown=1), "SearchConfig", "valid choices: n_angles"),
        ("search-config-nan-separation", lambda: SearchConfig(basin_separation=float("nan")), "basin_separation",
         "finite"),
        ("search-config-negative-budget", lambda: SearchConfig(memory_budget=-1), "memory_budget", ">= 1"),
        ("search-config-string-overlap", lambda: SearchConfig(min_overlap="0.5"), "min_overlap", "number"),
        ("search-config-aspects-without-angles", lambda: SearchConfig(affine_aspect_angles=()),
         "affine_aspect_angles", "no anisotropic shape"),
        ("parse-cap-zero", lambda: parse_transforms("rotation:90", max_transforms=0), "max_transforms", ">= 1"),
        ("parse-scale-zero", lambda: parse_transforms("scale:0"), "transform", "scale factor"),
        ("parse-rotation-nan", lambda: parse_transforms("rotation:nan"), "transform", "finite"),
        ("transform-nan", lambda: Transform("rotation", (float("nan"),)), "transform", "finite"),
        ("transform-string-param", lambda: Transform("rotation", ("30",)), "transform", "real numbers"),
        ("load-model-number", lambda: load_model(3), "model", "got int"),
        ("align-config-number", lambda: align(x, x, "rotation", config=3), "config", "SearchConfig or a preset"),
        ("measure-layers-number", lambda: m("rotation:90", layers=3), "layers", "list of layer names"),
        ("parse-none", lambda: parse_transforms(None), "transform", "got NoneType"),
        ("load-model-empty", lambda: load_model(""), "model", "empty"),
        ("report-load-missing", lambda: Report.load("/nonexistent/report"), "path", "not found"),
        ("report-save-read-only", lambda: Report(records=[]).save("/proc/invariance-test-out"), "out_dir",
         "cannot write"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _api_cases()])
def test_python_api_bad_input_is_one_line_naming_the_argument(name):
    """The Python API checks its arguments before any work; the message is one line that starts
    with the argument's name and says what is valid."""
    _, call, arg, needle = next(c for c in _api_cases() if c[0] == name)
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{arg}:") and needle in msg, msg


def test_integer_images_of_every_width_are_scaled_like_uint8():
    from invariance import as_image_batch

    for dt in (torch.uint8, torch.int16, torch.int32, torch.int64):
        out = as_image_batch(torch.tensor([[[0, 51, 255]]], dtype=dt))
        assert out.dtype == torch.float32 and out.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0]), dt


def test_n_boot_zero_means_no_interval_through_the_api_and_the_cli(d, capsys):
    """``n_boot=0`` is valid in both front ends alike (means without intervals): one rule, one meaning."""
    from invariance import measure as api_measure

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    rep = api_measure(net, torch.rand(3, 1, 12, 12), "rotation:90", layers="0", channels="spatial", n_boot=0,
                      progress=False)
    lo, hi = rep.records[0]["spatial_error_ci"]
    assert lo == hi == pytest.approx(rep.records[0]["spatial_error"])
    code, out, err = call(inv_cli.main, measure(d, "--n-boot", "0"), capsys)
    assert code == 0 and "spatial" in out, err


def test_a_list_of_spec_strings_and_transforms_is_measured():
    """``transforms=["rotation:30"]`` (a list of SPEC strings, possibly mixed with Transforms) used to fail
    inside measure with an AttributeError; it is the same as the joined SPEC."""
    from invariance import Transform
    from invariance import measure as api_measure

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))
    x = torch.rand(2, 1, 12, 12)
    kw = dict(layers="0", channels="spatial", n_boot=0, progress=False, calibrate=False)
    a = api_measure(net, x, ["rotation:30", Transform("translation", (1.0, 0.0))], **kw)
    b = api_measure(net, x, "rotation:30; translation:1,0", **kw)
    assert [r["transform"] for r in a.records] == ["rotation:30", "translation:1,0"]
    assert [r["spatial_error"] for r in a.records] == [r["spatial_error"] for r in b.records]


def test_the_callers_images_are_never_modified():
    """A model whose first layer works in place (``ReLU(inplace=True)``) used to overwrite the caller's
    images (negative values clipped to 0) and so measure other images than it was given."""
    from invariance import measure as api_measure

    net = torch.nn.Sequential(torch.nn.ReLU(inplace=True), torch.nn.Conv2d(1, 2, 3, padding=1))
    x = torch.rand(2, 1, 12, 12) - 0.5
    before = x.clone()
    api_measure(net, x, "rotation:90", layers="1", channels="spatial", n_boot=0, progress=False)
    assert torch.equal(x, before)


def test_a_model_in_training_mode_is_measured_in_eval_mode_and_restored():
    """As documented in ``measure``: a BatchNorm in training mode would normalise each batch by its own
    statistics (one image: a constant map); the measurement runs the model in eval mode and hands it back
    in the mode it came in. Known answer: the same errors as the model measured in eval mode."""
    from invariance import measure as api_measure

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    x = torch.rand(1, 1, 12, 12)
    kw = dict(layers="2", channels="spatial", n_boot=0, progress=False)
    trained = api_measure(net.train(), x, "rotation:90", **kw)
    assert net.training  # restored
    ev = api_measure(net.eval(), x, "rotation:90", **kw)
    assert trained.records[0]["spatial_error"] == ev.records[0]["spatial_error"]
    assert trained.meta["model_mode"].startswith("eval (the model was in training mode")
