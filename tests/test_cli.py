"""Tests of the ``invariance`` command (:func:`invariance._cli.main` in-process, and the console
script once in a subprocess).

Contract under test: ``invariance measure --model FILE.py:NAME --images FILE.npy --transform SPEC
--out DIR`` writes ``report.json`` / ``report.csv``; every bad input ends with exit code 2 and
ONE line on stderr, ``invariance: error: ...``, naming the problem and, where there is a finite
set of valid values, listing them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from invariance import Report, Transform
from invariance._cli import main

MODEL_SRC = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        # bias-free conv + ReLU on 1-channel 15 x 15 images, then a linear head (a non-4-D layer)
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
            with torch.no_grad():
                self.conv.weight.copy_(torch.randn(3, 1, 3, 3, generator=g))
            self.relu = nn.ReLU()
            self.fc = nn.Linear(3 * 15 * 15, 2)

        def forward(self, x):
            return self.fc(self.relu(self.conv(x)).flatten(1))


    NET = Net()
    """
)

QUICK = ["--quick", "--n-boot", "20", "--channels", "spatial"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A model file and image files: good (3 images 15 x 15: content 7 x 7 in a zero margin of 4,
    so a 2-px shift is exact through the 1-px receptive field), 3-channel, NaN, and empty."""
    d = tmp_path_factory.mktemp("cli")
    (d / "net.py").write_text(MODEL_SRC)
    rng = np.random.default_rng(0)
    good = np.zeros((3, 15, 15), dtype=np.float32)
    good[:, 4:11, 4:11] = rng.random((3, 7, 7), dtype=np.float32)
    np.save(d / "good.npy", good)
    np.save(d / "rgb.npy", rng.random((2, 3, 15, 15), dtype=np.float32))
    nan = good.copy()
    nan[1, 7, 7] = np.nan
    np.save(d / "nan.npy", nan)
    np.save(d / "empty.npy", np.zeros((0, 15, 15), dtype=np.float32))
    return {"dir": d, "model": d / "net.py", "good": d / "good.npy", "rgb": d / "rgb.npy", "nan": d / "nan.npy",
            "empty": d / "empty.npy"}


def measure_args(files, *extra, model=None, images=None, transform="translation:2,-1") -> list[str]:
    return ["measure", "--model", model or f"{files['model']}:NET", "--images", str(images or files["good"]),
            "--transform", transform, *QUICK, *extra]


def test_measure_writes_the_report_with_the_known_answer(files, tmp_path, capsys):
    """Translation by (2, -1) px of zero-margin images through a bias-free conv + ReLU: every
    layer's maps move by exactly (2, -1), so the spatial error is ~0 (float32 rounding: < 1e-8,
    see tests/test_search.py) and the best warp in the image frame is (-2, 1)."""
    out = tmp_path / "out"
    assert main(measure_args(files, "--out", str(out))) == 0  # default layers of a file model: all 4-D ones
    stdout = capsys.readouterr().out
    assert "translation:2,-1" in stdout and "wrote" in stdout
    data = Report.load(out)
    assert [r.layer for r in data.records] == ["conv", "relu"]
    for r in data.records:
        assert r.errors.spatial.mean < 1e-8
        np.testing.assert_allclose(r.best_warp.median, [-2.0, 1.0], atol=1e-4)
    assert data.meta["n_images"] == 3 and data.meta["image_size"] == [15, 15]
    assert data.meta["model"] == f"{files['model']}:NET"
    lines = (out / "report.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + len(data.records)


def test_sweep_spec_gives_five_transforms_and_all_layers(files, tmp_path, capsys):
    """``rotation:-90..90:45`` is -90, -45, 0, 45, 90: five records for one layer, and the sweep
    figure."""
    out = tmp_path / "sweep"
    argv = measure_args(files, "--search", "rotation", "--layers", "relu", "--n-images", "2", "--out", str(out),
                        transform="rotation:-90..90:45")
    assert main(argv) == 0
    capsys.readouterr()
    data = Report.load(out)
    assert data.meta["transforms"] == ["rotation:-90", "rotation:-45", "rotation:0", "rotation:45", "rotation:90"]
    assert data.meta["layers"] == ["relu"]
    assert [r.transform.params for r in data.records] == [(-90.0,), (-45.0,), (0.0,), (45.0,), (90.0,)]
    (zero,) = data.select(transform=Transform("rotation", (0.0,)))
    assert zero.errors.invariance.mean < 1e-10 and zero.errors.spatial.mean < 1e-10
    assert (out / "errors_by_magnitude.png").stat().st_size > 0


def test_console_script_in_a_subprocess(files, tmp_path):
    """The installed console script, end to end (the error paths are exercised in-process below)."""
    exe = Path(sys.executable).with_name("invariance")
    assert exe.is_file()
    out = tmp_path / "sub"
    proc = subprocess.run([str(exe), *measure_args(files, "--layers", "relu", "--out", str(out))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = Report.load(out)
    assert [r.layer for r in data.records] == ["relu"]
    assert data.records[0].errors.spatial.mean < 1e-8
    assert (out / "report.csv").is_file()


def test_layers_command_lists_frames(files, capsys):
    assert main(["layers", "--model", f"{files['model']}:NET", "--images", str(files["good"])]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "relu" in out and "traced" in out and "fc" not in out


@pytest.mark.parametrize("case, match", [
    ("unknown-layer", r"layers: unknown layer name\(s\) 'conv9'; valid choices: input, conv, relu, fc"),
    ("linear-layer", r"layers: layer 'fc' has a non-4-D output"),
    ("rgb-images", r"images: the model's first convolution 'conv' expects 1 channel\(s\), got images with 3"),
    ("nan-images", r"images: contain NaN or infinite values"),
    ("n-images-0", r"--n-images: must be at least 1, got 0"),
    ("empty-npy", r"images: empty batch"),
    ("unknown-spec", r"transform: unknown SPEC 'twist:3'; valid: rotation:ANGLE"),
    ("bad-sweep", r"transform: cannot parse SPEC 'rotation:0..90:0'"),
    ("unknown-search", r"search: unknown search family 'rotate'; valid choices: translation, rotation, scale"),
    ("unknown-channels", r"channels: unknown channel matching colour; valid choices: spatial, permutation, linear"),
    ("unknown-model", r"model: unknown model 'no-such-net'; valid choices: .*built-in name \(.*toy-wm"),
    ("missing-model-file", r"model: file '.*missing\.py' not found"),
    ("missing-attribute", r"model: '.*net\.py' has no attribute 'NOPE'"),
    ("missing-images", r"images: file '.*missing\.npy' not found"),
    ("unknown-source", r"images: unknown SOURCE 'pictures'; valid choices: digits, mnist"),
    ("unknown-device", r"device: unknown device 'gpu'; valid choices: cpu, cuda, cuda:N, auto"),
])
def test_bad_input_exits_2_with_one_line(files, capsys, case, match):
    d = files["dir"]
    argv = {
        "unknown-layer": measure_args(files, "--layers", "conv,conv9"),
        "linear-layer": measure_args(files, "--layers", "conv,fc"),
        "rgb-images": measure_args(files, images=files["rgb"]),
        "nan-images": measure_args(files, images=files["nan"]),
        "n-images-0": measure_args(files, "--n-images", "0"),
        "empty-npy": measure_args(files, images=files["empty"]),
        "unknown-spec": measure_args(files, transform="twist:3"),
        "bad-sweep": measure_args(files, transform="rotation:0..90:0"),
        "unknown-search": measure_args(files, "--search", "rotate"),
        "unknown-channels": measure_args(files, "--channels", "spatial,colour"),  # the last one counts
        "unknown-model": measure_args(files, model="no-such-net"),
        "missing-model-file": measure_args(files, model=f"{d / 'missing.py'}:NET"),
        "missing-attribute": measure_args(files, model=f"{files['model']}:NOPE"),
        "missing-images": measure_args(files, images=d / "missing.npy"),
        "unknown-source": measure_args(files, images="pictures"),
        "unknown-device": measure_args(files, "--device", "gpu"),
    }[case]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("invariance: error: ")
    import re

    assert re.search(match, lines[0]), lines[0]


def test_layers_of_an_rgb_model_without_images(tmp_path, capsys):
    """``invariance layers --model M`` with no ``--images`` for a model that takes 3 channels probes
    it with a random RGB image instead of failing on 1-channel digits; the frames are traced
    (stride 2 after the strided convolution)."""
    src = tmp_path / "rgb.py"
    src.write_text("import torch\nNET = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), "
                   "torch.nn.ReLU())\n")
    assert main(["layers", "--model", f"{src}:NET"]) == 0
    out = capsys.readouterr().out
    assert "random 1 x 3 x 224 x 224 probe" in out
    assert "(4, 112, 112)" in out and "(2.0, 2.0)" in out and "traced" in out
