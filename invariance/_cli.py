"""The ``invariance`` command: ``measure``, ``demo``, ``layers`` and ``models``.

    invariance measure --model MODEL --transform SPEC [--layers L1,L2|all]
        [--images SOURCE] [--n-images N] [--search FAMILY]
        [--channels spatial,permutation,linear,lie] [--mask-radius R] [--interior auto|on|off]
        [--out DIR] [--device cpu|cuda] [--seed S] [--n-boot B] [--max-transforms M] [--quick]
        [--memory-budget SIZE] [--no-floor-cache]
    invariance demo [--out DIR] [--quick]
    invariance layers --model MODEL [--images SOURCE] [--all]
    invariance models
    invariance sweep plan SPEC.toml --out DIR
    invariance sweep run DIR [--executor local|slurm] [--workers N] [--partition P]
        [--gpus-per-task G] [--cpus-per-task C] [--time-limit MIN] [--array-parallelism N] [--no-wait]
    invariance sweep status DIR
    invariance sweep report DIR

Every argument is checked before any computation: ``--out`` must be (or be creatable as) a
writable folder; a sweep SPEC may give at most ``--max-transforms`` transformations (default
:data:`MAX_TRANSFORMS`, 1000), counted before anything is allocated; ``--n-images`` may not exceed
the images the SOURCE holds; ``--n-boot`` is a positive integer. Images from a ``.npy`` / ``.pt``
file may be floats (any precision: converted to the model's dtype), ``uint8`` or another integer
type holding 0..255 (scaled like ``uint8`` to [0, 1]) or booleans; complex images, integers outside
0..255 and files holding anything but one array are refused.

Errors are reported on one line (``invariance: error: --ARGUMENT: ...``): exit code 2 for a bad
argument or input, 1 for any other failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch

from ._images import DEFAULT_N_IMAGES, IMAGE_SOURCES, load_images
from ._measure import DEFAULT_MEMORY_BUDGET, MAX_IMAGE_PIXELS, MeasureOptions
from ._transform import MAX_TRANSFORMS

__all__ = ["main", "load_images", "IMAGE_SOURCES", "DEFAULT_N_IMAGES"]

class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line (``invariance: error: ...``), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="invariance", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("measure", help="measure alignment errors of a model's feature maps")
    m.add_argument("--model", required=True, help="built-in name, checkpoint, FILE.py:NAME or module:NAME")
    m.add_argument("--transform", required=True, action="append",
                   help="SPEC: rotation:ANGLE, scale:FACTOR, translation:DX,DY, affine:a,b,c,d,e,f, "
                        "or a sweep rotation:-180..180:15 (repeatable; ';' joins several)")
    m.add_argument("--layers", default=None, help="comma-separated layer names, or 'all' (default: the model's)")
    m.add_argument("--images", default=None,
                   help="SOURCE: " + ", ".join(IMAGE_SOURCES) + " (file images: floats, integers 0..255 "
                        "scaled like uint8, or bool; converted to the model's dtype)")
    m.add_argument("--n-images", "--max-images", type=int, default=None, dest="n_images",
                   help=f"images to measure (default: {DEFAULT_N_IMAGES}, or all the SOURCE holds if fewer); a few "
                        "first size a long run: the progress bar's ETA scales with it")
    m.add_argument("--search", default=None, help="search family (default: from the transformation)")
    m.add_argument("--channels", default="spatial,permutation,linear",
                   help="which of spatial, permutation, linear, lie (the Lie derivative and the part no "
                        "infinitesimal warp explains) to compute; spatial always is (default: %(default)s)")
    m.add_argument("--mask-radius", type=float, default=None,
                   help="evaluation disk radius, normalised units (default: the whole map)")
    m.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"largest image size in pixels (default {MAX_IMAGE_PIXELS})")
    m.add_argument("--interior", default="auto", choices=("auto", "on", "off"),
                   help="compare only where the receptive field lies inside the image (default auto: wherever the "
                        "frame is traced; a layer whose receptive field covers the image has no verdict)")
    m.add_argument("--out", default=None, help="folder for report.json, report.csv and figures")
    m.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the intervals (0: no interval)")
    m.add_argument("--max-transforms", type=int, default=MAX_TRANSFORMS,
                   help="most transformations a SPEC may give (default: %(default)s)")
    m.add_argument("--quick", action="store_true", help="coarser search grid (faster)")
    m.add_argument("--trust-code", action="store_true",
                   help="let a checkpoint given as --model run code: unpickle any object and call a builder that "
                        "is not registered (only for files whose source you trust)")
    m.add_argument("--memory-budget", default=None,
                   help=f"memory one batch of images may use, e.g. 2GB (default: {DEFAULT_MEMORY_BUDGET >> 20} MiB "
                        f"on the CPU, half the free GPU memory on CUDA); the images per batch follow from it")
    m.add_argument("--no-floor-cache", action="store_false", dest="floor_cache",
                   help="compute every interpolation floor (default: keep them in ~/.cache/invariance/floors and "
                        "read them back for the same images, transformation and search)")

    d = sub.add_parser("demo", help="the paper's central result on an embedded default (offline)")
    d.add_argument("--out", default="demo-report")
    d.add_argument("--quick", action="store_true", help="fewer images and a coarser grid (CI)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--seed", type=int, default=0)

    ly = sub.add_parser("layers", help="list a model's spatial feature maps (what --layers all measures) and "
                                       "their frames")
    ly.add_argument("--model", required=True)
    ly.add_argument("--all", action="store_true", dest="show_all",
                    help="also list the 4-D outputs that are not measured (1x1 maps, identity/dropout duplicates)")
    ly.add_argument("--images", default=None)
    ly.add_argument("--trust-code", action="store_true", help="as for measure: let a checkpoint run code")

    sub.add_parser("models", help="list the built-in models")

    sw = sub.add_parser("sweep", help="models x layers x transformations as resumable tasks (local or Slurm), "
                                      "one results table (see invariance.sweep)")
    ssub = sw.add_subparsers(dest="sweep_command", required=True)
    sp = ssub.add_parser("plan", help="expand a TOML spec into tasks (checks every entry; runs nothing)")
    sp.add_argument("spec", help="the sweep spec (TOML; see invariance.sweep for its keys)")
    sp.add_argument("--out", required=True, help="the sweep folder")
    sr = ssub.add_parser("run", help="run the tasks not done yet (failed ones again)")
    sr.add_argument("dir", help="a planned sweep folder")
    sr.add_argument("--executor", default="local", choices=("local", "slurm"),
                    help="local: worker processes on this machine (default); slurm: a job array through submitit")
    sr.add_argument("--workers", type=int, default=None,
                    help="local: tasks run at once (default: the CPUs over the tasks' threads)")
    sr.add_argument("--partition", default=None, help="slurm: the partition (default: the cluster's)")
    sr.add_argument("--gpus-per-task", type=int, default=0, dest="gpus_per_task", help="slurm: GPUs per task")
    sr.add_argument("--cpus-per-task", type=int, default=None, dest="cpus_per_task",
                    help="slurm: CPUs per task (default: the tasks' threads)")
    sr.add_argument("--time-limit", type=int, default=60, dest="time_limit", help="slurm: minutes per task")
    sr.add_argument("--array-parallelism", type=int, default=64, dest="array_parallelism",
                    help="slurm: array elements running at once")
    sr.add_argument("--no-wait", action="store_false", dest="wait", help="slurm: return once the array is submitted")
    ss = ssub.add_parser("status", help="done, pending and failed tasks (with the reason)")
    ss.add_argument("dir")
    so = ssub.add_parser("report", help="merge the results: results.parquet, results.csv, summary.md, figures")
    so.add_argument("dir")
    st = ssub.add_parser("task")  # one task: what a local worker runs (not for users)
    st.add_argument("dir")
    st.add_argument("task_id")
    return p


def _device(name: str) -> torch.device:
    from .checks import resolve_device

    return resolve_device(name)


def _model_defaults(spec: str):
    from ._models import builtin_models

    info = builtin_models().get(spec)
    return (info.default_images, info.default_layers) if info else ("digits", "all")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), torch.float32)


def _check_seed(seed: int) -> None:
    from .checks import check_seed

    check_seed(seed)


def measure_options(a) -> MeasureOptions:
    """The :class:`invariance.MeasureOptions` of ``invariance measure``'s arguments: the same object,
    and so the same checks and messages, as :func:`invariance.measure`'s keyword arguments."""
    return MeasureOptions(channels=a.channels, search=a.search, mask_radius=a.mask_radius,
                          interior={"auto": None, "on": True, "off": False}[a.interior],
                          config="quick" if a.quick else "default", n_boot=a.n_boot, seed=a.seed, device=a.device,
                          progress=True, max_image_pixels=a.max_pixels, memory_budget=a.memory_budget,
                          floor_cache=a.floor_cache)


def cmd_measure(a) -> int:
    from ._measure import measure
    from ._models import load_model
    from ._transform import check_transform_count, parse_transforms
    from .checks import check_int
    from .files import check_output_dir

    # every argument is checked before the model is run
    if a.out is not None:
        check_output_dir(a.out, "out")
    opts = measure_options(a)
    check_int(a.max_transforms, "max_transforms", minimum=1)
    check_transform_count(a.transform, a.max_transforms)
    transforms = parse_transforms(a.transform, max_transforms=a.max_transforms)
    model = load_model(a.model, trust_code=a.trust_code)
    default_images, default_layers = _model_defaults(a.model)
    images = load_images(default_images if a.images is None else a.images, a.n_images, seed=a.seed)
    images = images.to(_model_dtype(model))  # e.g. float64 images through a float32 model
    report = measure(model, images.to(opts.device), transforms,
                     layers=default_layers if a.layers is None else a.layers, model_name=a.model,
                     **{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
    print(report.table())
    if a.out:
        paths = report.save(a.out)
        print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_layers(a) -> int:
    from ._features import FeatureExtractor
    from ._models import load_model
    from .checks import check_model_channels

    model = load_model(a.model, trust_code=a.trust_code)
    default_images, _ = _model_defaults(a.model)
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if a.images is None and conv is not None and conv.in_channels != 1:
        # no images given and the model does not take digits: a random probe of the channels it takes
        side = 224 if conv.in_channels == 3 else 64
        images = torch.rand(1, conv.in_channels, side, side, generator=torch.Generator().manual_seed(0))
        print(f"(no --images: a random 1 x {conv.in_channels} x {side} x {side} probe; pass --images for your size)")
        images = images.to(_model_dtype(model))
    else:
        images = load_images(a.images or default_images, 1).to(_model_dtype(model))
    check_model_channels(model, images)
    extractor = FeatureExtractor(model, "all")
    try:
        with torch.no_grad():
            feats, frames = extractor(images)
    except (RuntimeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"images: the model's forward pass failed on images of shape {tuple(images.shape)} "
                         f"({first}); pass images of the size the model takes") from None
    if not feats:
        raise ValueError(f"model: {a.model!r} has no layer with a (B, C, H, W) output on images of shape "
                         f"{tuple(images.shape)}: nothing to measure (the toolkit measures 2-D feature maps)")
    print(f"{'layer':24s} {'shape':18s} {'stride':12s} {'offset':14s} {'interior':9s} frame")
    for name, f in feats.items():
        fr = frames[name]
        # positions whose receptive field sees only the image (the comparison's default region)
        inside = str(int(fr.valid_positions(interior=True).sum())) if fr.exact and fr.rf_radius is not None else "-"
        print(f"{name:24s} {str(tuple(f.shape[1:])):18s} {str(fr.stride):12s} {str(fr.offset):14s} {inside:9s} "
              f"{'traced' if fr.exact else 'assumed'}"
              + (" (channels last, transposed)" if fr.layout == "BHWC" else ""))
    print("(interior: positions whose receptive field sees only the image; under MIN_REGION = 4 a layer has "
          "no verdict by default)")
    if extractor.not_spatial:
        left = extractor.not_spatial
        if a.show_all:
            print(f"\nnot measured ({len(left)}): 4-D outputs that are not spatial maps of their own")
            for name, why in left.items():
                print(f"  {name:22s} {why}")
        else:
            print(f"\n{len(left)} other 4-D output(s) left out (1x1 maps, identity/dropout duplicates); "
                  "--all lists them")
    if extractor.not_maps:
        names = list(extractor.not_maps)
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        print(f"\nnot measured: {len(names)} 4-D output(s) that are not spatial maps but tokens or attention "
              f"heads reshaped from a map (e.g. {shown}, shape {extractor.not_maps[names[0]][1:]}); "
              "the toolkit measures maps with a spatial frame")
    return 0


def cmd_models(a) -> int:
    from ._models import builtin_models

    for name, info in builtin_models().items():
        print(f"{name:20s} {info.description}  [images: {info.default_images}]")
    return 0


def cmd_demo(a) -> int:
    from ._demo import run_demo
    from .files import check_output_dir

    check_output_dir(a.out, "out")
    _check_seed(a.seed)
    run_demo(a.out, quick=a.quick, device=_device(a.device), seed=a.seed)
    return 0


_OPTION = re.compile(r"^([a-z][a-z_]*): ")
#: API names whose command-line option has another name (``measure(max_image_pixels=)`` is ``--max-pixels``).
_API_TO_DEST = {"transforms": "transform", "params": "transform", "max_image_pixels": "max_pixels"}


def flag_table(parser: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """``{argument name: --flag}`` of every option of every subcommand, read from the parser itself
    (so a new option is named in messages without a list to keep)."""
    parser = parser or _parser()
    table: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action.choices, dict):  # the subcommands: their parsers by name
            for sub in action.choices.values():
                table.update(flag_table(sub))
        elif action.option_strings and action.dest != "help":
            table[action.dest] = next(o for o in action.option_strings if o.startswith("--"))
    return table


def cmd_sweep(a) -> int:
    from . import sweep

    if a.sweep_command == "plan":
        tasks = sweep.plan(a.spec, a.out)
        print(f"planned {len(tasks)} task(s) in {a.out}/plan; next: invariance sweep run {a.out}")
        print(sweep.status(a.out))
    elif a.sweep_command == "run":
        st = sweep.run(a.dir, a.executor, workers=a.workers, partition=a.partition, gpus_per_task=a.gpus_per_task,
                       cpus_per_task=a.cpus_per_task, time_limit=a.time_limit,
                       array_parallelism=a.array_parallelism, wait=a.wait, progress=True)
        print(st)
        return 0 if not st.failed else 1
    elif a.sweep_command == "status":
        print(sweep.status(a.dir))
    elif a.sweep_command == "report":
        paths = sweep.report(a.dir)
        print(Path(paths["summary"]).read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    else:  # task
        sweep.run_task(a.dir, a.task_id)
    return 0


def _message(exc: BaseException) -> str:
    """One line; a leading ``name: `` that is an option becomes its ``--flag: `` (as typed)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    m = _OPTION.match(msg)
    if m:
        flags = flag_table()
        name = _API_TO_DEST.get(m[1], m[1])
        if name in flags:
            msg = flags[name] + msg[m.end(1):]
    return msg


def main(argv: list[str] | None = None) -> int:
    from .files import exit_on_sigterm

    parser = _parser()
    a = parser.parse_args(argv)
    handlers = {"measure": cmd_measure, "layers": cmd_layers, "models": cmd_models, "demo": cmd_demo,
                "sweep": cmd_sweep}
    try:
        with exit_on_sigterm():  # SIGTERM runs the cleanup of temporary files, as Ctrl-C does
            return handlers[a.command](a)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.exit(2, f"invariance: error: {_message(exc)}\n")
    except (OSError, RuntimeError, MemoryError) as exc:
        parser.exit(1, f"invariance: error: {type(exc).__name__}: {_message(exc)}\n")
    except KeyboardInterrupt:
        parser.exit(130, "invariance: interrupted\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
