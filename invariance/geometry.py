"""The one home of every geometric convention in the toolkit.

Everything that turns numbers into a spatial transformation lives here; every other module
(warping, the alignment search, the spatial transformer networks, the toy networks, the tests)
imports it and re-derives nothing.

Conventions
-----------
Coordinates
    Points are ``(x, y)`` pairs (x = column direction, to the right; y = row direction,
    *downwards*, as an image is displayed). Tensors of images are ``(..., H, W)``.

Three frames
    * **pixel (index) frame**: ``x = j`` at the centre of column ``j``, ``y = i`` at the centre
      of row ``i`` (so the image covers ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``).
    * **centred frame** (where transformation *parameters* live): the pixel frame moved so the
      origin is the image centre, ``x_c = x - (W - 1) / 2``, ``y_c = y - (H - 1) / 2``; the unit
      is one pixel in both directions, so a rotation is a rigid rotation of the displayed image
      even when ``H != W``.
    * **normalised frame** (what :func:`torch.nn.functional.grid_sample` uses, with
      ``align_corners=False``): the whole field of view is ``[-1, 1]^2``, ``x_n = (2 x + 1) / W - 1``.
      Feature maps of any resolution that cover the same field of view share this frame, which is
      why the alignment search works in it.

Matrices
    A transformation is a 3x3 matrix acting on homogeneous column vectors ``(x, y, 1)``. The
    matrix maps **input to output** (a *forward* map): the content at point ``p`` of the source
    ends up at ``A p`` in the transformed image, so ``(W_A f)(q) = f(A^{-1} q)``.
    :func:`torch.nn.functional.affine_grid` wants the opposite (output to input), so the warping
    module passes ``inverse(A)``. ``compose(A, B)`` applies ``B`` first, then ``A``.

Rotation direction
    A positive angle (degrees) rotates **counter-clockwise as displayed** (y pointing down), so
    ``rotation(90)`` agrees with :func:`torch.rot90` ``(k=1, dims=(-2, -1))``. In centred
    coordinates the matrix is ``[[cos, sin], [-sin, cos]]``.

Families and parameters (all in the centred frame, angles in degrees, translations in pixels)
    ==================  ========  =============================================================
    family              #params   parameters
    ==================  ========  =============================================================
    translation         2         tx, ty
    rotation            1         angle
    scale               1         s (isotropic factor, > 0)
    anisotropic_scale   2         sx, sy (> 0)
    rigid               3         angle, tx, ty              (rotation, then translation)
    scale_translation   3         s, tx, ty                  (scaling, then translation)
    similarity          4         angle, s, tx, ty           (scale, rotate, then translate)
    affine              6         a, b, c, d, e, f           -> [[a, b, c], [d, e, f], [0, 0, 1]]
    projective          8         h11, h12, h13, h21, h22, h23, h31, h32 -> [[.., .., ..], .., [h31, h32, 1]]
    ==================  ========  =============================================================

Example
-------
>>> import torch
>>> from invariance import geometry as G
>>> A = G.to_matrix("rotation", torch.tensor([90.0]))      # centred frame
>>> G.apply_to_points(A, torch.tensor([[1.0, 0.0]])).round() + 0.0  # right -> up (y down)
tensor([[ 0., -1.]])
>>> N = G.centred_to_normalized(A, (28, 28))                 # what warping consumes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import check_finite, check_float, check_matrix, check_size

__all__ = [
    "FAMILIES",
    "Family",
    "get_family",
    "to_matrix",
    "from_matrix",
    "identity_params",
    "identity_matrix",
    "compose",
    "inverse",
    "apply_to_points",
    "pixel_to_normalized",
    "normalized_to_pixel",
    "centred_to_normalized",
    "normalized_to_centred",
    "frame_matrix",
    "is_affine",
]


@dataclass(frozen=True)
class Family:
    """A parametrised family of planar transformations (parameters in the centred frame)."""

    name: str
    param_names: tuple[str, ...]
    identity: tuple[float, ...]
    translation_params: tuple[int, ...] = ()  # indices of tx, ty, if the family has them
    doc: str = ""

    @property
    def n_params(self) -> int:
        return len(self.param_names)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("translation", ("tx", "ty"), (0.0, 0.0), (0, 1), "shift by (tx, ty) pixels"),
        Family("rotation", ("angle",), (0.0,), (), "counter-clockwise by angle degrees about the centre"),
        Family("scale", ("s",), (1.0,), (), "isotropic scaling by s about the centre"),
        Family("anisotropic_scale", ("sx", "sy"), (1.0, 1.0), (), "scale x by sx and y by sy"),
        Family("rigid", ("angle", "tx", "ty"), (0.0, 0.0, 0.0), (1, 2), "rotation then translation"),
        Family("scale_translation", ("s", "tx", "ty"), (1.0, 0.0, 0.0), (1, 2), "scaling then translation"),
        Family("similarity", ("angle", "s", "tx", "ty"), (0.0, 1.0, 0.0, 0.0), (2, 3),
               "scaling, rotation, then translation"),
        Family("affine", ("a", "b", "c", "d", "e", "f"), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (2, 5),
               "[[a, b, c], [d, e, f], [0, 0, 1]]"),
        Family("projective", ("h11", "h12", "h13", "h21", "h22", "h23", "h31", "h32"),
               (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0), (2, 5),
               "[[h11, h12, h13], [h21, h22, h23], [h31, h32, 1]]"),
    )
}


def get_family(family: str | Family) -> Family:
    """Look a family up by name; an unknown name raises a one-line error listing the valid ones.

    >>> get_family("rotation").n_params
    1
    """
    if isinstance(family, Family):
        return family
    try:
        return FAMILIES[family]
    except (KeyError, TypeError):
        raise ValueError(
            f"family: unknown family {family!r}; valid choices: {', '.join(FAMILIES)}"
        ) from None


# ----------------------------------------------------------------------------- validation


def as_params(params, family: Family) -> torch.Tensor:
    if not isinstance(params, torch.Tensor):
        params = torch.as_tensor(params, dtype=torch.get_default_dtype())
    check_float(params, "params")
    if params.dim() == 0 or params.shape[-1] != family.n_params:
        raise ValueError(
            f"params: family {family.name!r} takes {family.n_params} parameters "
            f"({', '.join(family.param_names)}) in the last dimension, got shape {tuple(params.shape)}"
        )
    check_finite(params, "params")
    return params


# ----------------------------------------------------------------------------- matrices


def _linear(a, b, c, d) -> torch.Tensor:
    """2x2 blocks -> 3x3 with zero translation; inputs broadcast together."""
    a, b, c, d = torch.broadcast_tensors(a, b, c, d)
    z, o = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, z, c, d, z, z, z, o], dim=-1).unflatten(-1, (3, 3))


def _rotation(angle_deg: torch.Tensor) -> torch.Tensor:
    t = torch.deg2rad(angle_deg)
    c, s = torch.cos(t), torch.sin(t)
    # counter-clockwise as displayed with y pointing down
    return _linear(c, s, -s, c)


def _with_translation(m: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    top = torch.cat([m[..., :2, :2], torch.stack([tx, ty], -1).unsqueeze(-1)], dim=-1)
    return torch.cat([top, m[..., 2:, :]], dim=-2)


def to_matrix(family: str | Family, params, *, check: bool = True) -> torch.Tensor:
    """Parameters of ``family`` -> 3x3 matrices in the **centred** frame (input -> output).

    Convention: see the module docstring (angles in degrees, counter-clockwise as displayed;
    translations in pixels; ``(x, y)`` order). Differentiable in ``params``.

    Args:
        family: a name in :data:`FAMILIES` or a :class:`Family`.
        params: tensor ``(..., n_params)`` (floating point, finite).
        check: validate ``params`` (finite, positive scale factors). ``False`` skips the checks,
            which read values back from the device: for inner loops (the search's refinement
            and polish) whose parameters are valid by construction.

    Returns:
        tensor ``(..., 3, 3)`` with the dtype and device of ``params``.

    >>> to_matrix("translation", torch.tensor([2.0, -1.0]))
    tensor([[ 1.,  0.,  2.],
            [ 0.,  1., -1.],
            [ 0.,  0.,  1.]])
    """
    fam = get_family(family)
    if not check:
        return _matrix(fam, params)
    p = as_params(params, fam)
    name = fam.name
    if name in ("scale", "anisotropic_scale", "similarity", "scale_translation"):
        scales = p[..., [1]] if name == "similarity" else p[..., : (2 if name == "anisotropic_scale" else 1)]
        if bool((scales <= 0).any()):
            raise ValueError(f"params: scale factors of family {name!r} must be > 0")
    return _matrix(fam, p)


def _matrix(fam: Family, p: torch.Tensor) -> torch.Tensor:
    """:func:`to_matrix`'s matrices, without its checks."""
    u = p.unbind(-1)
    one, zero = torch.ones_like(u[0]), torch.zeros_like(u[0])
    name = fam.name
    if name == "translation":
        return _with_translation(_linear(one, zero, zero, one), u[0], u[1])
    if name == "rotation":
        return _rotation(u[0])
    if name == "scale":
        return _linear(u[0], zero, zero, u[0])
    if name == "anisotropic_scale":
        return _linear(u[0], zero, zero, u[1])
    if name == "rigid":
        return _with_translation(_rotation(u[0]), u[1], u[2])
    if name == "scale_translation":
        return _with_translation(_linear(u[0], zero, zero, u[0]), u[1], u[2])
    if name == "similarity":
        r = _rotation(u[0])
        lin = _linear(r[..., 0, 0] * u[1], r[..., 0, 1] * u[1], r[..., 1, 0] * u[1], r[..., 1, 1] * u[1])
        return _with_translation(lin, u[2], u[3])
    if name == "affine":
        return torch.stack([*u, zero, zero, one], dim=-1).unflatten(-1, (3, 3))
    if name == "projective":
        return torch.stack([*u, one], dim=-1).unflatten(-1, (3, 3))
    raise AssertionError(name)  # pragma: no cover - FAMILIES and this function agree


def from_matrix(family: str | Family, matrix: torch.Tensor) -> torch.Tensor:
    """3x3 centred-frame matrices -> parameters of ``family`` (inverse of :func:`to_matrix`).

    The matrix is assumed to lie in the family (it is not projected onto it). Projective
    matrices are normalised so that ``m[2, 2] == 1``. Rotation angles come back in
    ``(-180, 180]``.

    >>> from_matrix("rotation", to_matrix("rotation", torch.tensor([30.0]))).round(decimals=4)
    tensor([30.])
    """
    fam = get_family(family)
    check_matrix(matrix)
    m = matrix / matrix[..., 2:3, 2:3] if fam.name == "projective" else matrix
    tx, ty = m[..., 0, 2], m[..., 1, 2]
    angle = wrap_angle(torch.rad2deg(torch.atan2(m[..., 0, 1] - m[..., 1, 0], m[..., 0, 0] + m[..., 1, 1])))
    s = torch.sqrt(torch.clamp(torch.det(m[..., :2, :2]), min=0))
    name = fam.name
    cols: list[torch.Tensor]
    if name == "translation":
        cols = [tx, ty]
    elif name == "rotation":
        cols = [angle]
    elif name == "scale":
        cols = [s]
    elif name == "anisotropic_scale":
        cols = [m[..., 0, 0], m[..., 1, 1]]
    elif name == "rigid":
        cols = [angle, tx, ty]
    elif name == "scale_translation":
        cols = [s, tx, ty]
    elif name == "similarity":
        cols = [angle, s, tx, ty]
    elif name == "affine":
        cols = [m[..., 0, 0], m[..., 0, 1], tx, m[..., 1, 0], m[..., 1, 1], ty]
    else:  # projective
        cols = [m[..., 0, 0], m[..., 0, 1], tx, m[..., 1, 0], m[..., 1, 1], ty, m[..., 2, 0], m[..., 2, 1]]
    return torch.stack(cols, dim=-1)


def identity_params(family: str | Family, *, dtype=None, device=None) -> torch.Tensor:
    """The parameters of the identity in ``family``.

    >>> identity_params("similarity")
    tensor([0., 1., 0., 0.])
    """
    fam = get_family(family)
    return torch.tensor(fam.identity, dtype=dtype or torch.get_default_dtype(), device=device)


def identity_matrix(*batch: int, dtype=None, device=None) -> torch.Tensor:
    """Identity matrices of shape ``(*batch, 3, 3)``.

    >>> identity_matrix(2).shape
    torch.Size([2, 3, 3])
    """
    eye = torch.eye(3, dtype=dtype or torch.get_default_dtype(), device=device)
    return eye.expand(*batch, 3, 3).clone()


def compose(*matrices: torch.Tensor) -> torch.Tensor:
    """``compose(A, B, C) = A @ B @ C``: apply ``C`` first, then ``B``, then ``A``.

    Batch dimensions broadcast.

    >>> R = to_matrix("rotation", torch.tensor([90.0]))
    >>> torch.allclose(compose(R, R, R, R), torch.eye(3), atol=1e-6)
    True
    """
    if not matrices:
        raise ValueError("matrices: compose needs at least one matrix")
    for i, m in enumerate(matrices):
        check_matrix(m, f"matrices[{i}]")
    out = matrices[0]
    for m in matrices[1:]:
        out = out @ m
    return out


def inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse transformation(s); a singular or non-finite matrix raises a clear error.

    >>> A = to_matrix("similarity", torch.tensor([30.0, 2.0, 1.0, -3.0]))
    >>> torch.allclose(compose(A, inverse(A)), torch.eye(3), atol=1e-6)
    True
    """
    check_invertible(matrix)
    return torch.linalg.inv(matrix)


def check_invertible(matrix: torch.Tensor, name: str = "matrix") -> None:
    """Finite and invertible in its dtype (condition number within ``1 / (30 eps)``), else a clear error.

    The condition number is scale-free, so it is taken of each matrix divided by its largest entry,
    with entries below ``eps**2`` of it set to zero: that changes it by a relative ``eps / 5`` at
    most below the threshold, and keeps subnormal numbers out of the SVD (CUDA's SVD called a
    translation of 2e-313 px singular).

    >>> check_invertible(to_matrix("translation", torch.tensor([2e-313, 0.0], dtype=torch.float64)))
    >>> check_invertible(torch.diag(torch.tensor([1.0, 1.0, 0.0])))
    Traceback (most recent call last):
    ...
    ValueError: matrix: transformation is singular and has no inverse
    """
    check_matrix(matrix, name)
    check_finite(matrix, name)
    m = matrix.detach()
    top = m.abs().amax(dim=(-2, -1), keepdim=True)
    m = m / torch.where(top > 0, top, torch.ones_like(top))
    eps = torch.finfo(matrix.dtype).eps
    cond = torch.linalg.cond(torch.where(m.abs() < eps * eps, torch.zeros_like(m), m))
    if bool((~torch.isfinite(cond) | (cond > 1.0 / (30 * eps))).any()):
        raise ValueError(f"{name}: transformation is singular and has no inverse")


def is_affine(matrix: torch.Tensor, atol: float = 0.0) -> bool:
    """True when every matrix has last row ``(0, 0, 1)`` (within ``atol``)."""
    check_matrix(matrix)
    last = matrix[..., 2, :]
    ref = torch.tensor([0.0, 0.0, 1.0], dtype=matrix.dtype, device=matrix.device)
    return bool(((last - ref).abs() <= atol).all())


def apply_to_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply matrices to points ``(..., N, 2)`` in ``(x, y)`` order (with perspective divide).

    The frame of the points must be the frame of the matrix.

    >>> apply_to_points(to_matrix("translation", torch.tensor([1.0, 2.0])), torch.zeros(1, 2))
    tensor([[1., 2.]])
    """
    check_matrix(matrix)
    check_float(points, "points")
    if points.shape[-1] != 2:
        raise ValueError(f"points: expected shape (..., N, 2) in (x, y) order, got {tuple(points.shape)}")
    ones = torch.ones_like(points[..., :1])
    h = torch.cat([points, ones], dim=-1) @ matrix.transpose(-1, -2)
    return h[..., :2] / h[..., 2:3]


# ----------------------------------------------------------------------------- frames


def pixel_centres(size: Sequence[int], *, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised coordinates ``(ys (H,), xs (W,))`` of the pixel centres (``align_corners=False``):
    ``(2 i + 1) / n - 1``. The one formula of the sampling grid; every grid is built from it.

    >>> pixel_centres((2, 4))[1]
    tensor([-0.7500, -0.2500,  0.2500,  0.7500])
    """
    h, w = check_size(size)
    kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    return (torch.arange(h, **kw) * 2 + 1) / h - 1, (torch.arange(w, **kw) * 2 + 1) / w - 1


def frame_matrix(size: Sequence[int], *, frm: str, to: str, dtype=None, device=None) -> torch.Tensor:
    """The 3x3 matrix taking point coordinates from frame ``frm`` to frame ``to``.

    Frames: ``"pixel"`` (index coordinates, pixel centres at integers), ``"centred"`` (pixel
    units, origin at the image centre) and ``"normalized"`` (``[-1, 1]`` over the field of view,
    ``align_corners=False``). ``size`` is ``(H, W)``.

    >>> frame_matrix((2, 4), frm="pixel", to="normalized")
    tensor([[ 0.5000,  0.0000, -0.7500],
            [ 0.0000,  1.0000, -0.5000],
            [ 0.0000,  0.0000,  1.0000]])
    """
    h, w = check_size(size)
    kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
    frames = ("pixel", "centred", "normalized")
    for arg, val in (("frm", frm), ("to", to)):
        if val not in frames:
            raise ValueError(f"{arg}: unknown frame {val!r}; valid choices: {', '.join(frames)}")

    def to_norm(f: str) -> torch.Tensor:
        if f == "normalized":
            return torch.eye(3, **kw)
        sx, sy = 2.0 / w, 2.0 / h
        if f == "centred":
            return torch.tensor([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], **kw)
        return torch.tensor([[sx, 0, sx * 0.5 - 1], [0, sy, sy * 0.5 - 1], [0, 0, 1]], **kw)

    return torch.linalg.inv(to_norm(to)) @ to_norm(frm)


def _points_between(points: torch.Tensor, size, frm: str, to: str) -> torch.Tensor:
    check_float(points, "points")
    m = frame_matrix(size, frm=frm, to=to, dtype=points.dtype, device=points.device)
    return apply_to_points(m, points)


def pixel_to_normalized(points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Pixel (index) coordinates ``(x, y)`` -> normalised coordinates for an ``(H, W)`` grid.

    ``x_n = (2 x + 1) / W - 1`` (``align_corners=False``): pixel 0's centre is ``-1 + 1/W``.

    >>> pixel_to_normalized(torch.tensor([[0.0, 0.0]]), (2, 4))
    tensor([[-0.7500, -0.5000]])
    """
    return _points_between(points, size, "pixel", "normalized")


def normalized_to_pixel(points: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Normalised coordinates -> pixel (index) coordinates ``(x, y)``; see :func:`pixel_to_normalized`.

    >>> normalized_to_pixel(torch.tensor([[-1.0, 1.0]]), (2, 4))
    tensor([[-0.5000,  1.5000]])
    """
    return _points_between(points, size, "normalized", "pixel")


_FRAME_PAIRS: dict = {}


def _change_frame(matrix: torch.Tensor, size, frm: str, to: str) -> torch.Tensor:
    """``C A C^-1`` with ``C`` the point map from ``frm`` to ``to``. ``C`` and its inverse are built
    once per (size, frames, dtype, device) and kept: the search's inner loops change frames every
    step, and building ``C`` is a host-to-device copy."""
    check_matrix(matrix)
    key = (check_size(size), frm, to, matrix.dtype, matrix.device)
    if key not in _FRAME_PAIRS:
        c = frame_matrix(size, frm=frm, to=to, dtype=matrix.dtype, device=matrix.device)
        _FRAME_PAIRS[key] = (c, torch.linalg.inv(c))
    c, c_inv = _FRAME_PAIRS[key]
    out = c @ matrix @ c_inv
    return out / out[..., 2:3, 2:3]


def centred_to_normalized(matrix: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A centred-frame transformation (pixels) -> the same transformation in normalised coordinates.

    ``N = C A C^{-1}`` with ``C`` the centred -> normalised point map of an ``(H, W)`` grid.
    For a square grid rotations and scalings are unchanged; translations become ``2 t / W``.

    >>> centred_to_normalized(to_matrix("translation", torch.tensor([7.0, 0.0])), (28, 28))[0, 2]
    tensor(0.5000)
    """
    return _change_frame(matrix, size, "centred", "normalized")


def normalized_to_centred(matrix: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`centred_to_normalized`.

    >>> A = to_matrix("rigid", torch.tensor([30.0, 2.0, -1.0]))
    >>> torch.allclose(normalized_to_centred(centred_to_normalized(A, (20, 30)), (20, 30)), A, atol=1e-6)
    True
    """
    return _change_frame(matrix, size, "normalized", "centred")


def angle_grid(n: int, *, dtype=None, device=None) -> torch.Tensor:
    """``n`` equally spaced angles (degrees) covering the circle, starting at 0."""
    return torch.arange(n, dtype=dtype or torch.get_default_dtype(), device=device) * (360.0 / n)


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """Wrap angles in degrees to ``(-180, 180]``."""
    return 180.0 - torch.remainder(180.0 - angle, 360.0)


__all__ += ["angle_grid", "wrap_angle", "pixel_centres", "as_params"]
