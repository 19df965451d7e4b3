"""One call that measures how well a CNN's feature maps can be aligned under a transformation.

For every (layer, transformation) it computes, per image and then as means with bootstrap
confidence intervals over images, the five errors of DESIGN.md section 2:

===================  ========================================================================
``invariance``       ``||F_h - F||^2 / ||F||^2``, no alignment at all
``expected``         ``||W_{h^-1} F_h - F||^2 / ||F||^2``, the warp an STN "should" apply
``spatial``          best warp of the search family (:func:`invariance.search.align`)
``permutation``      best warp and channel permutation (Hungarian assignment)
``linear``           best warp and a C x C channel map, fitted on other images (held out)
===================  ========================================================================

with two calibrations: the *interpolation floor* (the spatial error of the input itself, the
identity network, under the same transformation and search) and the *random-pair null* (the
spatial error between an image's maps and the transformed maps of a different image). All norms
are over channels and the positions of the evaluation mask: the disk of radius ``mask_radius``
(normalised units) of each layer's own grid.

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
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from . import geometry as G
from .features import FeatureExtractor, LayerFrame
from .report import Report
from .search import SEARCH_FAMILIES, SearchConfig, align, channel_orbits, fit_linear, masked_error
from .warp import disk_mask, warp

__all__ = ["Transform", "parse_transforms", "measure", "CHANNEL_MODES", "DEFAULT_SEARCH",
           "bootstrap_ci", "as_image_batch"]

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
        fam = G.get_family(self.family)
        if len(self.params) != fam.n_params:
            raise ValueError(f"params: {self.family} takes {fam.n_params} parameters, got {len(self.params)}")

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


_SPEC_HELP = ("rotation:ANGLE, scale:FACTOR, translation:DX,DY, affine:a,b,c,d,e,f, or a sweep "
              "rotation:START..STOP:STEP, scale:START..STOP:COUNT (log-spaced), translation:START..STOP:STEP (x)")
_SPEC_FAMILIES = {"rotation": "rotation", "scale": "scale", "translation": "translation", "affine": "affine",
                  "similarity": "similarity", "rigid": "rigid", "projective": "projective",
                  "anisotropic_scale": "anisotropic_scale"}


def parse_transforms(spec: str | Iterable[str]) -> list[Transform]:
    """Parse SPEC strings (several may be joined with ``;``) into :class:`Transform` objects.

    >>> [t.label for t in parse_transforms("rotation:0..90:45; scale:0.5..2:3")]
    ['rotation:0', 'rotation:45', 'rotation:90', 'scale:0.5', 'scale:1', 'scale:2']
    >>> parse_transforms("translation:3,-2")[0].params
    (3.0, -2.0)
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
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
        detail = f" ({exc})" if str(exc) else ""
        raise ValueError(f"transform: cannot parse SPEC {s!r}{detail}; valid: {_SPEC_HELP}") from None


def bootstrap_ci(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over images (NaNs dropped).

    >>> lo, hi = bootstrap_ci(np.arange(100.0))
    >>> lo < 49.5 < hi
    True
    """
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
    """Accept ``(B, C, H, W)`` floats, or ``(B, H, W)`` / uint8 images (scaled to [0, 1])."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a tensor or array, got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W) or (B, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images: empty batch (B = 0)")
    if not images.is_floating_point():
        if images.dtype == torch.uint8:
            images = images.to(dtype) / 255.0
        else:
            images = images.to(dtype)
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images: contain NaN or infinite values")
    return images


def _check_channels(model: nn.Module, images: torch.Tensor) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels != images.shape[1]:
                raise ValueError(f"images: the model's first convolution {name!r} expects "
                                 f"{mod.in_channels} channel(s), got images with {images.shape[1]}")
            return


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
    mask_radius: float = 1.0,
    config: SearchConfig | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    calibrate: bool = True,
    progress: bool | None = None,
    model_name: str | None = None,
) -> Report:
    """Measure invariance, expected-transform, spatial, permutation and linear alignment errors.

    Args:
        model: any ``nn.Module`` mapping ``(B, C, H, W)`` images to outputs.
        images: ``(B, C, H, W)`` floats (or ``(B, H, W)`` / uint8, scaled to [0, 1]).
        transforms: :class:`Transform` objects or a SPEC string (see :func:`parse_transforms`).
        layers: ``"all"`` (every module with a 4-D output) or names (list or comma-separated);
            ``"input"`` is the input itself.
        search: search family (:data:`invariance.search.SEARCH_FAMILIES`); default per
            transformation family, :data:`DEFAULT_SEARCH`.
        channels: which of ``spatial``, ``permutation``, ``linear`` to compute (spatial always is).
        mask_radius: radius of the evaluation disk in each layer's normalised coordinates.
        config: :class:`invariance.search.SearchConfig` (grid resolution, refinement).
        n_boot: bootstrap resamples for the confidence intervals.
        seed: seeds the bootstrap, the linear-map folds and the refinement jitter.
        batch_size: images per forward pass (default: all at once).
        device: where to compute (default: the device of ``images``).
        calibrate: compute the interpolation floor and the random-pair null.
        progress: show a tqdm progress bar (default: when attached to a terminal).

    Returns:
        a :class:`invariance.report.Report` with one record per (layer, transformation).
    """
    t_start = time.time()
    if isinstance(transforms, str):
        transforms = parse_transforms(transforms)
    transforms = list(transforms)
    if not transforms:
        raise ValueError("transforms: no transformation given")
    channels = tuple(channels) if not isinstance(channels, str) else tuple(
        c.strip() for c in channels.split(",") if c.strip())
    bad = [c for c in channels if c not in CHANNEL_MODES]
    if bad:
        raise ValueError(f"channels: unknown channel matching {', '.join(bad)}; "
                         f"valid choices: {', '.join(CHANNEL_MODES)}")
    if search is not None and search not in SEARCH_FAMILIES:
        raise ValueError(f"search: unknown search family {search!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    x = as_image_batch(images)
    if device is not None:
        x = x.to(device)
        model = model.to(device)
    _check_channels(model, x)
    cfg = config or SearchConfig(seed=seed)
    extractor = FeatureExtractor(model, layers)
    size = tuple(x.shape[-2:])
    n = x.shape[0]

    def run(imgs):
        try:
            return extractor(imgs, batch_size)
        except (RuntimeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"model: forward pass failed on images of shape {tuple(imgs.shape)}: {first}") from None

    feats, frames = run(x)
    layer_names = list(feats)
    if not layer_names:
        raise ValueError("layers: the model has no layer with a 4-D output")

    from tqdm.auto import tqdm

    steps = len(transforms) * (len(layer_names) + (1 if calibrate else 0))
    bar = tqdm(total=steps, desc="measuring", unit="step", disable=(None if progress is None else not progress),
               leave=False)
    records: list[dict] = []
    floor: dict[str, dict] = {}
    for tr in transforms:
        fam = search or DEFAULT_SEARCH[tr.family]
        t_img = tr.matrix(size, torch.float64)
        xh = warp(x, t_img.to(x.dtype))
        feats_h, _ = run(xh)
        if calibrate:
            bar.set_postfix_str(f"{tr.label} floor")
            rec = _measure_layer(x, xh, LayerFrame.identity(size), t_img, fam, ("spatial",), mask_radius, cfg,
                                 n_boot, seed, null=False)
            floor[tr.label] = {"mean": rec["spatial_error"], "ci": rec["spatial_error_ci"]}
            bar.update()
        for name in layer_names:
            bar.set_postfix_str(f"{tr.label} {name}")
            rec = _measure_layer(feats[name], feats_h[name], frames[name], t_img, fam, channels, mask_radius, cfg,
                                 n_boot, seed, null=calibrate)
            rec = {"layer": name, "depth": layer_names.index(name), "transform": tr.label,
                   "family": tr.family, "magnitude": tr.magnitude, "search": fam, **rec}
            if calibrate:
                rec["interpolation_floor"] = floor[tr.label]["mean"]
            records.append(rec)
            bar.update()
    bar.close()
    null = {}
    for r in records:
        if "random_pair_null" in r:
            null.setdefault(r["layer"], {})[r["transform"]] = {"mean": r["random_pair_null"],
                                                                 "ci": r["random_pair_null_ci"]}
    meta = {
        "model": model_name or type(model).__name__,
        "n_images": n,
        "image_size": list(size),
        "image_channels": x.shape[1],
        "layers": layer_names,
        "transforms": [t.label for t in transforms],
        "search": search or "default per transformation family",
        "channels": list(channels),
        "mask_radius": mask_radius,
        "seed": seed,
        "n_boot": n_boot,
        "device": str(x.device),
        "dtype": str(x.dtype),
        "torch": torch.__version__,
        "seconds": round(time.time() - t_start, 2),
        "frames": {k: {"stride": list(f.stride), "offset": list(f.offset), "size": list(f.size),
                       "exact": f.exact} for k, f in frames.items()},
    }
    calibration = {"interpolation_floor": floor, "random_pair_null": null}
    return Report(records=records, calibration=calibration, meta=meta)


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


def _measure_layer(f, fh, frame: LayerFrame, t_img, family, channels, mask_radius, cfg, n_boot, seed, null):
    size = tuple(f.shape[-2:])
    dtype = f.dtype
    m = disk_mask(size, mask_radius, dtype=dtype, device=f.device).to(dtype)
    if not bool(m.any()):
        raise ValueError(f"mask_radius: {mask_radius} leaves no pixel of the {size[0]}x{size[1]} map in the "
                         "evaluation disk; use a larger radius (1.0 is the inscribed disk)")
    expected = frame.to_layer(G.inverse(t_img)).to(dtype=dtype, device=f.device)
    with torch.no_grad():
        e_inv = masked_error(f, fh, m)
        e_exp = masked_error(f, warp(fh, expected), m)
    extra = torch.stack([expected, torch.eye(3, dtype=dtype, device=f.device)])
    want_perm = "permutation" in channels
    res = align(f, fh, family, mask=m, channels="permutation" if want_perm else "spatial", config=cfg,
                extra_candidates=extra)
    sp = res.extra["spatial"] if want_perm else res
    out: dict = {}
    for key, vals in (("invariance_error", e_inv), ("expected_error", e_exp), ("spatial_error", sp.errors)):
        mean, ci, per = _stat(vals, n_boot, seed)
        out[key], out[key + "_ci"] = mean, ci
        out.setdefault("per_image", {})[key] = per
    fam = G.get_family(SEARCH_FAMILIES[family][0])
    img_params = G.from_matrix(fam, G.normalized_to_centred(frame.to_image(sp.matrices.double()), frame.input_size))
    out["best_params"] = {
        "family": fam.name,
        "frame": "image centred frame (pixels, degrees); the warp applied to the transformed maps",
        "param_names": list(fam.param_names),
        "median": _median_params(img_params.cpu().numpy(), fam.param_names).round(4).tolist(),
        "per_image": img_params.cpu().numpy().round(4).tolist(),
    }
    perm_res = None
    if want_perm:
        perm_res = res
        mean, ci, per = _stat(res.errors, n_boot, seed)
        out["permutation_error"], out["permutation_error_ci"] = mean, ci
        out["per_image"]["permutation_error"] = per
        perms = [tuple(p) for p in res.permutations.cpu().tolist()]
        modal, count = Counter(perms).most_common(1)[0]
        out["permutation"] = list(modal)
        out["permutation_agreement"] = count / len(perms)
        out["channel_orbits"] = channel_orbits(modal)
    else:
        out["permutation_error"], out["permutation_error_ci"] = float("nan"), [float("nan")] * 2
        out["channel_orbits"] = []
    if "linear" in channels:
        # A is shared by all images, g per image: the warp is taken from the best of a few per-image
        # choices (the spatial and permutation optima, the expected transformation), the one whose
        # cross-fitted (held-out) error is lowest; the in-sample bound is the per-image minimum.
        b = f.shape[0]
        choices = [(sp.matrices, None), (expected.expand(b, 3, 3), None)]
        if perm_res is not None:
            choices.append((perm_res.matrices, perm_res.permutations))
        fits = [fit_linear(f, fh, mats, mask=m, permutations=perms, seed=seed) for mats, perms in choices]
        best = min(fits, key=lambda d: float(torch.nan_to_num(d["held_out"], nan=float("inf")).mean()))
        lin = {"held_out": best["held_out"], "fit": torch.stack([d["fit"] for d in fits]).min(0).values}
        for key, vals in (("linear_error", lin["held_out"]), ("linear_fit_error", lin["fit"])):
            mean, ci, per = _stat(vals, n_boot, seed)
            out[key], out[key + "_ci"] = mean, ci
            out["per_image"][key] = per
    else:
        for key in ("linear_error", "linear_fit_error"):
            out[key], out[key + "_ci"] = float("nan"), [float("nan")] * 2
    if null:
        # random pair: image b against the transformed maps of image b+1
        fh_other = torch.roll(fh, 1, dims=0)
        if f.shape[0] > 1:
            # the null needs the same search, but not its last decimals: refine the best candidate only
            rn = align(f, fh_other, family, mask=m, channels="spatial", config=replace(cfg, top_k=1))
            mean, ci, _ = _stat(rn.errors, n_boot, seed)
        else:
            mean, ci = float("nan"), [float("nan")] * 2
        out["random_pair_null"], out["random_pair_null_ci"] = mean, ci
    return out

