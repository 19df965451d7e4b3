"""One rule per option: the same bad value gets the same one-line message through the Python API
(:func:`invariance.measure`, naming the argument) and the command line (``invariance measure``,
naming its ``--flag``), because both build one :class:`invariance.MeasureOptions`; and every
default is the same in the code, ``--help`` and README.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import invariance
from invariance import DEFAULT_MEMORY_BUDGET, MeasureOptions, measure
from invariance._cli import _parser, flag_table, main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
NET = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1))

# (API argument, its value, the CLI's flag, the same value as typed): every option measure() and the CLI share
BAD = [
    ("mask_radius", -1.0, "--mask-radius", "-1"),
    ("mask_radius", float("inf"), "--mask-radius", "inf"),
    ("mask_radius", float("nan"), "--mask-radius", "nan"),
    ("n_boot", -1, "--n-boot", "-1"),
    ("memory_budget", "0", "--memory-budget", "0"),
    ("memory_budget", "-1GB", "--memory-budget", "-1GB"),
    ("memory_budget", "lots", "--memory-budget", "lots"),
    ("seed", -1, "--seed", "-1"),
    ("seed", 2**32, "--seed", str(2**32)),
    ("device", "tpu", "--device", "tpu"),
    ("device", "cuda:x", "--device", "cuda:x"),
    ("search", "bogus", "--search", "bogus"),
    ("search", "projective", "--search", "projective"),
    ("channels", "colour", "--channels", "colour"),
    ("channels", "", "--channels", ""),
    ("max_image_pixels", 0, "--max-pixels", "0"),
]
if not torch.cuda.is_available():
    BAD.append(("device", "cuda", "--device", "cuda"))


@pytest.mark.parametrize("arg, value, flag, typed", BAD, ids=[f"{b[2]}={b[3]}" for b in BAD])
def test_the_same_bad_value_gets_the_same_message_in_the_api_and_the_cli(arg, value, flag, typed, capsys, tmp_path):
    with pytest.raises((ValueError, TypeError)) as info:
        measure(NET, torch.rand(2, 1, 12, 12), "rotation:90", progress=False, **{arg: value})
    api = str(info.value)
    assert "\n" not in api and api.startswith(f"{arg}: "), api
    try:
        code = main(["measure", "--model", "toy-circular", "--transform", "rotation:90", f"{flag}={typed}"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err == f"invariance: error: {flag}: {api.removeprefix(arg + ': ')}", (err, api)


def test_every_option_of_measure_options_has_a_flag_or_is_api_only():
    """A new option is either reachable from the command line (and named there by its flag) or
    listed here as deliberately API-only."""
    api_only = {"config", "batch_size", "calibrate", "progress"}  # --quick picks the config preset
    flags = flag_table()
    names = {f.name for f in MeasureOptions.__dataclass_fields__.values()}
    to_dest = {"max_image_pixels": "max_pixels"}
    missing = sorted(n for n in names - api_only if to_dest.get(n, n) not in flags)
    assert not missing, missing


def _cli_defaults() -> dict:
    p = _parser()
    sub = next(a for a in p._actions if a.dest == "command").choices["measure"]
    return {a.dest: a.default for a in sub._actions}


def test_defaults_agree_in_the_code_the_help_and_the_readme():
    cli = _cli_defaults()
    sig = inspect.signature(measure).parameters
    opts = MeasureOptions()
    assert cli["n_boot"] == sig["n_boot"].default == opts.n_boot == 1000
    assert cli["seed"] == sig["seed"].default == opts.seed == 0
    assert cli["max_pixels"] == sig["max_image_pixels"].default == opts.max_image_pixels == invariance.MAX_IMAGE_PIXELS
    assert cli["mask_radius"] is sig["mask_radius"].default is opts.mask_radius is None
    assert cli["search"] is sig["search"].default is opts.search is None
    assert tuple(cli["channels"].split(",")) == tuple(sig["channels"].default) == opts.channels
    assert cli["max_transforms"] == invariance.MAX_TRANSFORMS
    # the memory budget: None means the documented default, which --help and README quote from the code
    assert cli["memory_budget"] is sig["memory_budget"].default is opts.memory_budget is None
    quoted = f"{DEFAULT_MEMORY_BUDGET >> 20} MiB"
    sub = next(a for a in _parser()._actions if a.dest == "command").choices["measure"]
    assert quoted in " ".join(sub.format_help().split())
    assert f"default {quoted} on the CPU" in (ROOT / "README.md").read_text()


def test_options_are_frozen_and_normalised():
    o = MeasureOptions(channels="spatial, linear", mask_radius=1, memory_budget="1MiB", device="cpu")
    assert o.channels == ("spatial", "linear") and o.mask_radius == 1.0 and o.memory_budget == 1 << 20
    assert o.device == torch.device("cpu") and isinstance(o.config, invariance.SearchConfig)
    with pytest.raises(AttributeError):
        o.n_boot = 3
