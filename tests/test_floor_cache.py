"""The interpolation floor is computed once per (images, transformation, search) and read back after
(invariance/_floor_cache.py): counted, compared bit for bit, and refused when a file is not exactly
what the cache writes (loading never runs code)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import invariance
from invariance import _floor_cache, _measure, measure
from invariance._cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = "rotation:30; translation:1,2"
CFG = invariance.SearchConfig(n_angles=12, refine_steps=3, top_k=1, subpixel_top=2, hop_steps=(), polish_levels=1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()).double()


def _images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(3, 1, 16, 16, dtype=torch.float64)
    x[:, :, 4:12, 4:12] = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    return x


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls of the floor's computation made by ``measure``."""
    calls = []
    real = _measure.interpolation_floor

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(_measure, "interpolation_floor", counting)
    return calls


def _run(folder, **kw) -> invariance.Report:
    args = dict(layers="0,1", channels=("spatial",), config=CFG, n_boot=20, floor_cache=folder)
    args.update(kw)
    return measure(_net(), args.pop("images", _images()), SPEC, **args)


def _floors(rep) -> list[list[float]]:
    return [list(rec.calibration.floor.per_image) for rec in rep.records]


def test_a_second_call_reads_every_floor_and_computes_none(tmp_path, counted):
    """Two transformations: two floors computed by the first call (one batch each), none by the second,
    and the values read back are the values computed, bit for bit."""
    first = _run(tmp_path)
    assert len(counted) == 2 and first.meta["floor_cache"] == {"folder": str(tmp_path), "read": 0, "computed": 2}
    second = _run(tmp_path, layers="1")  # another layer selection: the floor does not depend on it
    assert len(counted) == 2 and second.meta["floor_cache"]["read"] == 2
    by_tr = {rec.transform: list(rec.calibration.floor.per_image) for rec in first.records}
    for rec in second.records:
        assert list(rec.calibration.floor.per_image) == by_tr[rec.transform]
    assert len(list(tmp_path.rglob("*.npy"))) == 2


def test_other_images_or_settings_compute_the_floor_again(tmp_path, counted):
    _run(tmp_path)
    _run(tmp_path, images=_images(seed=1))
    assert len(counted) == 4
    _run(tmp_path, config=CFG.__class__(**{**CFG.__dict__, "n_angles": 8}))
    assert len(counted) == 6
    _run(tmp_path, mask_radius=0.9)
    assert len(counted) == 8


def test_a_change_of_the_code_is_a_new_key(monkeypatch):
    """The key hashes the package's source: a changed search never reads a floor the old one computed."""
    x, t = _images(), torch.eye(3, dtype=torch.float64)
    before = _floor_cache.floor_key(x, t, "rigid", CFG, None)
    monkeypatch.setattr(_floor_cache, "_code_hash", lambda: b"another version of the search")
    assert _floor_cache.floor_key(x, t, "rigid", CFG, None) != before


def test_off_computes_every_time_and_writes_nothing(tmp_path, counted, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for _ in range(2):
        rep = _run(False)
    assert len(counted) == 4 and rep.meta["floor_cache"] == {"folder": None, "read": 0, "computed": 2}
    assert not list(tmp_path.rglob("*.npy"))


def test_the_default_folder_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rep = _run(True)
    assert rep.meta["floor_cache"]["folder"] == str(tmp_path / "invariance" / "floors")
    assert len(list((tmp_path / "invariance" / "floors").rglob("*.npy"))) == 2


class _Marker:
    """Unpickling this would create a folder: the proof that a cache file ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("bad", ["garbage", "wrong length", "float32", "pickled object"])
def test_a_bad_cache_file_is_computed_again_never_executed(tmp_path, counted, bad):
    first = _run(tmp_path)
    files = sorted(tmp_path.rglob("*.npy"))
    marker = tmp_path / "code-ran"
    for f in files:
        if bad == "garbage":
            f.write_bytes(b"\x93NUMPY not really")
        elif bad == "wrong length":
            np.save(f, np.zeros(2))
        elif bad == "float32":
            np.save(f, np.zeros(3, dtype=np.float32))
        else:
            np.save(f, np.array([_Marker(str(marker))], dtype=object), allow_pickle=True)
    if bad == "pickled object":  # the file is a real exploit: a pickle-enabled load would run it
        proof = tmp_path / "proof.npy"
        np.save(proof, np.array([_Marker(str(tmp_path / "proof-ran"))], dtype=object), allow_pickle=True)
        np.load(proof, allow_pickle=True)
        assert (tmp_path / "proof-ran").exists()
    again = _run(tmp_path)
    assert not marker.exists()
    assert len(counted) == 4 and again.meta["floor_cache"]["computed"] == 2
    assert _floors(again) == _floors(first)
    for f in files:  # replaced by good files
        assert np.load(f, allow_pickle=False).dtype == np.float64


def test_a_folder_that_cannot_be_written_only_costs_the_cache(tmp_path, counted):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    rep = _run(blocked / "floors")
    assert rep.meta["floor_cache"]["computed"] == 2 and len(counted) == 2


@pytest.mark.parametrize("value", [3, None, ""])
def test_a_bad_floor_cache_argument_is_named(value):
    with pytest.raises(TypeError, match=r"^floor_cache: expected True \(the user cache\), False \(off\) or a folder"):
        _run(value)


def test_the_command_line_turns_it_off(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["measure", "--model", "toy-wm", "--transform", "rotation:90", "--layers", "detect", "--n-images", "2",
            "--n-boot", "10", "--quick"]
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    assert cli_main(args + ["--out", str(tmp_path / "b"), "--no-floor-cache"]) == 0
    rep = invariance.Report.from_json(tmp_path / "b" / "report.json")
    assert rep.meta["floor_cache"] == {"folder": None, "read": 0, "computed": 1}


def test_no_floor_where_no_layer_can_have_a_verdict(tmp_path, counted):
    """Receptive fields of 43 px on 24 px images: every position's field covers the image, no layer
    has a verdict (RF_COVERS_IMAGE), so the floor would calibrate nothing and is not computed; with
    the input among the layers it is."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(4, 4, 7, stride=2, padding=3),
                        nn.ReLU(), nn.Conv2d(4, 4, 7, padding=3)).double()
    x = torch.rand(3, 1, 24, 24, dtype=torch.float64)
    kw = dict(channels=("spatial",), config=CFG, n_boot=10, floor_cache=tmp_path)
    deep = measure(net, x, "rotation:30", layers="4", **kw)
    rec = deep.records[0]
    assert rec.errors.spatial.n_excluded == 3 and invariance.RF_COVERS_IMAGE in rec.errors.spatial.reasons
    assert not counted and rec.calibration.floor is None and deep.meta["floor_cache"]["computed"] == 0
    with_input = measure(net, x, "rotation:30", layers="input,4", **kw)
    assert len(counted) == 1 and all(r.calibration.floor is not None for r in with_input.records)
