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
>>> errors = report.records[0].errors
>>> round(errors.spatial.mean, 6) <= round(errors.expected.mean, 6)
True
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import geometry as G
from ._features import FeatureExtractor
from ._floor_cache import cached_floor, floor_cache_dir, floor_key
from ._metric import LayerAccumulator, LayerResult, comparison_region, interpolation_floor
from ._record import Estimate, LayerRecord
from ._report import Report
from ._search import MIN_REGION, SEARCH_FAMILIES, SearchConfig, search_bytes_per_image
from ._transform import Transform, parse_transforms
from ._warp import warp
from .checks import check_int, check_model_channels

__all__ = ["MAX_IMAGE_PIXELS", "measure", "MeasureOptions", "CHANNEL_MODES", "DEFAULT_CHANNELS", "DEFAULT_SEARCH",
           "as_image_batch", "lie_derivative",
           "DEFAULT_MEMORY_BUDGET", "parse_bytes"]

CHANNEL_MODES = ("spatial", "permutation", "linear", "lie")
"""Channels :func:`measure` can compute (``spatial`` always is; ``lie``: the infinitesimal view)."""

DEFAULT_CHANNELS = ("spatial", "permutation", "linear")
"""The channels :func:`measure` computes when none are named."""

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

MAX_IMAGE_PIXELS = 512 * 512
"""Default cap on the image size (pixels) :func:`measure` accepts (``max_image_pixels`` overrides)."""


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


def measure(
    model: nn.Module,
    images,
    transforms: Sequence[Transform] | str,
    *,
    layers: str | Iterable[str] = "all",
    search: str | None = None,
    channels: Iterable[str] = DEFAULT_CHANNELS,
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
    floor_cache: bool | str | os.PathLike = True,
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
        layers: ``"all"`` (every module whose output is a spatial map, as ``invariance layers``
            lists them) or names (list or comma-separated);
            ``"input"`` is the input itself.
        search: search family (:data:`invariance.SEARCH_FAMILIES`); default per
            transformation family, :data:`DEFAULT_SEARCH`.
        channels: which of ``spatial``, ``permutation``, ``linear``, ``lie`` to compute (spatial
            always is; default :data:`DEFAULT_CHANNELS`). ``lie`` adds the infinitesimal view
            (:class:`invariance.Infinitesimal`, docs/definitions.md): the Lie derivative along the
            transformation's logarithm and the part of it no infinitesimal warp explains.
        mask_radius: radius of an evaluation disk in each layer's normalised coordinates
            (default: none, the whole map).
        interior: apply the receptive-field interior (default: wherever the layer's frame is
            traced; a layer whose receptive field covers the image has no verdict, the reason
            :data:`invariance.RF_COVERS_IMAGE`).
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
        floor_cache: keep each interpolation floor on disk and read it back when the same images,
            transformation and search come again (another model, layer or call): True the user
            cache (``~/.cache/invariance/floors``), a folder, or False (always compute).
            ``report.meta["floor_cache"]`` says how many floors were read and computed.

    Returns:
        a :class:`invariance.Report` with one record per (layer, transformation).
    """
    t_start = time.time()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    transforms = list(dict.fromkeys(_as_transforms(transforms)))  # equal by parameters: measured once
    if not transforms:
        raise ValueError("transforms: no transformation given")
    o = MeasureOptions(channels=channels, search=search, mask_radius=mask_radius, interior=interior, config=config,
                       n_boot=n_boot, seed=seed, batch_size=batch_size, device=device, calibrate=calibrate,
                       progress=progress, max_image_pixels=max_image_pixels, memory_budget=memory_budget,
                       floor_cache=floor_cache)
    channels, search, mask_radius, interior, cfg = o.channels, o.search, o.mask_radius, o.interior, o.config
    calibrate, progress, memory_budget, batch_size, n_boot, seed = (o.calibrate, o.progress, o.memory_budget,
                                                                     o.batch_size, o.n_boot, o.seed)
    x, model = _prepared(model, images, o.max_image_pixels, o.device)
    families = sorted({search or DEFAULT_SEARCH[t.family] for t in transforms})
    plan = _plan(model, x, layers, channels, batch_size, memory_budget, families, cfg)
    from tqdm.auto import tqdm

    n = x.shape[0]
    # no layer can have a verdict (every region under MIN_REGION positions, e.g. receptive fields that
    # cover the image): the floor would calibrate nothing and is not computed (records: floor None)
    with_floor = calibrate and _some_region(plan, mask_radius, interior)
    steps = len(transforms) * n * (len(plan.layers) + (1 if with_floor else 0))
    bar = tqdm(total=steps, desc="measuring", unit="img", disable=(None if progress is None else not progress),
               leave=False)
    results: dict[tuple[Transform, str], LayerResult] = {}
    lie: dict = {}
    floor: dict[Transform, Estimate] = {}
    floors_read = 0
    opts = {"channels": channels, "mask_radius": mask_radius, "interior": interior, "config": cfg, "seed": seed,
            "null": calibrate}
    for tr in transforms:
        if with_floor:
            floor[tr], hit = _floor(tr, x, search, mask_radius, cfg, plan.floor_batch, n_boot, seed, bar,
                                    floor_cache_dir(o.floor_cache))
            floors_read += hit
        for group in plan.groups:
            results.update(_measure_group(tr, x, group, plan, search, opts, bar))
            if "lie" in channels:
                lie.update(_lie_group(tr, x, group, plan, search, mask_radius, interior, calibrate))
    bar.close()
    records = [LayerRecord.build(results[(tr, name)], tr, depth, n_boot, seed, floor=floor.get(tr),
                                 lie=lie.get((tr, name)))
               for tr in transforms for depth, name in enumerate(plan.layers)]
    meta = _meta(model, model_name, x, plan.layers, transforms, plan.frames, search=search, channels=channels,
                 mask_radius=mask_radius, interior=interior, seed=seed, n_boot=n_boot,
                 seconds=time.time() - t_start)
    meta["model_mode"] = ("eval (the model was in training mode: put in eval mode for the measurement and "
                          "restored afterwards)" if model.training else "eval")
    meta["batching"] = {"images_per_batch": plan.batch, "layer_groups": len(plan.groups),
                        "memory_budget": plan.budget}
    folder = floor_cache_dir(o.floor_cache) if with_floor else None
    meta["floor_cache"] = {"folder": None if folder is None else str(folder), "read": floors_read,
                           "computed": len(transforms) - floors_read if with_floor else 0}
    return Report(records=records, meta=meta)


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


def _some_region(plan, mask_radius, interior) -> bool:
    """Whether any layer of the plan has a comparison region of at least MIN_REGION positions."""
    for name in plan.layers:
        region, _, _ = comparison_region(plan.frames[name], mask_radius=mask_radius, interior=interior)
        if float(region.sum()) >= MIN_REGION:
            return True
    return False


def _floor(tr, x, search, mask_radius, cfg, batch, n_boot, seed, bar, folder) -> tuple[Estimate, bool]:
    """The interpolation floor of one transformation, batch by batch, or read from the cache
    ``folder`` (:mod:`invariance._floor_cache`); and whether it was read."""
    fam = search or DEFAULT_SEARCH[tr.family]
    t_img = tr.matrix(tuple(x.shape[-2:]), torch.float64)
    bar.set_postfix_str(f"{tr.label} floor")

    def compute() -> torch.Tensor:
        parts = []
        for i in range(0, x.shape[0], batch):
            parts.append(interpolation_floor(x[i : i + batch], t_img, fam, mask_radius=mask_radius, config=cfg))
            bar.update(parts[-1].shape[0])
        return torch.cat(parts)

    key = floor_key(x, t_img, fam, cfg, mask_radius) if folder is not None else ""
    values, hit = cached_floor(folder, key, x.shape[0], compute)
    if hit:
        bar.update(x.shape[0])
    return Estimate.of(values, n_boot, seed), hit


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
    return {(tr, k): a.result() for k, a in accs.items()}


def _lie_group(tr, x, group, plan, search, mask_radius, interior, calibrate) -> dict:
    """The infinitesimal view of every layer of one group under one transformation, batch by batch
    (a third of a batch at a time when calibrating: the floor's two translation directions ride along)."""
    step = max(1, plan.batch // (3 if calibrate else 1))
    out = _lie_layers(tr, x, group[1], search or DEFAULT_SEARCH[tr.family], step, mask_radius, interior, calibrate)
    return {(tr, k): r for k, r in out.items()}


def _lie_layers(tr, x, extractor, fam, step, mask_radius, interior, calibrate) -> dict:
    """Layer name -> :class:`invariance.LieResult` of the extractor's layers, ``step`` images at a time."""
    from ._lie import LieAccumulator, image_tangent, layer_tangents, lie_generator, lie_region, translation_tangents

    gen = lie_generator(G.to_matrix(tr.family, torch.tensor(tr.params, dtype=torch.float64)))
    n = x.shape[0]
    accs: dict = {}
    for i in range(0, n, step):
        sl = slice(i, min(i + step, n))
        xs = x[sl]
        directions = [image_tangent(xs, gen)] + (translation_tangents(xs) if calibrate else [])
        maps, derivs, frames, method = layer_tangents(extractor, xs, directions)
        for k in maps:
            if k not in accs:
                region, reason = lie_region(frames[k], mask_radius=mask_radius, interior=interior, device=x.device)
                accs[k] = LieAccumulator(frames[k], gen, region, n, family=fam, null=calibrate, reason=reason,
                                         layer=k, transform=tr.label, method=method)
            accs[k].add(maps[k], derivs[k][0], sl, shifts=derivs[k][1:] if calibrate else None)
    return {k: a.result() for k, a in accs.items()}


def lie_derivative(model: nn.Module, images, transform, *, layers: str | Iterable[str] = "all",
                   search: str | None = None, mask_radius: float | None = None, interior: bool | None = None,
                   calibrate: bool = True) -> dict:
    """The infinitesimal view of every layer under one transformation: layer name ->
    :class:`invariance.LieResult` with per-image ``lie`` (``r²``), ``aligned`` (``a²``), ``share``,
    ``floor`` and ``null`` (docs/definitions.md, "The infinitesimal view"). :func:`measure` with
    ``channels="spatial,lie"`` reports the same values as means with intervals.

    Args:
        model: any ``nn.Module`` (in eval mode for the call, then restored).
        images: as for :func:`measure`.
        transform: one transformation (a :class:`Transform` or a SPEC string); its matrix
            logarithm gives the direction and the size (``rotation:1`` is a one-degree rotation).
        layers, search, mask_radius, interior: as for :func:`measure`.
        calibrate: also compute the grid floor and the null.

    >>> import torch
    >>> from invariance import toys
    >>> x = toys.make_blob_images(4, 48, seed=0).double()
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU()).double()
    >>> out = lie_derivative(net, x, "translation:1,0")  # CNNs are translation covariant:
    >>> bool(out["0"].lie.max() < 1e-20), bool((out["1"].aligned <= out["1"].floor * (1 + 1e-9)).all())
    (True, True)
    """
    trs = _as_transforms(transform)
    if len(trs) != 1:
        raise ValueError(f"transform: the Lie derivative takes one transformation, got {len(trs)}")
    tr = trs[0]
    o = MeasureOptions(search=search, mask_radius=mask_radius, interior=interior, calibrate=calibrate)
    fam = o.search or DEFAULT_SEARCH[tr.family]
    x, model = _prepared(model, images, MAX_IMAGE_PIXELS, None)
    return _lie_layers(tr, x, FeatureExtractor(model, layers), fam, x.shape[0], o.mask_radius, o.interior, calibrate)


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


@dataclass(frozen=True)
class MeasureOptions:
    """The options of :func:`measure`, each checked once, here, when the object is made (one-line
    errors naming the option); the command line builds the same object, so a bad value gets the
    same message through both (the command line writes the option as its ``--flag``).

    >>> MeasureOptions(mask_radius=0.5).mask_radius
    0.5
    >>> MeasureOptions(n_boot=-1)
    Traceback (most recent call last):
    ...
    ValueError: n_boot: must be an integer >= 0, got -1
    """

    channels: tuple[str, ...] = DEFAULT_CHANNELS
    search: str | None = None
    mask_radius: float | None = None
    interior: bool | None = None
    config: SearchConfig | None = None
    n_boot: int = 1000
    seed: int = 0
    batch_size: int | None = None
    device: torch.device | None = None
    calibrate: bool = True
    progress: bool | None = None
    max_image_pixels: int = MAX_IMAGE_PIXELS
    memory_budget: int | None = None
    floor_cache: bool | str | os.PathLike = True

    def __post_init__(self):
        from .checks import check_number, check_seed, resolve_device

        def put(name, value):
            object.__setattr__(self, name, value)

        ch = self.channels
        if isinstance(ch, str):
            ch = tuple(c.strip() for c in ch.split(",") if c.strip())
        elif isinstance(ch, Iterable):
            ch = tuple(ch)
        else:
            raise TypeError(f"channels: expected names such as 'spatial,permutation', got {ch!r}")
        if not ch:
            raise ValueError(f"channels: none given; valid choices: {', '.join(CHANNEL_MODES)} (spatial is always "
                             f"computed)")
        bad = [str(c) for c in ch if c not in CHANNEL_MODES]
        if bad:
            raise ValueError(f"channels: unknown channel matching {', '.join(bad)}; "
                             f"valid choices: {', '.join(CHANNEL_MODES)}")
        put("channels", ch)
        if self.search is not None and self.search not in SEARCH_FAMILIES:
            raise ValueError(f"search: unknown search family {self.search!r}; valid choices: "
                             f"{', '.join(SEARCH_FAMILIES)}")
        if self.mask_radius is not None:
            put("mask_radius", check_number(self.mask_radius, "mask_radius", positive=True))
        if self.interior is not None and not isinstance(self.interior, bool):
            raise TypeError(f"interior: expected None (auto), True or False, got {self.interior!r}")
        check_int(self.n_boot, "n_boot", minimum=0)  # 0: no interval (means only)
        put("seed", check_seed(self.seed))
        put("config", SearchConfig.of(self.config, seed=self.seed))
        if self.batch_size is not None:
            put("batch_size", check_int(self.batch_size, "batch_size", minimum=1))
        put("device", resolve_device(self.device))
        for name in ("calibrate", "progress"):
            flag = getattr(self, name)
            if not isinstance(flag, bool) and not (name == "progress" and flag is None):
                raise TypeError(f"{name}: expected True or False, got {flag!r}")
        put("max_image_pixels", check_int(self.max_image_pixels, "max_image_pixels", minimum=1))
        if self.memory_budget is not None:
            put("memory_budget", parse_bytes(self.memory_budget))
        if not isinstance(self.floor_cache, (bool, str, os.PathLike)) or self.floor_cache == "":
            raise TypeError(f"floor_cache: expected True (the user cache), False (off) or a folder, got "
                            f"{self.floor_cache!r}")


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
