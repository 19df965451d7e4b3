"""Test kit: hypothesis strategies and assertions about spatial alignability, for your own CI.

The metric and the assertion are separate (as in ``e3nn.util.test``): :func:`alignment_errors`
measures, per image, how well the maps of a layer for transformed images can be aligned with
those of the originals (:func:`invariance.measure_layer`, the toolkit's one measurement
core, over the comparison region of docs/definitions.md), and the ``assert_*`` helpers compare those
numbers with tolerances that follow the dtype and the *interpolation floor* (the same search
run on the images themselves, the identity network).

Tolerances
----------
A layer counts as *spatially alignable* under ``T_h`` when, for every image,
``spatial <= floor * (1 + rtol) + atol``:

* ``floor`` is what resampling alone costs (:func:`interpolation_floor`): the image is
  resampled once by ``T_h`` and the maps once by the warp, and at the input (the identity
  network) both interpolation errors are measured exactly; the kit takes the larger of the
  round trips with the transformation's centre on a pixel and between pixels (odd and even
  sizes), because a round trip can be exact by a lattice coincidence while its first
  resampling is not. A
  covariant layer sees the same two resamplings: the first one's error passes through the
  layer (smoothing filters attenuate it, a rectifier is 1-Lipschitz), the second acts on maps
  no rougher than the image. ``rtol = 1`` (:data:`DEFAULT_RTOL`) lets each of the two
  contributions be as large as the whole floor.
* ``atol`` (:data:`ATOL`) covers rounding where the floor is 0 (rotations by multiples of 90°,
  integer shifts). The errors are squared norms relative to the maps' energy, so maps that
  agree to a relative precision ``r`` give ``r^2``: we allow ``r = 1e-3`` in float32 (about
  ``10^4`` machine epsilons, rounding accumulated through a few layers of sums, the float32
  tolerance of ``e3nn.util.test``), ``r = 1e-6`` in float64 and ``r = 0.1`` in 16-bit formats.

A layer is *not spatially alignable* when, for every image,
``spatial > max(margin * (floor * (1 + rtol) + atol), min_error)`` (default ``margin = 2``): the
gap between the two verdicts means that no case passes both.

Example
-------
Paste into a test file of your project (``pytest`` with ``hypothesis`` installed)::

    import torch
    from hypothesis import given, settings
    from invariance import testing as it

    torch.manual_seed(0)
    NET = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 5, padding=2), torch.nn.ReLU())

    @settings(max_examples=10, deadline=None)
    @given(images=it.images(sizes=it.image_sizes(24, 40)), shift=it.translations(max_shift=4))
    def test_translations_are_alignable(images, shift):
        # CNNs are translation covariant: a warp undoes an integer shift of zero-margin images
        it.assert_spatially_alignable(NET, images, shift, layer="3")

    @settings(max_examples=5, deadline=None)
    @given(images=it.images(sizes=it.image_sizes(24, 40)), rotation=it.rotations(lattice=True))
    def test_rotations_are_not_alignable(images, rotation):
        # generic filters: a rotation changes which channel responds, and no warp undoes that
        it.assert_not_spatially_alignable(NET, images, rotation, layer="3")

    def test_report_a_layer():
        errs = it.alignment_errors(NET, it.example_images(), "rotation:45", layer="3")
        print(errs.table())   # per image: spatial, floor, expected, invariance, best warp

A failing assertion prints the measured errors per image, the bound and the best warp found::

    AssertionError: not spatially alignable: layer '3' of Sequential under rotation:90 (search rigid, ...)
    image     spatial       floor    expected  invariance     allowed  best warp (image frame: pixels, degrees)
        0      0.2447           0      0.5248      0.3257       1e-06  angle=18, tx=0.793, ty=-0.706   <- FAILS

The metric alone:

>>> import torch
>>> from invariance import testing as it
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2, bias=False), torch.nn.ReLU())
>>> errs = it.alignment_errors(net, it.example_images(2, 24), "translation:2,-1", layer="1")
>>> bool((errs.spatial <= errs.allowed()).all()), errs.params.round().tolist()
(True, [[-2.0, 1.0], [-2.0, 1.0]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import geometry as G
from ._features import FeatureExtractor
from ._measure import DEFAULT_SEARCH, Transform, parse_transforms
from ._metric import comparison_region, measure_layer, transformed_valid
from ._metric import interpolation_floor as _floor
from ._search import SEARCH_FAMILIES, SearchConfig, masked_error
from ._warp import warp
from .toys import make_blob_images

try:  # the metric and the assertions work without hypothesis; the strategies need it
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is installed with the dev extra
    st = None

__all__ = [
    "ATOL",
    "DEFAULT_RTOL",
    "DEFAULT_CONFIG",
    "AlignmentErrors",
    "alignment_errors",
    "as_transform",
    "valid_radius",
    "interpolation_floor",
    "border_band",
    "assert_spatially_alignable",
    "assert_not_spatially_alignable",
    "assert_invariant",
    "example_images",
    "rotations",
    "scalings",
    "translations",
    "transformations",
    "image_sizes",
    "dtypes",
    "images",
]

ATOL: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}
"""Absolute tolerance on a normalised squared error, per dtype (see the module docstring)."""

DEFAULT_RTOL = 1.0
"""Allowed relative excess over the interpolation floor (see the module docstring)."""

DEFAULT_CONFIG = SearchConfig.preset("fast")
"""A quick search (every 10° plus the expected transformation, 20 refinement steps)."""


# ----------------------------------------------------------------------------- helpers


def as_transform(transform: Transform | str) -> Transform:
    """A :class:`invariance.Transform` from itself or from one SPEC string (``"rotation:90"``)."""
    if isinstance(transform, Transform):
        return transform
    if isinstance(transform, str):
        out = parse_transforms(transform)
        if len(out) != 1:
            raise ValueError(f"transform: expected one transformation, got {len(out)} from {transform!r}")
        return out[0]
    raise TypeError(f"transform: expected a Transform or a SPEC string, got {type(transform).__name__}")


def valid_radius(transform: Transform | str, size: Sequence[int], border: float = 0.0) -> float:
    """Radius (normalised) of the central disk where ``W_{h^-1} F_h`` and ``F`` are both valid.

    ``W_{h^-1} F_h (x) = F_h(h x)`` and ``|h x| <= sigma_max |x| + |t|`` (``sigma_max`` the largest
    singular value of the linear part, ``t`` the translation, both normalised). With a band of
    width ``border`` (normalised) along the edges of every map excluded (padding effects), the
    disk of radius ``min(1 - border, (1 - border - |t|) / sigma_max)`` is valid in both maps.

    >>> valid_radius("rotation:30", (32, 32)), valid_radius("scale:2", (32, 32))
    (1.0, 0.5)
    >>> valid_radius("translation:4,0", (32, 32), border=0.25)
    0.5
    """
    tr = as_transform(transform)
    m = tr.matrix(size, torch.float64)
    smax = float(torch.linalg.matrix_norm(m[:2, :2], ord=2))
    t = float(torch.linalg.vector_norm(m[:2, 2]))
    r = min(1.0 - border, (1.0 - border - t) / smax)
    if r <= 0:
        raise ValueError(f"transform: {tr.label} leaves no region valid in both maps "
                         f"(translation {t:.3g}, scale {smax:.3g}, border {border:.3g}, normalised units)")
    return min(1.0, r)


def border_band(model: nn.Module, layer: str, images: torch.Tensor) -> float:
    """Width (normalised, at most 1) of the band along the map's edges that padding affects.

    Images with a zero margin look, to the network, like content on an infinite empty plane,
    except where a layer pads: there the map differs from the network's response to the empty
    plane. That response is the layer's output for an all-zero image, which is constant in the
    interior (a translation-covariant network with biases) and deviates within the band.
    Returns 0 when the output for an empty image is constant (no biases, circular padding).
    """
    if layer == "input":
        return 0.0
    z = torch.zeros(1, *images.shape[1:], dtype=images.dtype, device=images.device)
    f0 = FeatureExtractor(model, [layer])(z)[0][layer][0]
    h, w = f0.shape[-2:]
    centre = f0[:, h // 2, w // 2][:, None, None]
    scale = float(f0.abs().max())
    dev = ((f0 - centre).abs() > 1e-6 * scale).any(0) if scale > 0 else torch.zeros(h, w, dtype=torch.bool)
    if not bool(dev.any()):
        return 0.0
    ys, xs = G.pixel_centres((h, w), dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    depth = 1 - torch.maximum(yy.abs(), xx.abs())  # normalised distance of a pixel centre from the edge
    # one more pixel: bilinear warps read the neighbours of a point
    return min(1.0, float(depth[dev.cpu()].max()) + 2.0 / min(h, w) + 1.0 / min(h, w))


def _atol(dtype: torch.dtype) -> float:
    return ATOL.get(dtype, ATOL[torch.float32])


@dataclass
class AlignmentErrors:
    """Per-image errors of one layer under one transformation (all ``(B,)`` float64 tensors).

    Attributes:
        layer, transform, search: what was measured and the search family.
        spatial: best spatial warp. ``permutation``: best warp and channel permutation (None
            unless asked). ``expected``: the warp ``W_{h^-1}`` an STN "should" apply.
            ``invariance``: no alignment. ``floor``: the interpolation floor, the spatial error
            of the images themselves under the same transformation, search and mask radius
            (the larger over both grid parities, :func:`interpolation_floor`).
        params, param_names: the best spatial warp per image, in the image's centred frame
            (pixels, degrees), as applied to the maps of the transformed images.
        permutations: ``(B, C)`` best channel permutations (``aligned[c] = warped[perm[c]]``).
        orbits: channel orbits (cycles) of the most frequent permutation.
        mask_radius, dtype, model: how it was measured (``mask_radius`` None: the whole map).
        reasons: per image, None or why its errors are NaN (no signal on the region).
        overlap: the comparison region kept by the best warp (fraction of the reference's).
        interior: whether the receptive-field interior was applied.
    """

    layer: str
    transform: Transform
    search: str
    spatial: torch.Tensor
    expected: torch.Tensor
    invariance: torch.Tensor
    floor: torch.Tensor
    params: torch.Tensor
    param_names: tuple[str, ...]
    mask_radius: float | None
    dtype: torch.dtype
    model: str = ""
    permutation: torch.Tensor | None = None
    permutations: torch.Tensor | None = None
    orbits: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    overlap: torch.Tensor | None = None
    interior: bool = False

    def allowed(self, rtol: float = DEFAULT_RTOL, atol: float | None = None) -> torch.Tensor:
        """``floor * (1 + rtol) + atol`` per image: the largest error of an alignable layer."""
        return self.floor * (1 + rtol) + (_atol(self.dtype) if atol is None else atol)

    def table(self, bound: torch.Tensor | None = None, bound_name: str = "bound", ok=None) -> str:
        """One line per image: the errors, an optional bound, and the best transformation found."""
        head = f"{'image':>5}  {'spatial':>10}  {'floor':>10}  {'expected':>10}  {'invariance':>10}"
        if self.permutation is not None:
            head += f"  {'permutation':>11}"
        if bound is not None:
            head += f"  {bound_name:>10}"
        head += "  best warp (image frame: pixels, degrees)"
        lines = [head]
        for i in range(self.spatial.shape[0]):
            row = (f"{i:>5}  {self.spatial[i]:>10.4g}  {self.floor[i]:>10.4g}  {self.expected[i]:>10.4g}"
                   f"  {self.invariance[i]:>10.4g}")
            if self.permutation is not None:
                row += f"  {self.permutation[i]:>11.4g}"
            if bound is not None:
                row += f"  {bound[i]:>10.4g}"
            row += "  " + ", ".join(f"{n}={v:.3g}" for n, v in zip(self.param_names, self.params[i].tolist()))
            if ok is not None:
                row += "" if bool(ok[i]) else "   <- FAILS"
            lines.append(row)
        if self.permutations is not None:
            lines.append(f"channel orbits of the most frequent permutation: {self.orbits or 'none (identity)'}")
        for i, r in enumerate(self.reasons):
            if r is not None:
                lines.append(f"image {i}: no verdict (NaN): {r}")
        return "\n".join(lines)

    def describe(self) -> str:
        return (f"layer {self.layer!r}{' of ' + self.model if self.model else ''} under {self.transform.label} "
                f"(search {self.search}, {str(self.dtype).replace('torch.', '')}, {self.spatial.shape[0]} image(s), "
                f"{'whole map' if self.mask_radius is None else f'mask radius {self.mask_radius:.3g}'}, "
                f"interior {'on' if self.interior else 'off'})")


def interpolation_floor(
    images: torch.Tensor,
    transform: Transform | str,
    *,
    search: str | None = None,
    mask_radius: float | None = None,
    config: SearchConfig | None = None,
    transformed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The interpolation floor per image ``(B,)`` float64: what resampling alone costs.

    The toolkit's one floor (:func:`invariance.interpolation_floor`): the spatial error
    of the images themselves (the identity network) under the transformation and the search,
    the larger of the round trips on the images and on the images padded by one zero row and
    column (a round trip can be exact by a lattice coincidence although its first resampling is
    not: zooming an odd-sized image by 2 about its centre pixel interpolates between pixels, and
    warping back samples exactly the pixels that were not interpolated). Lattice-exact
    transformations (rotations of square images by multiples of 90°, integer shifts) stay exact
    in both. With ``transformed`` given (images transformed some other way, e.g.
    ``torch.roll``) only that round trip is measured.

    >>> x = example_images(2, 31)
    >>> bool((interpolation_floor(x, "scale:2") > 1e-4).all()), bool(interpolation_floor(x, "rotation:90").max() < 1e-9)
    (True, True)
    """
    tr = as_transform(transform)
    fam = search or DEFAULT_SEARCH[tr.family]
    return _floor(images, tr.matrix(tuple(images.shape[-2:]), torch.float64), fam, mask_radius=mask_radius,
                  config=config or DEFAULT_CONFIG, transformed=transformed)


def _check_model(model: nn.Module, images: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a floating-point (B, C, H, W) tensor, got {shape}")
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point() and p.dtype != images.dtype:
        raise TypeError(f"images: dtype {images.dtype} differs from the model's parameters ({p.dtype}); "
                        f"convert one of them, e.g. model.to({images.dtype})")


def alignment_errors(
    model: nn.Module,
    images: torch.Tensor,
    transform: Transform | str,
    layer: str,
    *,
    channels: str = "spatial",
    search: str | None = None,
    mask_radius: float | None = None,
    interior: bool | None = None,
    config: SearchConfig | None = None,
    transformed: torch.Tensor | None = None,
) -> AlignmentErrors:
    """The metric: per-image spatial (and permutation) alignment errors of ``layer``, with the floor.

    Args:
        model: any ``nn.Module`` taking ``(B, C, H, W)`` images (same dtype as ``images``).
        images: ``(B, C, H, W)`` floating-point images.
        transform: a :class:`invariance.Transform` or a SPEC string such as ``"rotation:90"``.
        layer: a module name (as in ``model.named_modules()``) or ``"input"``.
        channels: ``"spatial"`` or ``"permutation"`` (also search a channel permutation).
        search: the search family (default :data:`invariance.DEFAULT_SEARCH` of the
            transformation's family).
        mask_radius: an evaluation disk in normalised units of each grid (default: the whole
            map; the comparison region of docs/definitions.md takes care of the border).
        interior: the receptive-field interior (default: auto, see :data:`invariance.INTERIOR_MIN_FRACTION`).
        config: the search settings (default :data:`DEFAULT_CONFIG`); the expected warp
            ``W_{h^-1}`` and the identity are always scored as extra candidates.
        transformed: the transformed images ``T_h f`` when they are made some other way (for
            example ``torch.roll`` for circular shifts: every pixel then counts as valid);
            default: :func:`invariance.warp` of ``images`` (bilinear, zero padding).

    Returns:
        :class:`AlignmentErrors`.
    """
    _check_model(model, images)
    tr = as_transform(transform)
    fam = search or DEFAULT_SEARCH[tr.family]
    if fam not in SEARCH_FAMILIES:
        raise ValueError(f"search: unknown search family {fam!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    if channels not in ("spatial", "permutation"):
        raise ValueError(f"channels: expected 'spatial' or 'permutation', got {channels!r}")
    cfg = config or DEFAULT_CONFIG
    size = tuple(images.shape[-2:])
    t_img = tr.matrix(size, torch.float64)
    generated = transformed is None
    if generated:
        transformed = warp(images, t_img.to(images.dtype))
        image_valid = transformed_valid(t_img, size)
    elif transformed.shape != images.shape:
        raise ValueError(f"transformed: shape {tuple(transformed.shape)} differs from images {tuple(images.shape)}")
    else:
        image_valid = torch.ones(size, dtype=torch.bool)
    feats, frames = FeatureExtractor(model, [layer])(torch.cat([images, transformed]))
    b = images.shape[0]
    res = measure_layer(feats[layer][:b], feats[layer][b:], frames[layer], t_img, family=fam,
                        channels=(channels,), mask_radius=mask_radius, interior=interior, image_valid=image_valid,
                        config=cfg, layer=layer, transform=tr.label)
    floor = interpolation_floor(images, tr, search=fam, mask_radius=mask_radius, config=cfg,
                                transformed=None if generated else transformed)
    return AlignmentErrors(
        layer=layer, transform=tr, search=fam, spatial=res.spatial, expected=res.expected,
        invariance=res.invariance, floor=floor, params=res.params, param_names=res.param_names,
        mask_radius=mask_radius, dtype=images.dtype, model=type(model).__name__,
        permutation=res.permutation, permutations=res.permutations, orbits=res.orbits,
        reasons=res.reasons, overlap=res.overlap, interior=res.interior,
    )


# ----------------------------------------------------------------------------- assertions


def _require_verdict(errs: AlignmentErrors) -> None:
    """No verdict on no signal: an image without one fails the assertion, whichever it is."""
    bad = [i for i, r in enumerate(errs.reasons) if r is not None] + [
        i for i in range(errs.spatial.shape[0]) if errs.floor[i].isnan() and errs.reasons[i] is None]
    if bad:
        ok = torch.ones(errs.spatial.shape[0], dtype=torch.bool)
        ok[bad] = False
        _fail(errs, "no verdict", None, "bound", ok,
              f"{len(bad)} image(s) have no signal to align on the comparison region (see the reasons above); "
              "use images with content inside the frame, or another layer")


def _fail(errs: AlignmentErrors, headline: str, bound, bound_name, ok, note: str) -> None:
    raise AssertionError(f"{headline}: {errs.describe()}\n{errs.table(bound, bound_name, ok)}\n{note}")


def assert_spatially_alignable(
    model: nn.Module,
    images: torch.Tensor,
    transform: Transform | str,
    layer: str,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    **kwargs,
) -> AlignmentErrors:
    """Assert that for every image ``spatial <= floor * (1 + rtol) + atol`` (atol from :data:`ATOL`).

    Keyword arguments go to :func:`alignment_errors`. Returns the measured errors.
    """
    errs = alignment_errors(model, images, transform, layer, **kwargs)
    _require_verdict(errs)
    allowed = errs.allowed(rtol, atol)
    ok = errs.spatial <= allowed
    if not bool(ok.all()):
        a = _atol(errs.dtype) if atol is None else atol
        _fail(errs, "not spatially alignable", allowed, "allowed", ok,
              f"allowed = floor * (1 + rtol) + atol with rtol={rtol:g}, atol={a:g}; the best warp found "
              f"leaves more than resampling alone explains")
    return errs


def assert_not_spatially_alignable(
    model: nn.Module,
    images: torch.Tensor,
    transform: Transform | str,
    layer: str,
    *,
    margin: float = 2.0,
    min_error: float = 0.0,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    **kwargs,
) -> AlignmentErrors:
    """Assert that for every image ``spatial > max(margin * (floor * (1 + rtol) + atol), min_error)``.

    The default ``margin = 2`` leaves a gap above the bound of :func:`assert_spatially_alignable`.
    Keyword arguments go to :func:`alignment_errors`. Returns the measured errors.
    """
    errs = alignment_errors(model, images, transform, layer, **kwargs)
    _require_verdict(errs)
    need = torch.clamp(margin * errs.allowed(rtol, atol), min=min_error)
    ok = errs.spatial > need
    if not bool(ok.all()):
        _fail(errs, "spatially alignable (expected not to be)", need, "required", ok,
              f"required = max(margin * (floor * (1 + rtol) + atol), min_error) with margin={margin:g}, "
              f"rtol={rtol:g}, min_error={min_error:g}; a spatial warp aligns these maps about as well as "
              f"it aligns the images themselves")
    return errs


def assert_invariant(
    model: nn.Module,
    images: torch.Tensor,
    transform: Transform | str,
    layer: str | None = None,
    *,
    rtol: float = DEFAULT_RTOL,
    atol: float | None = None,
    mask_radius: float | None = None,
    config: SearchConfig | None = None,
    transformed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assert that the output (or ``layer``) does not change: ``||G T_h f - G f||^2 / ||G f||^2 <= allowed``.

    ``allowed = floor * (1 + rtol) + atol`` per image, with the interpolation floor of the images
    (as in :func:`alignment_errors`): an invariant model may not change by more than resampling
    the image explains. Outputs of any shape are compared as flat vectors per image; 4-D layer
    maps on their comparison region (docs/definitions.md; within the disk of radius
    ``mask_radius`` if given). Returns the per-image invariance errors.
    """
    _check_model(model, images)
    tr = as_transform(transform)
    size = tuple(images.shape[-2:])
    t_img = tr.matrix(size, torch.float64)
    user_transformed = transformed
    if transformed is None:
        transformed = warp(images, t_img.to(images.dtype))
        image_valid = transformed_valid(t_img, size)
    else:
        image_valid = torch.ones(size, dtype=torch.bool)
    b = images.shape[0]
    if layer is None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.cat([images, transformed]))
        finally:
            model.train(was)
        out = out.reshape(2 * b, -1)
        ref, mov = out[:b], out[b:]
        err = ((mov - ref).pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-30)).double()
    else:
        feats, frames = FeatureExtractor(model, [layer])(torch.cat([images, transformed]))
        ref, mov = feats[layer][:b], feats[layer][b:]
        region, mvalid, _ = comparison_region(frames[layer], mask_radius=mask_radius, image_valid=image_valid,
                                              device=ref.device, dtype=ref.dtype)
        err = masked_error(ref, mov, region, valid=mvalid).double()
    floor = interpolation_floor(images, tr, mask_radius=mask_radius, config=config, transformed=user_transformed)
    a = _atol(images.dtype) if atol is None else atol
    allowed = floor * (1 + rtol) + a
    ok = err.cpu() <= allowed.cpu()
    if not bool(ok.all()):
        rows = "\n".join(f"{i:>5}  {err[i]:>10.4g}  {floor[i]:>10.4g}  {allowed[i]:>10.4g}"
                         + ("" if bool(ok[i]) else "   <- FAILS") for i in range(b))
        what = "output" if layer is None else f"layer {layer!r}"
        raise AssertionError(
            f"not invariant: the {what} of {type(model).__name__} changes under {tr.label} "
            f"({str(images.dtype).replace('torch.', '')}, {b} image(s))\n"
            f"{'image':>5}  {'invariance':>10}  {'floor':>10}  {'allowed':>10}\n{rows}\n"
            f"invariance = ||G(T x) - G(x)||^2 / ||G(x)||^2; allowed = floor * (1 + rtol) + atol with "
            f"rtol={rtol:g}, atol={a:g}")
    return err.cpu()


# ----------------------------------------------------------------------------- images


def example_images(n: int = 4, size: int | Sequence[int] = 32, seed: int = 0, *, dtype=torch.float32,
                   content_radius: float = 0.5) -> torch.Tensor:
    """Smooth generic test images ``(n, 1, H, W)`` with a zero margin (:func:`invariance.toys.make_blob_images`).

    >>> example_images(2, 24).shape
    torch.Size([2, 1, 24, 24])
    """
    return make_blob_images(n, size, seed, content_radius=content_radius, dtype=dtype,
                            sigma_range=_sigma_range(size))


def _sigma_range(size) -> tuple[float, float]:
    s = min(size) if not isinstance(size, int) else size
    return (max(1.2, 1.5 * s / 48), max(1.5, 3.5 * s / 48))


# ----------------------------------------------------------------------------- strategies


def _hypothesis():
    if st is None:  # pragma: no cover
        raise ImportError("invariance.testing: the strategies need hypothesis (pip install hypothesis)")
    return st


def rotations(min_angle: float = -180.0, max_angle: float = 180.0, *, lattice: bool = False,
              min_abs: float = 0.0) -> st.SearchStrategy[Transform]:
    """Rotations about the centre (degrees, counter-clockwise as displayed).

    ``lattice=True`` draws from 90, 180 and 270 (exact on the pixel grid); ``min_abs`` keeps
    ``|angle|`` (wrapped to (-180, 180]) at least that far from 0.
    """
    st = _hypothesis()
    if lattice:
        return st.sampled_from([90.0, 180.0, 270.0]).map(lambda a: Transform("rotation", (a,)))
    ang = st.floats(min_angle, max_angle, allow_nan=False, allow_infinity=False)
    if min_abs > 0:
        ang = ang.filter(lambda a: abs(180.0 - (180.0 - a) % 360.0) >= min_abs)
    return ang.map(lambda a: Transform("rotation", (a,)))


def scalings(min_log2: float = -1.0, max_log2: float = 1.0, *, min_abs_log2: float = 0.0,
             values: Sequence[float] | None = None) -> st.SearchStrategy[Transform]:
    """Isotropic rescalings ``s = 2^u`` about the centre, ``u`` in ``[min_log2, max_log2]``, ``|u| >= min_abs_log2``.

    ``values`` draws from given factors instead.
    """
    st = _hypothesis()
    if values is not None:
        return st.sampled_from([float(v) for v in values]).map(lambda s: Transform("scale", (s,)))
    u = st.floats(min_log2, max_log2, allow_nan=False, allow_infinity=False)
    if min_abs_log2 > 0:
        u = u.filter(lambda v: abs(v) >= min_abs_log2)
    return u.map(lambda v: Transform("scale", (float(2.0**v),)))


def translations(max_shift: float = 4.0, *, integer: bool = True) -> st.SearchStrategy[Transform]:
    """Translations ``(tx, ty)`` in pixels with ``|tx|, |ty| <= max_shift`` (integers by default)."""
    st = _hypothesis()
    if integer:
        k = int(math.floor(max_shift))
        comp = st.integers(-k, k).map(float)
    else:
        comp = st.floats(-max_shift, max_shift, allow_nan=False, allow_infinity=False)
    return st.tuples(comp, comp).map(lambda t: Transform("translation", t))


def transformations(family: str = "rotation", **kwargs) -> st.SearchStrategy[Transform]:
    """Transformations of one family with sensible ranges.

    ``rotation`` / ``scale`` / ``translation`` use :func:`rotations`, :func:`scalings`,
    :func:`translations` (``kwargs`` go to them); ``rigid``: angle in [-180, 180] and shifts up
    to ``max_shift`` (default 3) px; ``similarity``: that and ``log2 s`` in [-0.5, 0.5];
    ``affine``: a linear part within ``0.2`` (``max_deform``) of a rotation, shifts up to 3 px.
    """
    st = _hypothesis()
    if family == "rotation":
        return rotations(**kwargs)
    if family == "scale":
        return scalings(**kwargs)
    if family == "translation":
        return translations(**kwargs)
    ms = float(kwargs.get("max_shift", 3.0))
    shift = st.floats(-ms, ms, allow_nan=False)
    angle = st.floats(-180.0, 180.0, allow_nan=False)
    if family == "rigid":
        return st.tuples(angle, shift, shift).map(lambda p: Transform("rigid", p))
    if family == "similarity":
        ls = float(kwargs.get("max_log2", 0.5))
        return st.tuples(angle, st.floats(-ls, ls), shift, shift).map(
            lambda p: Transform("similarity", (p[0], float(2.0 ** p[1]), p[2], p[3])))
    if family == "affine":
        d = float(kwargs.get("max_deform", 0.2))
        dev = st.floats(-d, d, allow_nan=False)

        def build(p):
            a, d00, d01, d10, d11, tx, ty = p
            c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
            lin = torch.tensor([[c, s], [-s, c]], dtype=torch.float64) @ torch.tensor(
                [[1 + d00, d01], [d10, 1 + d11]], dtype=torch.float64)
            return Transform("affine", (lin[0, 0].item(), lin[0, 1].item(), tx, lin[1, 0].item(),
                                        lin[1, 1].item(), ty))

        return st.tuples(angle, dev, dev, dev, dev, shift, shift).map(build)
    raise ValueError(f"family: expected rotation, scale, translation, rigid, similarity or affine, got {family!r}")


def image_sizes(min_size: int = 16, max_size: int = 48, *, parity: str | None = None,
                square: bool = True) -> st.SearchStrategy[tuple[int, int]]:
    """Image sizes ``(H, W)``: ``parity`` ``"odd"``, ``"even"`` or None (both); square by default."""
    st = _hypothesis()
    side = st.integers(min_size, max_size)
    if parity == "odd":
        side = side.map(lambda v: v if v % 2 else (v + 1 if v < max_size else v - 1))
    elif parity == "even":
        side = side.map(lambda v: v if v % 2 == 0 else (v + 1 if v < max_size else v - 1))
    elif parity is not None:
        raise ValueError(f"parity: expected 'odd', 'even' or None, got {parity!r}")
    if square:
        return side.map(lambda v: (v, v))
    return st.tuples(side, side)


def dtypes(*choices: torch.dtype) -> st.SearchStrategy[torch.dtype]:
    """Floating-point dtypes (default float32 and float64)."""
    st = _hypothesis()
    return st.sampled_from(list(choices) or [torch.float32, torch.float64])


def images(batch: int | tuple[int, int] = (1, 3), *, channels: int = 1,
           sizes: st.SearchStrategy[tuple[int, int]] | None = None,
           dtype: torch.dtype | st.SearchStrategy[torch.dtype] = torch.float32,
           content_radius: float = 0.5, sigma_range: tuple[float, float] | None = None):
    """Smooth generic images ``(B, C, H, W)`` with a zero margin (random blobs, exactly 0 outside
    the disk of radius ``content_radius``), built from a drawn seed so that they shrink well.

    ``sigma_range`` (pixels) sets the blob widths (default: 1.5 to 3.5 px on 48 px images,
    proportionally smaller on smaller ones, at least 1.2 px). Rescalings by ``s < 1`` need blobs
    wider than ``1 / s`` px to stay resolved after the resampling."""
    st = _hypothesis()

    @st.composite
    def draw_images(draw):
        n = batch if isinstance(batch, int) else draw(st.integers(batch[0], batch[1]))
        h, w = draw(sizes if sizes is not None else image_sizes())
        dt = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        x = make_blob_images(n * channels, (h, w), seed, content_radius=content_radius, dtype=dt,
                             sigma_range=sigma_range or _sigma_range((h, w)))
        return x.reshape(n, channels, h, w)

    return draw_images()
