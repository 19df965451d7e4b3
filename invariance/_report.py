"""The result of :func:`invariance.measure`: typed records, a table, JSON/CSV export and figures.

A :class:`Report` holds :class:`invariance.LayerRecord` values (one per (layer, transformation),
see ``invariance/_record.py`` and ``docs/report-schema.md``) and ``meta`` (how it was measured).
The table, the CSV and the figures read the records' fields; JSON exists only at
:meth:`Report.save` / :meth:`Report.load` (``report.json``, schema :data:`invariance.SCHEMA`;
reports of schema 1 still load).

A saved report folder is written as a whole: :meth:`Report.save` writes ``report.json`` last,
with ``files``, the size and sha256 of every file written before it (CSV, figures), and
:meth:`Report.load` refuses a folder whose files differ from that list (a save killed
half-way leaves the old ``report.json`` beside newer files) with a one-line
:class:`invariance.files.FolderError` (a ``ValueError``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from pathlib import Path

from ._record import ERROR_KINDS, SCHEMA, Estimate, LayerRecord, schema_markdown
from .files import atomic_write, atomic_write_json, atomic_write_text, check_files, describe_files

__all__ = ["Report", "ERROR_KEYS", "CSV_COLUMNS"]

#: The errors the table shows, in order (``linear_fit``, the in-sample linear error, is in the CSV only).
TABLE_KINDS = ("invariance", "expected", "spatial", "permutation", "linear")
#: Schema-1 names of the errors (the deprecated mapping access and the CSV's columns).
ERROR_KEYS = tuple(k + "_error" for k in TABLE_KINDS)

#: The columns of ``report.csv``, one row per record (``*_lo`` / ``*_hi``: the 95% interval).
CSV_COLUMNS = ["model", "layer", "depth", "transform", "family", "params", "magnitude", "search"]
for _name in (*(k + "_error" for k in ERROR_KINDS), "random_pair_null"):
    CSV_COLUMNS += [_name, _name + "_lo", _name + "_hi"]
CSV_COLUMNS += ["interpolation_floor", "interpolation_floor_lo", "interpolation_floor_hi", "spatial_over_null",
                "mark", "overlap", "positions", "signal", "interior", "region_size", "n_excluded", "best_params",
                "channel_orbits"]
#: The ``lie`` channel's columns (:class:`invariance.Infinitesimal`; empty when not measured).
LIE_COLUMNS = []
for _name in ("lie", "lie_aligned", "lie_share", "lie_floor", "lie_null", "lie_specific"):
    LIE_COLUMNS += [_name, _name + "_lo", _name + "_hi"]
CSV_COLUMNS += LIE_COLUMNS + ["lie_mark"]
CSV_COLUMNS = tuple(CSV_COLUMNS)


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _cell(e: Estimate | None, flag: str = "", spec: str = ".3f") -> str:
    """``mean [lo,hi]`` of an Estimate for the table (``-`` when absent)."""
    if e is None:
        return "-"
    lo, hi = e.ci
    return f"{_fmt(e.mean, spec)}{flag} [{_fmt(lo, spec)},{_fmt(hi, spec)}]"


def _positions(r: LayerRecord) -> str:
    """``kept/of`` positions of a record for the table (kept: the mean over images with a verdict)."""
    kept = r.comparison.mean_positions
    return f"{_fmt(kept, '.0f')}/{r.comparison.region_size}"


def _mean(e: Estimate | None) -> float:
    return float("nan") if e is None else e.mean


def _ci(e: Estimate | None) -> tuple[float, float]:
    return (float("nan"), float("nan")) if e is None else e.ci


class Report:
    """Typed records and metadata of a measurement (see the module docstring).

    ``records`` are :class:`invariance.LayerRecord` values; records in the flat layout of schema 1
    (dicts) are converted on the way in (``calibration`` then supplies their interpolation floors).
    """

    def __init__(self, records: list, calibration: dict | None = None, meta: dict | None = None):
        floors = (calibration or {}).get("interpolation_floor", {})
        self.records: list[LayerRecord] = [r if isinstance(r, LayerRecord) else LayerRecord.from_legacy(r, floors)
                                           for r in records]
        self.meta: dict = dict(meta or {})

    def __repr__(self) -> str:
        return f"Report({len(self.records)} records, model={self.meta.get('model', '?')!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Report) and self.records == other.records and self.meta == other.meta

    @staticmethod
    def schema_markdown() -> str:
        """``docs/report-schema.md``: the JSON layout of ``report.json``, generated from the record's types."""
        return schema_markdown()

    # ------------------------------------------------------------------ views
    @property
    def transforms(self) -> list:
        """The transformations measured, in order (:class:`invariance.Transform` values)."""
        return list(dict.fromkeys(r.transform for r in self.records))

    @property
    def calibration(self) -> dict:
        """``{"interpolation_floor": {label: {"mean", "ci"}}, "random_pair_null": {layer: {label: {...}}}}``,
        read from the records (each record carries its own :class:`invariance.Calibration`)."""
        floor, null = {}, {}
        for r in self.records:
            if r.calibration.floor is not None:
                floor[r.transform.label] = {"mean": r.calibration.floor.mean, "ci": list(r.calibration.floor.ci)}
            if r.calibration.null is not None:
                null.setdefault(r.layer, {})[r.transform.label] = {"mean": r.calibration.null.mean,
                                                                  "ci": list(r.calibration.null.ci)}
        return {"interpolation_floor": floor, "random_pair_null": null}

    def to_dict(self, per_image: bool = True) -> dict:
        """The report as schema-2 JSON (what ``report.json`` holds, less its ``files``)."""
        recs = [r.to_json() for r in self.records]
        if not per_image:
            for js in recs:
                for e in js["errors"].values():
                    e.pop("per_image", None)
                js["best_warp"].pop("per_image", None)
                js["best_warp"].pop("matrices", None)
        return {"schema": SCHEMA, "records": recs, "calibration": json_safe(self.calibration),
                "meta": self.meta}

    def select(self, layer: str | None = None, transform=None) -> list[LayerRecord]:
        """The records of one layer and/or one transformation (a :class:`invariance.Transform`, or
        its label)."""
        def same(r):
            return transform is None or (r.transform == transform if not isinstance(transform, str)
                                         else r.transform.label == transform)

        return [r for r in self.records if (layer is None or r.layer == layer) and same(r)]

    def table(self) -> str:
        """A plain-text table: one row per (transformation, layer), errors as mean [95% CI]."""
        kinds = [k for k in TABLE_KINDS
                 if any(not _isnan(_mean(getattr(r.errors, k))) for r in self.records)]
        excluded = any(r.n_excluded for r in self.records)
        head = ["transform", "layer"] + list(kinds) + ["null", "floor", "sp/null", "overlap", "positions", "signal",
                                                       "mark", "orbits"]
        head += ["excluded"] if excluded else []
        lie = any(r.lie is not None for r in self.records)
        head += ["lie r2", "lie a2", "lie floor", "lie null", "lie s2", "lie mark"] if lie else []
        rows = []
        for r in self.records:
            row = [r.transform.label, r.layer]
            for k in kinds:
                e = getattr(r.errors, k)
                flag = "!" if k == "linear" and r.linear_warning else ""
                row.append(_cell(e, flag))
            row += [_cell(r.calibration.null), _cell(r.calibration.floor), _fmt(r.ratio_to_null, ".2f"),
                    _fmt(r.comparison.overlap, ".2f"), _positions(r), _fmt(r.comparison.mean_signal, ".2f"),
                    r.mark or "-",
                    orbits_text(r.channels.orbits)]
            row += [str(r.n_excluded)] if excluded else []
            if lie:
                i = r.lie
                row += (["-"] * 6 if i is None else
                        [_cell(i.lie, spec=".2e"), _cell(i.aligned, spec=".2e"), _cell(i.floor, spec=".2e"),
                         _cell(i.null, spec=".2e"), _cell(i.specific, spec=".2e"), i.mark or "-"])
            rows.append(row)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        out.append("sp/null: spatial error over the random-pair null; overlap: share of the region M*I the best warp "
                   "keeps; positions: kept / of M*I (mean); signal: share of the reference's signal compared; mark: "
                   "the spatial interval reaches the floor's ('at floor') or the null's ('at null')"
                   + ("; lie r2 / a2: the Lie derivative's energy and the part no infinitesimal warp explains (second-"
                      "order predictions of the expected and spatial errors), lie floor: the grid's share, lie s2: "
                      "what no warp explains beyond the grid's response, lie mark: a2's interval reaches the grid "
                      "floor's"
                      if lie else ""))
        reasons = sorted({x for r in self.records for x in r.excluded_reasons})
        if reasons:
            out.append("excluded (no verdict, left out of the means): " + "; ".join(reasons))
        for r in self.records:
            if r.linear_warning:
                out.append(f"! {r.transform.label}, {r.layer}: {r.linear_warning}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    # ------------------------------------------------------------------ export
    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, json_safe(self.to_dict()))

    def csv_rows(self) -> list[dict]:
        """One dict per record, with the keys of :data:`CSV_COLUMNS`."""
        rows = []
        model = self.meta.get("model", "")
        for r in self.records:
            row = {"model": model, "layer": r.layer, "depth": r.depth, "transform": r.transform.label,
                   "family": r.transform.family, "params": json.dumps(list(r.transform.params)),
                   "magnitude": r.transform.magnitude, "search": r.search}
            for k in ERROR_KINDS:
                e = getattr(r.errors, k)
                row[k + "_error"], (row[k + "_error_lo"], row[k + "_error_hi"]) = _mean(e), _ci(e)
            row["random_pair_null"] = _mean(r.calibration.null)
            row["random_pair_null_lo"], row["random_pair_null_hi"] = _ci(r.calibration.null)
            row["interpolation_floor"] = _mean(r.calibration.floor)
            row["interpolation_floor_lo"], row["interpolation_floor_hi"] = _ci(r.calibration.floor)
            row["spatial_over_null"], row["mark"] = r.ratio_to_null, r.mark
            row.update(overlap=r.comparison.overlap, positions=r.comparison.mean_positions,
                       signal=r.comparison.mean_signal, interior=r.comparison.interior,
                       region_size=r.comparison.region_size, n_excluded=r.n_excluded,
                       best_params=json.dumps(list(r.best_warp.median)),
                       channel_orbits=json.dumps([list(c) for c in r.channels.orbits]))
            for name, kind in zip(("lie", "lie_aligned", "lie_share", "lie_floor", "lie_null", "lie_specific"),
                                  ("lie", "aligned", "share", "floor", "null", "specific")):
                e = None if r.lie is None else getattr(r.lie, kind)
                row[name], (row[name + "_lo"], row[name + "_hi"]) = _mean(e), _ci(e)
            row["lie_mark"] = "" if r.lie is None else r.lie.mark
            rows.append(row)
        return rows

    def to_csv(self, path: str | os.PathLike) -> Path:
        return write_csv(path, [self])

    @classmethod
    def load(cls, path: str | os.PathLike) -> Report:
        """Read a saved report: its folder or its ``report.json`` (see :meth:`from_json`).

        Reports are JSON: loading one runs no code. Errors are one line naming the path."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a report folder or report.json, got {type(path).__name__}")
        p = Path(path)
        if p.is_dir():
            p = p / "report.json"
        return cls.from_json(p)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Report:
        """Read ``report.json`` (schema 2, or schema 1 of earlier releases); refuses a report folder
        that mixes two saves (see the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: {str(path)!r} not found" + (" (no report.json in the folder)"
                                                                  if path.parent.is_dir() else ""))
        try:
            d = json.loads(path.read_text())
            records = d["records"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise TypeError("records is not a list of objects")
            schema = d.get("schema")
            if schema is None:  # schema 1: flat records, floors in the calibration
                report = cls(records=records, calibration=d.get("calibration") or {}, meta=d.get("meta") or {})
            elif schema == SCHEMA:
                report = cls(records=[LayerRecord.from_json(r) for r in records], meta=d.get("meta") or {})
            else:
                raise ValueError(f"unknown schema {schema!r}; this version reads {SCHEMA} and schema 1")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a report.json ({type(exc).__name__}: {_first(exc)})") from None
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
        if "files" in d:
            check_files(path.parent, d["files"], manifest=path.name)
        return report

    def save(self, out_dir: str | os.PathLike, figures: bool = True) -> dict[str, Path]:
        """Write ``report.csv``, the figures and, last, ``report.json`` (listing the others with
        their sha256) into ``out_dir``: a save killed half-way is detected by :meth:`load`."""
        from .files import check_output_dir

        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
        out = check_output_dir(out_dir, "out_dir")
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": self.to_csv(out / "report.csv")}
        if figures:
            paths.update(self.save_figures(out))
        for stale in set(_FIGURES) - {p.name for p in paths.values()}:  # figures of an earlier save
            (out / stale).unlink(missing_ok=True)
        d = json_safe(self.to_dict())
        d["files"] = describe_files(paths.values(), out)
        return {"json": atomic_write_json(out / "report.json", d), **paths}

    def save_figures(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        out = Path(out_dir)
        paths = {}
        fig = self.plot_layers()
        paths["layers"] = save_figure(fig, out / "errors_by_layer.png")
        plt.close(fig)
        if any(r.lie is not None for r in self.records):
            fig = self.plot_lie()
            paths["lie"] = save_figure(fig, out / "lie_by_layer.png")
            plt.close(fig)
        sweepable = {r.transform for r in self.records if not _isnan(r.transform.magnitude)}
        if len(sweepable) > 1:
            fig = self.plot_sweep()
            paths["sweep"] = save_figure(fig, out / "errors_by_magnitude.png")
            plt.close(fig)
        return paths

    # ------------------------------------------------------------------ figures
    def plot_layers(self, transforms: list | None = None, kinds=TABLE_KINDS, *, keys=None, ncols: int = 4):
        """Error against layer depth, one panel per transformation (every one: a grid of ``ncols``
        columns when there are many), each error with its 95% interval, the random-pair null with
        its interval and the interpolation floor with its interval.

        ``kinds``: which errors (:data:`invariance.ERROR_KINDS` names); ``keys`` (schema-1 names such
        as ``"spatial_error"``) is accepted for one minor version, deprecated."""

        if keys is not None:
            kinds = tuple(k.removesuffix("_error") for k in keys)
        transforms = list(transforms or self.transforms)
        fig, axes = _panels(len(transforms), ncols)
        for ax, tr in zip(axes.flat, transforms):
            recs = self.select(transform=tr)
            xs = list(range(len(recs)))
            for k in kinds:
                es = [getattr(r.errors, k) for r in recs]
                ys = [_mean(e) for e in es]
                if all(_isnan(y) for y in ys):
                    continue
                line, = ax.plot(xs, ys, marker="o", label=k)
                ax.fill_between(xs, [_ci(e)[0] for e in es], [_ci(e)[1] for e in es], alpha=0.2,
                                color=line.get_color())
            nulls = [r.calibration.null for r in recs]
            if any(e is not None and not _isnan(e.mean) for e in nulls):
                ax.plot(xs, [_mean(e) for e in nulls], color="grey", ls=":", label="random-pair null")
                ax.fill_between(xs, [_ci(e)[0] for e in nulls], [_ci(e)[1] for e in nulls], color="grey", alpha=0.12)
            floor = recs[0].calibration.floor if recs else None
            if floor is not None and not _isnan(floor.mean):
                ax.axhline(floor.mean, color="black", ls="--", lw=1, label="interpolation floor")
                ax.axhspan(floor.ci[0], floor.ci[1], color="black", alpha=0.08)
            ax.set_xticks(xs, [r.layer for r in recs], rotation=45, ha="right", fontsize=8)
            ax.set_title(tr if isinstance(tr, str) else tr.label)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel("normalised squared error")
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    def plot_lie(self, transforms: list | None = None, *, ncols: int = 4):
        """The infinitesimal view against layer depth (records of the ``lie`` channel), one panel per
        transformation: the Lie derivative's energy ``r²``, the part no infinitesimal warp explains
        ``a²``, the grid floor, the null and the part beyond the grid ``s²``, each with its 95%
        interval, on a log scale (they span
        orders of magnitude: a linear layer's floor is 0 up to rounding)."""

        transforms = [t for t in (transforms or self.transforms) if any(r.lie for r in self.select(transform=t))]
        fig, axes = _panels(len(transforms), ncols)
        styles = (("lie", "Lie derivative r²", {"marker": "o"}), ("aligned", "unexplained a²", {"marker": "s"}),
                  ("floor", "grid floor", {"color": "black", "ls": "--", "lw": 1}),
                  ("null", "null", {"color": "grey", "ls": ":"}),
                  ("specific", "beyond the grid s²", {"marker": "^"}))
        for ax, tr in zip(axes.flat, transforms):
            recs = [r for r in self.select(transform=tr) if r.lie is not None]
            xs = list(range(len(recs)))
            for kind, label, style in styles:
                es = [getattr(r.lie, kind) for r in recs]
                if all(e is None or _isnan(e.mean) for e in es):
                    continue
                line, = ax.plot(xs, [_mean(e) for e in es], label=label, **style)
                ax.fill_between(xs, [_ci(e)[0] for e in es], [_ci(e)[1] for e in es], alpha=0.15,
                                color=line.get_color())
            ax.set_yscale("log")
            ax.set_xticks(xs, [r.layer for r in recs], rotation=45, ha="right", fontsize=8)
            ax.set_title(tr if isinstance(tr, str) else tr.label)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        for row in axes:
            row[0].set_ylabel("second-order term (squared, relative)")
        axes.flat[0].legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    def plot_sweep(self, layers: list[str] | None = None, kind: str = "spatial", *, key: str | None = None):
        """The ``kind`` error against the transformation's magnitude, one line per layer with its 95%
        interval and its random-pair null (dotted), and the interpolation floor with its interval
        (``key``, a schema-1 name such as ``"spatial_error"``, is accepted for one minor version,
        deprecated)."""
        import matplotlib.pyplot as plt

        kind = (key or kind).removesuffix("_error")
        layers = layers or list(dict.fromkeys(r.layer for r in self.records))
        sweep = [r for r in self.records if not _isnan(r.transform.magnitude)]
        families = list(dict.fromkeys(r.transform.family for r in sweep))
        fig, axes = plt.subplots(1, max(1, len(families)), figsize=(4.5 * max(1, len(families)), 3.6),
                                 squeeze=False)
        for ax, fam in zip(axes[0], families):
            for layer in layers:
                recs = sorted((r for r in sweep if r.layer == layer and r.transform.family == fam),
                              key=lambda r: r.transform.magnitude)
                if not recs:
                    continue
                xs = [r.transform.magnitude for r in recs]
                es = [getattr(r.errors, kind) for r in recs]
                line, = ax.plot(xs, [_mean(e) for e in es], marker=".", label=layer)
                ax.fill_between(xs, [_ci(e)[0] for e in es], [_ci(e)[1] for e in es], color=line.get_color(),
                                alpha=0.15)
                nulls = [r.calibration.null for r in recs]
                if any(e is not None for e in nulls):
                    ax.plot(xs, [_mean(e) for e in nulls], color=line.get_color(), ls=":", lw=1)
            floors = sorted({(r.transform.magnitude, r.calibration.floor) for r in sweep
                             if r.transform.family == fam and r.calibration.floor is not None}, key=lambda p: p[0])
            if floors:
                xs = [m for m, _ in floors]
                ax.plot(xs, [f.mean for _, f in floors], color="black", ls="--", lw=1, label="interpolation floor")
                ax.fill_between(xs, [f.ci[0] for _, f in floors], [f.ci[1] for _, f in floors], color="black",
                                alpha=0.08)
            if any(r.calibration.null is not None for r in sweep):
                ax.plot([], [], color="grey", ls=":", lw=1, label="random-pair null (per layer)")
            unit = {"rotation": "angle (degrees)", "scale": "log2 scale", "translation": "shift (pixels)"}
            ax.set_xlabel(unit.get(fam, "magnitude"))
            ax.set_ylabel(kind + " error")
            ax.set_title(fam)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


def write_csv(path: str | os.PathLike, reports: list[Report]) -> Path:
    """``report.csv`` of one or more reports (their rows one after another, :data:`CSV_COLUMNS`)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for rep in reports:
        w.writerows(rep.csv_rows())
    return atomic_write_text(path, buf.getvalue())


def _panels(n: int, ncols: int):
    """A figure with one panel per transformation (``n``) in a grid of at most ``ncols`` columns,
    sharing the y axis; unused cells hidden. Returns ``(fig, axes)`` (2-D array)."""
    import matplotlib.pyplot as plt

    cols = min(ncols, max(1, n))
    rows = -(-max(1, n) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


_FIGURES = ("errors_by_layer.png", "errors_by_magnitude.png", "lie_by_layer.png")


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "unreadable"


def _isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def orbits_text(orbits, limit: int = 48) -> str:
    """Channel orbits for a table cell: written out when short, else counted by cycle length.

    >>> orbits_text([[0, 1], [2, 3, 4, 5]])
    '(0 1) (2 3 4 5)'
    >>> orbits_text([list(range(4 * i, 4 * i + 4)) for i in range(100)])
    '100 cycles: 100 x 4'
    """
    text = " ".join("(" + " ".join(map(str, c)) + ")" for c in orbits)
    if len(text) <= limit:
        return text or "-"
    lengths = Counter(len(c) for c in orbits)
    return f"{len(orbits)} cycles: " + ", ".join(f"{n} x {k}" for k, n in sorted(lengths.items(), reverse=True))


def json_safe(obj):
    """JSON-safe: NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_figure(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
