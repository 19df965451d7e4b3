"""Loading a file runs no code from it (the threat model in README, "Loading files from others").

Every case here is a file crafted to run a shell command that creates a marker file when it is
loaded: a checkpoint naming ``os:system`` as its builder, pickle payloads (an object whose
``__reduce__`` calls ``os.system``) in a checkpoint, an image ``.pt``, a training state and a
``report.json``. Each must be refused through the CLI and the API with one line that says how to
allow trusted code, and the marker must not exist afterwards: the test fails if the command ran.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import invariance
from invariance import (
    CheckpointError,
    Report,
    UntrustedCheckpointError,
    build_from_checkpoint,
    load_checkpoint,
    load_model,
    register_builder,
    save_checkpoint,
)
from invariance import _cli as inv_cli
from invariance.files import UntrustedFileError, safe_torch_load
from stn import _cli as stn_cli

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this object runs ``touch MARKER`` (what an attacker's file does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def call(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    _, err = capsys.readouterr()
    return code, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def system_builder_checkpoint(path: Path, marker: Path) -> Path:
    """A well-formed checkpoint (format, checksum) whose builder is ``os:system``."""
    return save_checkpoint(path, torch.nn.Linear(2, 2), builder="os:system", config={"command": f"touch {marker}"})


def payload_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint dict with a pickle payload among its extras."""
    torch.save({"format": invariance.CHECKPOINT_FORMAT, "builder": "invariance:mnist_cnn", "config": {},
                "state_dict": {}, "extra": Payload(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "loading the file ran the attacker's command"


# ---------------------------------------------------------------------------- a builder naming os:system

def test_a_checkpoint_naming_os_system_is_refused_by_the_api(tmp_path, marker):
    ck = system_builder_checkpoint(tmp_path / "ck.pt", marker)
    for load in (lambda: load_model(str(ck)), lambda: build_from_checkpoint(ck)):
        with pytest.raises(UntrustedCheckpointError, match=r"builder 'os:system', which is not registered.*"
                                                            r"trust_code=True"):
            load()


def test_a_checkpoint_naming_os_system_is_refused_by_the_cli(tmp_path, marker, capsys):
    ck = system_builder_checkpoint(tmp_path / "ck.pt", marker)
    code, err = call(inv_cli.main, ["measure", "--model", ck, "--transform", "rotation:90", "--n-images", "2"],
                     capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("invariance: error: --model:") and "--trust-code" in line
    code, err = call(inv_cli.main, ["layers", "--model", ck], capsys)
    assert code == 2 and "--trust-code" in one_line(err)


def test_a_registered_builder_is_allowed_and_trust_code_allows_any(tmp_path, monkeypatch):
    """The registry is the package's builders plus those registered in code; trust_code opens the rest."""
    net = torch.nn.Conv2d(1, 3, 3)
    ck = save_checkpoint(tmp_path / "conv.pt", net, builder="torch.nn:Conv2d",
                         config={"in_channels": 1, "out_channels": 3, "kernel_size": 3})
    with pytest.raises(UntrustedCheckpointError):
        load_model(str(ck))
    rebuilt = load_model(str(ck), trust_code=True)
    assert torch.equal(rebuilt.weight, net.weight)
    from invariance import _models

    monkeypatch.setattr(_models, "_USER_BUILDERS", {})  # the registration ends with this test
    register_builder("tests:conv", lambda **cfg: torch.nn.Conv2d(**cfg))
    ck2 = save_checkpoint(tmp_path / "conv2.pt", net, builder="tests:conv",
                          config={"in_channels": 1, "out_channels": 3, "kernel_size": 3})
    assert torch.equal(load_model(str(ck2)).weight, net.weight)


def test_the_package_builders_load_without_trust(tmp_path):
    """The shipped CNN and stn's architectures are registered: nothing the package writes needs trust."""
    from stn import build_model

    assert isinstance(load_model("mnist-cnn"), torch.nn.Module)  # the shipped checkpoint
    m = build_model("STN-C1", family="rotation", image_size=(28, 28))
    ck = save_checkpoint(tmp_path / "stn.pt", m, builder="stn:build_model", config=m.config)
    again = load_model(str(ck))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


# ---------------------------------------------------------------------------- pickle payloads

def test_a_pickle_payload_in_a_checkpoint_runs_nothing(tmp_path, marker, capsys):
    ck = payload_checkpoint(tmp_path / "ck.pt", marker)
    with pytest.raises(UntrustedCheckpointError, match=r"posix\.system|os\.system|nt\.system"):
        load_checkpoint(ck)
    with pytest.raises(UntrustedCheckpointError, match="trust_code=True"):
        load_model(str(ck))
    code, err = call(inv_cli.main, ["measure", "--model", ck, "--transform", "rotation:90"], capsys)
    assert code == 2 and "--trust-code" in one_line(err)
    code, err = call(stn_cli.main, ["evaluate", ck, "--no-write"], capsys)
    assert code == 1 and "--trust-code" in one_line(err)


def test_a_raw_pickle_file_given_as_a_checkpoint_runs_nothing(tmp_path, marker):
    ck = tmp_path / "raw.pt"
    ck.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UntrustedCheckpointError):
        load_model(str(ck))


def test_a_pickle_payload_in_an_image_file_runs_nothing(tmp_path, marker, capsys):
    path = tmp_path / "images.pt"
    torch.save({"images": torch.zeros(2, 8, 8), "x": Payload(marker)}, path)
    with pytest.raises(UntrustedFileError, match="images: .* unpickling them could run code"):
        inv_cli.load_images(str(path))
    code, err = call(inv_cli.main, ["measure", "--model", "toy-circular", "--images", path, "--transform",
                                    "rotation:90"], capsys)
    line = one_line(err)
    assert code == 2 and line.startswith("invariance: error: --images:") and "torch.save(images" in line


def test_a_pickle_file_named_report_json_runs_nothing(tmp_path, marker):
    """Reports are JSON: a pickle saved as report.json is refused as unreadable, never unpickled."""
    (tmp_path / "report.json").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="not a report.json"):
        Report.from_json(tmp_path / "report.json")


def test_a_pickle_payload_in_a_training_state_runs_nothing(tmp_path, marker):
    """stn's resumable training state (budgeted training) is read the same way."""
    path = tmp_path / "rotation.state.pt"
    torch.save({"schedule": {"steps": 3}, "x": Payload(marker)}, path)
    with pytest.raises(UntrustedFileError):
        safe_torch_load(path, what="state")


def test_trusted_loading_still_works_for_plain_files(tmp_path):
    """The safe loader reads everything the package writes: tensors, optimiser and scheduler state,
    RNG state, nested dicts of numbers and strings."""
    m = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 5])
    m(torch.ones(1, 2)).sum().backward()
    opt.step()
    obj = {"opt": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
           "history": [{"epoch": 1, "loss": 0.5, "note": None}], "shape": (2, 3)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    back = safe_torch_load(buf)
    assert back["sched"]["milestones"] == sched.state_dict()["milestones"]
    assert torch.equal(back["rng"], obj["rng"])


# ---------------------------------------------------------------------------- unbounded reads

def test_an_npy_header_claiming_400_gb_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.npy"
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (100_000, 1000, 1000)})
        f.write(b"\0" * 64)
    with pytest.raises(ValueError, match=r"images: .* truncated or corrupt: its header claims .*400,000,000,000"):
        inv_cli.load_images(str(path))


def test_a_corrupt_checkpoint_is_still_a_checkpoint_error(tmp_path):
    path = tmp_path / "trunc.pt"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(100)}, buf)
    path.write_bytes(buf.getvalue()[:50])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
