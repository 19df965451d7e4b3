"""A slow, dense reference search that shares none of the fast path's code: the check on :func:`align`.

:func:`brute_force_align` evaluates the definition of docs/definitions.md directly: for every
linear part on a dense grid (angles, log-scales, affine shapes) and every sub-pixel offset of a
fine lattice, the moving map is warped once onto a canvas that holds all its shifts, and the
error of **every integer shift** is computed as the plain masked sum over the window of the
canvas by direct correlation (``torch.nn.functional.conv2d`` over the windows: no FFT, no
canvas groups, no candidate short-lists). The best few distinct candidates are then polished by Nelder-Mead
(:func:`scipy.optimize.minimize`) on the exact error of the family parameters. Only ``warp``
(``grid_sample``), the geometry conventions and the validity rule of the definitions are shared
with :func:`invariance.align`.

Use it in tests and benchmarks, on small maps: it costs ``angles x scales x offsets x shifts``
window sums per image (see :func:`invariance.align` for the fast path). Every integer shift
that can keep the minimum number of positions is tried (the canvas holds the warped map's whole
support and every window that can overlap it by that much). The feasibility rule of the
definitions (positions and the reference's signal kept) is written out here again, on its own.

>>> ref = torch.zeros(1, 1, 12, 12, dtype=torch.float64); ref[0, 0, 3:6, 5:9] = 1
>>> mov = torch.roll(ref, (2, -1), dims=(-2, -1))
>>> out = brute_force_align(ref, mov, "translation", offsets=1)
>>> float(out.errors[0]) < 1e-12, out.params[0].round().tolist()
(True, [1.0, -2.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from . import geometry as G
from ._warp import warp

__all__ = ["ReferenceAlignment", "brute_force_align", "BatteryCase", "battery", "run_battery", "random_architecture",
           "fresh_battery", "ARCHITECTURE_SPACE", "FRESH_TRANSFORMS"]

_OUTSIDE = 1e-6  # the validity rule of the definitions: a smaller valid share of a footprint counts as 0
_MIN_REGION = 4  # the definitions' MIN_REGION, written again (this module shares no code with the search)

# search family -> (geometry family, has an integer translation part), as in docs/definitions.md
_FAMILIES = {"translation": ("translation", True), "rotation": ("rotation", False), "scale": ("scale", False),
             "rigid": ("rigid", True), "scale_translation": ("scale_translation", True),
             "similarity": ("similarity", True), "affine": ("affine", True)}


@dataclass
class ReferenceAlignment:
    """Per image: the best error found (NaN if none is feasible), its centred matrix and parameters."""

    errors: torch.Tensor
    matrices: torch.Tensor
    params: torch.Tensor


def _linear_grid(family: str, angle_step: float, log2_step: float, log2_range: float,
                 affine_angle_step: float) -> list[np.ndarray]:
    if family == "affine":  # 6 parameters: a coarser grid, the polish does the rest
        angle_step, log2_step, log2_range = max(angle_step, affine_angle_step), 0.25, 0.5
    rots = [0.0] if family in ("translation", "scale", "scale_translation") else \
        list(np.arange(-180.0, 180.0, angle_step))
    scales = [0.0] if family in ("translation", "rotation", "rigid") else \
        list(np.arange(-log2_range, log2_range + 1e-9, log2_step))
    shapes = [(0.0, 0.0)]
    if family == "affine":
        shapes += [(la, phi) for la in (-0.5, -0.25, 0.25, 0.5) for phi in (0.0, 45.0, 90.0, 135.0)]
    out = []
    for a in rots:
        r = np.deg2rad(a)
        rot = np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])  # ccw as displayed, y down
        for ls in scales:
            for la, phi in shapes:
                p = np.deg2rad(phi)
                q = np.array([[math.cos(p), math.sin(p)], [-math.sin(p), math.cos(p)]])
                d = np.diag([2.0 ** (la / 2), 2.0 ** (-la / 2)])
                out.append(rot @ (2.0 ** ls * np.eye(2)) @ q @ d @ q.T)
    return out


def _centred(lin: np.ndarray, t) -> np.ndarray:
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = t
    return m


def _sample(mov: torch.Tensor, v: torch.Tensor, norm: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (C, H', W'), weights (H', W')) of the definitions: each warped position blends the valid
    positions of its bilinear footprint only, and weighs the valid share of that footprint."""
    w = warp(v[None, None], norm, size=size)[0, 0]
    w = torch.where(w > _OUTSIDE, w.clamp(max=1.0), torch.zeros_like(w))
    g = warp((mov * v)[None], norm, size=size)[0]
    vals = torch.where(w > 0, g / torch.where(w > 0, w, torch.ones_like(w)), torch.zeros_like(g))
    return vals, w


def brute_force_align(
    reference: torch.Tensor,
    moving: torch.Tensor,
    family: str = "rigid",
    *,
    mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    expected: torch.Tensor | None = None,
    min_overlap: float = 0.5,
    min_signal: float = 0.25,
    angle_step: float = 0.5,
    log2_step: float = 1 / 32,
    log2_range: float = 2.0,
    offsets: int = 4,
    polish: int = 3,
    affine_angle_step: float = 15.0,
) -> ReferenceAlignment:
    """The dense reference search (module docstring), image by image, in float64.

    Args:
        reference, moving: ``(B, C, H, W)`` maps, as for :func:`invariance.align`.
        family: a search family (``translation``, ``rotation``, ``scale``, ``rigid``,
            ``scale_translation``, ``similarity``, ``affine``).
        mask, moving_mask: the reference's region and the moving map's valid region ``(H, W)``.
        expected: ``(3, 3)`` or ``(B, 3, 3)`` normalised matrices of the expected warp (the
            baseline of the minimum positions, and a candidate).
        min_overlap, min_signal: the feasibility rule of the definitions: a warp's region keeps at
            least ``max(4, min_overlap * O_exp)`` positions and ``max(min_signal * S,
            min_overlap * S_exp)`` of the reference's signal (``S`` its energy about its mean on the
            mask; ``O_exp``, ``S_exp`` what the expected warp's region keeps); an image whose
            expected warp keeps less than ``min_signal * S`` or fewer than 4 positions has no
            verdict (NaN).
        angle_step: degrees between grid angles; log2_step, log2_range: the log2-scale grid.
        offsets: sub-pixel offsets per axis (4: quarter pixels).
        polish: distinct best candidates refined by Nelder-Mead.
        affine_angle_step: the (coarser) angle step of the ``affine`` grid, whose linear parts
            are rotation x log2-scale (-0.5 to 0.5 by 0.25) x 17 shapes (anisotropy 2^(+-0.25),
            2^(+-0.5) along 0, 45, 90, 135 degrees).

    Returns:
        :class:`ReferenceAlignment` with centred-frame matrices ``(B, 3, 3)``.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family: unknown search family {family!r}; valid choices: {', '.join(_FAMILIES)}")
    ref_all, mov_all = reference.detach().double().cpu(), moving.detach().double().cpu()
    b, c, h, w = ref_all.shape
    size = (h, w)
    region = torch.ones(size, dtype=torch.float64) if mask is None else (mask.cpu() > 0).double()
    mvalid = torch.ones(size, dtype=torch.float64) if moving_mask is None else (moving_mask.cpu() > 0).double()
    gfam, has_t = _FAMILIES[family]
    grid = _linear_grid(family, angle_step, log2_step, log2_range, affine_angle_step)
    subs = [k / offsets for k in range(offsets)] if has_t else [0.0]
    to_norm = G.frame_matrix(size, frm="centred", to="normalized", dtype=torch.float64).numpy()
    exp = None if expected is None else expected.detach().double().cpu().reshape(-1, 3, 3)
    errors, mats = [], []
    for i in range(b):
        ref, mov = ref_all[i], mov_all[i]
        e_c = None if exp is None else np.linalg.inv(to_norm) @ exp[min(i, exp.shape[0] - 1)].numpy() @ to_norm

        # the signal per position: the reference's energy about its mean on the mask
        n_mask = float(region.sum())
        mean = (ref * region).sum((1, 2), keepdim=True) / max(n_mask, 1e-300)
        plane = ((ref - mean) * region).pow(2).sum(0)
        if e_c is None:
            base, s_exp = n_mask, float(plane.sum())
        else:
            norm = torch.from_numpy(to_norm @ e_c @ np.linalg.inv(to_norm))
            w_exp = _sample(mvalid[None], mvalid, norm, size)[1]
            base, s_exp = float((region * w_exp).sum()), float((plane * w_exp).sum())
        if s_exp < min_signal * float(plane.sum()) or base < _MIN_REGION:  # the expected warp compares too little
            errors.append(math.nan)
            mats.append(np.eye(3))
            continue
        need = (max(float(_MIN_REGION), min_overlap * base), max(min_signal * float(plane.sum()), min_overlap * s_exp))

        def exact(centred: np.ndarray, ref=ref, mov=mov, plane=plane, need=need) -> float:
            norm = torch.from_numpy(to_norm @ centred @ np.linalg.inv(to_norm))
            vals, wv = _sample(mov, mvalid, norm, size)
            r = region * wv
            den = float((ref.pow(2).sum(0) * r).sum())
            if den <= 0 or float(r.sum()) < need[0] or float((plane * wv).sum()) < need[1]:
                return math.inf
            return float(((vals - ref).pow(2).sum(0) * r).sum()) / den

        cands: list[tuple[float, np.ndarray]] = []
        for lin in grid:
            for ox in subs:
                for oy in subs:
                    cands.extend(_all_shifts(ref, mov, region, mvalid, lin, (ox, oy), has_t, to_norm, size,
                                             plane, need))
        if e_c is not None:
            cands.append((exact(e_c), e_c))
        cands.append((exact(np.eye(3)), np.eye(3)))
        cands.sort(key=lambda t: t[0])
        # the window sums are rounded sums of products: re-score the best few exactly
        cands = sorted([(exact(m), m) for _, m in cands[:20]], key=lambda t: t[0]) + cands[20:]
        starts: list[np.ndarray] = []
        for e, m in cands:
            if len(starts) == polish or not math.isfinite(e):
                break
            if all(np.abs(m - s).max() > 0.05 for s in starts):
                starts.append(m)
        best_e, best_m = cands[0]
        for s in starts:
            p0 = G.from_matrix(gfam, torch.from_numpy(s)).numpy()

            def obj(p):
                try:
                    m = G.to_matrix(gfam, torch.from_numpy(np.asarray(p, dtype=np.float64))).numpy()
                except ValueError:
                    return math.inf
                return exact(m)

            res = minimize(obj, p0, method="Nelder-Mead",
                           options={"xatol": 1e-4, "fatol": 1e-12, "maxfev": 200 * len(p0)})
            if res.fun < best_e:
                best_e, best_m = float(res.fun), G.to_matrix(gfam, torch.from_numpy(res.x)).numpy()
        errors.append(best_e if math.isfinite(best_e) else math.nan)
        mats.append(best_m)
    m = torch.from_numpy(np.stack(mats))
    return ReferenceAlignment(torch.tensor(errors, dtype=torch.float64), m, G.from_matrix(gfam, m))


def _all_shifts(ref, mov, region, mvalid, lin, offset, has_t, to_norm, size, plane, need):
    """Errors of every feasible integer shift of ``shift o offset o lin`` by direct window sums:
    [(error, centred)] of the best few."""
    h, w = size
    base = _centred(lin, offset)
    if not has_t:
        norm = torch.from_numpy(to_norm @ base @ np.linalg.inv(to_norm))
        vals, wv = _sample(mov, mvalid, norm, size)
        r = region * wv
        den = float((ref.pow(2).sum(0) * r).sum())
        if den <= 0 or float(r.sum()) < need[0] or float((plane * wv).sum()) < need[1]:
            return [(math.inf, base)]
        return [(float(((vals - ref).pow(2).sum(0) * r).sum()) / den, base)]
    # a canvas of the same pitch and centre that holds every window overlapping the warped map's
    # support by at least need[0] positions: the support's half-extents (ey, ex) bound the overlap
    # of a window shifted by t_y to (h/2 + ey - |t_y|) rows of at most min(w, 2 ex + 1) positions
    corners = np.array([[sx * w / 2, sy * h / 2] for sx in (-1, 1) for sy in (-1, 1)]) @ lin.T + np.asarray(offset)
    ex, ey = np.abs(corners).max(0) + 1
    py = max(0, math.ceil(h / 2 + ey - need[0] / min(w, 2 * ex + 1)))
    px = max(0, math.ceil(w / 2 + ex - need[0] / min(h, 2 * ey + 1)))
    canvas = (h + 2 * py, w + 2 * px)
    c_norm = G.frame_matrix(canvas, frm="centred", to="normalized", dtype=torch.float64).numpy()
    norm = torch.from_numpy(c_norm @ base @ np.linalg.inv(to_norm))
    vals, wv = _sample(mov, mvalid, norm, canvas)
    g, v = vals[None], wv[None, None]  # (1, C, Hc, Wc), (1, 1, Hc, Wc)
    # window (i, j) of the canvas = shift (px - j, py - i); every window sum by direct correlation
    # of the expanded square sum_y R w ||g - f||^2 = sum R (w ||g||^2 - 2 w g.f + w ||f||^2)
    corr = torch.nn.functional.conv2d
    # the windows that keep the positions and the signal (cheap, one channel each); the other terms
    # are computed on the part of the canvas that those windows cover only
    tol = 1e-9 * (h * w)  # window sums are rounded sums: a candidate within rounding of the minimum
    cnt = corr(v, region[None, None])[0, 0]  # stays one (its exact re-scoring applies the rule as written)
    sig = corr(v, plane[None, None])[0, 0]
    keep = (cnt >= need[0] - tol) & (sig >= need[1] - 1e-9 * float(plane.sum()))
    if not bool(keep.any()):
        return [(math.inf, base)]
    rows, cols = keep.any(1).nonzero()[:, 0], keep.any(0).nonzero()[:, 0]
    i0, i1, j0, j1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    g, v = g[..., i0:i1 + h - 1, j0:j1 + w - 1], v[..., i0:i1 + h - 1, j0:j1 + w - 1]
    gv = g * v
    num = (corr((g.pow(2).sum(1, keepdim=True) * v), region[None, None])
           - 2 * corr(gv, (ref * region)[None])
           + corr(v, (ref.pow(2).sum(0) * region)[None, None]))[0, 0]
    den = corr(v, (ref.pow(2).sum(0) * region)[None, None])[0, 0]
    ok = (den > 1e-9 * float((ref.pow(2).sum(0) * region).sum())) & keep[i0:i1, j0:j1]
    err = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.inf)
    out = []
    ny, nx = err.shape
    flat = err.flatten()
    order = torch.argsort(flat)[: 8]  # the best few shifts of this linear part
    for k in order.tolist():
        i, j = divmod(k, nx)
        i, j = i + i0, j + j0  # window (i, j) of the whole canvas
        out.append((float(flat[k]), _centred(lin, (offset[0] + px - j, offset[1] + py - i))))
    return out


# ----------------------------------------------------------------------------- the battery


@dataclass
class BatteryCase:
    """One search problem of the battery: maps, region and expected warp of one (network, layer, transform)."""

    name: str
    family: str
    reference: torch.Tensor
    moving: torch.Tensor
    mask: torch.Tensor
    moving_mask: torch.Tensor
    expected: torch.Tensor


def _random_cnn(seed: int = 0) -> torch.nn.Module:
    """A random-filter CNN with biases (zero padding, stride 1)."""
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 6, 3, padding=1), torch.nn.ReLU())
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.05)
    return net.double().eval()


def _case(name, net, images, spec, layer, family) -> BatteryCase:
    from ._features import extract_features
    from ._measure import DEFAULT_SEARCH
    from ._metric import comparison_region, transformed_valid
    from ._transform import parse_transforms

    tr = parse_transforms(spec)[0]
    size = tuple(images.shape[-2:])
    t = tr.matrix(size, torch.float64)
    feats, frames = extract_features(net, torch.cat([images, warp(images, t.to(images))]), [layer])
    b = images.shape[0]
    f = feats[layer].double()
    region, mvalid, _ = comparison_region(frames[layer], image_valid=transformed_valid(t, size))
    expected = frames[layer].to_layer(G.inverse(t))
    return BatteryCase(name, family or DEFAULT_SEARCH[tr.family], f[:b], f[b:], region, mvalid, expected)


def battery(n_images: int = 2, *, size: int = 24) -> list[BatteryCase]:
    """The search battery of docs/definitions.md: a random-filter CNN with biases under rotations by
    30, 45, 90 and 135 degrees, scales 0.7 and 1.5, a sub-pixel translation and a shear, on
    ``size`` x ``size`` blobs and on non-square ones; the shipped MNIST CNN's every layer under 45
    degrees on shipped digits (on a 48 px canvas). ``n_images`` images per case."""
    from ._models import load_model
    from ._zoo import load_digits
    from .toys import make_images

    net = _random_cnn()
    x = make_images("blobs", n_images, size, seed=5, content_radius=0.45).double()
    rect = make_images("blobs", n_images, (size, size * 4 // 3), seed=6, content_radius=0.45).double()
    cases = [_case(f"random-cnn {spec}", net, x, spec, "3", None) for spec in (
        "rotation:30", "rotation:45", "rotation:90", "rotation:135", "scale:0.7", "scale:1.5",
        "translation:1.5,-0.5")]
    cases.append(_case("random-cnn shear affine:1,0.3,0,0,1,0", net, x, "affine:1,0.3,0,0,1,0", "3", None))
    cases.append(_case("random-cnn non-square rotation:30", net, rect, "rotation:30", "3", None))
    cnn = load_model("mnist-cnn").double().eval()
    digits = load_digits()[0][:n_images].double()
    digits = (digits / 255.0 if digits.max() > 1 else digits)[:, None] if digits.dim() == 3 else digits
    # on a 48 px canvas the deepest layers keep an interior (at 28 px their receptive field covers the image)
    digits = torch.nn.functional.pad(digits, (10, 10, 10, 10))
    for layer in ("conv1", "pool1", "relu1", "conv2", "pool2", "relu2"):
        cases.append(_case(f"mnist-cnn {layer} rotation:45", cnn, digits, "rotation:45", layer, None))
    return cases


def run_battery(cases: list[BatteryCase], *, config=None, reference_options: dict | None = None,
                progress: bool = False) -> list[dict]:
    """Fast search (:func:`invariance.align`) against the dense reference on every case.

    Returns one dict per case: name, family, map shape, per-image errors of both, the worst gap
    ``fast - reference`` (0 where neither has a verdict, inf where only one has) and the seconds
    each took.
    """
    import time

    from tqdm.auto import tqdm

    from ._search import align

    out = []
    for case in tqdm(cases, desc="battery", disable=not progress):
        t0 = time.perf_counter()
        fast = align(case.reference, case.moving, case.family, mask=case.mask, moving_mask=case.moving_mask,
                     config=config, expected=case.expected)
        t1 = time.perf_counter()
        ref = brute_force_align(case.reference, case.moving, case.family, mask=case.mask,
                                moving_mask=case.moving_mask, expected=case.expected, **(reference_options or {}))
        t2 = time.perf_counter()
        # both without a verdict agree (gap 0); a verdict on one side only is a disagreement (inf)
        f_nan, r_nan = fast.errors.isnan(), ref.errors.isnan()
        gap = torch.where(f_nan & r_nan, 0.0, torch.where(f_nan | r_nan, math.inf, fast.errors - ref.errors)).tolist()
        out.append({"name": case.name, "family": case.family, "shape": list(case.reference.shape),
                    "fast": fast.errors.tolist(), "reference": ref.errors.tolist(),
                    "worst_gap": max(gap), "fast_seconds": t1 - t0, "reference_seconds": t2 - t1})
    return out


# ----------------------------------------------------------------------------- the fresh battery

#: What :func:`random_architecture` draws from (kernel, stride, dilation, pooling, activation).
ARCHITECTURE_SPACE = {
    "depth": (2, 3, 4),
    "kernel": (3, 5, 7),
    "stride": (1, 2),
    "dilation": (1, 1, 2),
    "channels": (3, 4, 6, 8),
    "activation": ("relu", "gelu", "leaky_relu", "tanh", "silu"),
    "pool": (None, None, "max", "avg"),
}

#: The transformations of the fresh battery: rotations at angles no grid was tuned on, scales from
#: 0.5 to 2, a similarity, shifts that are not multiples of any stride.
FRESH_TRANSFORMS = ("rotation:17", "rotation:45", "rotation:120", "rotation:-73", "scale:0.6", "scale:1.7",
                    "similarity:30,1.25,1.5,-1", "translation:3.5,-2.25")


def random_architecture(seed: int) -> tuple[torch.nn.Module, str]:
    """A random CNN drawn from :data:`ARCHITECTURE_SPACE` by ``seed`` (float64, eval mode, biases):
    2-4 convolutions, each with its kernel, stride, dilation ("same" padding), activation and an
    optional 2x2 pooling, such that the total stride stays at most 4. Returns the network and a
    one-line description.

    >>> net, text = random_architecture(3)
    >>> text == random_architecture(3)[1], isinstance(net, torch.nn.Sequential)
    (True, True)
    """
    rng = np.random.default_rng(seed)
    pick = lambda key: ARCHITECTURE_SPACE[key][int(rng.integers(len(ARCHITECTURE_SPACE[key])))]  # noqa: E731
    acts = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "leaky_relu": lambda: torch.nn.LeakyReLU(0.1),
            "tanh": torch.nn.Tanh, "silu": torch.nn.SiLU}
    layers, parts, c_in, total = [], [], 1, 1
    for _ in range(pick("depth")):
        k, d, c = pick("kernel"), pick("dilation"), pick("channels")
        s = pick("stride") if total < 4 else 1
        act = pick("activation")
        layers += [torch.nn.Conv2d(c_in, c, k, stride=s, dilation=d, padding=d * (k - 1) // 2), acts[act]()]
        total *= s
        text = f"conv{k}x{k}/s{s}" + (f"/d{d}" if d > 1 else "") + f"x{c} {act}"
        pool = pick("pool") if total < 4 else None
        if pool:
            layers.append(torch.nn.MaxPool2d(2) if pool == "max" else torch.nn.AvgPool2d(2))
            total *= 2
            text += f" {pool}pool"
        parts.append(text)
        c_in = c
    net = torch.nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.05)
    return net.double().eval(), ", ".join(parts)


def _image_kind(kind: str, n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` float64 images of a kind: ``digits`` (shipped MNIST digits centred on a ``size`` canvas)
    or ``smooth`` (blobs filling most of the frame)."""
    from .toys import make_images

    if kind == "digits":
        from ._zoo import load_digits

        x = load_digits()[0]
        idx = np.random.default_rng(seed).choice(len(x), n, replace=False)
        d = x[torch.as_tensor(idx)].double()[:, None] / 255.0
        p = (size - 28) // 2
        return torch.nn.functional.pad(d, (p, size - 28 - p, p, size - 28 - p))
    if kind == "smooth":
        return make_images("blobs", n, size, seed=seed, content_radius=0.45).double()
    raise ValueError(f"kind: unknown image kind {kind!r}; valid choices: digits, smooth")


def fresh_battery(seed: int = 2026, *, n_architectures: int = 25, transforms_per_architecture: int = 2,
                  n_images: int = 2, size: int = 48, min_interior: int = 16) -> list[BatteryCase]:
    """A battery drawn from ``seed``, for checking the search on networks it was never tuned on.

    Architectures are :func:`random_architecture` of ``seed, seed + 1, ...``, keeping the first
    ``n_architectures`` whose last layer has a stride of at least 2 (maps of at most ``size / 2``
    px, so that the dense reference stays affordable) and at least ``min_interior`` positions that
    see only the image (a verdict is possible). Each is paired with
    ``transforms_per_architecture`` transformations of :data:`FRESH_TRANSFORMS` and an image kind
    (shipped digits or smooth blobs), both drawn from the same seed, and measured at its last layer
    on ``n_images`` images of ``size`` px (the comparison region of docs/definitions.md). The
    default draws 25 architectures x 2 transformations x 2 images = 100 images.
    """
    from ._features import extract_features

    rng = np.random.default_rng(seed)
    cases = []
    k, kept = seed, 0
    while kept < n_architectures:
        net, text = random_architecture(k)
        k += 1
        last = str(len(net) - 1)
        _, frames = extract_features(net, torch.zeros(1, 1, size, size, dtype=torch.float64), [last])
        fr = frames[last]
        if fr.stride[0] < 2 or int(fr.valid_positions(interior=True).sum()) < min_interior:
            continue
        kept += 1
        picks = rng.choice(len(FRESH_TRANSFORMS), transforms_per_architecture, replace=False)
        for j in picks:
            spec = FRESH_TRANSFORMS[int(j)]
            kind = ("digits", "smooth")[int(rng.integers(2))]
            images = _image_kind(kind, n_images, size, 1000 * k + int(j))
            cases.append(_case(f"arch {k - 1} ({text}) {spec} {kind}", net, images, spec, last, None))
    return cases
