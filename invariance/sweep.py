"""Sweeps: models x layers x transformations x image sets as resumable tasks, with one results table.

A sweep is a table of tasks written by :func:`plan` from a TOML spec; each task is one
:func:`invariance.measure` call (one model, its layers, one transformation, one shard of one image
set) with a content-addressed id (a hash of everything that determines its result), so a task
already done is never run again and re-planning keeps every result that still applies.
:func:`run` runs the pending tasks in worker processes on this machine (``executor="local"``) or
as a Slurm job array through submitit (``executor="slurm"``); :func:`status` lists done, pending
and failed tasks; :func:`report` merges the results into ``results.parquet`` / ``results.csv``
with the cross-model figures and a markdown summary. The command line is ``invariance sweep
plan|run|status|report``.

The spec (TOML)::

    [options]                       # measure options shared by every task
    transformations = ["rotation:90", "translation:8,0"]
    channels = ["spatial"]          # "permutation" and "linear" need shards = 1
    n_boot = 1000                   # bootstrap resamples of the intervals
    seed = 0                        # bootstrap seed
    quick = false                   # the coarser search grid of `measure --quick`
    threads = 1                     # CPU threads per task (part of the result: see below)
    # search = "rigid", interior = "auto" | "on" | "off", mask_radius = 0.8, memory_budget = "1GB"

    [[models]]
    name = "resnet18"                 # the row label; unique
    model = "torchvision:resnet18"    # built-in name, FILE.py:NAME, package.module:NAME,
                                      # torchvision:NAME, timm:NAME (random weights)
    weights = "weights/resnet18.pt"   # optional local state dict: nothing is downloaded
    layers = [0.25, 0.5, 0.75, 1.0]   # relative depths, layer names, or "all"
    images = ["digits64"]             # the image sets it runs on (default: all)

    [[images]]
    name = "digits64"
    source = "digits"       # as `invariance measure --images`: digits, mnist, fashion-mnist, glyphs, blobs, FILE.npy
    n = 16
    size = 64               # resized to size x size (optional)
    channels = 3            # grey images repeated to 3 channels (optional)
    shards = 1              # tasks the set is split into

Layout of a sweep folder ``DIR``: ``plan/spec.toml`` and ``plan/tasks.json`` (the plan),
``results/ID.json`` (each task's :class:`invariance.Report`, written atomically when the task
ends), ``rows/ID.parquet`` (the task's rows: a Parquet dataset that grows while the sweep runs),
``failed/ID.txt`` (why a task failed; removed when it succeeds), ``logs/``, ``floors/`` (the
interpolation floors, shared by every model of the sweep) and, after :func:`report`,
``results.parquet``, ``results.csv``, ``summary.md`` and the figures.

Every task runs with ``threads`` CPU threads (default 1) whatever the executor: floating-point
sums split over threads round differently (about 1e-6 in a float32 search), so the thread count is
part of a task's address, and a sweep run locally and on Slurm gives bit-identical tables.

Shards of an image set merge into exactly the record of one call: every image's errors are
independent of the other images, and a shard also measures the image before its first one (the
last image for the first shard), dropped when merging, so that the random-pair null pairs every
image with the same partner as one call does. The means and bootstrap intervals are recomputed
from the merged per-image values.

Example
-------
>>> import pathlib, tempfile, invariance
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "spec.toml").write_text('''
... [options]
... transformations = ["rotation:90"]
... channels = ["spatial"]
... n_boot = 50
... quick = true
... [[models]]
... name = "wm"
... model = "toy-wm"
... layers = ["detect"]
... [[images]]
... name = "glyphs"
... source = "glyphs"
... n = 4
... shards = 2
... ''')
>>> tasks = invariance.sweep.plan(d / "spec.toml", d / "sweep")
>>> len(tasks), invariance.sweep.status(d / "sweep").counts()
(2, {'done': 0, 'pending': 2, 'failed': 0})
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SpecError", "Task", "SweepStatus", "plan", "run", "run_task", "status", "report", "load_tasks", "EXECUTORS"]

EXECUTORS = ("local", "slurm")
"""Where :func:`run` runs tasks: ``local`` (worker processes on this machine) or ``slurm`` (a job
array through submitit)."""

_TOP_KEYS = {"options", "models", "images"}
_OPTION_KEYS = {"transformations", "channels", "n_boot", "seed", "quick", "search", "interior", "mask_radius",
                "memory_budget", "threads"}
_MODEL_KEYS = {"name", "model", "weights", "layers", "images"}
_IMAGE_KEYS = {"name", "source", "n", "size", "channels", "shards", "seed"}
_SWEEP_CHANNELS = ("spatial", "permutation", "linear")


class SpecError(ValueError):
    """A sweep spec that cannot run: the message is one line naming the entry."""


@dataclass(frozen=True)
class Task:
    """One task of a sweep: one :func:`invariance.measure` call.

    Attributes:
        id: content address (sha256 of :attr:`key`, 16 hex digits).
        key: everything that determines the result (model and weights hash, layers, transformation,
            images and shard, measure options).
        info: what the report needs and the result does not depend on (the model's parameter
            count, each layer's index among the model's spatial maps).
    """

    id: str
    key: dict
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        k = self.key
        shard, shards = k["shard"]
        return (f"{k['model']['name']} / {k['transform']} / {k['images']['name']}"
                + (f" shard {shard + 1} of {shards}" if shards > 1 else ""))

    def to_json(self) -> dict:
        return {"id": self.id, "key": self.key, "info": self.info}

    @classmethod
    def from_json(cls, d: dict) -> Task:
        return cls(id=d["id"], key=d["key"], info=d.get("info", {}))


def _task_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the spec
def _read_spec(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"spec: file {str(path)!r} not found")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"spec: {path.name} is not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise SpecError(f"spec: {path.name} is not a UTF-8 text file") from None
    unknown = set(spec) - _TOP_KEYS
    if unknown:
        raise SpecError(f"spec: unknown table {sorted(unknown)[0]!r}; valid: {', '.join(sorted(_TOP_KEYS))}")
    for table in ("models", "images"):
        if not isinstance(spec.get(table), list) or not spec[table]:
            raise SpecError(f"spec: no [[{table}]] entry; a sweep needs at least one")
    if not isinstance(spec.get("options", {}), dict):
        raise SpecError("spec: options must be a table ([options])")
    return spec


def _entry(kind: str, i: int, e: Any, keys: set[str], required: tuple[str, ...]) -> str:
    where = f"{kind}[{i}]"
    if not isinstance(e, dict):
        raise SpecError(f"spec: {where} is not a table")
    name = e.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"spec: {where} has no name (a non-empty string)")
    where = f"{kind}[{i}] {name!r}"
    unknown = set(e) - keys
    if unknown:
        raise SpecError(f"spec: {where}: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(keys))}")
    for k in required:
        if k not in e:
            raise SpecError(f"spec: {where}: missing key {k!r}")
    return where


def _unique(kind: str, entries: list[dict]) -> None:
    seen = set()
    for e in entries:
        if e["name"] in seen:
            raise SpecError(f"spec: {kind}: duplicate name {e['name']!r}; names label the rows and must be unique")
        seen.add(e["name"])


def _options(o: dict) -> tuple[dict, list]:
    """The measure options of the spec, checked by :class:`invariance.MeasureOptions`."""
    from ._measure import MeasureOptions
    from ._transform import parse_transforms

    unknown = set(o) - _OPTION_KEYS
    if unknown:
        raise SpecError(f"spec: options: unknown key {sorted(unknown)[0]!r}; valid: {', '.join(sorted(_OPTION_KEYS))}")
    specs = o.get("transformations")
    if not isinstance(specs, list) or not specs or not all(isinstance(t, str) for t in specs):
        raise SpecError("spec: options.transformations: a non-empty list of SPEC strings, e.g. [\"rotation:90\"]")
    transforms = []
    for t in specs:
        try:
            transforms.extend(parse_transforms(t))
        except ValueError as exc:
            raise SpecError(f"spec: options.transformations {t!r}: {exc}") from None
    labels = [t.label for t in transforms]
    if len(set(labels)) != len(labels):
        raise SpecError(f"spec: options.transformations: duplicate transformation "
                        f"{next(x for x in labels if labels.count(x) > 1)!r}")
    channels = o.get("channels", ["spatial"])
    if isinstance(channels, str):
        channels = [channels]
    interior = o.get("interior", "auto")
    if interior not in ("auto", "on", "off"):
        raise SpecError(f"spec: options.interior: {interior!r}; valid: auto, on, off")
    quick = o.get("quick", False)
    if not isinstance(quick, bool):
        raise SpecError(f"spec: options.quick: expected true or false, got {quick!r}")
    try:
        m = MeasureOptions(channels=channels, search=o.get("search"), mask_radius=o.get("mask_radius"),
                           interior={"auto": None, "on": True, "off": False}[interior],
                           config="quick" if quick else "default", n_boot=o.get("n_boot", 1000),
                           seed=o.get("seed", 0), memory_budget=o.get("memory_budget"))
    except (ValueError, TypeError) as exc:
        raise SpecError(f"spec: options.{exc}") from None
    threads = o.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise SpecError(f"spec: options.threads: must be an integer >= 1, got {threads!r}")
    opts = {"threads": threads, "channels": list(m.channels), "search": m.search, "mask_radius": m.mask_radius,
            "interior": interior, "quick": quick, "n_boot": m.n_boot, "seed": m.seed,
            "memory_budget": o.get("memory_budget")}
    return opts, transforms


def _image_set(i: int, e: dict, base: Path) -> dict:
    from .checks import check_int

    where = _entry("images", i, e, _IMAGE_KEYS, ("source",))
    src = e["source"]
    if not isinstance(src, str):
        raise SpecError(f"spec: {where}: source must be a string")
    if src.endswith((".npy", ".pt")) and not Path(src).is_absolute():
        src = str((base / src).resolve())
    out = {"name": e["name"], "source": src, "n": e.get("n"), "size": e.get("size"), "channels": e.get("channels"),
           "shards": e.get("shards", 1), "seed": e.get("seed", 0)}
    try:
        for k, lo in (("n", 1), ("size", 4), ("channels", 1), ("shards", 1), ("seed", 0)):
            if out[k] is not None:
                check_int(out[k], k, minimum=lo)
        imgs = _load_image_set(out)
    except (ValueError, TypeError) as exc:
        raise SpecError(f"spec: {where}: {exc}") from None
    out["n"] = int(imgs.shape[0])
    if out["shards"] > out["n"]:
        raise SpecError(f"spec: {where}: shards = {out['shards']} but the set holds {out['n']} images; "
                        f"valid: 1..{out['n']}")
    if src.endswith((".npy", ".pt")):
        out["sha256"] = _sha256(Path(src))
    return out


def _load_image_set(s: dict):
    """The images of an image set entry: ``(n, C, H, W)`` float in [0, 1]."""
    import torch.nn.functional as F

    from ._images import load_images

    imgs = load_images(s["source"], s["n"], seed=s["seed"])
    if s.get("size") is not None and tuple(imgs.shape[-2:]) != (s["size"], s["size"]):
        imgs = F.interpolate(imgs, size=(s["size"], s["size"]), mode="bilinear", align_corners=False,
                             antialias=True).clamp(0, 1)
    c = s.get("channels")
    if c is not None and imgs.shape[1] != c:
        if imgs.shape[1] != 1:
            raise ValueError(f"channels: the images have {imgs.shape[1]} channels; only grey images are repeated "
                             f"to {c}")
        imgs = imgs.expand(-1, c, -1, -1).contiguous()
    return imgs


def _model_entry(i: int, e: dict, base: Path) -> dict:
    where = _entry("models", i, e, _MODEL_KEYS, ("model",))
    if not isinstance(e["model"], str):
        raise SpecError(f"spec: {where}: model must be a string")
    spec = e["model"]
    file, sep, name = spec.rpartition(":")
    if sep and file.endswith(".py") and not Path(file).is_absolute():
        spec = f"{(base / file).resolve()}:{name}"
    elif Path(spec).suffix in (".pt", ".pth", ".ckpt") and not Path(spec).is_absolute():
        spec = str((base / spec).resolve())
    out = {"name": e["name"], "model": spec}
    if "weights" in e:
        w = Path(e["weights"]) if Path(e["weights"]).is_absolute() else (base / e["weights"]).resolve()
        if not w.is_file():
            raise SpecError(f"spec: {where}: weights file {e['weights']!r} not found (nothing is downloaded)")
        out["weights"], out["weights_sha256"] = str(w), _sha256(w)
    layers = e.get("layers", "all")
    ok = (layers == "all" or (isinstance(layers, list) and layers
                              and (all(isinstance(x, str) for x in layers)
                                   or all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in layers))))
    if not ok:
        raise SpecError(f"spec: {where}: layers must be \"all\", a list of layer names or a list of relative "
                        f"depths in [0, 1], got {layers!r}")
    if isinstance(layers, list) and not isinstance(layers[0], str) and not all(0 <= x <= 1 for x in layers):
        raise SpecError(f"spec: {where}: relative depths must lie in [0, 1], got {layers!r}")
    out["layers"] = layers
    sets = e.get("images")
    if sets is not None and (not isinstance(sets, list) or not sets or not all(isinstance(x, str) for x in sets)):
        raise SpecError(f"spec: {where}: images must be a non-empty list of image set names, got {sets!r}")
    out["images"] = sets
    return out


def _build_model(m: dict):
    from ._models import load_model, load_weights

    model = load_model(m["model"])
    if m.get("weights"):
        load_weights(model, m["weights"])
    return model.eval()


def _resolve_layers(where: str, m: dict, probe) -> tuple[list[str], dict[str, int], int, int]:
    """The model's layers to measure, each layer's index among its spatial maps, their count and the
    model's parameter count."""
    import torch

    from ._features import list_layers
    from .checks import check_model_channels

    try:
        model = _build_model(m)
    except (ValueError, TypeError, OSError) as exc:
        raise SpecError(f"spec: {where}: {exc}") from None
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    try:
        check_model_channels(model, probe)
        with torch.no_grad():
            maps = list_layers(model, probe.to(dtype))[1:]
    except (ValueError, RuntimeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"spec: {where}: the model does not run on images of shape {tuple(probe.shape[1:])} "
                        f"({first})") from None
    if not maps:
        raise SpecError(f"spec: {where}: the model has no spatial feature map on these images")
    index = {name: i for i, name in enumerate(maps)}
    layers = m["layers"]
    if layers == "all":
        chosen = maps
    elif isinstance(layers[0], str):
        missing = [x for x in layers if x not in index and x != "input"]
        if missing:
            raise SpecError(f"spec: {where}: no spatial layer {missing[0]!r}; valid: {', '.join(maps[:12])}"
                            + (f", ... ({len(maps)} in all; `invariance layers --model ...` lists them)"
                               if len(maps) > 12 else ""))
        chosen = list(dict.fromkeys(layers))
    else:
        chosen = list(dict.fromkeys(maps[round(r * (len(maps) - 1))] for r in layers))
    n_params = sum(p.numel() for p in model.parameters())
    return chosen, {k: index.get(k, -1) for k in chosen}, len(maps), n_params


def plan(spec: str | os.PathLike, out: str | os.PathLike) -> list[Task]:
    """Expand a TOML spec into tasks and write them to ``out/plan`` (nothing is measured).

    Every entry is checked first (models built and run once on their image sets, layers resolved,
    weights files hashed); a bad spec raises :class:`SpecError` naming the entry and writes nothing.
    Re-planning into the same folder keeps every result whose task is still in the plan.
    """
    from .files import atomic_write_json, atomic_write_text, check_output_dir

    spec = Path(spec)
    d = _read_spec(spec)
    base = spec.resolve().parent
    out = check_output_dir(out, "out")
    opts, transforms = _options(d.get("options", {}))
    models = [_model_entry(i, e, base) for i, e in enumerate(d["models"])]
    _unique("models", models)
    images = [_image_set(i, e, base) for i, e in enumerate(d["images"])]
    _unique("images", images)
    sharded = [s["name"] for s in images if s["shards"] > 1]
    whole = [c for c in opts["channels"] if c in ("permutation", "linear")]
    if sharded and whole:
        raise SpecError(f"spec: images {sharded[0]!r}: shards > 1 with channel {whole[0]!r}, whose result (the "
                        "modal permutation, the held-out linear map) needs every image in one call; valid: "
                        "shards = 1, or channels = [\"spatial\"]")
    names = [s["name"] for s in images]
    for i, m in enumerate(models):
        unknown = [x for x in (m["images"] or []) if x not in names]
        if unknown:
            raise SpecError(f"spec: models[{i}] {m['name']!r}: no image set {unknown[0]!r}; valid: {', '.join(names)}")
    tasks = []
    for i, m in enumerate(models):
        for s in images:
            if m["images"] is not None and s["name"] not in m["images"]:
                continue
            probe = _load_image_set({**s, "n": 1})
            layers, index, n_maps, n_params = _resolve_layers(f"models[{i}] {m['name']!r}", m, probe)
            for t in transforms:
                for k in range(s["shards"]):
                    model = {k: v for k, v in m.items() if k != "images"}  # `images` only selects
                    key = {"model": model, "layers": layers, "transform": t.label, "images": s,
                           "shard": [k, s["shards"]],
                           "options": opts}
                    info = {"n_parameters": n_params, "layer_index": index, "n_maps": n_maps}
                    tasks.append(Task(_task_id(key), key, info))
    (out / "plan").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "plan" / "spec.toml", spec.read_text())
    atomic_write_json(out / "plan" / "tasks.json", {"format": "invariance-sweep/1",
                                                    "tasks": [t.to_json() for t in tasks]})
    return tasks


def load_tasks(folder: str | os.PathLike) -> list[Task]:
    """The tasks of a planned sweep folder (JSON: reading it runs nothing)."""
    p = Path(folder) / "plan" / "tasks.json"
    if not p.is_file():
        raise ValueError(f"sweep: {str(folder)!r} has no plan (run `invariance sweep plan SPEC --out "
                         f"{folder}` first)")
    try:
        d = json.loads(p.read_text())
        if d.get("format") != "invariance-sweep/1":
            raise ValueError(f"format {d.get('format')!r}")
        return [Task.from_json(t) for t in d["tasks"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"sweep: {p} is not a sweep plan ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------- one task
def _shard(n: int, k: int, shards: int) -> tuple[int, int]:
    return k * n // shards, (k + 1) * n // shards


def _task_images(key: dict):
    """The task's images and how many leading context images its result holds (see the module docstring)."""
    import torch

    imgs = _load_image_set(key["images"])
    k, shards = key["shard"]
    if shards == 1:
        return imgs, 0
    lo, hi = _shard(imgs.shape[0], k, shards)
    before = (lo - 1) % imgs.shape[0]
    return torch.cat([imgs[before:before + 1], imgs[lo:hi]]), 1


def run_task(folder: str | os.PathLike, task_id: str) -> str:
    """Run one task of a sweep folder (what a worker or a Slurm array element does); returns
    ``"done"`` (already done: nothing run) or ``"ran"``. The result is written atomically, so a
    task killed half-way leaves nothing and simply runs again."""
    import torch

    from ._measure import measure
    from .files import atomic_write_json

    folder = Path(folder)
    result = folder / "results" / f"{task_id}.json"
    if result.is_file():
        return "done"
    task = {t.id: t for t in load_tasks(folder)}.get(task_id)
    if task is None:
        raise ValueError(f"task: no task {task_id!r} in {folder}/plan")
    failed = folder / "failed" / f"{task_id}.txt"
    running = folder / "running" / f"{task_id}.json"
    atomic_write_json(running, {"pid": os.getpid(), "host": os.uname().nodename, "started": time.time(),
                                "slurm_job": _slurm_job_id()})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(task.key["options"]["threads"])
        key, o = task.key, task.key["options"]
        model = _build_model(key["model"])
        imgs, context = _task_images(key)
        dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
        rep = measure(model, imgs.to(dtype), key["transform"], layers=key["layers"], channels=o["channels"],
                      search=o["search"], mask_radius=o["mask_radius"],
                      interior={"auto": None, "on": True, "off": False}[o["interior"]],
                      config="quick" if o["quick"] else None, n_boot=o["n_boot"], seed=o["seed"],
                      memory_budget=o["memory_budget"], progress=False, model_name=key["model"]["name"],
                      floor_cache=folder / "floors")
        rep.meta["sweep"] = {"task": task_id, "context_images": context, "shard": key["shard"],
                             "host": os.uname().nodename}
        atomic_write_json(result, _json_safe(rep.to_dict()))
        _write_rows(folder, task, rep)
    except BaseException as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else _one_line(exc)
        _write_failure(folder, task_id, reason, traceback.format_exc())
        raise
    finally:
        torch.set_num_threads(threads)
        running.unlink(missing_ok=True)
    failed.unlink(missing_ok=True)
    return "ran"


def _slurm_job_id() -> str | None:
    """``ARRAY_TASK`` of the Slurm array element this process runs in (None outside Slurm)."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID")


def _json_safe(obj):
    from ._report import json_safe

    return json_safe(obj)


def _one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _write_failure(folder: Path, task_id: str, reason: str, log: str = "") -> None:
    from .files import atomic_write_text

    atomic_write_text(folder / "failed" / f"{task_id}.txt", reason + "\n")
    if log:
        atomic_write_text(folder / "logs" / f"{task_id}.err", log)


def _write_rows(folder: Path, task: Task, rep) -> None:
    """The task's rows as ``rows/ID.parquet`` (skipped without pyarrow: the report rebuilds them)."""
    from ._record import LayerRecord

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return
    k0, shards = task.key["shard"]
    recs = [LayerRecord.merge([r], [rep.meta["sweep"]["context_images"]], rep.meta.get("n_boot", 1000),
                             rep.meta.get("seed", 0)) for r in rep.records]
    rows = _rows(task, recs, rep.meta)
    for r in rows:
        r["shard"] = k0
        r["shards"] = shards
    _write_parquet(folder / "rows" / f"{task.id}.parquet", rows)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class SweepStatus:
    """Where a sweep stands: task ids by state, and why the failed ones failed."""

    tasks: list[Task]
    done: list[str]
    pending: list[str]
    failed: dict[str, str]
    running: list[str] = field(default_factory=list)
    """Tasks not done whose worker has started and not ended (or was killed: a task killed with
    SIGKILL stays here until it runs again); each is also pending or failed."""

    def counts(self) -> dict[str, int]:
        return {"done": len(self.done), "pending": len(self.pending), "failed": len(self.failed)}

    def __str__(self) -> str:
        by_id = {t.id: t for t in self.tasks}
        c = self.counts()
        lines = [f"{len(self.tasks)} tasks: {c['done']} done, {c['pending']} pending, {c['failed']} failed"
                 + (f" ({len(self.running)} started and not ended: running now, or killed)" if self.running else "")]
        for tid, why in self.failed.items():
            lines.append(f"  failed  {tid}  {by_id[tid].label}: {why}")
        for tid in self.pending[:20]:
            lines.append(f"  pending {tid}  {by_id[tid].label}")
        if len(self.pending) > 20:
            lines.append(f"  ... and {len(self.pending) - 20} more pending")
        return "\n".join(lines)


def status(folder: str | os.PathLike) -> SweepStatus:
    """Done (a result exists), failed (the last attempt failed, with its reason) and pending tasks;
    ``running``: started and not ended (a worker's ``running/ID.json`` marker: pid, host, start)."""
    folder = Path(folder)
    tasks = load_tasks(folder)
    done, pending, failed, running = [], [], {}, []
    for t in tasks:
        if (folder / "results" / f"{t.id}.json").is_file():
            done.append(t.id)
            continue
        if (folder / "running" / f"{t.id}.json").is_file():
            running.append(t.id)
        if (folder / "failed" / f"{t.id}.txt").is_file():
            failed[t.id] = (folder / "failed" / f"{t.id}.txt").read_text().strip()
        else:
            pending.append(t.id)
    return SweepStatus(tasks, done, pending, failed, running)


def run(folder: str | os.PathLike, executor: str = "local", *, workers: int | None = None,
        partition: str | None = None, gpus_per_task: int = 0, cpus_per_task: int | None = None,
        time_limit: int = 60, array_parallelism: int = 64,
        wait: bool = True, progress: bool | None = None) -> SweepStatus:
    """Run every task that is not done (failed ones again), on ``executor`` (:data:`EXECUTORS`).

    ``local``: ``workers`` worker processes on this machine (default: the CPUs over the tasks'
    ``threads``; each task a fresh process, so a killed worker loses its task only).
    ``slurm``: one job array through submitit (``partition``, ``gpus_per_task``, ``cpus_per_task``
    (default: the tasks' ``threads``), ``time_limit`` in minutes, ``array_parallelism``); with
    ``wait`` the call returns when the array has finished. Either way a task writes its result
    atomically and a task already done is skipped, so running again after a kill, a pre-emption or
    a ``scancel`` finishes the sweep.
    """
    from .checks import check_int

    if executor not in EXECUTORS:
        raise ValueError(f"executor: {executor!r}; valid choices: {', '.join(EXECUTORS)}")
    folder = Path(folder)
    st = status(folder)
    threads = max((t.key["options"]["threads"] for t in st.tasks), default=1)
    workers = max(1, (os.cpu_count() or 1) // threads) if workers is None else workers
    cpus_per_task = threads if cpus_per_task is None else cpus_per_task
    check_int(workers, "workers", minimum=1)
    check_int(cpus_per_task, "cpus_per_task", minimum=1)
    check_int(gpus_per_task, "gpus_per_task", minimum=0)
    check_int(time_limit, "time_limit", minimum=1)
    check_int(array_parallelism, "array_parallelism", minimum=1)
    todo = st.pending + list(st.failed)
    if todo:
        if executor == "local":
            _run_local(folder, todo, workers, progress)
        else:
            _run_slurm(folder, todo, partition=partition, gpus=gpus_per_task, cpus=cpus_per_task, minutes=time_limit,
                       parallel=array_parallelism, wait=wait)
    return status(folder)


def _run_local(folder: Path, todo: list[str], workers: int, progress: bool | None) -> None:
    from tqdm.auto import tqdm

    (folder / "logs").mkdir(parents=True, exist_ok=True)
    queue = list(todo)
    running: dict[str, subprocess.Popen] = {}
    bar = tqdm(total=len(todo), desc="sweep", unit="task", disable=(None if progress is None else not progress))
    try:
        while queue or running:
            while queue and len(running) < workers:
                tid = queue.pop(0)
                log = open(folder / "logs" / f"{tid}.log", "ab")  # noqa: SIM115 (closed with the process)
                running[tid] = subprocess.Popen([sys.executable, "-m", "invariance", "sweep", "task", str(folder), tid],
                                                stdout=log, stderr=subprocess.STDOUT)
                log.close()
            time.sleep(0.2)
            for tid, p in list(running.items()):
                rc = p.poll()
                if rc is None:
                    continue
                del running[tid]
                bar.update(1)
                if rc != 0 and not (folder / "results" / f"{tid}.json").is_file():
                    why = (f"worker killed by {signal.Signals(-rc).name}" if rc < 0
                           else _last_line(folder / "failed" / f"{tid}.txt") or f"worker exited with status {rc}")
                    _write_failure(folder, tid, why)
    finally:
        for p in running.values():  # interrupted: stop the workers (their tasks stay pending)
            p.terminate()
        for p in running.values():
            p.wait()
        bar.close()


def _last_line(path: Path) -> str:
    return path.read_text().strip().splitlines()[-1] if path.is_file() and path.read_text().strip() else ""


def _slurm_task(folder: str, task_id: str) -> str:
    """What one Slurm array element runs (importable, so submitit can pickle it by reference)."""
    return run_task(folder, task_id)


def _run_slurm(folder: Path, todo: list[str], *, partition, gpus, cpus, minutes, parallel, wait) -> None:
    try:
        import submitit
    except ImportError:
        raise ValueError("executor: slurm needs submitit (pip install 'invariance[sweep]')") from None
    # a fresh submitit folder per submission: Slurm job ids restart on a new cluster, and submitit
    # would take an old result file of the same id for the new job's
    sub = folder / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
    ex = submitit.AutoExecutor(folder=sub / "%j", cluster="slurm")
    params = {"timeout_min": minutes, "cpus_per_task": cpus, "slurm_array_parallelism": parallel,
              "name": f"invariance-sweep-{folder.name}"}
    if partition:
        params["slurm_partition"] = partition
    if gpus:
        params["gpus_per_node"] = gpus
    ex.update_parameters(**params)
    jobs = ex.map_array(_slurm_task, [str(folder)] * len(todo), todo)
    array = jobs[0].job_id.split("_")[0]
    from .files import atomic_write_json

    atomic_write_json(sub / "array.json", {"array": array, "tasks": dict(zip(todo, (j.job_id for j in jobs)))})
    print(f"submitted {len(jobs)} task(s) as Slurm array {array} (submitit folder {sub})", flush=True)
    if not wait:
        return
    for tid, job in zip(todo, jobs):
        try:
            job.result()
        except Exception as exc:  # failed in the task (reason already written), cancelled or killed by Slurm
            if not (folder / "results" / f"{tid}.json").is_file():
                mine = folder / "failed" / f"{tid}.txt"
                if not mine.is_file() or mine.stat().st_mtime < sub.stat().st_mtime:  # not this attempt's
                    _write_failure(folder, tid, f"Slurm job {job.job_id} {job.state}: {_one_line(exc)}")


# ---------------------------------------------------------------------------------------------- the report
_LIST_KINDS = ("invariance", "expected", "spatial", "permutation", "linear")


def _rows(task: Task, records, meta: dict) -> list[dict]:
    """The table's rows of one (model, transformation, image set): one per layer."""
    from ._report import Report

    key, info = task.key, task.info
    base = Report(records=list(records), meta={"model": key["model"]["name"]}).csv_rows()
    frames = meta.get("frames", {})
    rows = []
    for rec, row in zip(records, base):
        idx = info.get("layer_index", {}).get(rec.layer, -1)
        n_maps = info.get("n_maps", 0)
        fr = frames.get(rec.layer, {})
        row.update(model_spec=key["model"]["model"], n_parameters=info.get("n_parameters"),
                   layer_index=idx, n_maps=n_maps,
                   relative_depth=(idx / (n_maps - 1) if n_maps > 1 and idx >= 0 else (0.0 if idx == 0 else math.nan)),
                   stride=json.dumps(fr.get("stride")), rf_radius=json.dumps(fr.get("rf_radius")),
                   image_set=key["images"]["name"], n_images=len(rec.errors.spatial.per_image),
                   image_size=json.dumps(meta.get("image_size")), no_verdict="; ".join(rec.excluded_reasons))
        for k in _LIST_KINDS:
            e = getattr(rec.errors, k)
            row[f"{k}_per_image"] = None if e is None else list(e.per_image)
        for k in ("floor", "null"):
            e = getattr(rec.calibration, k)
            row[f"{k}_per_image"] = None if e is None else list(e.per_image)
        rows.append(row)
    return rows


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .files import atomic_write

    table = pa.Table.from_pylist(rows)
    return atomic_write(path, lambda f: pq.write_table(table, f))


def _groups(folder: Path, tasks: list[Task]) -> tuple[dict, list[str]]:
    """Tasks grouped by (model, transformation, image set), shards in order; groups missing a shard are
    reported, not merged."""
    groups: dict[tuple, list[Task]] = {}
    for t in tasks:
        k = t.key
        groups.setdefault((k["model"]["name"], k["transform"], k["images"]["name"]), []).append(t)
    complete, missing = {}, []
    for g, ts in groups.items():
        ts.sort(key=lambda t: t.key["shard"][0])
        absent = [t for t in ts if not (folder / "results" / f"{t.id}.json").is_file()]
        if absent:
            missing.append(f"{' / '.join(g)}: {len(absent)} of {len(ts)} task(s) not done")
        else:
            complete[g] = ts
    return complete, missing


def report(folder: str | os.PathLike, *, figures: bool = True) -> dict[str, Path]:
    """Merge a sweep's results into ``results.parquet`` and ``results.csv`` (one row per model x
    layer x transformation x image set, per-image values in list columns), ``summary.md`` and the
    figures (error against relative depth, one line per model with floor and null; a heat map of
    models x transformations). Groups with a task not done are left out and named in the summary."""
    from ._record import LayerRecord
    from ._report import Report

    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError("sweep report: needs pyarrow (pip install 'invariance[sweep]')") from None
    folder = Path(folder)
    tasks = load_tasks(folder)
    complete, missing = _groups(folder, tasks)
    if not complete:
        raise ValueError(f"sweep report: no (model, transformation, image set) has all its tasks done in {folder}; "
                         f"`invariance sweep status {folder}` lists them")
    rows = []
    for ts in complete.values():
        reps = [Report.load(folder / "results" / f"{t.id}.json") for t in ts]
        ctx = [r.meta.get("sweep", {}).get("context_images", 0) for r in reps]
        o = ts[0].key["options"]
        for layer in reps[0].meta["layers"]:
            recs = [r.select(layer=layer)[0] for r in reps]
            merged = LayerRecord.merge(recs, ctx, o["n_boot"], o["seed"])
            rows.extend(_rows(ts[0], [merged], reps[0].meta))
    paths = {"parquet": _write_parquet(folder / "results.parquet", rows),
             "csv": _write_csv(folder / "results.csv", rows)}
    paths["summary"] = _write_summary(folder / "summary.md", rows, missing)
    if figures:
        paths.update(_figures(folder, rows))
    return paths


def _write_csv(path: Path, rows: list[dict]) -> Path:
    import csv
    import io

    from .files import atomic_write_text

    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def _short(reasons: str, excluded: int, n: int) -> str:
    if not excluded:
        return ""
    first = reasons.split(";")[0].split("(")[0].strip()
    return f"no verdict for {excluded} of {n} images: {first}" if first else f"no verdict for {excluded} of {n}"


def _write_summary(path: Path, rows: list[dict], missing: list[str]) -> Path:
    from .files import atomic_write_text

    lines = ["# Sweep summary", "",
             "Spatial error (mean over the images with a verdict) per model and layer; floor: the interpolation "
             "floor of the images under the transformation; null: the random-pair null of the layer; "
             "interior only: whether only positions whose receptive field lies inside the image were compared (the "
             "spec's `interior`); mark: `at floor` / `at null` where the interval reaches them, or why images "
             "have no verdict.", ""]
    for tr in dict.fromkeys(r["transform"] for r in rows):
        for iset in dict.fromkeys(r["image_set"] for r in rows if r["transform"] == tr):
            sel = [r for r in rows if r["transform"] == tr and r["image_set"] == iset]
            lines += [f"## {tr} on {iset} ({sel[0]['n_images']} images)", "",
                      "| model | parameters | layer | relative depth | interior only | spatial [95% CI] | floor | "
                      "null | spatial / null | mark |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in sel:
                ci = f"[{_fmt(r['spatial_error_lo'])}, {_fmt(r['spatial_error_hi'])}]"
                mark = r["mark"] or _short(r["no_verdict"], r["n_excluded"], r["n_images"])
                lines.append(f"| {r['model']} | {r['n_parameters']:,} | {r['layer']} | {_fmt(r['relative_depth'])} | "
                             f"{_yes_no(r['interior'])} | {_fmt(r['spatial_error'])} {ci} | "
                             f"{_fmt(r['interpolation_floor'])} | {_fmt(r['random_pair_null'])} | "
                             f"{_fmt(r['spatial_over_null'])} | {mark} |")
            lines.append("")
    if missing:
        lines += ["## Not in the table (tasks not done)", ""] + [f"- {m}" for m in missing] + [""]
    return atomic_write_text(path, "\n".join(lines))


def _yes_no(v) -> str:
    return "–" if v is None else ("yes" if v else "no")


def _figures(folder: Path, rows: list[dict]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ._report import save_figure

    out = {}
    trs = list(dict.fromkeys(r["transform"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    cmap = plt.get_cmap("tab10" if len(models) <= 10 else "tab20")
    colors = [cmap(i % cmap.N) for i in range(len(models))]
    def has_verdict(r) -> bool:
        return r["spatial_error"] is not None and math.isfinite(r["spatial_error"])

    labels_of = {m: m if any(has_verdict(r) for r in rows if r["model"] == m) else f"{m} (no verdict)"
                 for m in models}
    fig, axes = plt.subplots(1, len(trs), figsize=(5 * len(trs) + 2.2, 4.2), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, tr in zip(axes[0], trs):
        floor_drawn = False
        for m, col in zip(models, colors):
            sel = sorted((r for r in rows if r["transform"] == tr and r["model"] == m),
                         key=lambda r: r["relative_depth"])
            if not sel:
                continue
            x = [r["relative_depth"] for r in sel]
            ax.plot(x, [r["spatial_error"] for r in sel], "o-", color=col, label=labels_of[m])
            ax.fill_between(x, [r["spatial_error_lo"] for r in sel], [r["spatial_error_hi"] for r in sel],
                            color=col, alpha=0.15, lw=0)
            ax.plot(x, [r["random_pair_null"] for r in sel], ":x", color=col, lw=1, ms=4)
            floor = sel[0]["interpolation_floor"]
            if floor is not None and math.isfinite(floor) and not floor_drawn:
                ax.axhline(floor, color="0.3", ls="--", lw=1, label="interpolation floor")
                floor_drawn = True
        ax.set_title(tr)
        ax.set_xlabel("relative depth (layer index / last spatial layer)")
        ax.set_xlim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("spatial error (dotted x: random-pair null)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "interpolation floor")  # the floor last
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside right center", fontsize=8,
               frameon=False)
    out["depth_figure"] = save_figure(fig, folder / "error_by_depth.png")

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.3 * len(trs) * 2, 1.2 + 0.42 * len(models)), squeeze=False)
    for ax, (what, title) in zip(axes[0], (("spatial_error", "mean spatial error over layers"),
                                           ("spatial_over_null", "mean spatial error / null"))):
        grid = np.full((len(models), len(trs)), np.nan)
        for i, m in enumerate(models):
            for j, tr in enumerate(trs):
                v = [r[what] for r in rows if r["model"] == m and r["transform"] == tr
                     and r[what] is not None and math.isfinite(r[what])]
                grid[i, j] = np.mean(v) if v else np.nan
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.88")
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap)
        for i in range(len(models)):
            for j in range(len(trs)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7,
                            color="w" if grid[i, j] < np.nanmean(grid) else "k")
                else:
                    ax.text(j, i, "no verdict", ha="center", va="center", fontsize=7, color="0.35")
        ax.set_xticks(range(len(trs)), trs, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(models)), models, fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    out["heatmap"] = save_figure(fig, folder / "models_by_transform.png")
    return out
