"""Image transformations: the :class:`Transform` value and the SPEC strings that name them.

One home for what a transformation *is* (a family and its parameters in the image's centred
frame), what range its parameters may take (:func:`check_transform_params`) and how a SPEC
string such as ``"rotation:-180..180:15; scale:2"`` becomes a list of them
(:func:`parse_transforms`). The geometry behind it (parametrisations, frames, matrices) is
:mod:`invariance.geometry`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import geometry as G
from .checks import check_int

__all__ = ["Transform", "TRANSFORM_LIMITS", "check_transform_params", "parse_transforms", "check_transform_count",
           "MAX_TRANSFORMS"]


@dataclass(frozen=True)
class Transform:
    """An image transformation: family parameters in the image's centred frame (pixels, degrees).

    Two transformations are equal when their families and parameters are; the label is for
    people (and is distinct for distinct parameters).

    Attributes:
        family: a name of :data:`invariance.FAMILIES` (``rotation``, ``scale``, ...).
        params: the family's parameters (angles in degrees, counter-clockwise; shifts in pixels).

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
        """``family:p1,p2,...`` with each parameter as short as ``%g`` where that is exact, and in full
        where it is not: two different transformations never share a label.

        >>> Transform("rotation", (30.0,)).label, Transform("rotation", (30.0000004,)).label
        ('rotation:30', 'rotation:30.0000004')
        """
        return f"{self.family}:{','.join(_number(p) for p in self.params)}"

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


def _number(p: float) -> str:
    """``%g`` where it gives ``p`` back exactly, else the shortest exact form (``repr``)."""
    short = f"{p:g}"
    return short if float(short) == p else repr(float(p))


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
