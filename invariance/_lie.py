"""The infinitesimal view: a layer's Lie derivative and the part of it that no warp explains.

For an image transformation ``T`` with real logarithm ``X = log T`` (the one-parameter group
``h_t = exp(t X)`` passes through the identity at ``t = 0`` and through ``T`` at ``t = 1``), the
**Lie derivative** of a layer ``Γ`` at an image ``f`` is (Gruver et al. 2023, docs/definitions.md,
"The infinitesimal view")::

    L_X Γf = d/dt  W_{h_t^-1} Γ(T_{h_t} f)  at t = 0  =  J_Γ(f) δf + (v_L · ∇) Γf,   δf = -(v · ∇) f

with ``v`` the velocity field of ``X`` on the image and ``v_L`` the same field on the layer's grid
(in its pixels). The image derivative ``δf`` is pushed through the network by forward-mode
automatic differentiation (central differences along ``δf`` where a module does not support
it); ``∇`` is the central difference with zero padding, the limit of the symmetric difference
quotient of the bilinear warp (``(W_{h_ε} f - W_{h_-ε} f) / 2ε -> -(v · ∇) f``), so the value
needs no step size. Per image, over the reference's region ``M · I``:

* ``lie`` = ``r² = ||L_X Γf||² / ||Γf||²``: the second-order prediction of the expected-warp
  error at ``T`` (``e_exp(tX) / t² -> r²``);
* ``aligned`` = ``a² = min_c ||L_X Γf - Σ_i c_i (u_i · ∇)Γf||² / ||Γf||²`` over the generators
  ``u_i`` of the search family: the part of the response that no infinitesimal warp of the map
  explains, the second-order prediction of the spatial error (``e_sp(tX) / t² -> a²``);
* ``share`` = ``a² / r²``: the unexplained share of the Lie derivative's energy;
* ``floor``: the identity network's value on the layer's own map under the bilinear sampler,
  ``min_c ||Σ_k |v_L,k| Δ_k Γf - Σ_i c_i (u_i · ∇)Γf||² / ||Γf||²`` (``Δ_k`` the second
  difference along axis ``k``: the first-order term of a bilinear round trip ``W_{h_t^-1} W_{h_t}``);
* ``null``: ``a²`` with the Lie derivative of another image (image ``i - 1``) in place of image
  ``i``'s: what the warps explain of an unrelated response;
* ``specific``: ``s² = min_c ||L_X Γf - K - Σ_i c_i (u_i · ∇)Γf||² / ||Γf||²`` with ``K`` the
  floor's field (each position's response to its own motion, as a translation):
  ``L - K = J_Γ(Σ_k v_k δ_k) - Σ_k v_k J_Γ(δ_k)`` is the commutator of the network with the
  velocity field, 0 for a translation and for pointwise layers, and of second order for
  isotropic filters under rotation: the response to the transformation itself, aliasing and
  kinks removed.

Example
-------
>>> import torch, invariance
>>> from invariance import toys
>>> x = toys.make_blob_images(3, 40, seed=1).double()
>>> r = invariance.lie_derivative(toys.IsotropicNet().double(), x, "rotation:5", layers="relu1")["relu1"]
>>> bool((r.aligned < 1.1 * r.floor).all())  # isotropic filters: what is left is the grid's
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import geometry as G
from ._features import FeatureExtractor, LayerFrame
from ._metric import RF_COVERS_IMAGE, comparison_region
from ._search import MIN_REGION, SEARCH_FAMILIES

__all__ = ["LieResult", "lie_generator", "LieAccumulator", "LIE_METHODS", "image_tangent", "translation_tangents",
           "layer_tangents", "lie_region"]

LIE_METHODS = ("forward-mode AD", "central differences")
"""How the image derivative is pushed through the network: forward-mode automatic
differentiation, or (where a module does not support it) central differences along it with the
relative step :data:`FD_STEP` of the image's dtype."""

FD_STEP = {torch.float32: 1e-3, torch.float64: 1e-6}
"""Relative step of the central differences along the image derivative (fallback of forward mode):
the perturbation is ``step * max|f| / max|δf|`` times the image derivative."""

NO_SIGNAL = "no signal: the map is zero on the region"


@dataclass
class LieResult:
    """The infinitesimal view of one layer under one transformation: per image ``(B,)`` float64.

    Attributes:
        layer, transform, search: what was measured and the search family whose generators align.
        lie: ``r²``, the Lie derivative's energy over the map's (docs/definitions.md).
        aligned: ``a²``, the part no infinitesimal warp of the search family explains.
        share: ``a² / r²`` (0 where ``r² = 0``).
        floor: the identity network's value on the layer's own map (the bilinear sampler's
            discretisation).
        null: ``a²`` of another image's Lie derivative (image ``i - 1``; None for one image).
        reasons: per image, None or why its values are NaN.
        method: one of :data:`LIE_METHODS`.
        specific: ``s²``, the part of the Lie derivative beyond the grid's (``L - K``, with ``K``
            what each position's own motion would give as a translation) that no infinitesimal
            warp explains (None without the floor's translation directions).
    """

    layer: str
    transform: str
    search: str
    lie: torch.Tensor
    aligned: torch.Tensor
    share: torch.Tensor
    floor: torch.Tensor
    null: torch.Tensor | None
    reasons: list
    method: str
    specific: torch.Tensor | None = None


def lie_generator(t_centred: torch.Tensor) -> torch.Tensor:
    """The real logarithm ``X`` (3x3 float64) of a centred-frame transformation: ``exp(X) = T``.

    >>> T = G.to_matrix("rotation", torch.tensor([90.0], dtype=torch.float64))
    >>> (lie_generator(T)[:2, :2].mul(2 / math.pi).round() + 0.0).tolist()  # a quarter turn
    [[0.0, 1.0], [-1.0, 0.0]]
    """
    from scipy.linalg import expm, logm

    m = np.asarray(t_centred.detach().double().cpu(), dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"transform: the Lie derivative needs one 3x3 transformation, got shape {m.shape}")
    m = m / m[2, 2]
    if np.linalg.det(m[:2, :2]) <= 0:
        raise ValueError("transform: a reflection (negative determinant) is not reached by a one-parameter group; "
                         "the Lie derivative is defined for transformations with a real logarithm")
    x = logm(m)
    if np.iscomplexobj(x):
        if np.abs(x.imag).max() > 1e-9 * max(1.0, np.abs(x.real).max()):
            raise ValueError("transform: has no real logarithm (e.g. a rotation by exactly 180 degrees combined "
                             "with a non-uniform part); the Lie derivative needs one")
        x = x.real
    if not np.allclose(expm(x), m, atol=1e-9, rtol=1e-9):
        raise ValueError("transform: its matrix logarithm does not reproduce it; the Lie derivative needs a "
                         "transformation on a one-parameter group")
    return torch.from_numpy(np.ascontiguousarray(x))


def _velocity(x: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity ``(vx, vy)`` (each ``(h, w)``) of the generator ``x`` at centred points ``xs (w,), ys (h,)``:
    ``d/dt exp(t X) p`` at ``t = 0`` (projective generators included)."""
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    w0 = x[0, 0] * xx + x[0, 1] * yy + x[0, 2]
    w1 = x[1, 0] * xx + x[1, 1] * yy + x[1, 2]
    w2 = x[2, 0] * xx + x[2, 1] * yy + x[2, 2]
    return w0 - xx * w2, w1 - yy * w2


def _family_generators(family: str) -> list[torch.Tensor]:
    """A basis of the Lie algebra of a search family (centred frame, float64): the derivatives of
    its matrices along each parameter at the identity (central differences; only their span is used)."""
    fam = G.get_family(SEARCH_FAMILIES[family][0])
    p0 = G.identity_params(fam, dtype=torch.float64)
    out = []
    for i in range(p0.numel()):
        e = torch.zeros_like(p0)
        e[i] = 1e-4
        out.append((G.to_matrix(fam, p0 + e) - G.to_matrix(fam, p0 - e)) / 2e-4)
    return out


def _grad(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences ``(d/dx, d/dy)`` of ``(..., h, w)`` maps, zero outside (one pixel units)."""
    p = torch.nn.functional.pad(f, (1, 1, 1, 1))
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


def _second(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Second differences ``(Δx, Δy)`` of ``(..., h, w)`` maps, zero outside."""
    p = torch.nn.functional.pad(f, (1, 1, 1, 1))
    c = p[..., 1:-1, 1:-1]
    return p[..., 1:-1, 2:] - 2 * c + p[..., 1:-1, :-2], p[..., 2:, 1:-1] - 2 * c + p[..., :-2, 1:-1]


def _centred_positions(frame: LayerFrame, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred image coordinates (input pixels) of the layer's pixel centres: ``xs (w,), ys (h,)``."""
    xs, ys = frame.centres(dtype=dtype, device=device)
    hh, ww = frame.input_size
    return xs - (ww - 1) / 2, ys - (hh - 1) / 2


def _layer_field(x: torch.Tensor, frame: LayerFrame, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The velocity of the image generator ``x`` on the layer's grid, in the layer's pixels."""
    xs, ys = _centred_positions(frame, torch.float64, device)
    vx, vy = _velocity(x.to(device), xs, ys)
    return vx / frame.stride[0], vy / frame.stride[1]


def image_tangent(images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The derivative ``δf = -(v · ∇) f`` of ``images (B, C, H, W)`` along the generator ``x`` (centred
    frame): the limit of ``(W_{exp(εX)} f - W_{exp(-εX)} f) / 2ε`` of the bilinear warp.

    >>> f = torch.zeros(1, 1, 5, 5, dtype=torch.float64); f[..., 2, 2] = 1
    >>> X = torch.zeros(3, 3, dtype=torch.float64); X[0, 2] = 1.0  # translation to the right
    >>> (image_tangent(f, X)[0, 0, 2] + 0.0).tolist()  # the spot moves right: gains on its right, loses on its left
    [0.0, -0.5, 0.0, 0.5, 0.0]
    """
    vx, vy = _layer_field(x, LayerFrame.identity(images.shape[-2:]), images.device)
    gx, gy = _grad(images)
    return -(vx.to(images.dtype) * gx + vy.to(images.dtype) * gy)


def translation_tangents(images: torch.Tensor) -> list[torch.Tensor]:
    """The image derivatives along unit translations in x and in y (one image pixel)."""
    gx, gy = _grad(images)
    return [-gx, -gy]


def layer_tangents(extractor: FeatureExtractor, images: torch.Tensor, tangents: list[torch.Tensor]):
    """``(maps, derivatives, frames, method)``: the layers' maps of ``images (B, ...)`` and, per layer,
    their derivatives along each image direction of ``tangents`` (a list of ``k`` image-shaped
    tensors; ``derivatives[name]`` is a list of ``k`` maps). One forward-mode pass over the ``k``
    copies of the batch; central differences along each direction where a module does not support
    forward mode (:data:`FD_STEP`)."""
    b, k = images.shape[0], len(tangents)
    stacked, direction = images.repeat(k, 1, 1, 1), torch.cat(tangents)
    try:
        maps, derivs, frames = extractor.jvp(stacked, direction)
        if all(derivs.get(n) is not None for n in maps):
            return ({n: v[:b] for n, v in maps.items()}, {n: list(d.split(b)) for n, d in derivs.items()},
                    frames, LIE_METHODS[0])
    except (NotImplementedError, RuntimeError):
        pass
    maps, frames = extractor(images)
    scale = float(images.abs().max()) / max(float(direction.abs().max()), 1e-300)
    eta = FD_STEP.get(images.dtype, 1e-3) * scale
    plus, _ = extractor(stacked + eta * direction)
    minus, _ = extractor(stacked - eta * direction)
    return maps, {n: list(((plus[n] - minus[n]) / (2 * eta)).split(b)) for n in maps}, frames, LIE_METHODS[1]


class LieAccumulator:
    """The infinitesimal view of one layer over batches of images (``add`` in order, then ``result``).

    ``x``: the transformation's generator (centred frame, :func:`lie_generator`); ``region``:
    the reference's region ``M · I`` ``(h, w)`` (0/1); ``family``: the search family whose
    generators align. The null pairs image ``i`` with image ``i - 1`` across batches (image 0 with
    the last), as :class:`invariance.LayerAccumulator` does.
    """

    def __init__(self, frame: LayerFrame, x: torch.Tensor, region: torch.Tensor, n_images: int, *, family: str,
                 null: bool = True, reason: str | None = None, layer: str = "", transform: str = "",
                 method: str = LIE_METHODS[0]):
        if family not in SEARCH_FAMILIES:
            raise ValueError(f"family: unknown search family {family!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
        dev = region.device
        self.frame, self.n, self.family, self.labels, self.method = frame, n_images, family, (layer, transform), method
        self.region = region.double()
        self.vx, self.vy = _layer_field(x, frame, dev)
        self.fields = [_layer_field(u, frame, dev) for u in _family_generators(family)]
        self.reason = reason or (f"the region has fewer than MIN_REGION = {MIN_REGION} positions"
                                 if float(self.region.sum()) < MIN_REGION else None)
        self.want_null = null and n_images > 1
        self.parts: list[dict] = []
        self.first: tuple | None = None  # image 0's fit, for its null at the end
        self.last_l: torch.Tensor | None = None
        self.root = self.region.sqrt().flatten()  # sums of squares of maps times it are region sums
        self.cast: dict = {}

    def _on_region(self, m: torch.Tensor) -> torch.Tensor:
        """``(B, ..., C, h, w)`` maps -> ``(B, ..., C * h * w)`` float64, weighted by the square root of
        the region's weight (so sums of squares are region sums). The products before it run in the
        maps' precision, element by element; every sum after it runs in float64, so no value
        depends on which images share a batch beyond float64 rounding."""
        return (m.flatten(-2) * self._as(m.dtype)[0]).flatten(-2).double()

    def _as(self, dtype) -> tuple:
        """``(root, vx, vy, fields)`` in ``dtype`` (the maps' own: the products of maps run in it)."""
        if dtype not in self.cast:
            self.cast[dtype] = (self.root.to(dtype), self.vx.to(dtype), self.vy.to(dtype),
                                [(ux.to(dtype), uy.to(dtype)) for ux, uy in self.fields])
        return self.cast[dtype]

    def _fit(self, f: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor):
        """The warp derivatives ``(u_i · ∇) F`` of the search family's generators on the region,
        ``d (B, n, C * P)``, and the pseudo-inverse of their Gram matrices ``(B, n, n)``."""
        d = self._on_region(torch.stack([ux * gx + uy * gy for ux, uy in self._as(f.dtype)[3]], dim=1))
        return d, torch.linalg.pinv(d @ d.transpose(1, 2), hermitian=True)

    @staticmethod
    def _residuals(targets: torch.Tensor, d: torch.Tensor, ginv: torch.Tensor) -> torch.Tensor:
        """Per image and target ``min_c ||target - sum_i c_i d_i||²``: ``targets (B, m, N)`` -> ``(B, m)``."""
        c = ginv @ (d @ targets.transpose(1, 2))  # (B, n, m)
        res = targets - c.transpose(1, 2) @ d
        return (res * res).sum(-1)

    def add(self, f: torch.Tensor, df: torch.Tensor, index: slice, shifts=None) -> None:
        """Images ``index`` from their maps ``f``, the maps' derivatives ``df`` along the image
        derivative and (for the floor) ``shifts``: the maps' derivatives along the image derivatives
        of the unit translations in x and y (:func:`translation_tangents`)."""
        if f.dtype not in (torch.float32, torch.float64):
            f, df, shifts = f.float(), df.float(), None if shifts is None else [s.float() for s in shifts]
        _, vx, vy, _ = self._as(f.dtype)
        gx, gy = _grad(f)
        lie = self._on_region(df.to(f.dtype) + vx * gx + vy * gy)
        d, ginv = self._fit(f, gx, gy)
        norm = self._on_region(f).square().sum(-1)
        targets = [lie]
        if shifts is not None:
            (ax, ay) = self.frame.stride
            sx, sy = shifts[0].to(f.dtype), shifts[1].to(f.dtype)
            grid = (sx + gx / ax) * (vx * ax) + (sy + gy / ay) * (vy * ay)
            targets.append(self._on_region(grid))
            # L - K: the response beyond what each position's own motion, as a translation, gives
            targets.append(self._on_region(df.to(f.dtype) - (vx * ax) * sx - (vy * ay) * sy))
        null_sl = None
        if self.want_null:  # image i against the Lie derivative of image i - 1 (image 0: at the end)
            if index.start == 0:
                self.first = (d[:1], ginv[:1], norm[:1])
                other, null_sl = torch.cat([lie[:1], lie[:-1]]), slice(1, None)
            else:
                other, null_sl = torch.cat([self.last_l, lie[:-1]]), slice(None)
            self.last_l = lie[-1:]
            targets.append(other)
        res = (self._residuals(torch.stack(targets, dim=1), d, ginv) / norm[:, None]).cpu()
        part = {"lie": (lie.square().sum(-1) / norm).cpu(), "aligned": res[:, 0],
                "reasons": [self.reason or (NO_SIGNAL if not float(v) > 0 else None) for v in norm]}
        if shifts is not None:
            part["floor"], part["specific"] = res[:, 1], res[:, 2]
        if null_sl is not None:
            null = res[:, -1].clone()
            null[:1] = math.nan if null_sl.start == 1 else null[:1]
            part["null"] = null
        self.parts.append(part)

    def result(self) -> LieResult:
        """The :class:`LieResult` of every image added."""
        got = sum(len(p["lie"]) for p in self.parts)
        if got != self.n:
            raise ValueError(f"index: {got} images were added, expected n_images = {self.n}")
        reasons = [r for p in self.parts for r in p["reasons"]]
        bad = torch.tensor([r is not None for r in reasons])

        def cat(k):
            return torch.where(bad, torch.nan, torch.cat([p[k] for p in self.parts]))

        lie, aligned = cat("lie"), cat("aligned")
        share = torch.where(lie > 0, aligned / lie.clamp_min(1e-300), torch.zeros_like(lie))
        null = None
        if self.want_null:
            null = torch.cat([p["null"] for p in self.parts])
            d, ginv, norm = self.first
            first = float(self._residuals(self.last_l[:, None], d, ginv)[0, 0])
            null[0] = first / float(norm[0]) if float(norm[0]) > 0 else math.nan
            null = torch.where(bad, torch.nan, null)
        floor = cat("floor") if all("floor" in p for p in self.parts) else None
        specific = cat("specific") if all("specific" in p for p in self.parts) else None
        return LieResult(layer=self.labels[0], transform=self.labels[1], search=self.family, lie=lie,
                         aligned=aligned, share=torch.where(bad, torch.nan, share), floor=floor, null=null,
                         specific=specific,
                         reasons=reasons, method=self.method)


def lie_region(frame: LayerFrame, *, mask_radius: float | None = None, interior: bool | None = None,
               device=None) -> tuple[torch.Tensor, str | None]:
    """The reference's region ``M · I`` of a layer (float64 0/1) and the reason of every image when it is
    too small for a verdict (as for the finite errors, :data:`invariance.RF_COVERS_IMAGE`)."""
    region, _, used = comparison_region(frame, mask_radius=mask_radius, interior=interior, device=device,
                                        dtype=torch.float64)
    return region, (RF_COVERS_IMAGE if used and float(region.sum()) < MIN_REGION else None)
