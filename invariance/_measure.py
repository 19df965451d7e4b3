"""One call that measures how well a CNN's feature maps can be aligned under a transformation.

For every (layer, transformation) it computes, per image and then as means with bootstrap
confidence intervals over images, the five errors of docs/definitions.md:

===================  ========================================================================
``invariance``       ``||F_h - F||^2 / ||F||^2``, no alignment at all
``expected``         ``||W_{h^-1} F_h - F||^2 / ||F||^2``, the warp an STN "should" apply
``spatial``          best warp of the search family (:func:`invariance.align`)
``permutation``      best warp and channel permutation (Hungarian assignment)
``linear``           best warp and a C x C channel map, fitted on other images (held out)
===================  ========================================================================

with two calibrations: the *interpolation floor* (the spatial error of the input itself, the
identity network, under the same transformation and search) and the *random-pair null* (the
spatial error between an image's maps and the transformed maps of a different image). All norms
are over channels and the positions of the comparison region (docs/definitions.md): where both
maps are defined, within the receptive-field interior where it applies, and within the disk of
radius ``mask_radius`` (normalised units of each layer's own grid) when one is given. Each
(layer, transformation) is measured by :func:`invariance.measure_layer`; images without
a verdict (no signal on the region) are left out of the means and counted (``n_excluded``).

Example
-------
>>> import torch
>>> from invariance import measure, parse_transforms
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU())
>>> images = torch.rand(6, 1, 24, 24)
>>> report = measure(net, images, parse_transforms("rotation:90"), layers="0,1",
...                  channels=("spatial",), n_boot=100, progress=False)
>>> round(report.records[0]["spatial_error"], 6) <= round(report.records[0]["expected_error"], 6)
True
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import geometry as G
from ._features import FeatureExtractor
from ._metric import LayerAccumulator, LayerResult, interpolation_floor
from ._report import Report
from ._search import SEARCH_FAMILIES, SearchConfig, search_bytes_per_image
from ._warp import warp
from .checks import check_int, check_model_channels

__all__ = ["linear_warning",
           "Transform", "parse_transforms", "check_transform_count", "MAX_TRANSFORMS", "MAX_IMAGE_PIXELS", "measure",
           "CHANNEL_MODES",
           "DEFAULT_SEARCH",
           "bootstrap_ci", "as_image_batch", "DEFAULT_MEMORY_BUDGET", "parse_bytes"]

CHANNEL_MODES = ("spatial", "permutation", "linear")

DEFAULT_SEARCH = {
    "translation": "translation",
    "rotation": "rigid",
    "rigid": "rigid",
    "scale": "scale_translation",
    "scale_translation": "scale_translation",
    "anisotropic_scale": "affine",
    "similarity": "similarity",
    "affine": "affine",
    "projective": "affine",
}
"""The search family used for each transformation family when none is given."""


@dataclass(frozen=True)
class Transform:
    """An image transformation: family parameters in the image's centred frame (pixels, degrees).

    >>> Transform("rotation", (30.0,)).label
    'rotation:30'
    """

    family: str
    params: tuple[float, ...]

    def __post_init__(self):
        if not isinstance(self.family, str):
            raise TypeError(f"transform: family must be a name such as 'rotation', got {type(self.family).__name__}")
        fam = G.get_family(self.family)
        if isinstance(self.params, (str, bytes)) or not hasattr(self.params, "__len__"):
            raise TypeError(f"transform: params of {self.family} must be a tuple of {fam.n_params} numbers, got "
                            f"{self.params!r}")
        if len(self.params) != fam.n_params:
            raise ValueError(f"params: {self.family} takes {fam.n_params} parameters "
                             f"({', '.join(fam.param_names)}), got {len(self.params)}")
        params = tuple(float(p) if isinstance(p, numbers.Real) and not isinstance(p, bool) else p
                       for p in self.params)
        object.__setattr__(self, "params", params)
        check_transform_params(fam.name, params)

    @property
    def label(self) -> str:
        return f"{self.family}:{','.join(f'{p:g}' for p in self.params)}"

    @property
    def magnitude(self) -> float:
        """Angle (degrees), log2 scale, or shift length (pixels); NaN for other families."""
        p = self.params
        if self.family == "rotation":
            return p[0]
        if self.family == "scale":
            return math.log2(p[0])
        if self.family == "translation":
            return math.hypot(*p)
        return float("nan")

    def matrix(self, size: Sequence[int], dtype=torch.float64) -> torch.Tensor:
        """Normalised input -> output matrix of this transformation on an image of ``size``."""
        return G.centred_to_normalized(G.to_matrix(self.family, torch.tensor(self.params, dtype=dtype)), size)


#: The range a transformation's parameters may take (beyond it an image of at most
#: :data:`MAX_IMAGE_PIXELS` maps to under a pixel, or out of its frame, or is not representable).
TRANSFORM_LIMITS = {"angle": 360.0, "log2_scale": 6.0, "shift": 4096.0}


class _OutOfRange(ValueError):
    """A transformation parsed, but with parameters outside :data:`TRANSFORM_LIMITS`."""


def check_transform_params(family: str, params: Sequence[float]) -> None:
    """Refuse parameters that are not finite, angles beyond +-360 degrees, scale factors (or the
    singular values of a linear part) outside ``2**-6 .. 2**6`` (a 512 px image would map to under
    8 px, or one pixel would fill 64), and shifts beyond 4096 px, with one line naming the
    transformation.

    >>> try:
    ...     check_transform_params("scale", (0.0,))
    ... except ValueError as exc:
    ...     print(exc)
    transform: scale:0: the scale factor must lie in 0.015625..64 (2**-6..2**6), got 0
    """
    fam = G.get_family(family)
    label = f"{fam.name}:{','.join(f'{p:g}' if isinstance(p, float) else repr(p) for p in params)}"
    if not all(isinstance(p, float) for p in params):
        raise TypeError(f"transform: {label}: parameters must be real numbers")
    if not all(math.isfinite(p) for p in params):
        raise _OutOfRange(f"transform: {label}: parameters must be finite numbers (no nan or inf)")
    values = dict(zip(fam.param_names, params))
    lim = TRANSFORM_LIMITS
    lo, hi = 2.0 ** -lim["log2_scale"], 2.0 ** lim["log2_scale"]
    if "angle" in values and abs(values["angle"]) > lim["angle"]:
        raise _OutOfRange(f"transform: {label}: the angle must lie in -360..360 degrees, got {values['angle']:g}")
    for k in ("s", "sx", "sy"):
        if k in values and not lo <= values[k] <= hi:
            raise _OutOfRange(f"transform: {label}: the scale factor must lie in {lo:g}..{hi:g} (2**-6..2**6), got "
                             f"{values[k]:g}")
    for i in fam.translation_params:
        if abs(params[i]) > lim["shift"]:
            raise _OutOfRange(f"transform: {label}: shifts must lie in -4096..4096 pixels, got {params[i]:g}")
    if fam.name in ("affine", "projective"):
        a, b, _, d, e = params[:5]
        sv = np.linalg.svd(np.array([[a, b], [d, e]]), compute_uv=False)
        if sv[-1] < lo or sv[0] > hi:
            what = "singular (it collapses the image onto a line or a point)" if sv[-1] < 1e-12 else \
                f"too extreme (singular values {sv[0]:.3g}, {sv[-1]:.3g})"
            raise _OutOfRange(f"transform: {label}: the linear part is {what}; its singular values must lie in "
                             f"{lo:g}..{hi:g}")
    if fam.name == "projective" and max(abs(params[6]), abs(params[7])) > 1.0:
        raise _OutOfRange(f"transform: {label}: the perspective terms h31, h32 must lie in -1..1 (centred pixel "
                         f"frame), got {params[6]:g}, {params[7]:g}")


_SPEC_HELP = ("rotation:ANGLE, scale:FACTOR, translation:DX,DY, affine:a,b,c,d,e,f, or a sweep "
              "rotation:START..STOP:STEP, scale:START..STOP:COUNT (log-spaced), translation:START..STOP:STEP (x)")
_SPEC_FAMILIES = {"rotation": "rotation", "scale": "scale", "translation": "translation", "affine": "affine",
                  "similarity": "similarity", "rigid": "rigid", "projective": "projective",
                  "anisotropic_scale": "anisotropic_scale"}


MAX_IMAGE_PIXELS = 512 * 512
"""Default cap on the image size (pixels) :func:`measure` accepts (``max_image_pixels`` overrides)."""

MAX_TRANSFORMS = 1000
"""Default cap on the number of transformations one SPEC may give (``max_transforms`` overrides)."""

_SWEEP = re.compile(r"\s*([A-Za-z_]+)\s*:\s*([-+0-9.eEinfINFaA]+)\s*\.\.\s*([-+0-9.eEinfINFaA]+)\s*:\s*"
                    r"([-+0-9.eEinfINFaA]+)\s*")


def check_transform_count(specs: list[str], cap: int = MAX_TRANSFORMS) -> int:
    """Count the transformations of SPEC strings without building them; sweeps with a fractional
    COUNT, an empty range, non-finite numbers, or more than ``cap`` transformations in all are
    refused (``ValueError("transform: ...")``) before anything is allocated.

    >>> check_transform_count(["rotation:-180..180:15; scale:0.5..2:5"])
    30
    """
    cap = check_int(cap, "max_transforms", minimum=1)
    total = 0
    for chunk in specs:
        for s in (p.strip() for p in chunk.split(";")):
            if not s:
                continue
            m = _SWEEP.fullmatch(s)
            if not m:
                total += 1
                if total > cap:
                    raise ValueError(f"transform: the SPEC gives more than {cap} transformations; use fewer or "
                                     f"raise the cap (max_transforms, or --max-transforms on the command line)")
                continue
            name = m[1].lower()
            try:
                a, b, c = (float(v) for v in m.groups()[1:])
            except ValueError:
                total += 1  # the SPEC parser reports it
                continue
            if not all(math.isfinite(v) for v in (a, b, c)):
                raise ValueError(f"transform: the sweep {s!r} needs finite START, STOP and STEP / COUNT")
            if name == "scale":
                if c != int(c) or c < 1:
                    raise ValueError(f"transform: the COUNT of the sweep {s!r} must be a whole number >= 1, got "
                                     f"{c:g} (scale:START..STOP:COUNT gives COUNT log-spaced factors)")
                n = int(c)
            elif name in ("rotation", "translation"):
                if c <= 0:
                    total += 1  # the SPEC parser reports it
                    continue
                if b < a:
                    raise ValueError(f"transform: the sweep {s!r} is empty: STOP {b:g} is below START {a:g}")
                n = math.floor((b - a) / c + 1e-9) + 1
            else:
                n = 1
            total += n
            if total > cap:
                raise ValueError(f"transform: {s!r} gives {n:.4g} transformations"
                                 f"{' (with the others, ' + format(total, '.4g') + ')' if total != n else ''}, "
                                 f"above the cap of {cap}; use a coarser STEP, or raise the cap "
                                 f"(max_transforms, or --max-transforms on the command line)")
    return total


def parse_transforms(spec: str | Iterable[str], max_transforms: int = MAX_TRANSFORMS) -> list[Transform]:
    """Parse SPEC strings (several may be joined with ``;``) into :class:`Transform` objects.

    Sweeps are counted first (:func:`check_transform_count`): more than ``max_transforms`` in
    all, a fractional scale COUNT, an empty or non-finite range are refused before anything is
    built.

    >>> [t.label for t in parse_transforms("rotation:0..90:45; scale:0.5..2:3")]
    ['rotation:0', 'rotation:45', 'rotation:90', 'scale:0.5', 'scale:1', 'scale:2']
    >>> parse_transforms("translation:3,-2")[0].params
    (3.0, -2.0)
    """
    if not isinstance(spec, (str, Iterable)):
        raise TypeError(f"transform: expected a SPEC string or a list of them, got {type(spec).__name__}")
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not all(isinstance(s, str) for s in specs):
        raise TypeError("transform: expected SPEC strings")
    check_transform_count(specs, max_transforms)
    out: list[Transform] = []
    for chunk in specs:
        for s in (p.strip() for p in chunk.split(";")):
            if s:
                out.extend(_parse_one(s))
    if not out:
        raise ValueError(f"transform: empty SPEC; expected {_SPEC_HELP}")
    return out


def _parse_one(s: str) -> list[Transform]:
    name, sep, rest = s.partition(":")
    name = name.strip().lower()
    if not sep or name not in _SPEC_FAMILIES:
        raise ValueError(f"transform: unknown SPEC {s!r}; valid: {_SPEC_HELP}")
    fam = _SPEC_FAMILIES[name]
    m = re.fullmatch(r"\s*([-+0-9.eE]+)\s*\.\.\s*([-+0-9.eE]+)\s*:\s*([-+0-9.eE]+)\s*", rest)
    try:
        if m:
            a, b, c = (float(v) for v in m.groups())
            if fam == "scale":
                n = int(c)
                if n < 1 or a <= 0 or b <= 0:
                    raise ValueError
                vals = np.exp(np.linspace(math.log(a), math.log(b), n)) if n > 1 else np.array([a])
                return [Transform("scale", (float(round(v, 10)),)) for v in vals]
            if c <= 0 or fam not in ("rotation", "translation"):
                raise ValueError
            vals = np.arange(a, b + 1e-9 * max(1.0, abs(b)), c)
            if fam == "rotation":
                return [Transform("rotation", (float(round(v, 10)),)) for v in vals]
            return [Transform("translation", (float(round(v, 10)), 0.0)) for v in vals]
        vals = tuple(float(v) for v in rest.split(","))
        return [Transform(fam, vals)]
    except ValueError as exc:
        if isinstance(exc, _OutOfRange):  # parsed, but out of range: that message says it all
            raise ValueError(str(exc)) from None
        detail = f" ({exc})" if str(exc) else ""
        raise ValueError(f"transform: cannot parse SPEC {s!r}{detail}; valid: {_SPEC_HELP}") from None


def bootstrap_ci(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over images (NaNs dropped).

    >>> lo, hi = bootstrap_ci(np.arange(100.0))
    >>> lo < 49.5 < hi
    True
    """
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot: must be a non-negative integer (0: no interval), got {n_boot!r}")
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    if v.size == 1 or n_boot <= 0:
        return (float(v.mean()), float(v.mean()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(1)
    a = (1 - level) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def as_image_batch(images, dtype=torch.float32) -> torch.Tensor:
    """Accept ``(B, C, H, W)`` or ``(B, H, W)`` images: floats are kept, integers of any type holding
    0..255 are scaled like ``uint8`` to [0, 1] (in ``dtype``), booleans become 0 / 1; complex
    images and integers outside 0..255 are refused.

    >>> as_image_batch(torch.tensor([[[0, 255]]], dtype=torch.int64)).tolist()
    [[[[0.0, 1.0]]]]
    """
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "biufc":
            raise TypeError(f"images: an array of {images.dtype}; valid: floats, integers 0..255, bool")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a tensor or array, got {type(images).__name__}")
    if images.is_complex():
        raise TypeError(f"images: complex numbers ({images.dtype}); pass real images, e.g. the magnitude or the "
                        "real part")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W) or (B, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images: empty batch (B = 0)")
    if images.dtype == torch.bool:
        images = images.to(dtype)
    elif not images.is_floating_point():
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"images: {images.dtype} values in {lo}..{hi}; integer images must lie in 0..255 "
                             "(scaled like uint8 to [0, 1]); convert other ranges to floats")
        images = images.to(dtype) / 255.0
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images: contain NaN or infinite values")
    return images


def _stat(values: torch.Tensor, n_boot: int, seed: int) -> tuple[float, list[float], list[float]]:
    v = values.detach().double().cpu().numpy()
    finite = v[np.isfinite(v)]
    mean = float(finite.mean()) if finite.size else float("nan")
    return mean, list(bootstrap_ci(v, n_boot, seed=seed)), v.tolist()


def measure(
    model: nn.Module,
    images,
    transforms: Sequence[Transform] | str,
    *,
    layers: str | Iterable[str] = "all",
    search: str | None = None,
    channels: Iterable[str] = CHANNEL_MODES,
    mask_radius: float | None = None,
    interior: bool | None = None,
    config: SearchConfig | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    calibrate: bool = True,
    progress: bool | None = None,
    model_name: str | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    memory_budget: int | str | None = None,
) -> Report:
    """Measure invariance, expected-transform, spatial, permutation and linear alignment errors.

    The model runs in eval mode (a model in training mode is put in eval mode for the measurement,
    as BatchNorm would otherwise normalise each batch by its own statistics and dropout would
    add noise, and handed back in its mode; ``report.meta["model_mode"]`` says so), and on a copy
    of each batch: a model that works on its input in place never changes the caller's images.

    Args:
        model: any ``nn.Module`` mapping ``(B, C, H, W)`` images to outputs.
        images: ``(B, C, H, W)`` floats (or ``(B, H, W)`` / uint8, scaled to [0, 1]).
        transforms: :class:`Transform` objects or a SPEC string (see :func:`parse_transforms`).
        layers: ``"all"`` (every module with a 4-D output) or names (list or comma-separated);
            ``"input"`` is the input itself.
        search: search family (:data:`invariance.SEARCH_FAMILIES`); default per
            transformation family, :data:`DEFAULT_SEARCH`.
        channels: which of ``spatial``, ``permutation``, ``linear`` to compute (spatial always is).
        mask_radius: radius of an evaluation disk in each layer's normalised coordinates
            (default: none, the whole map).
        interior: apply the receptive-field interior (default: where it keeps at least a quarter
            of the map, :data:`invariance.INTERIOR_MIN_FRACTION`).
        config: :class:`invariance.SearchConfig` (grid resolution, refinement).
        n_boot: bootstrap resamples for the confidence intervals.
        seed: seeds the bootstrap, the linear-map folds and the refinement jitter.
        batch_size: images per batch (forward passes and searches); default: as many as
            ``memory_budget`` allows. Results do not depend on it: every image's search is
            independent of its batch-mates, the random-pair null pairs the same images and the
            linear map is accumulated over batches.
        device: where to compute (default: the device of ``images``).
        calibrate: compute the interpolation floor and the random-pair null.
        progress: show a tqdm progress bar over images x layers, with an ETA (default: when
            attached to a terminal).
        max_image_pixels: refuse larger images before any work (:data:`MAX_IMAGE_PIXELS`; the
            search's memory grows with the map size; raise it knowingly).

    Returns:
        a :class:`invariance.Report` with one record per (layer, transformation).
    """
    t_start = time.time()
    transforms, channels, cfg = _checked_arguments(
        model, transforms, channels, search, n_boot, interior=interior, seed=seed, mask_radius=mask_radius,
        config=config, max_image_pixels=max_image_pixels, memory_budget=memory_budget, calibrate=calibrate,
        progress=progress, device=device)
    x, model = _prepared(model, images, max_image_pixels, device)
    families = sorted({search or DEFAULT_SEARCH[t.family] for t in transforms})
    plan = _plan(model, x, layers, channels, batch_size, memory_budget, families, cfg)
    from tqdm.auto import tqdm

    n = x.shape[0]
    steps = len(transforms) * n * (len(plan.layers) + (1 if calibrate else 0))
    bar = tqdm(total=steps, desc="measuring", unit="img", disable=(None if progress is None else not progress),
               leave=False)
    results: dict[tuple[str, str], LayerResult] = {}
    floor: dict[str, dict] = {}
    opts = {"channels": channels, "mask_radius": mask_radius, "interior": interior, "config": cfg, "seed": seed,
            "null": calibrate}
    for tr in transforms:
        if calibrate:
            floor[tr.label] = _floor(tr, x, search, mask_radius, cfg, plan.floor_batch, n_boot, seed, bar)
        for group in plan.groups:
            results.update(_measure_group(tr, x, group, plan, search, opts, bar))
    bar.close()
    records = []
    for tr in transforms:
        for depth, name in enumerate(plan.layers):
            res = results[(tr.label, name)]
            rec = {"layer": name, "depth": depth, "transform": tr.label, "family": tr.family,
                   "magnitude": tr.magnitude, "search": res.search, **_record(res, n_boot, seed)}
            if calibrate:
                rec["interpolation_floor"] = floor[tr.label]["mean"]
            records.append(rec)
    null: dict = {}
    for r in records:
        if "random_pair_null" in r:
            null.setdefault(r["layer"], {})[r["transform"]] = {"mean": r["random_pair_null"],
                                                                 "ci": r["random_pair_null_ci"]}
    meta = _meta(model, model_name, x, plan.layers, transforms, plan.frames, search=search, channels=channels,
                 mask_radius=mask_radius, interior=interior, seed=seed, n_boot=n_boot,
                 seconds=time.time() - t_start)
    meta["model_mode"] = ("eval (the model was in training mode: put in eval mode for the measurement and "
                          "restored afterwards)" if model.training else "eval")
    meta["batching"] = {"images_per_batch": plan.batch, "layer_groups": len(plan.groups),
                        "memory_budget": plan.budget}
    return Report(records=records, calibration={"interpolation_floor": floor, "random_pair_null": null}, meta=meta)


DEFAULT_MEMORY_BUDGET = 768 << 20
"""Bytes a :func:`measure` batch may use on the CPU for maps and search buffers (768 MiB: with
the interpreter, torch and a resnet50 the process stays under 2 GB); on CUDA the default is half
the device's free memory."""


def parse_bytes(value, name: str = "memory_budget") -> int:
    """Bytes from an integer or a string such as ``"2GB"``, ``"512MiB"``, ``"1.5G"``.

    >>> parse_bytes("2GB"), parse_bytes("512MiB"), parse_bytes(1000)
    (2000000000, 536870912, 1000)
    """
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
             "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m[2].lower() not in units:
            raise ValueError(f"{name}: cannot read {value!r} as a size; valid: bytes as an integer or a number "
                             "with a unit, e.g. 2GB, 512MiB, 1.5G")
        out = int(float(m[1]) * units[m[2].lower()])
    if out <= 0:
        raise ValueError(f"{name}: must be a positive size, got {value!r}")
    return out


@dataclass
class _Plan:
    """How a :func:`measure` call walks through memory: layer groups and images per batch."""

    layers: list[str]
    frames: dict
    groups: list[tuple[list[str], FeatureExtractor]]
    batch: int
    floor_batch: int
    budget: int
    reuse: bool
    originals: dict | None = None


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return DEFAULT_MEMORY_BUDGET


def _run(extractor: FeatureExtractor, imgs: torch.Tensor):
    try:
        return extractor(imgs)
    except (RuntimeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model: forward pass failed on images of shape {tuple(imgs.shape)}: {first}") from None


def _plan(model, x, layers, channels, batch_size, memory_budget, families, cfg) -> _Plan:
    """Probe the layers with two images, then size the batches from the memory budget.

    An image costs its maps and its transformed image's maps at every layer of its group, plus
    the search of one layer at a time (:func:`invariance.search_bytes_per_image` of its widest FFT canvas, with
    ``C x C`` cost matrices for permutations and the float64 design of the linear map). Layers
    are split into groups when two images' maps of all of them would take more than half the budget.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"batch_size: must be a positive integer (images per batch), got {batch_size!r}")
    budget = parse_bytes(memory_budget) if memory_budget is not None else _default_budget(x.device)
    extractor = FeatureExtractor(model, layers)
    probe, frames = _run(extractor, x[:2])  # two images: a BatchNorm in training mode needs them
    names = list(probe)
    if not names:
        raise ValueError("layers: the model has no layer with a 4-D output")
    maps = {k: v[0].numel() * v.element_size() for k, v in probe.items()}

    def search_bytes(k):
        b, c, h, w = probe[k].shape
        extra = 4 * c * c * 8 if "permutation" in channels else 0
        extra += 4 * maps[k] * 8 // probe[k].element_size() if "linear" in channels else 0
        return max(search_bytes_per_image(f, c, (h, w), cfg, probe[k].element_size()) for f in families) + extra

    groups: list[list[str]] = [[]]
    for k in names:  # consecutive layers, each group's maps of two images within half the budget
        if groups[-1] and 2 * 2 * (sum(maps[j] for j in groups[-1]) + maps[k]) > budget // 2:
            groups.append([])
        groups[-1].append(k)
    per_image = max(2 * sum(maps[k] for k in g) + max(search_bytes(k) for k in g) for g in groups)
    batch = int(batch_size) if batch_size is not None else max(1, min(x.shape[0], budget // per_image))
    floor_bytes = max(search_bytes_per_image(f, x.shape[1], x.shape[-2:], cfg, x.element_size()) for f in families)
    floor_batch = max(1, min(x.shape[0], budget // floor_bytes))
    extractors = [(g, extractor if len(groups) == 1 else FeatureExtractor(model, g)) for g in groups]
    reuse = batch >= x.shape[0] and len(groups) == 1
    return _Plan(names, frames, extractors, batch, floor_batch, budget, reuse)


def _floor(tr, x, search, mask_radius, cfg, batch, n_boot, seed, bar) -> dict:
    """The interpolation floor of one transformation, batch by batch."""
    fam = search or DEFAULT_SEARCH[tr.family]
    t_img = tr.matrix(tuple(x.shape[-2:]), torch.float64)
    bar.set_postfix_str(f"{tr.label} floor")
    parts = []
    for i in range(0, x.shape[0], batch):
        parts.append(interpolation_floor(x[i : i + batch], t_img, fam, mask_radius=mask_radius, config=cfg))
        bar.update(parts[-1].shape[0])
    mean, ci, _ = _stat(torch.cat(parts), n_boot, seed)
    return {"mean": mean, "ci": ci}


def _measure_group(tr, x, group, plan, search, opts, bar) -> dict:
    """Every layer of one group under one transformation, batch by batch (two passes for the
    linear map's held-out errors)."""
    names, extractor = group
    fam = search or DEFAULT_SEARCH[tr.family]
    t_img = tr.matrix(tuple(x.shape[-2:]), torch.float64)
    n = x.shape[0]
    batches = [slice(i, min(i + plan.batch, n)) for i in range(0, n, plan.batch)]

    def maps(sl):
        f = plan.originals
        if f is None:
            f, _ = _run(extractor, x[sl])
            if plan.reuse:  # one batch, one group: the originals' maps serve every transformation
                plan.originals = f
        fh, _ = _run(extractor, warp(x[sl], t_img.to(x.dtype)))
        return f, fh

    accs: dict[str, LayerAccumulator] = {}
    for j, sl in enumerate(batches):
        f, fh = maps(sl)
        for k in names:
            if k not in accs:
                accs[k] = LayerAccumulator(plan.frames[k], t_img, n, family=fam, layer=k, transform=tr.label,
                                           device=f[k].device, dtype=f[k].dtype, **opts)
            bar.set_postfix_str(f"{tr.label} {k}" + (f" (batch {j + 1}/{len(batches)})" if len(batches) > 1 else ""))
            accs[k].add(f[k], fh[k], sl)
            bar.update(sl.stop - sl.start)
        del f, fh
    if any(a.second_pass for a in accs.values()):
        for sl in batches:
            f, fh = maps(sl)
            for k in names:
                accs[k].score(f[k], fh[k], sl)
    return {(tr.label, k): a.result() for k, a in accs.items()}


def _as_transforms(transforms) -> list[Transform]:
    """:class:`Transform` objects from a SPEC string, or a list of SPEC strings and Transforms."""
    if isinstance(transforms, str):
        return parse_transforms(transforms)
    if isinstance(transforms, Transform):
        return [transforms]
    if not isinstance(transforms, Iterable):
        raise TypeError(f"transforms: expected a SPEC string or a list of Transform / SPEC strings, got "
                        f"{type(transforms).__name__}")
    out: list[Transform] = []
    for t in transforms:
        if isinstance(t, str):
            out.extend(parse_transforms(t))
        elif isinstance(t, Transform):
            out.append(t)
        else:
            raise TypeError(f"transforms: expected Transform objects or SPEC strings, got a {type(t).__name__}")
    return out


def _checked_arguments(model, transforms, channels, search, n_boot, *, interior=None, seed=0, mask_radius=None,
                       config=None, max_image_pixels=MAX_IMAGE_PIXELS, memory_budget=None, calibrate=True,
                       progress=None, device=None) -> tuple[list[Transform], tuple[str, ...], SearchConfig]:
    """The transformations, channel modes and search settings of a :func:`measure` call; every
    argument is checked here, before the model runs."""
    from .checks import check_number, check_seed, resolve_device

    transforms = _as_transforms(transforms)
    if not transforms:
        raise ValueError("transforms: no transformation given")
    channels = tuple(channels) if not isinstance(channels, str) else tuple(
        c.strip() for c in channels.split(",") if c.strip())
    if not channels:
        raise ValueError(f"channels: none given; valid choices: {', '.join(CHANNEL_MODES)} (spatial is always "
                         f"computed)")
    bad = [c for c in channels if c not in CHANNEL_MODES]
    if bad:
        raise ValueError(f"channels: unknown channel matching {', '.join(bad)}; "
                         f"valid choices: {', '.join(CHANNEL_MODES)}")
    if search is not None and search not in SEARCH_FAMILIES:
        raise ValueError(f"search: unknown search family {search!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_int(n_boot, "n_boot", minimum=0)  # 0: no interval (means only)
    seed = check_seed(seed)
    if interior is not None and not isinstance(interior, bool):
        raise TypeError(f"interior: expected None (auto), True or False, got {interior!r}")
    if mask_radius is not None:
        check_number(mask_radius, "mask_radius", positive=True)
    check_int(max_image_pixels, "max_image_pixels", minimum=1)
    if memory_budget is not None:
        parse_bytes(memory_budget)
    for name, flag in (("calibrate", calibrate), ("progress", progress)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name}: expected True or False, got {flag!r}")
    resolve_device(device)
    return transforms, channels, SearchConfig.of(config, seed=seed)


def _prepared(model: nn.Module, images, max_image_pixels: int, device) -> tuple[torch.Tensor, nn.Module]:
    """The image batch (checked: size cap, dtype, channels) and the model, both on ``device``."""
    x = as_image_batch(images)
    if x.shape[-2] * x.shape[-1] > max_image_pixels:
        raise ValueError(f"images: {x.shape[-2]}x{x.shape[-1]} pixels is above the cap of {max_image_pixels} "
                         f"(max_image_pixels; --max-pixels on the command line): the search's memory grows with "
                         f"the map size; downsample the images or raise the cap")
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point() and p.dtype != x.dtype:
        raise TypeError(f"images: dtype {x.dtype} differs from the model's parameters ({p.dtype}); convert one of "
                        f"them, e.g. model.to({x.dtype}) or images.to({p.dtype})")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"images: the search runs in float32 or float64, got {x.dtype}; convert the images and "
                        "the model, e.g. images.float() and model.float()")
    if device is not None:
        from .checks import resolve_device

        device = resolve_device(device)
        x = x.to(device)
        model = model.to(device)
    check_model_channels(model, x)
    return x, model


def _meta(model, model_name, x, layer_names, transforms, frames, *, search, channels, mask_radius, interior, seed,
          n_boot, seconds) -> dict:
    """What a report says about how it was made."""
    return {
        "model": model_name or type(model).__name__,
        "n_images": x.shape[0],
        "image_size": list(x.shape[-2:]),
        "image_channels": x.shape[1],
        "layers": layer_names,
        "transforms": [t.label for t in transforms],
        "search": search or "default per transformation family",
        "channels": list(channels),
        "mask_radius": mask_radius,
        "interior": "auto" if interior is None else bool(interior),
        "seed": seed,
        "n_boot": n_boot,
        "device": str(x.device),
        "dtype": str(x.dtype),
        "torch": torch.__version__,
        "seconds": round(seconds, 2),
        "frames": {k: {"stride": list(f.stride), "offset": list(f.offset), "size": list(f.size),
                       "exact": f.exact, "rf_radius": None if f.rf_radius is None else list(f.rf_radius),
                       "layout": f.layout}
                   for k, f in frames.items()},
    }


def _median_params(params: np.ndarray, names) -> np.ndarray:
    """Per-parameter median over images; angles as a circular median (about the circular mean)."""
    out = np.median(params, 0)
    for i, n in enumerate(names):
        if n == "angle" and params.shape[0]:
            a = np.deg2rad(params[:, i])
            centre = np.arctan2(np.sin(a).mean(), np.cos(a).mean())
            dev = np.angle(np.exp(1j * (a - centre)))
            out[i] = float(np.rad2deg(np.angle(np.exp(1j * (centre + np.median(dev))))))
    return out


def _record(res: LayerResult, n_boot: int, seed: int) -> dict:
    """The report record of one :class:`invariance.LayerResult` (means over the images with
    a verdict, bootstrap intervals, per-image values, the best warps and channel orbits)."""
    out: dict = {"per_image": {}}
    keys = [("invariance_error", res.invariance), ("expected_error", res.expected), ("spatial_error", res.spatial),
            ("permutation_error", res.permutation), ("linear_error", res.linear),
            ("linear_fit_error", res.linear_fit)]
    for key, vals in keys:
        if vals is None:
            out[key], out[key + "_ci"] = float("nan"), [float("nan")] * 2
            continue
        mean, ci, per = _stat(vals, n_boot, seed)
        out[key], out[key + "_ci"] = mean, ci
        out["per_image"][key] = per
    out["n_excluded"] = res.n_excluded
    out["excluded_reasons"] = sorted({r for r in res.reasons if r is not None})
    ov = res.overlap[torch.isfinite(res.spatial)]
    out["overlap"] = float(ov.mean()) if ov.numel() else float("nan")
    out["interior"] = res.interior
    out["region_size"] = res.region_size
    out["best_params"] = {
        "family": res.param_family,
        "frame": "image centred frame (pixels, degrees); the warp applied to the transformed maps",
        "param_names": list(res.param_names),
        "median": _median_params(res.params.numpy(), res.param_names).round(4).tolist(),
        "per_image": res.params.numpy().round(4).tolist(),
    }
    if res.permutations is not None:
        perms = [tuple(p) for p in res.permutations.tolist()]
        modal, count = Counter(perms).most_common(1)[0]
        out["permutation"] = list(modal)
        out["permutation_agreement"] = count / len(perms)
    out["channel_orbits"] = res.orbits
    if res.null is not None:
        mean, ci, _ = _stat(res.null, n_boot, seed)
        out["random_pair_null"], out["random_pair_null_ci"] = mean, ci
    warning = linear_warning(out["linear_error"], out["spatial_error"], out.get("random_pair_null", float("nan")))
    if warning:  # in the record and marked in the table (not a Python warning: reports are the interface)
        out["linear_warning"] = warning
    return out


def linear_warning(linear: float, spatial: float, null: float) -> str | None:
    """Why a held-out linear error cannot be trusted, or None.

    The linear maps include the identity, so a map that generalises does no worse than the
    spatial error on held-out images (up to sampling noise), and never worse than predicting
    zero (error 1). A held-out error above 1, or above both the spatial error and the
    random-pair null, means the ``C x C`` map was fitted to noise: too few images for its
    ``C^2`` coefficients.

    >>> "above the spatial error 0.161 and the random-pair null 0.316" in linear_warning(0.348, 0.161, 0.316)
    True
    >>> linear_warning(0.10, 0.161, 0.316) is None
    True
    """
    if not math.isfinite(linear):
        return None
    if linear > 1.0:
        why = "above 1 (worse than predicting zero)"
    elif math.isfinite(spatial) and math.isfinite(null) and linear > max(spatial, null):
        why = f"above the spatial error {spatial:.3g} and the random-pair null {null:.3g}"
    else:
        return None
    return (f"held-out linear error {linear:.3g} is {why}: the channel map is overfitted (too few images for its "
            f"C x C coefficients); use more images or a larger ridge")
