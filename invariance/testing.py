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

The infinitesimal view (docs/definitions.md) has its own two: :func:`assert_infinitesimally_alignable`
asserts ``a² <= floor * (1 + rtol) + atol`` against the layer's grid floor (:data:`LIE_RTOL`), and
:func:`assert_infinitesimally_covariant` asserts ``s² <= max_share * r² + atol``, by default to
the dtype's rounding (:data:`ATOL` for both: exact covariance, as under any translation).

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
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import geometry as G
from ._features import FeatureExtractor
from ._measure import DEFAULT_SEARCH
from ._metric import comparison_region, measure_layer, transformed_valid
from ._metric import interpolation_floor as _floor
from ._search import SEARCH_FAMILIES, SearchConfig, masked_error
from ._transform import Transform, parse_transforms
from ._warp import warp
from .checks import check_finite, check_images, check_int, check_number, check_size
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
    "assert_infinitesimally_alignable",
    "assert_infinitesimally_covariant",
    "LIE_RTOL",
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
    size = check_size(size)
    border = check_number(border, "border", minimum=0, maximum=1)
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
    __tracebackhide__ = _hide_argument_error
    _check_model(model, images)
    _check_layer(model, layer)
    if layer == "input":
        return 0.0
    z = torch.zeros(1, *images.shape[1:], dtype=images.dtype, device=images.device)
    f0 = _layer_maps(model, layer, z)[0][0]
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


# ----------------------------------------------------------------------------- argument checks
# Each raises a one-line TypeError / ValueError that names the argument and the valid range
# (invariance.checks); the assertions call them before measuring anything.


def _hide_argument_error(excinfo) -> bool:
    """pytest's ``__tracebackhide__`` for the metric: hide its frame for an argument error (the
    one-line ``TypeError`` / ``ValueError`` about the caller's input), keep it for anything else."""
    return excinfo is not None and excinfo.errisinstance((TypeError, ValueError))


def _check_tolerances(rtol, atol) -> None:
    """``rtol``: the allowed relative excess over the floor, ``atol``: an absolute allowance (None:
    :data:`ATOL` of the dtype); both finite and >= 0 (a negative one would fail a layer that aligns
    exactly, an infinite one would pass any layer)."""
    __tracebackhide__ = True
    check_number(rtol, "rtol", minimum=0)
    if atol is not None:
        check_number(atol, "atol", minimum=0)


def _check_mask_radius(mask_radius) -> None:
    __tracebackhide__ = True
    if mask_radius is not None:
        check_number(mask_radius, "mask_radius", positive=True)


def _check_model(model: nn.Module, images: torch.Tensor) -> None:
    __tracebackhide__ = True
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    check_images(images)
    check_finite(images, "images")
    p = next(iter(model.parameters()), None)
    if p is not None and p.is_floating_point() and p.dtype != images.dtype:
        raise TypeError(f"images: dtype {images.dtype} differs from the model's parameters ({p.dtype}); "
                        f"convert one of them, e.g. model.to({images.dtype})")


def _check_transformed(transformed, images: torch.Tensor) -> None:
    """``transformed`` (when given) is a floating-point tensor of the images' shape and dtype."""
    __tracebackhide__ = True
    if transformed is None:
        return
    if not isinstance(transformed, torch.Tensor):
        raise TypeError(f"transformed: expected a torch.Tensor shaped like images {tuple(images.shape)}, "
                        f"got {type(transformed).__name__}")
    if transformed.shape != images.shape:
        raise ValueError(f"transformed: shape {tuple(transformed.shape)} differs from images {tuple(images.shape)}")
    if transformed.dtype != images.dtype:
        raise TypeError(f"transformed: dtype {transformed.dtype} differs from images ({images.dtype})")


def _check_layer(model: nn.Module, layer) -> None:
    """``layer`` is ``"input"`` or the name of one of ``model``'s submodules."""
    __tracebackhide__ = True
    if not isinstance(layer, str):
        raise TypeError(f"layer: expected a module name (str) as in model.named_modules(), or 'input', "
                        f"got {type(layer).__name__}")
    if layer == "input":
        return
    names = [n for n, _ in model.named_modules() if n]
    if layer not in names:
        choices = ["input", *names]
        shown = ", ".join(choices[:12]) + (f", ... ({len(choices)} in all)" if len(choices) > 12 else "")
        raise ValueError(f"layer: {type(model).__name__} has no module named {layer!r}; valid choices: {shown}")


def _describe_output(out) -> str:
    """What a module returned, for an error message: the type, and the keys or length of a container."""
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, dict):
        return f"a {type(out).__name__} (keys {', '.join(map(repr, list(out)[:6]))})"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


def _layer_maps(model: nn.Module, layer: str, x: torch.Tensor):
    """``(maps, frame)`` of ``layer`` for ``x``; a layer whose output is not one ``(B, C, H, W)``
    tensor (a tuple, a dict, a vector) is refused with what it returned, before the rest of the
    forward pass runs (a hook on that module, called before the extractor's)."""
    __tracebackhide__ = _hide_argument_error
    if layer == "input":
        feats, frames = FeatureExtractor(model, [layer])(x)
        return feats[layer], frames[layer]
    module = dict(model.named_modules())[layer]
    first = []

    def check_output(_module, _inp, out):
        if first:
            return  # a module called twice (a shared ReLU): its first call counts, as in the extractor
        first.append(True)
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            err = TypeError if not isinstance(out, torch.Tensor) else ValueError
            raise err(f"layer: module {layer!r} of {type(model).__name__} returned {_describe_output(out)}, "
                      f"not one (B, C, H, W) tensor of feature maps; choose a layer with 4-D output "
                      f"(invariance.extract_features(model, images) lists them)")

    handle = module.register_forward_hook(check_output)
    try:
        feats, frames = FeatureExtractor(model, [layer])(x)
    finally:
        handle.remove()
    return feats[layer], frames[layer]


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
        _check_tolerances(rtol, atol)
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
    __tracebackhide__ = _hide_argument_error
    check_images(images)
    check_finite(images, "images")
    tr = as_transform(transform)
    _check_mask_radius(mask_radius)
    _check_transformed(transformed, images)
    fam = search or DEFAULT_SEARCH[tr.family]
    if fam not in SEARCH_FAMILIES:
        raise ValueError(f"search: unknown search family {fam!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    return _floor(images, tr.matrix(tuple(images.shape[-2:]), torch.float64), fam, mask_radius=mask_radius,
                  config=config or DEFAULT_CONFIG, transformed=transformed)


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
        interior: the receptive-field interior (default: auto, see :func:`invariance.measure_layer`).
        config: the search settings (default :data:`DEFAULT_CONFIG`); the expected warp
            ``W_{h^-1}`` and the identity are always scored as extra candidates.
        transformed: the transformed images ``T_h f`` when they are made some other way (for
            example ``torch.roll`` for circular shifts: every pixel then counts as valid);
            default: :func:`invariance.warp` of ``images`` (bilinear, zero padding).

    Returns:
        :class:`AlignmentErrors`.
    """
    __tracebackhide__ = _hide_argument_error
    _check_model(model, images)
    _check_layer(model, layer)
    tr = as_transform(transform)
    fam = search or DEFAULT_SEARCH[tr.family]
    if fam not in SEARCH_FAMILIES:
        raise ValueError(f"search: unknown search family {fam!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    if channels not in ("spatial", "permutation"):
        raise ValueError(f"channels: expected 'spatial' or 'permutation', got {channels!r}")
    _check_mask_radius(mask_radius)
    _check_transformed(transformed, images)
    cfg = config or DEFAULT_CONFIG
    size = tuple(images.shape[-2:])
    t_img = tr.matrix(size, torch.float64)
    generated = transformed is None
    if generated:
        transformed = warp(images, t_img.to(images.dtype))
        image_valid = transformed_valid(t_img, size)
    else:
        image_valid = torch.ones(size, dtype=torch.bool)
    maps, frame = _layer_maps(model, layer, torch.cat([images, transformed]))
    b = images.shape[0]
    res = measure_layer(maps[:b], maps[b:], frame, t_img, family=fam,
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
    __tracebackhide__ = True
    bad = [i for i, r in enumerate(errs.reasons) if r is not None] + [
        i for i in range(errs.spatial.shape[0]) if errs.floor[i].isnan() and errs.reasons[i] is None]
    if bad:
        ok = torch.ones(errs.spatial.shape[0], dtype=torch.bool)
        ok[bad] = False
        _fail(errs, "no verdict", None, "bound", ok,
              f"{len(bad)} image(s) have no verdict (see the reasons above); use larger images, images with "
              "content inside the frame, or another layer")


_FLOOR_NOTE = ("floor = the same search on the images themselves (interpolation_floor: what resampling alone "
              "costs, the larger over both grid parities)")


def _atol_note(atol: float | None, dtype: torch.dtype) -> str:
    """``atol=...`` as used, and where it came from."""
    if atol is not None:
        return f"atol={atol:g} (given)"
    name = str(dtype).replace("torch.", "")
    return f"atol={_atol(dtype):g} (ATOL[{name}]: rounding where the floor is 0)"


def _check_margin(margin, min_error) -> None:
    """``margin >= 1``: the module docstring's gap (no case passes both verdicts) needs
    ``margin * allowed >= allowed``; ``min_error``: an error is a ratio of energies, >= 0."""
    __tracebackhide__ = True
    try:
        check_number(margin, "margin", minimum=1)
    except ValueError as e:
        raise ValueError(f"{e} (the factor on assert_spatially_alignable's bound: below 1 a layer could pass "
                         f"both assertions, a negative one passes exactly alignable layers)") from None
    check_number(min_error, "min_error", minimum=0)


def _fail(errs: AlignmentErrors, headline: str, bound, bound_name, ok, note: str) -> None:
    __tracebackhide__ = True
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
    ``rtol`` and ``atol`` must be finite and >= 0.
    """
    __tracebackhide__ = True
    _check_tolerances(rtol, atol)
    errs = alignment_errors(model, images, transform, layer, **kwargs)
    _require_verdict(errs)
    allowed = errs.allowed(rtol, atol)
    ok = errs.spatial <= allowed
    if not bool(ok.all()):
        _fail(errs, "not spatially alignable", allowed, "allowed", ok,
              f"allowed = floor * (1 + rtol) + atol with rtol={rtol:g}, {_atol_note(atol, errs.dtype)}; "
              f"{_FLOOR_NOTE}; the best warp found leaves more than resampling alone explains")
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

    The default ``margin = 2`` leaves a gap above the bound of :func:`assert_spatially_alignable`;
    ``margin`` must be at least 1 (below 1 a layer could pass both assertions; a negative margin
    would pass a layer that aligns exactly). ``min_error``, ``rtol`` and ``atol`` must be finite
    and >= 0. Keyword arguments go to :func:`alignment_errors`. Returns the measured errors.
    """
    __tracebackhide__ = True
    _check_margin(margin, min_error)
    _check_tolerances(rtol, atol)
    errs = alignment_errors(model, images, transform, layer, **kwargs)
    _require_verdict(errs)
    need = torch.clamp(margin * errs.allowed(rtol, atol), min=min_error)
    ok = errs.spatial > need
    if not bool(ok.all()):
        _fail(errs, "spatially alignable (expected not to be)", need, "required", ok,
              f"required = max(margin * (floor * (1 + rtol) + atol), min_error) with margin={margin:g}, "
              f"rtol={rtol:g}, {_atol_note(atol, errs.dtype)}, min_error={min_error:g}; {_FLOOR_NOTE}; "
              f"a spatial warp aligns these maps about as well as it aligns the images themselves")
    return errs


_LIE_OPTIONS = ("search", "mask_radius", "interior")


def _lie_layer(model: nn.Module, images: torch.Tensor, transform, layer, options: dict, who: str):
    """The :class:`invariance.LieResult` of ``layer`` (with its grid floor and ``s²``), after the
    kit's argument checks: one-line errors naming the argument, before the Lie derivative runs."""
    __tracebackhide__ = _hide_argument_error
    from ._measure import lie_derivative

    _check_model(model, images)
    _check_layer(model, layer)
    for name in options:
        if name not in _LIE_OPTIONS:
            why = " (the assertion needs the grid floor's translation directions)" if name == "calibrate" else ""
            raise TypeError(f"{name}: not an option of {who}{why}; valid choices: {', '.join(_LIE_OPTIONS)}")
    tr = as_transform(transform)
    fam = options.get("search")
    if fam is not None and fam not in SEARCH_FAMILIES:
        raise ValueError(f"search: unknown search family {fam!r}; valid choices: {', '.join(SEARCH_FAMILIES)}")
    _check_mask_radius(options.get("mask_radius"))
    _layer_maps(model, layer, images[:1])  # a layer that is not one (B, C, H, W) tensor: named, as elsewhere
    return lie_derivative(model, images, tr, layers=[layer], **options)[layer]


LIE_RTOL = 0.25
"""Default relative slack of :func:`assert_infinitesimally_alignable` over the grid floor. The
floor carries each position's response to sub-pixel translation along the transformation's
velocity at that position: exact where the velocity is constant over a receptive field (a
translation), first-order in its variation otherwise. On the isotropic control
(``toys.IsotropicNet``, rotations of 1-30 degrees) the aligned value stays within 1% of the floor
at the first nonlinear layer and within 8% at the second, whose receptive field spans more of the
velocity's variation; layers that no warp explains sit more than 10x above their floor (the tests'
C4 lifting layer and random CNNs), so a 25% slack separates the two with room on both sides."""


def assert_infinitesimally_alignable(
    model: nn.Module,
    images: torch.Tensor,
    transform: Transform | str,
    layer: str,
    *,
    rtol: float = LIE_RTOL,
    atol: float | None = None,
    **kwargs,
):
    """Assert that for every image the aligned Lie derivative ``a² <= floor * (1 + rtol) + atol``:
    no infinitesimal warp of the search family leaves more of the layer's response to ``transform``
    than the grid alone (docs/definitions.md, "The infinitesimal view"). ``atol`` (default
    :data:`ATOL` of the images' dtype, scaled by nothing) absorbs what is left of an exactly
    covariant linear layer (its floor is 0). Keyword arguments go to
    :func:`invariance.lie_derivative`. Returns the layer's :class:`invariance.LieResult`.

    >>> from invariance import toys
    >>> x = toys.make_blob_images(3, 40, seed=1).double()
    >>> r = assert_infinitesimally_alignable(toys.IsotropicNet().double(), x, "rotation:5", "relu1")
    >>> bool((r.aligned > 0).all())
    True
    """
    __tracebackhide__ = True
    _check_tolerances(rtol, atol)
    res = _lie_layer(model, images, transform, layer, kwargs, "assert_infinitesimally_alignable")
    atol = _atol(images.dtype) if atol is None else atol
    if any(r is not None for r in res.reasons):
        raise AssertionError(f"{layer}: no verdict for {sum(r is not None for r in res.reasons)} image(s): "
                             + "; ".join(sorted({r for r in res.reasons if r})))
    allowed = res.floor * (1 + rtol) + atol
    ok = res.aligned <= allowed
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        raise AssertionError(
            f"{layer} under {res.transform}: not infinitesimally alignable: {int((~ok).sum())} of {len(ok)} images "
            f"have a² above floor * (1 + rtol) + atol (rtol={rtol:g}, atol={atol:g}); image {i}: a² = "
            f"{float(res.aligned[i]):.4g}, floor {float(res.floor[i]):.4g}, r² {float(res.lie[i]):.4g} (unexplained "
            f"share {float(res.share[i]):.3f})")
    return res


def assert_infinitesimally_covariant(
    model: nn.Module,
    images: torch.Tensor,
    transform: Transform | str,
    layer: str,
    *,
    max_share: float | None = None,
    atol: float | None = None,
    **kwargs,
):
    """Assert that for every image ``s² <= max_share * r² + atol``: the part of the layer's Lie
    derivative beyond the grid's response that no infinitesimal warp explains is at most
    ``max_share`` of the Lie derivative (docs/definitions.md, "Beyond the grid").

    ``s²`` (:attr:`invariance.LieResult.specific`) is what is left of ``L - K`` (the network's
    commutator with the transformation's velocity field: ``L`` the Lie derivative, ``K`` each
    position's response to its own motion as a translation, which carries the aliasing of strides
    and the kinks) after the best infinitesimal warp of the search family. It is 0, to rounding,
    for a translation through any layer (the velocity is constant and the network's derivative is
    linear: strides, pools and kinks included) and for pointwise layers; of second order for
    isotropic filters under a rotation (the commutator's leading term ``c tr(Aᵀ H)`` vanishes for
    an antisymmetric ``A``); 0.3-1 of ``r²`` for oriented filters (generic CNNs, C4/C8 lifting
    layers) under a rotation. So ``s² / r²`` asks whether a layer is covariant, infinitesimally,
    separately from its grid, which :func:`assert_infinitesimally_alignable` (``a²`` against the
    grid floor) cannot on strided networks.

    Args:
        model, images, transform, layer: as for :func:`assert_spatially_alignable`; ``transform``
            is one transformation with a real logarithm ``X = log T``, which sets the direction
            and the size (``r²`` and ``s²`` are in the units of the finite errors of ``T``).
        max_share: the allowed ``s² / r²``; default :data:`ATOL` of the images' dtype, the squared
            relative precision the kit allows (module docstring): ``L - K`` is explained by a warp
            to the precision of ``L`` itself, i.e. exact covariance. A layer covariant up to its
            sampling (isotropic filters under a rotation) needs a stated tolerance, such as 0.1.
        atol: an absolute allowance on ``s²``; default :data:`ATOL` of the images' dtype: rounding
            where ``r²`` is itself 0 (a linear stride-1 layer under a translation), which makes the
            share meaningless. ``max_share`` and ``atol`` must be finite and >= 0.
        kwargs: ``search``, ``mask_radius``, ``interior``, as for :func:`invariance.lie_derivative`.

    Returns the layer's :class:`invariance.LieResult`. A failure prints, per image, ``r²``, ``s²``,
    their ratio, the bound, ``a²`` and its grid floor.

    >>> import torch
    >>> from invariance import toys
    >>> x = toys.make_blob_images(2, 40, seed=0).double()
    >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, stride=2, padding=2), torch.nn.ReLU(),
    ...                           torch.nn.MaxPool2d(2)).double()
    >>> r = assert_infinitesimally_covariant(cnn, x, "translation:0.5,1.5", "2")  # strides, kinks, pools: exact
    >>> bool((r.specific < 1e-20).all())
    True
    >>> iso = toys.IsotropicNet().double()
    >>> r = assert_infinitesimally_covariant(iso, x, "rotation:5", "relu1", max_share=0.1)
    >>> bool((r.specific < 0.01 * r.lie).all())  # isotropic filters: second order
    True
    """
    __tracebackhide__ = True
    if max_share is not None:
        check_number(max_share, "max_share", minimum=0)
    if atol is not None:
        check_number(atol, "atol", minimum=0)
    res = _lie_layer(model, images, transform, layer, kwargs, "assert_infinitesimally_covariant")
    share = _atol(images.dtype) if max_share is None else float(max_share)
    tol = _atol(images.dtype) if atol is None else float(atol)
    allowed = res.lie * share + tol
    bad = [r is not None for r in res.reasons]
    ok = (res.specific <= allowed) & ~torch.tensor(bad)
    if bool(ok.all()):
        return res
    name = str(images.dtype).replace("torch.", "")
    rows = [f"{'image':>5}  {'r²':>10}  {'s²':>10}  {'s²/r²':>10}  {'allowed':>10}  {'a²':>10}  {'grid floor':>10}"]
    for i in range(len(ok)):
        ratio = float(res.specific[i] / res.lie[i]) if float(res.lie[i]) > 0 else math.nan
        rows.append(f"{i:>5}  {res.lie[i]:>10.4g}  {res.specific[i]:>10.4g}  {ratio:>10.4g}  {allowed[i]:>10.4g}  "
                    f"{res.aligned[i]:>10.4g}  {res.floor[i]:>10.4g}" + ("" if bool(ok[i]) else "   <- FAILS"))
    rows += [f"image {i}: no verdict (NaN): {r}" for i, r in enumerate(res.reasons) if r is not None]
    share_note = (f"max_share={share:g} (given)" if max_share is not None else
                  f"max_share={share:g} (ATOL[{name}]: exact covariance, to the dtype's precision)")
    atol_note = f"atol={tol:g} (given)" if atol is not None else f"atol={tol:g} (ATOL[{name}]: rounding where r² is 0)"
    headline = "no verdict" if any(bad) and bool((ok | torch.tensor(bad)).all()) else "not infinitesimally covariant"
    raise AssertionError(
        f"{headline}: layer {layer!r} of {type(model).__name__} under {res.transform} (search {res.search}, {name}, "
        f"{len(ok)} image(s))\n" + "\n".join(rows) + "\n"
        f"allowed = max_share * r² + atol with {share_note}, {atol_note}; s² = the part of the Lie derivative beyond "
        f"the grid's response (L - K: the network's commutator with the velocity field) that no infinitesimal warp "
        f"explains (docs/definitions.md, \"Beyond the grid\")")


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
    ``mask_radius`` if given). Returns the per-image invariance errors. ``rtol`` and ``atol``
    must be finite and >= 0; the output (or the layer) must be one tensor with the batch first.
    """
    __tracebackhide__ = True
    _check_tolerances(rtol, atol)
    _check_model(model, images)
    if layer is not None:
        _check_layer(model, layer)
    _check_mask_radius(mask_radius)
    _check_transformed(transformed, images)
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
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: {type(model).__name__} returned {_describe_output(out)}, not one tensor; "
                            f"assert_invariant compares the output tensor: wrap the model to return one, or "
                            f"pass layer=")
        if out.dim() == 0 or out.shape[0] != 2 * b:
            raise ValueError(f"model: {type(model).__name__} returned a tensor of shape {tuple(out.shape)} for "
                             f"{2 * b} images; the output must keep the batch dimension first")
        out = out.reshape(2 * b, -1)
        ref, mov = out[:b], out[b:]
        err = ((mov - ref).pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-30)).double()
    else:
        maps, frame = _layer_maps(model, layer, torch.cat([images, transformed]))
        ref, mov = maps[:b], maps[b:]
        region, mvalid, _ = comparison_region(frame, mask_radius=mask_radius, image_valid=image_valid,
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
            f"rtol={rtol:g}, {_atol_note(atol, images.dtype)}; {_FLOOR_NOTE}")
    return err.cpu()


# ----------------------------------------------------------------------------- images


def example_images(n: int = 4, size: int | Sequence[int] = 32, seed: int = 0, *, dtype=torch.float32,
                   content_radius: float = 0.5) -> torch.Tensor:
    """Smooth generic test images ``(n, 1, H, W)`` with a zero margin (:func:`invariance.toys.make_blob_images`).

    >>> example_images(2, 24).shape
    torch.Size([2, 1, 24, 24])
    """
    n = check_int(n, "n", minimum=1)
    size = check_int(size, "size", minimum=1) if isinstance(size, numbers.Integral) else check_size(size)
    check_int(seed, "seed", minimum=0)
    _check_float_dtype(dtype, "dtype")
    content_radius = _check_content_radius(content_radius)
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


# Strategies check their arguments when they are built, so that a wrong range fails at the
# decorator with a one-line error naming the argument, not later inside hypothesis' draw.

_FLOAT_DTYPES = "torch.float16, torch.bfloat16, torch.float32 or torch.float64"
_LOG2_RANGE = (-1022.0, 1023.0)  # 2**u is then a positive, finite (normal) float64 scale factor


def _check_float_dtype(dtype, name: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        got = dtype if isinstance(dtype, torch.dtype) else type(dtype).__name__
        raise TypeError(f"{name}: expected a floating-point torch dtype ({_FLOAT_DTYPES}), got {got}")


def _number_in(value, name: str, interval: str, ok, why: str = "") -> float:
    """``value`` is a real number with ``ok(value)`` (False for NaN), else a one-line error that
    gives the valid ``interval`` (for half-open ranges, which :func:`invariance.checks.check_number`
    does not spell)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: must be a number in {interval}, got {value!r}")
    value = float(value)
    if not ok(value):
        raise ValueError(f"{name}: must be a finite number in {interval}{' (' + why + ')' if why else ''}, "
                         f"got {value!r}")
    return value


def _check_content_radius(content_radius) -> float:
    return _number_in(content_radius, "content_radius", "(0, 1]", lambda v: 0 < v <= 1,
                      "normalised units of the field of view")


def _check_order(low: float, high: float, low_name: str, high_name: str) -> None:
    if high < low:
        raise ValueError(f"{high_name}: must be >= {low_name} ({low:g}), got {high:g}")


def rotations(min_angle: float = -180.0, max_angle: float = 180.0, *, lattice: bool = False,
              min_abs: float = 0.0) -> st.SearchStrategy[Transform]:
    """Rotations about the centre (degrees, counter-clockwise as displayed).

    ``lattice=True`` draws from 90, 180 and 270 (exact on the pixel grid); ``min_abs`` keeps
    ``|angle|`` (wrapped to (-180, 180]) at least that far from 0. The bounds must be finite with
    ``min_angle <= max_angle``, ``0 <= min_abs < 180``, and some angle of the range must keep
    ``min_abs``.
    """
    st = _hypothesis()
    min_angle = check_number(min_angle, "min_angle")
    max_angle = check_number(max_angle, "max_angle")
    _check_order(min_angle, max_angle, "min_angle", "max_angle")
    min_abs = _number_in(min_abs, "min_abs", "[0, 180)", lambda v: 0 <= v < 180,
                         "wrapped angles lie in (-180, 180]")
    if min_abs > 0 and not lattice:
        k = round(min_angle / 360.0)  # the angles within min_abs of 0 (mod 360) near min_angle
        if abs(min_angle - 360.0 * k) < min_abs and max_angle < 360.0 * k + min_abs:
            raise ValueError(f"min_abs: no angle in [{min_angle:g}, {max_angle:g}] is at least {min_abs:g} "
                             f"from 0 (mod 360); lower min_abs or widen the range")
    if lattice:
        return st.sampled_from([90.0, 180.0, 270.0]).map(lambda a: Transform("rotation", (a,)))
    ang = st.floats(min_angle, max_angle, allow_nan=False, allow_infinity=False)
    if min_abs > 0:
        ang = ang.filter(lambda a: abs(180.0 - (180.0 - a) % 360.0) >= min_abs)
    return ang.map(lambda a: Transform("rotation", (a,)))


def scalings(min_log2: float = -1.0, max_log2: float = 1.0, *, min_abs_log2: float = 0.0,
             values: Sequence[float] | None = None) -> st.SearchStrategy[Transform]:
    """Isotropic rescalings ``s = 2^u`` about the centre, ``u`` in ``[min_log2, max_log2]``, ``|u| >= min_abs_log2``.

    ``values`` draws from given factors instead (a non-empty sequence of finite factors > 0).
    The bounds must be finite with ``min_log2 <= max_log2`` within -1022..1023 (so that ``2^u`` is
    a positive finite float), and ``min_abs_log2 >= 0`` must leave some ``u`` of the range.
    """
    st = _hypothesis()
    if values is not None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"values: expected a non-empty sequence of scale factors > 0, got {values!r}")
        factors = [check_number(v, f"values[{i}]", positive=True) for i, v in enumerate(values)]
        return st.sampled_from(factors).map(lambda s: Transform("scale", (s,)))
    lo, hi = _LOG2_RANGE
    min_log2 = check_number(min_log2, "min_log2", minimum=lo, maximum=hi)
    max_log2 = check_number(max_log2, "max_log2", minimum=lo, maximum=hi)
    _check_order(min_log2, max_log2, "min_log2", "max_log2")
    min_abs_log2 = check_number(min_abs_log2, "min_abs_log2", minimum=0)
    if min_abs_log2 > 0 and -min_abs_log2 < min_log2 and max_log2 < min_abs_log2:
        raise ValueError(f"min_abs_log2: no u in [{min_log2:g}, {max_log2:g}] has |u| >= {min_abs_log2:g}; "
                         f"lower min_abs_log2 or widen the range")
    u = st.floats(min_log2, max_log2, allow_nan=False, allow_infinity=False)
    if min_abs_log2 > 0:
        u = u.filter(lambda v: abs(v) >= min_abs_log2)
    return u.map(lambda v: Transform("scale", (float(2.0**v),)))


def translations(max_shift: float = 4.0, *, integer: bool = True) -> st.SearchStrategy[Transform]:
    """Translations ``(tx, ty)`` in pixels with ``|tx|, |ty| <= max_shift`` (integers by default).

    ``max_shift`` must be finite and >= 0."""
    st = _hypothesis()
    max_shift = check_number(max_shift, "max_shift", minimum=0)
    if integer:
        k = int(math.floor(max_shift))
        comp = st.integers(-k, k).map(float)
    else:
        comp = st.floats(-max_shift, max_shift, allow_nan=False, allow_infinity=False)
    return st.tuples(comp, comp).map(lambda t: Transform("translation", t))


_FAMILY_OPTIONS = {"rigid": ("max_shift",), "similarity": ("max_shift", "max_log2"),
                   "affine": ("max_shift", "max_deform")}


def transformations(family: str = "rotation", **kwargs) -> st.SearchStrategy[Transform]:
    """Transformations of one family with sensible ranges.

    ``rotation`` / ``scale`` / ``translation`` use :func:`rotations`, :func:`scalings`,
    :func:`translations` (``kwargs`` go to them); ``rigid``: angle in [-180, 180] and shifts up
    to ``max_shift`` (default 3) px; ``similarity``: that and ``log2 s`` in [-0.5, 0.5];
    ``affine``: a linear part within ``0.2`` (``max_deform``) of a rotation, shifts up to 3 px.
    ``max_shift`` and ``max_log2`` must be finite and >= 0; ``max_deform`` in [0, 0.5) (the
    determinant of ``1 + D`` with ``|D_ij| <= d`` is at least ``1 - 2d``: invertible).
    """
    st = _hypothesis()
    if family == "rotation":
        return rotations(**kwargs)
    if family == "scale":
        return scalings(**kwargs)
    if family == "translation":
        return translations(**kwargs)
    if family not in _FAMILY_OPTIONS:
        raise ValueError(f"family: expected rotation, scale, translation, rigid, similarity or affine, got {family!r}")
    unknown = [k for k in kwargs if k not in _FAMILY_OPTIONS[family]]
    if unknown:
        raise TypeError(f"{unknown[0]}: not an option of family {family!r}; valid choices: "
                        f"{', '.join(_FAMILY_OPTIONS[family])}")
    ms = check_number(kwargs.get("max_shift", 3.0), "max_shift", minimum=0)
    shift = st.floats(-ms, ms, allow_nan=False)
    angle = st.floats(-180.0, 180.0, allow_nan=False)
    if family == "rigid":
        return st.tuples(angle, shift, shift).map(lambda p: Transform("rigid", p))
    if family == "similarity":
        ls = check_number(kwargs.get("max_log2", 0.5), "max_log2", minimum=0, maximum=_LOG2_RANGE[1])
        return st.tuples(angle, st.floats(-ls, ls), shift, shift).map(
            lambda p: Transform("similarity", (p[0], float(2.0 ** p[1]), p[2], p[3])))
    d = _number_in(kwargs.get("max_deform", 0.2), "max_deform", "[0, 0.5)", lambda v: 0 <= v < 0.5,
                   "the linear part's determinant is at least 1 - 2 max_deform")
    dev = st.floats(-d, d, allow_nan=False)

    def build(p):
        a, d00, d01, d10, d11, tx, ty = p
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        lin = torch.tensor([[c, s], [-s, c]], dtype=torch.float64) @ torch.tensor(
            [[1 + d00, d01], [d10, 1 + d11]], dtype=torch.float64)
        return Transform("affine", (lin[0, 0].item(), lin[0, 1].item(), tx, lin[1, 0].item(),
                                    lin[1, 1].item(), ty))

    return st.tuples(angle, dev, dev, dev, dev, shift, shift).map(build)


def image_sizes(min_size: int = 16, max_size: int = 48, *, parity: str | None = None,
                square: bool = True) -> st.SearchStrategy[tuple[int, int]]:
    """Image sizes ``(H, W)``: ``parity`` ``"odd"``, ``"even"`` or None (both); square by default.

    ``1 <= min_size <= max_size`` (integers), with a side of the requested parity in that range."""
    st = _hypothesis()
    min_size = check_int(min_size, "min_size", minimum=1)
    max_size = check_int(max_size, "max_size", minimum=1)
    _check_order(min_size, max_size, "min_size", "max_size")
    if parity not in (None, "odd", "even"):
        raise ValueError(f"parity: expected 'odd', 'even' or None, got {parity!r}")
    if parity is not None and min_size == max_size and (min_size % 2 == 1) != (parity == "odd"):
        raise ValueError(f"parity: no {parity} size in [{min_size}, {max_size}]; widen the range")
    side = st.integers(min_size, max_size)
    if parity == "odd":
        side = side.map(lambda v: v if v % 2 else (v + 1 if v < max_size else v - 1))
    elif parity == "even":
        side = side.map(lambda v: v if v % 2 == 0 else (v + 1 if v < max_size else v - 1))
    if square:
        return side.map(lambda v: (v, v))
    return st.tuples(side, side)


def dtypes(*choices: torch.dtype) -> st.SearchStrategy[torch.dtype]:
    """Floating-point dtypes (default float32 and float64)."""
    st = _hypothesis()
    for c in choices:
        _check_float_dtype(c, "choices")
    return st.sampled_from(list(choices) or [torch.float32, torch.float64])


def _check_batch(batch) -> tuple[int, int]:
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"batch: expected an integer >= 1 or a range (low, high), got {batch!r}")
        lo = check_int(batch[0], "batch[0]", minimum=1)
        hi = check_int(batch[1], "batch[1]", minimum=1)
        if hi < lo:
            raise ValueError(f"batch[1]: must be >= batch[0] ({lo}), got {hi}")
        return lo, hi
    n = check_int(batch, "batch", minimum=1)
    return n, n


def images(batch: int | tuple[int, int] = (1, 3), *, channels: int = 1,
           sizes: st.SearchStrategy[tuple[int, int]] | None = None,
           dtype: torch.dtype | st.SearchStrategy[torch.dtype] = torch.float32,
           content_radius: float = 0.5, sigma_range: tuple[float, float] | None = None):
    """Smooth generic images ``(B, C, H, W)`` with a zero margin (random blobs, exactly 0 outside
    the disk of radius ``content_radius``), built from a drawn seed so that they shrink well.

    ``sigma_range`` (pixels) sets the blob widths (default: 1.5 to 3.5 px on 48 px images,
    proportionally smaller on smaller ones, at least 1.2 px). Rescalings by ``s < 1`` need blobs
    wider than ``1 / s`` px to stay resolved after the resampling.

    ``batch``: an integer >= 1 or a range ``(low, high)``; ``channels >= 1``; ``sizes``: a
    strategy of ``(H, W)`` such as :func:`image_sizes`; ``dtype``: a floating-point dtype or a
    strategy of them (:func:`dtypes`); ``content_radius`` in (0, 1]; ``sigma_range``: finite
    ``0 < low <= high``."""
    st = _hypothesis()
    b_lo, b_hi = _check_batch(batch)
    channels = check_int(channels, "channels", minimum=1)
    if sizes is not None and not isinstance(sizes, st.SearchStrategy):
        raise TypeError(f"sizes: expected a hypothesis strategy of (H, W) such as image_sizes(16, 48), "
                        f"got {type(sizes).__name__}")
    if not isinstance(dtype, st.SearchStrategy):
        _check_float_dtype(dtype, "dtype")
    content_radius = _check_content_radius(content_radius)
    if sigma_range is not None:
        if isinstance(sigma_range, (str, bytes)) or not isinstance(sigma_range, Sequence) or len(sigma_range) != 2:
            raise ValueError(f"sigma_range: expected (low, high) in pixels, got {sigma_range!r}")
        s_lo = check_number(sigma_range[0], "sigma_range[0]", positive=True)
        s_hi = check_number(sigma_range[1], "sigma_range[1]", positive=True)
        _check_order(s_lo, s_hi, "sigma_range[0]", "sigma_range[1]")
        sigma_range = (s_lo, s_hi)

    @st.composite
    def draw_images(draw):
        n = b_lo if b_lo == b_hi else draw(st.integers(b_lo, b_hi))
        h, w = draw(sizes if sizes is not None else image_sizes())
        dt = draw(dtype) if isinstance(dtype, st.SearchStrategy) else dtype
        seed = draw(st.integers(0, 2**31 - 1))
        x = make_blob_images(n * channels, (h, w), seed, content_radius=content_radius, dtype=dt,
                             sigma_range=sigma_range or _sigma_range((h, w)))
        return x.reshape(n, channels, h, w)

    return draw_images()
