"""The typed result of one (layer, transformation): frozen values, built in one place.

:func:`invariance.measure` returns a :class:`invariance.Report` whose ``records`` are
:class:`LayerRecord` values, built by :meth:`LayerRecord.build` from the measurement core's
per-image :class:`invariance.LayerResult`. Everything that reads a result (the table, the CSV,
the figures, the demo, ``stn``) reads these fields; JSON exists only at
:meth:`invariance.Report.save` / :meth:`invariance.Report.load`, in the versioned schema
:data:`SCHEMA` described field by field in ``docs/report-schema.md`` (generated from these
types by ``python scripts/report_schema.py``; a test keeps it current).

Reading a record by string key (``record["spatial_error"]``, the layout of schema 1) still
works in this minor version and gives the same values; it is deprecated (see
``docs/report-schema.md``) and will be removed in the next one.

Example
-------
>>> import torch, invariance
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU())
>>> rep = invariance.measure(net, torch.rand(4, 1, 24, 24), "rotation:90", layers="1",
...                          channels=("spatial",), n_boot=50, progress=False)
>>> rec = rep.records[0]
>>> rec.transform == invariance.Transform("rotation", (90.0,)), rec.errors.spatial.mean <= rec.errors.expected.mean
(True, True)
>>> rec.errors.spatial.n_excluded, len(rec.errors.spatial.per_image)
(0, 4)
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._transform import Transform

if TYPE_CHECKING:  # pragma: no cover
    from ._metric import LayerResult

__all__ = ["bootstrap_ci", "linear_warning",
           "SCHEMA", "ERROR_KINDS", "Estimate", "Errors", "BestWarp", "Comparison", "Calibration", "ChannelMatch",
           "LayerRecord", "WARP_FRAME", "Infinitesimal"]

SCHEMA = "invariance-report/2"
"""The JSON schema :meth:`invariance.Report.save` writes (``report.json``'s ``"schema"``); reports
of schema 1 (no ``"schema"`` key: flat string-keyed records) still load."""

ERROR_KINDS = ("invariance", "expected", "spatial", "permutation", "linear", "linear_fit")
"""The errors of a record, in the order of docs/definitions.md (``linear_fit``: in-sample)."""

WARP_FRAME = "image centred frame (pixels, degrees); the warp applied to the transformed maps"


NAN = float("nan")
"""The one NaN object of the records: equal records compare equal even where a value is NaN
(tuples compare elements by identity first, and ``nan != nan``)."""


def _f(v) -> float:
    """A float, NaN for None (JSON's null)."""
    return NAN if v is None else _canon(float(v))


def _canon(v):
    """``v`` with every float NaN replaced by :data:`NAN` (inside tuples too)."""
    if isinstance(v, float):
        return NAN if v != v else v
    if isinstance(v, tuple):
        return tuple(_canon(x) for x in v)
    return v


class _Canonical:
    """Frozen dataclasses whose float fields hold the one :data:`NAN` (see there)."""

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            c = _canon(v)
            if c is not v:
                object.__setattr__(self, f.name, c)


def _nan_to_none(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


@dataclass(frozen=True)
class Estimate(_Canonical):
    """A mean over the images with a verdict, its bootstrap interval and the per-image values.

    Attributes:
        mean: mean over the images with a finite value (NaN when none has one).
        ci: 95% percentile-bootstrap interval of the mean (``(mean, mean)`` for one image or
            ``n_boot=0``; NaNs when no image has a value).
        per_image: the value of every image, NaN where it has no verdict.
        n_excluded: images without a verdict (NaN), left out of the mean.
        reasons: why, one entry per distinct reason.
    """

    mean: float
    ci: tuple[float, float]
    per_image: tuple[float, ...] = ()
    n_excluded: int = 0
    reasons: tuple[str, ...] = ()

    @classmethod
    def of(cls, values: torch.Tensor | np.ndarray, n_boot: int, seed: int, reasons=()) -> Estimate:
        """Mean, bootstrap interval (:func:`invariance.bootstrap_ci`) and per-image values."""
        v = (values.detach().double().cpu().numpy() if isinstance(values, torch.Tensor)
             else np.asarray(values, dtype=float))
        finite = v[np.isfinite(v)]
        mean = float(finite.mean()) if finite.size else float("nan")
        return cls(mean=mean, ci=tuple(bootstrap_ci(v, n_boot, seed=seed)), per_image=tuple(v.tolist()),
                   n_excluded=int(v.size - finite.size), reasons=tuple(sorted({r for r in reasons if r})))

    def to_json(self) -> dict:
        return {"mean": _nan_to_none(self.mean), "ci": [_nan_to_none(c) for c in self.ci],
                "per_image": [_nan_to_none(v) for v in self.per_image], "n_excluded": self.n_excluded,
                "reasons": list(self.reasons)}

    @classmethod
    def from_json(cls, d: dict) -> Estimate:
        ci = d.get("ci") or [None, None]
        return cls(mean=_f(d.get("mean")), ci=(_f(ci[0]), _f(ci[1])),
                   per_image=tuple(_f(v) for v in d.get("per_image", [])), n_excluded=int(d.get("n_excluded", 0)),
                   reasons=tuple(d.get("reasons", [])))


@dataclass(frozen=True)
class Errors:
    """The errors of one record (docs/definitions.md); ``None`` where the channel was not asked for.

    Attributes:
        invariance: ``||F_h - F||^2 / ||F||^2``, no alignment at all.
        expected: ``||W_{h^-1} F_h - F||^2 / ||F||^2``, the warp an STN "should" apply.
        spatial: the best warp of the search family.
        permutation: the best warp and channel permutation.
        linear: the best warp and a ``C x C`` channel map fitted on other images (held out).
        linear_fit: the same map scored on the images it was fitted on (in sample).
    """

    invariance: Estimate
    expected: Estimate
    spatial: Estimate
    permutation: Estimate | None = None
    linear: Estimate | None = None
    linear_fit: Estimate | None = None

    def items(self):
        """``(kind, Estimate)`` of the errors that were measured, in :data:`ERROR_KINDS` order."""
        return [(k, getattr(self, k)) for k in ERROR_KINDS if getattr(self, k) is not None]


@dataclass(frozen=True)
class BestWarp(_Canonical):
    """The best spatial warp found per image (what :func:`invariance.align` returned).

    Attributes:
        family: the search family (:data:`invariance.SEARCH_FAMILIES`), not the transformation's.
        param_names: the family's parameters.
        median: per-parameter median over the images (angles as a circular median).
        per_image: the parameters of every image, in the image's centred frame (pixels, degrees),
            as applied to the transformed image's maps.
        matrices: the same warps as normalised ``3 x 3`` matrices in the layer's frame
            (input -> output), one per image.
        frame: what the parameters are relative to.
    """

    family: str
    param_names: tuple[str, ...]
    median: tuple[float, ...]
    per_image: tuple[tuple[float, ...], ...]
    matrices: tuple[tuple[tuple[float, ...], ...], ...] = ()
    frame: str = WARP_FRAME


@dataclass(frozen=True)
class Comparison(_Canonical):
    """How the maps were compared (docs/definitions.md, the comparison region ``R_g = M I V_g``).

    Attributes:
        overlap: mean over the images with a verdict of the share of ``M * I`` the best warp keeps.
        interior: whether the receptive-field interior ``I`` was applied.
        region_size: positions of ``M * I`` in the layer's map.
        positions: per image, the positions of the best warp's region ``R_g`` (NaN: no verdict).
        signal: per image, the share of the reference's signal on ``M * I`` that ``R_g`` carries
            (docs/definitions.md, "What a verdict needs").
        overlaps: per image, the share of ``M * I`` the best warp keeps (NaN: no verdict); their
            mean over the images with a verdict is :attr:`overlap`.
    """

    overlap: float
    interior: bool
    region_size: int
    positions: tuple[float, ...] = ()
    signal: tuple[float, ...] = ()
    overlaps: tuple[float, ...] = ()

    @property
    def mean_positions(self) -> float:
        """Mean of :attr:`positions` over the images with a verdict (NaN when none)."""
        return _finite_mean(self.positions)

    @property
    def mean_signal(self) -> float:
        """Mean of :attr:`signal` over the images with a verdict (NaN when none)."""
        return _finite_mean(self.signal)


def _finite_mean(values) -> float:
    v = [x for x in values if x == x and math.isfinite(x)]
    return sum(v) / len(v) if v else NAN


@dataclass(frozen=True)
class Calibration:
    """The two calibrations of docs/definitions.md, each with its interval (None when not computed).

    Attributes:
        floor: the interpolation floor (the spatial error of the input itself under the same
            transformation and search; the same for every layer of a transformation).
        null: the random-pair null (the spatial error between an image's maps and the
            transformed maps of another image).
    """

    floor: Estimate | None = None
    null: Estimate | None = None


@dataclass(frozen=True)
class ChannelMatch(_Canonical):
    """The channel permutation found on top of the best warp (None when not asked for).

    Attributes:
        permutation: the most frequent permutation over the images (``aligned[c] = warped[perm[c]]``).
        agreement: the share of images whose permutation is that one.
        orbits: its cycles (channel orbits), e.g. ``((0, 1),)`` for a W/M swap.
    """

    permutation: tuple[int, ...] | None = None
    agreement: float | None = None
    orbits: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Infinitesimal:
    """The infinitesimal view of a record (docs/definitions.md, "The infinitesimal view"); each value
    an :class:`Estimate` over the images.

    Attributes:
        lie: ``r²``, the energy of the layer's Lie derivative along the transformation's
            logarithm over the map's (the second-order prediction of the expected-warp error).
        aligned: ``a²``, the part no infinitesimal warp of the search family explains (the
            second-order prediction of the spatial error).
        share: ``a² / r²``, the unexplained share.
        floor: the grid floor: ``a²`` of the layer's response to sub-pixel translation alone,
            carried along the transformation's velocity (None when not calibrated).
        null: ``a²`` of another image's Lie derivative (None when not calibrated).
        method: how the image derivative went through the network (forward-mode AD or central
            differences).
        specific: ``s²``, the part no warp explains beyond the grid's response (the network's
            commutator with the transformation's velocity field; None when not calibrated).
    """

    lie: Estimate
    aligned: Estimate
    share: Estimate
    floor: Estimate | None = None
    null: Estimate | None = None
    method: str = ""
    specific: Estimate | None = None

    KINDS = ("lie", "aligned", "share", "floor", "null", "specific")

    @property
    def mark(self) -> str:
        """``"at floor"`` when the aligned interval reaches the grid floor's, else ``""``."""
        if self.floor is None:
            return ""
        return "at floor" if self.aligned.ci[0] <= max(self.floor.ci[1], self.floor.mean) else ""

    def to_json(self) -> dict:
        out = {k: (None if getattr(self, k) is None else getattr(self, k).to_json()) for k in self.KINDS}
        out["method"] = self.method
        return out

    @classmethod
    def from_json(cls, d: dict) -> Infinitesimal:
        return cls(**{k: (None if d.get(k) is None else Estimate.from_json(d[k])) for k in cls.KINDS},
                   method=str(d.get("method", "")))

    @property
    def specific_share(self) -> float:
        """``s² / r²`` of the means (NaN without ``specific``): near 0, the layer's response to the
        transformation is what its response to local translation gives (a covariant layer)."""
        if self.specific is None or not self.lie.mean > 0:
            return NAN
        return self.specific.mean / self.lie.mean


@dataclass(frozen=True)
class LayerRecord:
    """Everything measured for one layer under one transformation.

    Attributes:
        layer: the layer's name (``input`` for the image itself).
        depth: its position among the layers measured (0 first).
        transform: the image transformation, a :class:`invariance.Transform` (equal by parameters).
        errors: :class:`Errors`, each an :class:`Estimate`.
        best_warp: :class:`BestWarp`.
        comparison: :class:`Comparison`.
        calibration: :class:`Calibration`.
        channels: :class:`ChannelMatch`.
        linear_warning: why the held-out linear error cannot be trusted, or None
            (:func:`invariance.linear_warning`).
        lie: :class:`Infinitesimal` (the ``lie`` channel), or None when not asked for.
    """

    layer: str
    depth: int
    transform: Transform
    errors: Errors
    best_warp: BestWarp
    comparison: Comparison
    calibration: Calibration = field(default_factory=Calibration)
    channels: ChannelMatch = field(default_factory=ChannelMatch)
    linear_warning: str | None = None
    lie: Infinitesimal | None = None

    # ------------------------------------------------------------------ derived
    @property
    def search(self) -> str:
        """The search family (the same as ``best_warp.family``)."""
        return self.best_warp.family

    @property
    def n_excluded(self) -> int:
        """Images without a verdict (the spatial error's)."""
        return self.errors.spatial.n_excluded

    @property
    def ratio_to_null(self) -> float:
        """The spatial error over the random-pair null (NaN without a null): near 1, the best warp
        aligns the transformed maps no better than it aligns another image's."""
        null = self.calibration.null
        if null is None or not null.mean > 0:
            return NAN
        return self.errors.spatial.mean / null.mean

    @property
    def mark(self) -> str:
        """``"at floor"`` when the spatial error's interval reaches the interpolation floor's (the
        instrument cannot tell it from interpolation), ``"at null"`` when it reaches the random-pair
        null's (no better than another image), else ``""``. A NaN anywhere marks nothing."""
        lo, hi = self.errors.spatial.ci
        floor, null = self.calibration.floor, self.calibration.null
        if floor is not None and lo <= max(floor.ci[1], floor.mean):
            return "at floor"
        if null is not None and hi >= min(null.ci[0], null.mean):
            return "at null"
        return ""

    @property
    def excluded_reasons(self) -> tuple[str, ...]:
        """Why images have no verdict, over every error of the record."""
        return tuple(sorted({r for _, e in self.errors.items() for r in e.reasons}))

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, res: LayerResult, transform: Transform, depth: int, n_boot: int, seed: int,
              floor: Estimate | None = None, lie=None) -> LayerRecord:
        """The record of one :class:`invariance.LayerResult`: means over the images with a verdict,
        bootstrap intervals, per-image values, the best warps and the channel orbits."""
        reasons = [r for r in res.reasons if r is not None]

        def est(vals):
            return None if vals is None else Estimate.of(vals, n_boot, seed, reasons)

        errors = Errors(invariance=est(res.invariance), expected=est(res.expected), spatial=est(res.spatial),
                        permutation=est(res.permutation), linear=est(res.linear), linear_fit=est(res.linear_fit))
        ok = torch.isfinite(res.spatial)
        ov = res.overlap[ok]

        def kept(v):  # per image, NaN where the image has no verdict
            return () if v is None else tuple(torch.where(ok, v.double(), torch.nan).tolist())
        params = res.params.numpy()
        warp = BestWarp(family=res.param_family, param_names=tuple(res.param_names),
                        median=tuple(_median_params(params, res.param_names).round(4).tolist()),
                        per_image=tuple(tuple(p) for p in params.round(4).tolist()),
                        matrices=tuple(tuple(tuple(row) for row in m) for m in res.matrices.double().tolist()))
        channels = ChannelMatch(orbits=tuple(tuple(c) for c in res.orbits))
        if res.permutations is not None:
            perms = [tuple(p) for p in res.permutations.tolist()]
            modal, count = Counter(perms).most_common(1)[0]
            channels = ChannelMatch(permutation=tuple(modal), agreement=count / len(perms), orbits=channels.orbits)
        null = None if res.null is None else Estimate.of(res.null, n_boot, seed)
        warning = linear_warning(errors.linear.mean if errors.linear else float("nan"), errors.spatial.mean,
                                 null.mean if null else float("nan"))
        return cls(layer=res.layer, depth=depth, transform=transform, errors=errors, best_warp=warp,
                   comparison=Comparison(overlap=float(ov.mean()) if ov.numel() else float("nan"),
                                         interior=bool(res.interior), region_size=int(res.region_size),
                                         positions=kept(res.positions), signal=kept(res.signal),
                                         overlaps=kept(res.overlap)),
                   calibration=Calibration(floor=floor, null=null), channels=channels, linear_warning=warning,
                   lie=None if lie is None else _infinitesimal(lie, n_boot, seed))

    @classmethod
    def merge(cls, records, context, n_boot: int, seed: int) -> LayerRecord:
        """One record from the records of the shards of an image set (in shard order), each without
        its first ``context[i]`` images: per-image values concatenated, means and bootstrap intervals
        recomputed (:meth:`Estimate.of`), the overlap the mean of the per-image overlaps. Merging one
        record with no context recomputes its intervals the same way, so a sharded and an unsharded
        sweep (:mod:`invariance.sweep`) go through the same arithmetic.

        >>> import torch, invariance
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU()).double()
        >>> x = torch.rand(6, 1, 12, 12, dtype=torch.float64)
        >>> kw = dict(layers="1", channels="spatial", n_boot=20, progress=False, floor_cache=False)
        >>> whole = invariance.measure(net, x, "rotation:90", **kw).records[0]
        >>> a = invariance.measure(net, x[:3], "rotation:90", **kw).records[0]
        >>> b = invariance.measure(net, x[3:], "rotation:90", **kw).records[0]
        >>> merged = LayerRecord.merge([a, b], [0, 0], 20, 0).errors.spatial
        >>> bool(np.allclose(merged.per_image, whole.errors.spatial.per_image, rtol=0, atol=1e-12, equal_nan=True))
        True
        """
        if not records or len(records) != len(context):
            raise ValueError("records: one context count per record, at least one record")
        first = records[0]

        def cut(values, c):
            return list(values)[c:]

        def joined(get):
            return [v for r, c in zip(records, context) for v in cut(get(r), c)]

        def est(get) -> Estimate | None:
            parts = [get(r) for r in records]
            if any(p is None for p in parts):
                return None
            reasons = sorted({x for p in parts for x in p.reasons})
            return Estimate.of(np.asarray(joined(lambda r: get(r).per_image), dtype=float), n_boot, seed, reasons)

        errors = Errors(**{k: est(lambda r, k=k: getattr(r.errors, k)) for k in ERROR_KINDS})
        params = joined(lambda r: r.best_warp.per_image)
        names = first.best_warp.param_names
        median = (tuple(_median_params(np.asarray(params, dtype=float), names).round(4).tolist()) if params
                  else first.best_warp.median)
        warp = BestWarp(family=first.best_warp.family, param_names=names, median=median, per_image=tuple(params),
                        matrices=tuple(joined(lambda r: r.best_warp.matrices)), frame=first.best_warp.frame)
        positions, overlaps = joined(lambda r: r.comparison.positions), joined(lambda r: r.comparison.overlaps)
        if len(overlaps) == len(positions):
            overlap = _finite_mean(overlaps)
        elif len(records) == 1 and not context[0]:
            overlap = first.comparison.overlap
        else:
            raise ValueError("records: a record without per-image overlaps (written before they were kept) cannot "
                             "be merged with others; measure it again")
        comp = Comparison(overlap=overlap, interior=first.comparison.interior,
                          region_size=first.comparison.region_size, positions=tuple(positions),
                          signal=tuple(joined(lambda r: r.comparison.signal)), overlaps=tuple(overlaps))
        null = est(lambda r: r.calibration.null)
        warning = linear_warning(errors.linear.mean if errors.linear else NAN, errors.spatial.mean,
                                 null.mean if null else NAN)
        lie = None
        if all(r.lie is not None for r in records):
            lie = Infinitesimal(**{k: est(lambda r, k=k: getattr(r.lie, k)) for k in Infinitesimal.KINDS},
                                method=first.lie.method)
        return cls(layer=first.layer, depth=first.depth, transform=first.transform, errors=errors, best_warp=warp,
                   comparison=comp, calibration=Calibration(floor=est(lambda r: r.calibration.floor), null=null),
                   channels=first.channels, linear_warning=warning, lie=lie)

    # ------------------------------------------------------------------ JSON (schema 2)
    def to_json(self) -> dict:
        """This record as schema-2 JSON (NaN written as null)."""
        t = self.transform
        return {
            "layer": self.layer, "depth": self.depth,
            "transform": {"family": t.family, "params": list(t.params), "label": t.label},
            "errors": {k: e.to_json() for k, e in self.errors.items()},
            "best_warp": {"family": self.best_warp.family, "param_names": list(self.best_warp.param_names),
                          "median": [_nan_to_none(v) for v in self.best_warp.median],
                          "per_image": [[_nan_to_none(v) for v in p] for p in self.best_warp.per_image],
                          "matrices": [[[_nan_to_none(v) for v in row] for row in m]
                                       for m in self.best_warp.matrices],
                          "frame": self.best_warp.frame},
            "comparison": {"overlap": _nan_to_none(self.comparison.overlap), "interior": self.comparison.interior,
                           "region_size": self.comparison.region_size,
                           "positions": [_nan_to_none(v) for v in self.comparison.positions],
                           "signal": [_nan_to_none(v) for v in self.comparison.signal],
                           "overlaps": [_nan_to_none(v) for v in self.comparison.overlaps]},
            "calibration": {"floor": None if self.calibration.floor is None else self.calibration.floor.to_json(),
                            "null": None if self.calibration.null is None else self.calibration.null.to_json()},
            "channels": {"permutation": None if self.channels.permutation is None else list(self.channels.permutation),
                         "agreement": self.channels.agreement,
                         "orbits": [list(c) for c in self.channels.orbits]},
            "linear_warning": self.linear_warning,
            "derived": {"spatial_over_null": _nan_to_none(self.ratio_to_null), "mark": self.mark},
            **({} if self.lie is None else {"lie": self.lie.to_json()}),
        }

    @classmethod
    def from_json(cls, d: dict) -> LayerRecord:
        """A record from schema-2 JSON."""
        tr = d["transform"]
        errs = {k: Estimate.from_json(v) for k, v in d["errors"].items()}
        bw, cmp_, cal, ch = d["best_warp"], d["comparison"], d.get("calibration") or {}, d.get("channels") or {}
        return cls(
            layer=str(d["layer"]), depth=int(d["depth"]),
            transform=Transform(tr["family"], tuple(float(p) for p in tr["params"])),
            errors=Errors(**{k: errs.get(k) for k in ERROR_KINDS}),
            best_warp=BestWarp(family=bw["family"], param_names=tuple(bw["param_names"]),
                               median=tuple(_f(v) for v in bw["median"]),
                               per_image=tuple(tuple(_f(v) for v in p) for p in bw["per_image"]),
                               matrices=tuple(tuple(tuple(_f(v) for v in row) for row in m)
                                              for m in bw.get("matrices", [])),
                               frame=bw.get("frame", WARP_FRAME)),
            comparison=Comparison(overlap=_f(cmp_["overlap"]), interior=bool(cmp_["interior"]),
                                  region_size=int(cmp_["region_size"]),
                                  positions=tuple(_f(v) for v in cmp_.get("positions", [])),
                                  signal=tuple(_f(v) for v in cmp_.get("signal", [])),
                                  overlaps=tuple(_f(v) for v in cmp_.get("overlaps", []))),
            calibration=Calibration(floor=None if cal.get("floor") is None else Estimate.from_json(cal["floor"]),
                                    null=None if cal.get("null") is None else Estimate.from_json(cal["null"])),
            channels=ChannelMatch(permutation=None if ch.get("permutation") is None else tuple(ch["permutation"]),
                                  agreement=ch.get("agreement"),
                                  orbits=tuple(tuple(c) for c in ch.get("orbits", []))),
            linear_warning=d.get("linear_warning"),
            lie=None if d.get("lie") is None else Infinitesimal.from_json(d["lie"]),
        )

    @classmethod
    def from_legacy(cls, r: dict, floor: dict | None = None) -> LayerRecord:
        """A record from a schema-1 report (flat string keys, as written before schema 2)."""
        def est(key, reasons=()):
            if r.get(key) is None and key + "_ci" not in r:
                return None
            per = (r.get("per_image") or {}).get(key, [])
            if r.get(key) is None and not per and key not in ("invariance_error", "expected_error", "spatial_error"):
                return None
            ci = r.get(key + "_ci") or [None, None]
            n_ex = sum(1 for v in per if v is None or not math.isfinite(_f(v)))
            return Estimate(mean=_f(r.get(key)), ci=(_f(ci[0]), _f(ci[1])), per_image=tuple(_f(v) for v in per),
                            n_excluded=n_ex if per else int(r.get("n_excluded", 0)), reasons=tuple(reasons))

        reasons = tuple(r.get("excluded_reasons", []))
        label = r["transform"]
        family, _, rest = label.partition(":")
        transform = Transform(r.get("family", family), tuple(float(v) for v in rest.split(",")))
        bp = r.get("best_params") or {}
        null = None
        if r.get("random_pair_null") is not None:
            ci = r.get("random_pair_null_ci") or [None, None]
            null = Estimate(mean=_f(r["random_pair_null"]), ci=(_f(ci[0]), _f(ci[1])))
        fl = None
        if floor and label in floor:
            ci = floor[label].get("ci") or [None, None]
            fl = Estimate(mean=_f(floor[label].get("mean")), ci=(_f(ci[0]), _f(ci[1])))
        perm = r.get("permutation")
        return cls(
            layer=str(r["layer"]), depth=int(r.get("depth", 0)), transform=transform,
            errors=Errors(invariance=est("invariance_error", reasons), expected=est("expected_error", reasons),
                          spatial=est("spatial_error", reasons), permutation=est("permutation_error", reasons),
                          linear=est("linear_error", reasons), linear_fit=est("linear_fit_error", reasons)),
            best_warp=BestWarp(family=bp.get("family", r.get("search", "")),
                               param_names=tuple(bp.get("param_names", [])),
                               median=tuple(_f(v) for v in bp.get("median", [])),
                               per_image=tuple(tuple(_f(v) for v in p) for p in bp.get("per_image", [])),
                               frame=bp.get("frame", WARP_FRAME)),
            comparison=Comparison(overlap=_f(r.get("overlap")), interior=bool(r.get("interior", False)),
                                  region_size=int(r.get("region_size", 0))),
            calibration=Calibration(floor=fl, null=null),
            channels=ChannelMatch(permutation=None if perm is None else tuple(perm),
                                  agreement=r.get("permutation_agreement"),
                                  orbits=tuple(tuple(c) for c in r.get("channel_orbits", []))),
            linear_warning=r.get("linear_warning"),
        )

    # ------------------------------------------------------------------ deprecated mapping access
    def legacy(self) -> dict[str, Any]:
        """This record in the flat layout of schema 1 (``{"spatial_error": ..., ...}``).

        Deprecated, for one minor version: read the fields instead (``record.errors.spatial.mean``)."""
        out: dict[str, Any] = {"layer": self.layer, "depth": self.depth, "transform": self.transform.label,
                               "family": self.transform.family, "magnitude": self.transform.magnitude,
                               "search": self.search, "per_image": {}}
        for kind in ERROR_KINDS:
            e = getattr(self.errors, kind)
            key = kind + "_error"
            if e is None:
                out[key], out[key + "_ci"] = float("nan"), [float("nan")] * 2
                continue
            out[key], out[key + "_ci"] = e.mean, list(e.ci)
            out["per_image"][key] = list(e.per_image)
        out["n_excluded"] = self.n_excluded
        out["excluded_reasons"] = list(self.excluded_reasons)
        out["overlap"] = self.comparison.overlap
        out["interior"] = self.comparison.interior
        out["region_size"] = self.comparison.region_size
        out["best_params"] = {"family": self.best_warp.family, "frame": self.best_warp.frame,
                              "param_names": list(self.best_warp.param_names), "median": list(self.best_warp.median),
                              "per_image": [list(p) for p in self.best_warp.per_image]}
        if self.channels.permutation is not None:
            out["permutation"] = list(self.channels.permutation)
            out["permutation_agreement"] = self.channels.agreement
        out["channel_orbits"] = [list(c) for c in self.channels.orbits]
        if self.calibration.null is not None:
            out["random_pair_null"] = self.calibration.null.mean
            out["random_pair_null_ci"] = list(self.calibration.null.ci)
        if self.linear_warning:
            out["linear_warning"] = self.linear_warning
        if self.calibration.floor is not None:
            out["interpolation_floor"] = self.calibration.floor.mean
        return out

    def __getitem__(self, key: str):
        """Deprecated: ``record["spatial_error"]`` reads the schema-1 layout (see :meth:`legacy`)."""
        return self.legacy()[key]

    def get(self, key: str, default=None):
        """Deprecated, as ``record[key]``."""
        return self.legacy().get(key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.legacy()

    def keys(self):
        """Deprecated: the keys of the schema-1 layout."""
        return self.legacy().keys()


def _infinitesimal(res, n_boot: int, seed: int) -> Infinitesimal:
    """The :class:`Infinitesimal` of a :class:`invariance.LieResult` (per-image values to estimates)."""
    reasons = [r for r in res.reasons if r is not None]

    def est(v):
        return None if v is None else Estimate.of(v, n_boot, seed, reasons)

    return Infinitesimal(lie=est(res.lie), aligned=est(res.aligned), share=est(res.share), floor=est(res.floor),
                         null=est(res.null), method=res.method, specific=est(res.specific))


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


def schema_markdown() -> str:
    """``docs/report-schema.md``: the JSON layout of a report, generated from the types above."""
    import inspect
    import re


    def md(text: str) -> str:  # reStructuredText roles and literals as markdown code
        text = re.sub(r":(?:class|func|data|meth):`~?(?:invariance\.)?([^`]+)`", r"`\1`", text)
        return text.replace("``", "`")

    def table(cls) -> list[str]:
        doc = [md(p) for p in inspect.getdoc(cls).split("\n\n")]
        lines = [f"### `{cls.__name__}`", "", doc[0].replace("\n", " ").strip(), "",
                 "| field | type | meaning |", "|---|---|---|"]
        attrs = _attribute_docs(cls)
        for f in fields(cls):
            typ = str(f.type).replace("|", "\\|")
            meaning = md(attrs.get(f.name, "")).replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{typ}` | {meaning} |")
        return lines + [""]

    out = ["# Report schema", "", f"`report.json` written by `Report.save` carries `\"schema\": \"{SCHEMA}\"`.",
           "This page is generated from the types in `invariance/_record.py` "
           "(`python scripts/report_schema.py`); a test checks it is current.", "",
           "```", "{", f'  "schema": "{SCHEMA}",',
           '  "records": [LayerRecord, ...],     // one per (transformation, layer)',
           '  "calibration": {"interpolation_floor": {LABEL: {"mean", "ci"}},',
           '                  "random_pair_null": {LAYER: {LABEL: {"mean", "ci"}}}},   // read from the records',
           '  "meta": {...},                     // how it was measured (model, images, search, seed, frames, ...)',
           '  "files": {NAME: {"bytes": N, "sha256": HEX}}   // the files saved before report.json',
           "}", "```", "",
           "NaN is written as `null`. A transformation is written as `{\"family\", \"params\", \"label\"}`; it is "
           "identified by its family and parameters, never by its label. Each record also carries `\"derived\": "
           "{\"spatial_over_null\", \"mark\"}` (`LayerRecord.ratio_to_null` and `LayerRecord.mark`), computed from "
           "its fields when saved and recomputed, not read, when loaded. A record of the `lie` channel carries "
           "`\"lie\"` (`Infinitesimal`); reports without it read as before.", "",
           "## Types", ""]
    for cls in (LayerRecord, Errors, Estimate, BestWarp, Comparison, Calibration, ChannelMatch, Infinitesimal,
                Transform):
        out += table(cls)
    out += ["## Schema 1 (before 0.2) and the deprecated mapping access", "",
            "Reports without a `\"schema\"` key hold flat records (`\"spatial_error\"`, `\"spatial_error_ci\"`, "
            "`\"best_params\"`, ...). `Report.load` reads them into the types above. "
            "`record[\"spatial_error\"]` and `record.get(...)` still read that flat layout from a typed record in this "
            "minor version (no Python warning is raised, as the test suite turns warnings into errors); they are "
            "deprecated and will be removed in the next minor version: read `record.errors.spatial.mean` instead.",
            ""]
    return "\n".join(out)


def _attribute_docs(cls) -> dict[str, str]:
    """``name: text`` pairs of the ``Attributes:`` section of a class docstring."""
    import inspect
    import re

    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    if "Attributes:" not in doc:
        return out
    body = doc.split("Attributes:", 1)[1]
    current = None
    for line in body.splitlines():
        m = re.match(r"^    ([a-z_, ]+): (.*)$", line)
        if m:
            names = [n.strip() for n in m[1].split(",")]
            for n in names:
                out[n] = m[2].strip()
            current = names
        elif current and line.startswith("        "):
            for n in current:
                out[n] += " " + line.strip()
        elif line.strip() == "":
            continue
        else:
            break
    return out
