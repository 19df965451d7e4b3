"""The ``stn`` command: ``stn train``, ``stn evaluate``, ``stn reproduce``.

Run ``stn COMMAND --help`` for the options. Exit status: 0 on success, 2 for a usage error
(unknown architecture, data set, family, ..., the message lists the valid choices; a number out
of its range, such as ``--gamma -1`` or ``--milestones 5,3``, the message names the flag and the
range; an ``--out`` that is a file or not writable, a ``--data-root`` that is not a folder:
checked before anything is read or trained), 1 for any other error (missing or malformed data
files, a ``--resume`` with nothing to resume, a corrupt checkpoint, a diverged training run, ...),
always with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line (``stn COMMAND: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _arch(value: str) -> str:
    from ._models import parse_arch

    try:
        return parse_arch(value).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("arch: ")) from None


def _family(value: str) -> str:
    from ._transformer import STN_FAMILIES

    if value not in STN_FAMILIES:
        raise argparse.ArgumentTypeError(f"unknown family {value!r}; valid choices: {', '.join(STN_FAMILIES)}")
    return value


def _milestones(value: str) -> list[int]:
    """Parsing only; the range (increasing epochs >= 1) is checked by TrainConfig, for the API too."""
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole epochs >= 1 in increasing order like "
                                         f"10,15, got {value!r}") from None


def _protocols(value: str) -> str:
    """Comma-separated protocol names, each one of :data:`stn.TRANSFORMS` (a usage error otherwise)."""
    from ._reproduce import TRANSFORMS

    names = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown protocol(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                                         f"valid choices: {', '.join(TRANSFORMS)}")
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from invariance.datasets import DATASETS

    from ._data import PROTOCOLS
    from ._models import CLASSIFIERS, valid_arch_names
    from ._reproduce import TRANSFORMS

    p = _Parser(prog="stn", description="Spatial transformer networks (Jaderberg et al. 2015): "
                                "train the paper's architectures on transformed MNIST / Fashion-MNIST, evaluate "
                                "them, and reproduce the MNIST table of Finnveden et al. 2020.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train one architecture", description="Train one architecture; "
                       "a checkpoint is written atomically after every epoch.")
    t.add_argument("--arch", required=True, type=_arch, help=f"architecture: {valid_arch_names()}")
    t.add_argument("--dataset", required=True, choices=DATASETS)
    t.add_argument("--transform", required=True, choices=tuple(PROTOCOLS))
    t.add_argument("--epochs", required=True, type=int)
    t.add_argument("--out", required=True, help="run folder (checkpoint.pt, metrics.json)")
    t.add_argument("--family", type=_family, default=None,
                   help="family the transformers predict (default: rotation / scale_translation / translation "
                        "for the rotation / scale / translation data)")
    t.add_argument("--classifier", choices=tuple(CLASSIFIERS), default="mnist")
    t.add_argument("--size", type=int, default=None,
                   help="image side: smaller than the protocol's canvas renders a reduced protocol")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=0.01)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--loc-lr-mult", type=float, default=0.1, help="learning-rate multiplier of the localisation nets")
    t.add_argument("--milestones", type=_milestones, default=[], help="epochs after which lr *= gamma, e.g. 10,15")
    t.add_argument("--gamma", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    t.add_argument("--test-limit", type=int, default=None, help="use only the first N test images")
    t.add_argument("--eval-every", type=int, default=1, help="test every N epochs (0: only at the end)")
    t.add_argument("--data-root", default=None, help="data folder (default: $INVARIANCE_DATA, ...)")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="evaluate a run folder", description="Test error, canonical-pose "
                       "statistic and (for STN-C1) feature-map alignment errors of a trained run.")
    e.add_argument("run", help="run folder written by stn train (or a checkpoint file)")
    e.add_argument("--device", default="auto")
    e.add_argument("--alignment", action=argparse.BooleanOptionalAction, default=None,
                   help="feature-map alignment analysis (default: for STN-C architectures with depth > 0)")
    e.add_argument("--alignment-images", type=_positive_int, default=64)
    e.add_argument("--data-root", default=None)
    e.add_argument("--json", action="store_true", help="print the full result as JSON")
    e.add_argument("--no-write", action="store_true",
                   help="do not write evaluation.json (e.g. for a read-only run folder)")
    e.add_argument("--threads", type=_positive_int, default=None)
    e.add_argument("--trust-code", action="store_true",
                   help="let the checkpoint unpickle any Python object (only for files whose source you trust)")

    r = sub.add_parser("reproduce", help="reproduce the paper's MNIST table",
                       description="Train CNN, STN-C0, STN-C1, STN-DL1, STN-SL1 under rotation, scale and "
                       "translation; write reproduction.md / .json. Finished runs are skipped and unfinished "
                       "ones resumed.")
    r.add_argument("--quick", action="store_true", help="the CPU quick mode (reduced protocols, see the report)")
    r.add_argument("--budget", choices=("gpu", "tiny"), default=None,
                   help="step-budgeted training of each column's models together (stn.reproduce_budget): gpu = about "
                        "4 minutes of training on one H100/H200; tiny = a CPU smoke run of the same code. Writes to "
                        "--results (default benchmarks/results/gpu for a budget)")
    r.add_argument("--out", default="runs/reproduce", help="folder of the runs")
    r.add_argument("--results", default=None,
                   help="folder for reproduction.md / .json (default benchmarks/results, or benchmarks/results/gpu "
                        "with --budget)")
    r.add_argument("--device", default="auto")
    r.add_argument("--threads", type=_positive_int, default=None)
    r.add_argument("--data-root", default=None)
    r.add_argument("--no-fashion", action="store_true", help="skip the Fashion-MNIST runs")
    r.add_argument("--transforms", type=_protocols, default=",".join(TRANSFORMS),
                   help="comma-separated protocols to run (default: all of %(default)s)")
    return p


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(n)  # n >= 1: checked by the parser


def _fmt_eval(res: dict) -> str:
    lines = [f"{res['arch']} on {res['dataset']}/{res['transform']} ({res['epochs']} epochs"
             f"{'' if res['finished'] else ', unfinished'}): test error {100 * res['test_error']:.2f}% "
             f"+- {100 * res['test_error_se']:.2f} ({res['n_test']} test images: {res['test_data']})"]
    cp = res["canonical_pose"]
    lines.append(f"canonical pose: mean per-class spread of the {cp['quantity']} {cp['mean_spread']:.3g} "
                 f"{cp['unit']} (data alone: {cp['applied_only_mean_spread']:.3g})")
    fa = res.get("feature_alignment")
    if fa:
        lines.append(f"feature maps at depth {fa['depth']} ({fa['n_images']} pairs, search {fa['search_family']}): "
                     + ", ".join(f"{k} {fa[k]['mean']:.3f}" for k in
                                 ("stn_error", "spatial_error", "expected_error", "invariance_error", "input_floor")))
    return "\n".join(lines)


def _check_paths(parser: argparse.ArgumentParser, args) -> None:
    """Output and data folders, before anything is read or trained (usage errors, exit code 2)."""
    from pathlib import Path

    from invariance.files import check_output_dir

    try:
        for option in ("out", "results"):
            if getattr(args, option, None) is not None:
                check_output_dir(getattr(args, option), "--" + option)
    except ValueError as exc:
        parser.exit(2, f"stn {args.command}: error: {exc}\n")
    root = getattr(args, "data_root", None)
    if root is not None and not Path(root).expanduser().is_dir():
        parser.exit(2, f"stn {args.command}: error: --data-root: {root!r} is not a folder; give the folder that "
                       f"holds mnist/ and fashion-mnist/\n")


def _flag(msg: str) -> str:
    """``"lr: must be ..."`` (a TrainConfig field, as the API names it) -> ``"--lr: must be ..."``."""
    from dataclasses import fields

    from ._train import TrainConfig

    name, sep, rest = msg.partition(": ")
    if sep and name in {f.name for f in fields(TrainConfig)}:
        return f"--{name.replace('_', '-')}: {rest}"
    return msg


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from invariance.files import exit_on_sigterm

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_paths(parser, args)
    with exit_on_sigterm():  # SIGTERM runs the cleanup of temporary files, as Ctrl-C does
        return _run(parser, args)


def _run(parser: argparse.ArgumentParser, args) -> int:
    try:
        from invariance import CheckpointError
        from invariance.datasets import DatasetNotFoundError, IDXFormatError

        from ._train import RunError, TrainConfig, evaluate, resolve_device, train

        _set_threads(args.threads)
        try:  # a usage error, before anything is read or trained
            resolve_device(args.device)
        except ValueError as exc:
            parser.exit(2, f"stn {args.command}: error: --{_one_line(exc)}\n")
        if args.command == "train":
            try:
                cfg = TrainConfig(arch=args.arch, dataset=args.dataset, transform=args.transform, epochs=args.epochs,
                                  family=args.family, classifier=args.classifier, size=args.size,
                                  batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay, loc_lr_mult=args.loc_lr_mult,
                                  milestones=args.milestones, gamma=args.gamma, seed=args.seed, limit=args.limit,
                                  test_limit=args.test_limit, eval_every=args.eval_every, data_root=args.data_root)
            except (TypeError, ValueError) as exc:
                parser.exit(2, f"stn train: error: {_flag(_one_line(exc))}\n")
            m = train(cfg, args.out, resume=args.resume, device=args.device, progress=not args.no_progress)
            if m.get("test_error") is not None:
                print(f"{args.out}: test error {100 * m['test_error']:.2f}% after {m['epochs_done']} epochs")
            return 0
        if args.command == "evaluate":
            res = evaluate(args.run, device=args.device, alignment=args.alignment,
                           alignment_images=args.alignment_images, data_root=args.data_root,
                           write=not args.no_write, trust_code=args.trust_code)
            print(json.dumps(res, indent=2) if args.json else _fmt_eval(res))
            return 0
        if args.command == "reproduce":
            from ._reproduce import reproduce

            transforms = [t.strip() for t in args.transforms.split(",") if t.strip()]
            if args.budget is not None:
                from ._budget import reproduce_budget

                if args.quick:
                    parser.exit(2, "stn reproduce: error: --quick and --budget: choose one\n")
                out = args.out if args.out != "runs/reproduce" else f"runs/budget-{args.budget}"
                reproduce_budget(args.budget, out=out, results=args.results or "benchmarks/results/gpu",
                                 device=args.device, data_root=args.data_root, transforms=transforms)
                return 0
            reproduce(quick=args.quick, out=args.out, results=args.results or "benchmarks/results",
                      device=args.device, data_root=args.data_root, fashion=not args.no_fashion,
                      transforms=transforms)
            return 0
    except (DatasetNotFoundError, IDXFormatError) as exc:
        where = "--data-root: " if getattr(args, "data_root", None) is not None else ""
        print(f"stn {args.command}: error: {where}{_one_line(exc)}", file=sys.stderr)
        return 1
    except (CheckpointError, RunError, ValueError, OSError) as exc:
        msg = _one_line(exc)
        if msg.startswith("run: "):
            msg = msg.removeprefix("run: ") + " (pass --no-write to evaluate without writing evaluation.json)"
        elif msg.startswith("resume: "):
            msg = "--" + msg
        print(f"stn {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stn {args.command}: interrupted (the last completed epoch is saved; rerun with --resume)",
              file=sys.stderr)
        return 130
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
