"""The ``stn`` command (stn/_cli.py): its parser, its dispatch to the Python API, and its exit codes.

Run in-process (``stn._cli.main``) with capsys. Not repeated here: the one-line usage errors and the
run errors of each bad input (tests/test_bad_inputs.py, tests/test_bad_inputs_stn.py) and the
train / resume / evaluate round trip's text (tests/test_stn_train.py). What is here: every option
is documented in ``--help``, the defaults of ``stn train`` are the API's, ``evaluate`` prints the
test error that ``train`` wrote, ``reproduce`` passes its options on, and the exit codes.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from stn import TrainConfig
from stn import _cli as cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)

# the options of each subcommand, pinned: a new option is added here (and documented) on purpose
OPTIONS = {
    "train": ["--arch", "--dataset", "--transform", "--epochs", "--out", "--family", "--classifier", "--size",
              "--batch-size", "--lr", "--momentum", "--weight-decay", "--loc-lr-mult", "--milestones", "--gamma",
              "--seed", "--limit", "--test-limit", "--eval-every", "--data-root", "--device", "--threads",
              "--resume", "--no-progress"],
    "evaluate": ["--device", "--alignment", "--no-alignment", "--alignment-images", "--data-root", "--json",
                 "--no-write", "--threads", "--trust-code"],
    "reproduce": ["--quick", "--budget", "--out", "--results", "--device", "--threads", "--data-root",
                  "--no-fashion", "--transforms"],
}


def call(argv, capsys) -> tuple[int, str, str]:
    """``stn ARGV`` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("command", list(OPTIONS))
def test_help_of_each_subcommand_lists_exactly_its_options(command, capsys):
    """``stn COMMAND --help`` exits 0 and its usage lists every documented option and no other."""
    code, out, err = call([command, "--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(f"usage: stn {command} ")
    listed = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", out))
    assert listed == {*OPTIONS[command], "--help"}, listed ^ {*OPTIONS[command], "--help"}


def test_top_level_help_lists_the_three_commands(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0
    assert all(re.search(rf"^\s+{c}\s+\S", out, re.M) for c in OPTIONS), out


def test_train_defaults_are_the_apis(tmp_path):
    """``stn train`` with only the required options trains the same run as ``TrainConfig`` with the
    same five values: every other option defaults to the dataclass field's default."""
    args = cli.build_parser().parse_args(["train", "--arch", "CNN", "--dataset", "mnist", "--transform", "scale",
                                          "--epochs", "3", "--out", str(tmp_path)])
    api = TrainConfig(arch="CNN", dataset="mnist", transform="scale", epochs=3)
    for f in fields(TrainConfig):
        assert getattr(args, f.name) == getattr(api, f.name), f.name
    assert (args.device, args.resume, args.no_progress, args.threads) == ("auto", False, False, None)


def test_names_are_normalised_by_the_parser(tmp_path):
    """``--arch`` goes through ``parse_arch`` (the canonical spelling is stored), ``--milestones`` is
    split at commas and ``--alignment`` / ``--no-alignment`` give True / False (unset: None, auto)."""
    p = cli.build_parser()
    base = ["train", "--dataset", "mnist", "--transform", "rotation", "--epochs", "1", "--out", str(tmp_path)]
    assert p.parse_args([*base, "--arch", "stn-sl1"]).arch == "STN-SL1"
    assert p.parse_args([*base, "--arch", "CNN", "--milestones", "3,7"]).milestones == [3, 7]
    assert [p.parse_args(["evaluate", "run", *a]).alignment for a in ([], ["--alignment"], ["--no-alignment"])] == [
        None, True, False]


# ----------------------------------------------------------------------------- train and evaluate


def test_evaluate_prints_the_test_error_that_train_wrote(tmp_path, fake_root, capsys):
    """``stn train`` writes checkpoint.pt and metrics.json and prints its final test error;
    ``stn evaluate`` of that folder computes the same number on the same test set (the weights of the
    checkpoint, the same 8 test images of the fake data set: the error is k/8 exactly) and prints it;
    ``--json`` holds it to the bit; ``--no-write`` writes no evaluation.json, without it the file
    holds the same result."""
    out = tmp_path / "run"
    code, text, err = call(["train", "--arch", "STN-C0", "--dataset", "mnist", "--transform", "rotation",
                            "--epochs", "1", "--out", out, "--limit", "32", "--test-limit", "8", "--batch-size",
                            "16", "--data-root", fake_root, "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert (out / "checkpoint.pt").is_file() and (out / "metrics.json").is_file()
    m = json.loads((out / "metrics.json").read_text())
    error = m["test_error"]
    assert m["finished"] and m["n_test"] == 8 and (8 * error).is_integer()
    assert text.strip().splitlines()[-1] == f"{out}: test error {100 * error:.2f}% after 1 epochs"

    code, text, err = call(["evaluate", out, "--device", "cpu", "--json", "--no-write"], capsys)
    assert code == 0, err
    res = json.loads(text)
    assert res["test_error"] == error and res["n_test"] == 8 and res["correct"].count("0") == 8 * error
    assert not (out / "evaluation.json").exists()

    code, text, err = call(["evaluate", out, "--device", "cpu"], capsys)
    assert code == 0, err
    assert f"STN-C0 on mnist/rotation (1 epochs): test error {100 * error:.2f}% +- " in text.splitlines()[0]
    assert json.loads((out / "evaluation.json").read_text())["test_error"] == error


# ----------------------------------------------------------------------------- reproduce: dispatch


def test_reproduce_passes_its_options_to_the_api(tmp_path, capsys, monkeypatch):
    """``stn reproduce`` calls ``stn.reproduce`` (or, with ``--budget``, ``stn.reproduce_budget``) with
    the options as given: ``--transforms`` split at commas, ``--no-fashion`` as ``fashion=False``,
    the documented default folders."""
    from stn import _budget, _reproduce

    seen = []
    monkeypatch.setattr(_reproduce, "reproduce", lambda **kw: seen.append(("table", kw)))
    monkeypatch.setattr(_budget, "reproduce_budget", lambda budget, **kw: seen.append((budget, kw)))
    monkeypatch.chdir(tmp_path)
    assert call(["reproduce", "--quick", "--no-fashion", "--transforms", "rotation, scale", "--device", "cpu"],
                capsys)[0] == 0
    assert call(["reproduce", "--data-root", tmp_path], capsys)[0] == 0
    assert call(["reproduce", "--budget", "tiny", "--transforms", "translation", "--out", "b", "--results", "r"],
                capsys)[0] == 0
    assert call(["reproduce", "--budget", "gpu"], capsys)[0] == 0
    assert seen == [
        ("table", dict(quick=True, out="runs/reproduce", results="benchmarks/results", device="cpu", data_root=None,
                       fashion=False, transforms=["rotation", "scale"])),
        ("table", dict(quick=False, out="runs/reproduce", results="benchmarks/results", device="auto",
                       data_root=str(tmp_path), fashion=True, transforms=["rotation", "scale", "translation"])),
        ("tiny", dict(out="b", results="r", device="auto", data_root=None, transforms=["translation"])),
        ("gpu", dict(out="runs/budget-gpu", results="benchmarks/results/gpu", device="auto", data_root=None,
                     transforms=["rotation", "scale", "translation"])),
    ]
    assert not any(tmp_path.iterdir())  # the defaults were checked, not created


# ----------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("argv, needle", [
    ([], "the following arguments are required: COMMAND"),
    (["fly"], "invalid choice: 'fly'"),
    (["reproduce", "--quick", "--budget", "tiny"], "--quick and --budget: choose one"),
    (["reproduce", "--budget", "cpu"], "argument --budget: invalid choice: 'cpu'"),
    (["evaluate", "run", "--json", "extra"], "unrecognized arguments: extra"),
], ids=["no-command", "unknown-command", "quick-and-budget", "unknown-budget", "extra-argument"])
def test_usage_errors_exit_2_before_anything_runs(tmp_path, capsys, monkeypatch, argv, needle):
    """Exit code 2 and one line on stderr naming the problem; nothing runs and nothing is written."""
    from stn import _budget

    monkeypatch.setattr(_budget, "reproduce_budget", lambda *a, **kw: pytest.fail("ran despite a usage error"))
    monkeypatch.chdir(tmp_path)
    code, out, err = call(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not any(tmp_path.iterdir())


def test_a_run_error_exits_1_with_one_line(tmp_path, capsys):
    """A folder that exists but holds no run: exit 1, one line naming the missing checkpoint file."""
    code, out, err = call(["evaluate", tmp_path, "--device", "cpu"], capsys)
    assert code == 1 and out == ""
    assert err.strip() == f"stn evaluate: error: {tmp_path / 'checkpoint.pt'}: checkpoint file not found " \
                          f"(is {tmp_path} an stn run folder?)"
    assert not any(tmp_path.iterdir())  # no evaluation.json either


def test_an_interrupted_train_exits_130_and_says_how_to_resume(tmp_path, fake_root, capsys, monkeypatch):
    """Ctrl-C during training: exit code 130 (128 + SIGINT) and one line pointing to ``--resume``."""
    from stn import _train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_train, "train", interrupted)
    code, out, err = call(["train", "--arch", "CNN", "--dataset", "mnist", "--transform", "rotation", "--epochs",
                           "1", "--out", tmp_path / "run", "--data-root", fake_root, "--device", "cpu"], capsys)
    assert code == 130 and out == ""
    assert err.strip() == "stn train: interrupted (the last completed epoch is saved; rerun with --resume)"
