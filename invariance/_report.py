"""The result of :func:`invariance.measure`: a table, JSON/CSV export and figures.

``report.json`` holds ``records`` (one object per (layer, transformation) with the five
errors, their ``*_ci`` bootstrap intervals, ``best_params`` and the channel orbits),
``calibration`` (``interpolation_floor`` per transformation and ``random_pair_null`` per layer
and transformation) and ``meta`` (how it was measured).

A saved report folder is written as a whole: :meth:`Report.save` writes ``report.json`` last,
with ``files``, the size and sha256 of every file written before it (CSV, figures), and
:meth:`Report.from_json` refuses a folder whose files differ from that list (a save killed
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
from dataclasses import dataclass, field
from pathlib import Path

from .files import atomic_write, atomic_write_json, atomic_write_text, check_files, describe_files

__all__ = ["Report", "ERROR_KEYS"]

ERROR_KEYS = ("invariance_error", "expected_error", "spatial_error", "permutation_error", "linear_error")
_SHORT = {"invariance_error": "invariance", "expected_error": "expected", "spatial_error": "spatial",
          "permutation_error": "permutation", "linear_error": "linear"}


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


@dataclass
class Report:
    """Records, calibration and metadata of a measurement (see the module docstring)."""

    records: list[dict]
    calibration: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    def to_dict(self, per_image: bool = True) -> dict:
        recs = self.records if per_image else [{k: v for k, v in r.items() if k != "per_image"}
                                               for r in self.records]
        return {"records": recs, "calibration": self.calibration, "meta": self.meta}

    def select(self, layer: str | None = None, transform: str | None = None) -> list[dict]:
        return [r for r in self.records if (layer is None or r["layer"] == layer)
                and (transform is None or r["transform"] == transform)]

    def table(self) -> str:
        """A plain-text table: one row per (transformation, layer), errors as mean [95% CI]."""
        keys = [k for k in ERROR_KEYS if any(not _isnan(r.get(k)) for r in self.records)]
        excluded = any(r.get("n_excluded") for r in self.records)
        head = ["transform", "layer"] + [_SHORT[k] for k in keys] + ["null", "floor", "orbits"]
        head += ["excluded"] if excluded else []
        rows = []
        for r in self.records:
            row = [r["transform"], r["layer"]]
            for k in keys:
                lo, hi = r.get(k + "_ci", [float("nan")] * 2)
                flag = "!" if k == "linear_error" and r.get("linear_warning") else ""
                row.append(f"{_fmt(r.get(k))}{flag} [{_fmt(lo)},{_fmt(hi)}]")
            row += [_fmt(r.get("random_pair_null")), _fmt(r.get("interpolation_floor")),
                    orbits_text(r.get("channel_orbits", []))]
            row += [str(r.get("n_excluded", 0))] if excluded else []
            rows.append(row)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
        reasons = sorted({x for r in self.records for x in r.get("excluded_reasons", [])})
        if reasons:
            out.append("excluded (no verdict, left out of the means): " + "; ".join(reasons))
        for r in self.records:
            if r.get("linear_warning"):
                out.append(f"! {r['transform']}, {r['layer']}: {r['linear_warning']}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()

    # ------------------------------------------------------------------ export
    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, json_safe(self.to_dict()))

    def to_csv(self, path: str | os.PathLike) -> Path:
        cols = ["layer", "depth", "transform", "family", "magnitude", "search"]
        for k in (*ERROR_KEYS, "linear_fit_error", "random_pair_null"):
            cols += [k, k + "_lo", k + "_hi"]
        cols += ["interpolation_floor", "best_params", "channel_orbits"]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        for r in self.records:
            row = []
            for c in cols:
                if c.endswith("_lo") or c.endswith("_hi"):
                    ci = r.get(c[:-3] + "_ci") or [float("nan")] * 2
                    row.append(ci[0] if c.endswith("_lo") else ci[1])
                elif c == "best_params":
                    row.append(json.dumps(r.get("best_params", {}).get("median")))
                elif c == "channel_orbits":
                    row.append(json.dumps(r.get("channel_orbits", [])))
                else:
                    row.append(r.get(c, ""))
            w.writerow(row)
        return atomic_write_text(path, buf.getvalue())

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
        """Read ``report.json``; refuses a report folder that mixes two saves (see the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: {str(path)!r} not found" + (" (no report.json in the folder)"
                                                                  if path.parent.is_dir() else ""))
        try:
            d = json.loads(path.read_text())
            records = d["records"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise TypeError("records is not a list of objects")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a report.json ({type(exc).__name__}: {_first(exc)})") from None
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it ({exc.strerror or type(exc).__name__})") from None
        if "files" in d:
            check_files(path.parent, d["files"], manifest=path.name)
        return cls(records=records, calibration=d.get("calibration", {}), meta=d.get("meta", {}))

    def save(self, out_dir: str | os.PathLike, figures: bool = True) -> dict[str, Path]:
        """Write ``report.csv``, the figures and, last, ``report.json`` (listing the others with
        their sha256) into ``out_dir``: a save killed half-way is detected by :meth:`from_json`."""
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
        paths["layers"] = _save_fig(fig, out / "errors_by_layer.png")
        plt.close(fig)
        sweepable = [r for r in self.records if not _isnan(r.get("magnitude"))]
        if len({r["transform"] for r in sweepable}) > 1:
            fig = self.plot_sweep()
            paths["sweep"] = _save_fig(fig, out / "errors_by_magnitude.png")
            plt.close(fig)
        return paths

    # ------------------------------------------------------------------ figures
    def plot_layers(self, transforms: list[str] | None = None, keys=ERROR_KEYS):
        """Error against layer depth, one panel per transformation (with floor and null)."""
        import matplotlib.pyplot as plt

        transforms = transforms or list(dict.fromkeys(r["transform"] for r in self.records))
        transforms = transforms[:6]
        fig, axes = plt.subplots(1, len(transforms), figsize=(4.2 * len(transforms), 3.6), squeeze=False,
                                 sharey=True)
        for ax, tr in zip(axes[0], transforms):
            recs = self.select(transform=tr)
            xs = list(range(len(recs)))
            for k in keys:
                ys = [r.get(k, float("nan")) for r in recs]
                if all(_isnan(y) for y in ys):
                    continue
                lo = [r.get(k + "_ci", [float("nan")] * 2)[0] for r in recs]
                hi = [r.get(k + "_ci", [float("nan")] * 2)[1] for r in recs]
                ax.plot(xs, ys, marker="o", label=_SHORT[k])
                ax.fill_between(xs, lo, hi, alpha=0.2)
            null = [r.get("random_pair_null", float("nan")) for r in recs]
            if not all(_isnan(v) for v in null):
                ax.plot(xs, null, color="grey", ls=":", label="random-pair null")
            floor = self.calibration.get("interpolation_floor", {}).get(tr, {}).get("mean")
            if floor is not None:
                ax.axhline(floor, color="black", ls="--", lw=1, label="interpolation floor")
            ax.set_xticks(xs, [r["layer"] for r in recs], rotation=45, ha="right", fontsize=8)
            ax.set_title(tr)
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("normalised squared error")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig

    def plot_sweep(self, layers: list[str] | None = None, key: str = "spatial_error"):
        """``key`` against the transformation's magnitude, one line per layer."""
        import matplotlib.pyplot as plt

        layers = layers or list(dict.fromkeys(r["layer"] for r in self.records))
        families = list(dict.fromkeys(r["family"] for r in self.records if not _isnan(r.get("magnitude"))))
        fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 3.6), squeeze=False)
        for ax, fam in zip(axes[0], families):
            for layer in layers:
                recs = sorted((r for r in self.records if r["layer"] == layer and r["family"] == fam
                               and not _isnan(r.get("magnitude"))), key=lambda r: r["magnitude"])
                if not recs:
                    continue
                ax.plot([r["magnitude"] for r in recs], [r.get(key) for r in recs], marker=".", label=layer)
            floor = self.calibration.get("interpolation_floor", {})
            pts = sorted((r["magnitude"], floor[r["transform"]]["mean"]) for r in self.records
                         if r["family"] == fam and r["transform"] in floor and not _isnan(r.get("magnitude")))
            if pts:
                ax.plot(*zip(*pts), color="black", ls="--", lw=1, label="interpolation floor")
            unit = {"rotation": "angle (degrees)", "scale": "log2 scale", "translation": "shift (pixels)"}
            ax.set_xlabel(unit.get(fam, "magnitude"))
            ax.set_ylabel(_SHORT.get(key, key) + " error")
            ax.set_title(fam)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


_FIGURES = ("errors_by_layer.png", "errors_by_magnitude.png")


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


def _save_fig(fig, path: Path) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
