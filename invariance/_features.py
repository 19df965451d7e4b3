"""Feature maps of any ``nn.Module`` by layer name, with each layer's coordinate frame.

How a layer's grid maps onto the image
--------------------------------------
Along each axis, pixel ``j`` of a feature map sits at input-pixel position ``x = a * j + b``
(pixel-index units of the input image: ``a`` is the accumulated stride, ``b`` the offset of
the centre of feature pixel 0). Every convolution or pooling with kernel ``k``, stride ``s``,
padding ``p`` and dilation ``d`` updates it as::

    a' = a * s        b' = b + a * (d * (k - 1) / 2 - p)

Elementwise layers (activations, BatchNorm, dropout, residual additions, channel
concatenations) keep the frame when every per-image map they combine has it; a merge with a map
of another grid or of unknown frame (a U-Net decoder's upsampled branch, say) has no single
frame. Upsampling (``F.interpolate``, ``nn.Upsample``) is traced: output pixel ``i`` reads input
coordinate ``(i + 1/2) r - 1/2`` with ``r = n_in / n_out`` (``a' = a r, b' = b + a (r - 1) / 2``;
``nearest`` reads ``i r``, an approximate frame). Outputs in ``(B, H, W, C)`` of a traced map
(``permute(0, 2, 3, 1)``, as in ConvNeXt) keep its frame and are transposed for measuring. These
rules are applied while the model runs, by watching every torch function call (a
:class:`torch.overrides.TorchFunctionMode`), so functional code, nested modules and residual
branches are all covered. A layer reached through an operation the tracer does not know
(adaptive pooling, transposed convolutions, rolls) gets the *assumed* frame "covers the image's
field of view" and ``LayerFrame.exact`` is ``False``. A 4-D output that descends from a map
through a reshape folding its grid into other axes (a vision transformer's patch tokens and
attention heads, ``(B, heads, tokens, dims)``) has no spatial frame at all: ``"all"`` leaves it
out (listed in :attr:`FeatureExtractor.not_maps`) and naming it is refused.

The tracer also accumulates the half-width ``r`` of each axis's receptive field (input pixels:
pixel ``j`` depends on input pixels ``[a j + b - r, a j + b + r]``), ``r' = r + a * d * (k - 1) / 2``
per convolution or pooling. It defines the layer's *interior*, the positions whose receptive
field lies inside the image (:meth:`LayerFrame.valid_positions`, used for the comparison region
of docs/definitions.md).

From ``(a, b)`` and the sizes follows the affine map from the layer's normalised coordinates
``u`` to the image's normalised coordinates ``X = alpha * u + beta`` with
``alpha = a w / W`` and ``beta = (a (w - 1) + 2 b + 1) / W - 1``. A transformation ``T`` of the
image (normalised, input -> output) then acts on the layer as ``Phi^{-1} T Phi``
(:meth:`LayerFrame.to_layer`). For a ``valid`` 9x9 convolution on 28x28 inputs
(``a = 1, b = 4, w = 20``) this gives ``alpha = 20/28, beta = 0``: the same centre, a smaller
field of view.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["LayerFrame", "FeatureExtractor", "extract_features", "list_layers", "INPUT"]

INPUT = "input"
"""Pseudo-layer name of the input itself (the identity network)."""


@dataclass(frozen=True)
class LayerFrame:
    """Where a feature map's pixel grid sits on the input image (see the module docstring).

    Attributes:
        stride: ``(a_x, a_y)`` input pixels per feature pixel.
        offset: ``(b_x, b_y)`` input-pixel position of feature pixel ``(0, 0)``.
        size: feature map ``(h, w)``.
        input_size: image ``(H, W)``.
        exact: ``True`` if traced through known layers, ``False`` if assumed.
        rf_radius: ``(r_x, r_y)`` half-width of the receptive field in input pixels (``None``
            when unknown, e.g. for an assumed frame).
        layout: ``"BCHW"``, or ``"BHWC"`` when the module returned channels last (``x.permute(0,
            2, 3, 1)`` of a traced map, as in ConvNeXt blocks): the map is then transposed to
            ``(B, C, H, W)`` for measuring, and its frame is the traced one.
    """

    stride: tuple[float, float]
    offset: tuple[float, float]
    size: tuple[int, int]
    input_size: tuple[int, int]
    exact: bool = True
    rf_radius: tuple[float, float] | None = (0.0, 0.0)
    layout: str = "BCHW"

    @classmethod
    def identity(cls, size: Sequence[int]) -> LayerFrame:
        h, w = (int(s) for s in size)
        return cls((1.0, 1.0), (0.0, 0.0), (h, w), (h, w), True, (0.0, 0.0))

    @classmethod
    def assumed(cls, size: Sequence[int], input_size: Sequence[int]) -> LayerFrame:
        """The frame of a map that covers exactly the image's field of view."""
        h, w = (int(s) for s in size)
        hh, ww = (int(s) for s in input_size)
        ax, ay = ww / w, hh / h
        return cls((ax, ay), ((ax - 1) / 2, (ay - 1) / 2), (h, w), (hh, ww), False, None)

    def matrix(self, dtype=None, device=None) -> torch.Tensor:
        """``Phi``: layer-normalised -> image-normalised point coordinates (3x3)."""
        (ax, ay), (bx, by) = self.stride, self.offset
        h, w = self.size
        hh, ww = self.input_size
        alx, aly = ax * w / ww, ay * h / hh
        bex = (ax * (w - 1) + 2 * bx + 1) / ww - 1
        bey = (ay * (h - 1) + 2 * by + 1) / hh - 1
        return torch.tensor([[alx, 0, bex], [0, aly, bey], [0, 0, 1]],
                            dtype=dtype or torch.get_default_dtype(), device=device)

    def to_layer(self, image_matrix: torch.Tensor) -> torch.Tensor:
        """An image transformation (normalised, input -> output) as it acts on this layer."""
        phi = self.matrix(image_matrix.dtype, image_matrix.device)
        return torch.linalg.inv(phi) @ image_matrix @ phi

    def to_image(self, layer_matrix: torch.Tensor) -> torch.Tensor:
        """A layer transformation (layer-normalised) expressed on the image (inverse of :meth:`to_layer`)."""
        phi = self.matrix(layer_matrix.dtype, layer_matrix.device)
        return phi @ layer_matrix @ torch.linalg.inv(phi)

    def centres(self, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Input-pixel positions ``(x (w,), y (h,))`` of the centres of the map's pixels."""
        (ax, ay), (bx, by) = self.stride, self.offset
        h, w = self.size
        return (torch.arange(w, dtype=dtype, device=device) * ax + bx,
                torch.arange(h, dtype=dtype, device=device) * ay + by)

    def valid_positions(self, image_valid: torch.Tensor | None = None, *, interior: bool = False) -> torch.Tensor:
        """Boolean ``(h, w)`` mask of the map's positions computed from valid image pixels only.

        ``image_valid`` ``(H, W)`` marks the image pixels that carry real content (default: all;
        for a transformed image, the pixels that came from inside the original frame). With
        ``interior=False`` a position is valid when the image pixel under its centre is (outside
        the image, the nearest border pixel counts); with ``interior=True`` when every pixel of
        its receptive field lies inside the image and is valid (the receptive-field interior of
        docs/definitions.md). An unknown receptive field (``rf_radius is None``) raises.

        >>> net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1))
        >>> _, frames = extract_features(net, torch.rand(1, 1, 8, 8), "1")
        >>> frames["1"].rf_radius, frames["1"].valid_positions(interior=True).sum(1).tolist()
        ((2.0, 2.0), [0, 0, 4, 4, 4, 4, 0, 0])
        """
        hh, ww = self.input_size
        dev = image_valid.device if isinstance(image_valid, torch.Tensor) else None
        v = (torch.ones(hh, ww, dtype=torch.bool, device=dev) if image_valid is None
             else image_valid.to(torch.bool))
        if tuple(v.shape) != (hh, ww):
            raise ValueError(f"image_valid: expected shape (H, W) = {(hh, ww)}, got {tuple(v.shape)}")
        cx, cy = self.centres(device=v.device)
        if not interior:
            ix = cx.round().clamp(0, ww - 1).long()
            iy = cy.round().clamp(0, hh - 1).long()
            return v[iy][:, ix]
        if self.rf_radius is None:
            raise ValueError("interior: the receptive field of this layer is unknown (its frame is assumed, "
                             "not traced); use interior=False")
        rx, ry = self.rf_radius
        # integral image of the invalid pixels: a box is valid iff it holds none
        bad = (~v).to(torch.float64)
        sat = torch.nn.functional.pad(bad.cumsum(0).cumsum(1), (1, 0, 1, 0))
        x0 = torch.ceil(cx - rx - 1e-9).long()
        x1 = torch.floor(cx + rx + 1e-9).long()
        y0 = torch.ceil(cy - ry - 1e-9).long()
        y1 = torch.floor(cy + ry + 1e-9).long()
        inside = ((y0 >= 0) & (y1 <= hh - 1))[:, None] & ((x0 >= 0) & (x1 <= ww - 1))[None, :]
        x0c, x1c = x0.clamp(0, ww - 1), x1.clamp(0, ww - 1) + 1
        y0c, y1c = y0.clamp(0, hh - 1), y1.clamp(0, hh - 1) + 1
        count = (sat[y1c][:, x1c] - sat[y0c][:, x1c] - sat[y1c][:, x0c] + sat[y0c][:, x0c])
        return inside & (count < 0.5)

    @property
    def is_identity(self) -> bool:
        return bool(torch.allclose(self.matrix(torch.float64), torch.eye(3, dtype=torch.float64), atol=1e-9))


# ----------------------------------------------------------------------------- frame tracing

_GEOMETRIC = {"conv2d", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices", "_max_pool2d", "pad"}
# operations that keep the spatial size but move content: the frame of their output is unknown
_MOVING = {"flip", "fliplr", "flipud", "rot90", "roll", "transpose", "permute", "swapaxes", "swapdims",
           "movedim", "moveaxis", "t", "grid_sample", "interpolate", "upsample", "pixel_shuffle",
           "pixel_unshuffle", "affine_grid"}
# operations that can fold a map's grid into other axes (a ViT's patch tokens, attention heads)
_RESHAPING = {"flatten", "view", "reshape", "unflatten", "transpose", "permute", "swapaxes", "swapdims",
              "movedim", "moveaxis", "t", "matmul", "bmm", "einsum", "linear", "unfold", "chunk", "split",
              "unbind", "pixel_shuffle", "pixel_unshuffle"}
_ARGS = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "pad": ("input", "pad", "mode", "value"),
    "interpolate": ("input", "size", "scale_factor", "mode", "align_corners"),
}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _bind(name: str, args, kwargs) -> dict:
    names = _ARGS["max_pool2d" if "max_pool" in name else name]
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


def _batched_maps(args, kwargs, like: torch.Tensor) -> list[torch.Tensor]:
    """The inputs that are per-image maps of ``like``'s grid: same batch and size, not a parameter."""
    flat = []
    for a in list(args) + list(kwargs.values()):
        flat += [t for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
    return [t for t in flat if t.dim() == 4 and not isinstance(t, nn.Parameter) and t.shape[0] == like.shape[0]
            and t.shape[-2:] == like.shape[-2:]]


def _resampled(frame, p: dict, size_in, size_out):
    """The frame after ``F.interpolate`` from ``size_in`` to ``size_out`` (per axis: output pixel
    ``i`` reads input coordinate ``(i + 1/2) r - 1/2``, ``r = in / out``, for the centred modes;
    ``i r`` for ``nearest``; ``i (in - 1) / (out - 1)`` with ``align_corners``)."""
    mode = p.get("mode", "nearest")
    corners = bool(p.get("align_corners")) and mode != "nearest"
    axes = []
    for (a, b, rad), n_in, n_out in zip(frame[:2], (size_in[1], size_in[0]), (size_out[1], size_out[0])):
        if corners:
            r = (n_in - 1) / max(n_out - 1, 1)
            shift = 0.0
        else:
            r = n_in / n_out
            shift = 0.0 if mode == "nearest" else 0.5 * r - 0.5
        axes.append((a * r, b + a * shift, rad + a))
    return (axes[0], axes[1], frame[2] and mode != "nearest")


class _FrameTracer(TorchFunctionMode):
    """Propagates per-axis frames ``((a_x, b_x, r_x), (a_y, b_y, r_y))`` from the input through the ops."""

    def __init__(self):
        super().__init__()
        self.frames: dict[int, tuple[tuple[float, float], tuple[float, float], bool]] = {}
        self.channels_last: dict[int, tuple] = {}  # (B, H, W, C) views of traced maps, and their frames
        # untraced tensors descended from a map through a reshape that mixes its grid into other axes
        # (flatten, view, matmul: tokens, attention heads): no spatial frame at all
        self.tokens: set[int] = set()
        # an id is forgotten when its tensor dies (ids of dead tensors are reused), so the tracer
        # keeps no intermediate alive: memory stays that of a plain forward pass
        self._finalizers: list[weakref.finalize] = []

    def seed(self, x: torch.Tensor) -> None:
        self.frames[id(x)] = ((1.0, 0.0, 0.0), (1.0, 0.0, 0.0), True)
        self._watch(x)

    def _watch(self, t: torch.Tensor) -> None:
        key = id(t)
        self._finalizers.append(weakref.finalize(t, self._forget, key))

    def _forget(self, key: int) -> None:
        self.frames.pop(key, None)
        self.channels_last.pop(key, None)
        self.tokens.discard(key)

    def is_tokens(self, t: torch.Tensor) -> bool:
        """Whether ``t`` has no spatial frame because it descends from a reshaped map (tokens)."""
        return id(t) in self.tokens and id(t) not in self.frames

    def __exit__(self, *exc):
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()
        return super().__exit__(*exc)

    def lookup(self, t: torch.Tensor):
        return self.frames.get(id(t))

    def lookup_channels_last(self, t: torch.Tensor):
        """The frame of a ``(B, H, W, C)`` tensor derived from a traced map, else None."""
        return self.channels_last.get(id(t))

    def _layout(self, func, args, kwargs, out) -> bool:
        """Follow (B, C, H, W) <-> (B, H, W, C) permutes and the ops in between (norms, linear
        layers, activations act on the last axis and keep (B, H, W)). True when handled."""
        name = getattr(func, "__name__", "")
        src = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if src is None or not isinstance(out, torch.Tensor) or out.dim() != 4:
            return False
        if name == "permute":
            dims = tuple(args[1:]) if len(args) > 1 else tuple(kwargs.get("dims", ()))
            dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
            dims = tuple(d % 4 for d in dims)
            if dims == (0, 2, 3, 1) and id(src) in self.frames:
                self.channels_last[id(out)] = self.frames[id(src)]
                self._watch(out)
                return True
            if dims == (0, 3, 1, 2) and id(src) in self.channels_last:
                self._record(out, self.channels_last[id(src)])
                return True
            return False
        if id(src) in self.channels_last and out.shape[:3] == src.shape[:3]:
            self.channels_last[id(out)] = self.channels_last[id(src)]
            self._watch(out)
            return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._propagate(func, args, kwargs, out)
            self._mark_tokens(func, args, kwargs, out)
        except Exception:  # tracing must never break the user's forward pass
            pass
        return out

    def _mark_tokens(self, func, args, kwargs, out) -> None:
        """Untraced outputs of a reshape of a map, or of any op on tokens, are tokens."""
        flat = []
        for a in list(args) + list(kwargs.values()):
            flat += [t for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
        inherited = any(id(t) in self.tokens for t in flat)
        src = next((t for t in flat if id(t) in self.frames or id(t) in self.channels_last), None)
        if not inherited and (src is None or getattr(func, "__name__", "") not in _RESHAPING):
            return
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(o, torch.Tensor) or id(o) in self.frames or id(o) in self.channels_last:
                continue
            # a map transposed or flipped keeps a grid (of unknown frame); one folded into other axes does not
            folded = src is not None and (o.dim() != src.dim() or sorted(o.shape[-2:]) != sorted(src.shape[-2:]))
            if inherited or folded:
                self.tokens.add(id(o))
                self._watch(o)

    def _framed_inputs(self, args, kwargs):
        found = []
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor) and id(a) in self.frames:
                found.append(a)
            elif isinstance(a, (list, tuple)):
                found += [t for t in a if isinstance(t, torch.Tensor) and id(t) in self.frames]
        return found

    def _record(self, out, frame) -> None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor) and o.dim() >= 3:
                self.frames[id(o)] = frame
                self._watch(o)

    def _propagate(self, func, args, kwargs, out) -> None:
        if self._layout(func, args, kwargs, out):
            return
        inputs = self._framed_inputs(args, kwargs)
        if not inputs:
            return
        name = getattr(func, "__name__", "")
        src = inputs[0]
        (ax, bx, rx), (ay, by, ry), exact = self.frames[id(src)]
        if name == "interpolate" and src.dim() == 4 and isinstance(out, torch.Tensor) and out.dim() == 4:
            self._record(out, _resampled(self.frames[id(src)], _bind(name, args, kwargs), src.shape[-2:],
                                         out.shape[-2:]))
            return
        if name in _MOVING:
            return  # content moved within the grid: leave the output untraced (assumed frame)
        if name in _GEOMETRIC and src.dim() == 4:
            p = _bind(name, args, kwargs)
            if name == "pad":
                pads = list(p["pad"]) + [0] * 4  # (left, right, top, bottom, ...)
                self._record(out, ((ax, bx - ax * pads[0], rx), (ay, by - ay * pads[2], ry), exact))
                return
            if name == "conv2d":
                k = tuple(p["weight"].shape[-2:])
                s = _pair(p.get("stride", 1))
                d = _pair(p.get("dilation", 1))
                pad = p.get("padding", 0)
                if isinstance(pad, str):
                    pad = (0, 0) if pad == "valid" else tuple((d[i] * (k[i] - 1)) // 2 for i in range(2))
                pad = _pair(pad)
            else:
                k = _pair(p["kernel_size"])
                s = _pair(p.get("stride") or k)
                d = _pair(p.get("dilation", 1)) if "max_pool" in name else (1, 1)
                pad = _pair(p.get("padding", 0))
            # index 0 is the H axis (y), index 1 the W axis (x)
            nx = (ax * s[1], bx + ax * (d[1] * (k[1] - 1) / 2 - pad[1]), rx + ax * d[1] * (k[1] - 1) / 2)
            ny = (ay * s[0], by + ay * (d[0] * (k[0] - 1) / 2 - pad[0]), ry + ay * d[0] * (k[0] - 1) / 2)
            self._record(out, (nx, ny, exact))
            return
        # same spatial size as a framed input: elementwise-like, keeps the frame
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if not isinstance(o, torch.Tensor) or o.dim() < 3:
                continue
            same = [t for t in inputs if t.dim() >= 3 and t.shape[-2:] == o.shape[-2:]]
            if not same:
                continue
            grids = {tuple(ax_[:2] for ax_ in self.frames[id(t)][:2]) for t in same}
            if len(grids) > 1 or any(id(t) not in self.frames for t in _batched_maps(args, kwargs, o)):
                # merged with a map of another grid (timm resnet18d's average-pooling shortcut) or of
                # unknown frame (an upsampled branch): no single frame, also when the merge is in place
                # (`out += shortcut` returns a tensor that had the first branch's frame)
                self.frames.pop(id(o), None)
                continue
            # the same grid (stride, offset) in every input: keep it, with the widest receptive field
            (gx, gy) = grids.pop()
            rx_ = max(self.frames[id(t)][0][2] for t in same)
            ry_ = max(self.frames[id(t)][1][2] for t in same)
            self._record(o, ((*gx, rx_), (*gy, ry_), all(self.frames[id(t)][2] for t in same)))


# ----------------------------------------------------------------------------- extraction


class _StopForward(Exception):
    """Raised by a hook once every requested layer is captured (later layers may not even
    accept the input size, e.g. a classifier head on larger images)."""


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout)


def _spatial_only(order: list[str], captured: dict, modules: dict) -> tuple[list[str], dict[str, str]]:
    """The spatial maps among the 4-D outputs ``order`` (what ``"all"`` measures), and why the others are not:
    fewer than ``MIN_REGION`` positions (1x1 squeeze-excitation gates, pooled vectors, classifier heads
    on them) or a duplicate of the map before it (identity and dropout modules, or any output equal to
    its predecessor's)."""
    from ._search import MIN_REGION

    keep, left_out = [], {}
    prev = None
    for n in order:
        t = captured[n]
        if t.shape[-1] * t.shape[-2] < MIN_REGION:
            left_out[n] = f"{t.shape[-2]}x{t.shape[-1]} map, fewer than MIN_REGION = {MIN_REGION} positions"
            continue
        if prev is not None and (isinstance(modules.get(n), _PASS_THROUGH) or (
                captured[prev].shape == t.shape and torch.equal(captured[prev], t))):
            left_out[n] = f"the same map as {prev}"
            continue
        keep.append(n)
        prev = n
    return keep, left_out


def list_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose output is a spatial feature map, in execution order (deepest name
    kept when a container returns its last child's tensor), preceded by ``"input"``. Outputs of
    fewer than ``MIN_REGION`` positions and duplicates of the map before them (identity, dropout)
    are left out (:attr:`FeatureExtractor.not_spatial` says why).

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    >>> list_layers(net, torch.rand(1, 1, 8, 8))
    ['input', '0', '1']
    """
    ex = FeatureExtractor(model, "all")
    ex(example[:1])
    return [INPUT] + ex.layer_names


class FeatureExtractor:
    """Collect the outputs of named layers of ``model`` (forward hooks) with their frames.

    Args:
        model: any ``nn.Module`` taking a ``(B, C, H, W)`` tensor.
        layers: ``"all"`` (every module whose output is a spatial map: 4-D, at least
            ``MIN_REGION`` positions, not a duplicate of the map before it; the others are in
            ``not_spatial``, with the reason), or an iterable of module names as in
            ``model.named_modules()``; ``"input"`` names the input itself.

    The model is put in eval mode during the call (BatchNorm uses its running statistics,
    dropout is off) and restored afterwards. Gradients are not tracked.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU())
    >>> feats, frames = FeatureExtractor(net, ["0"])(torch.rand(2, 1, 9, 9))
    >>> feats["0"].shape, frames["0"].stride
    (torch.Size([2, 4, 5, 5]), (2.0, 2.0))
    """

    def __init__(self, model: nn.Module, layers: str | Iterable[str] = "all"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.modules = dict(model.named_modules())
        self.modules.pop("", None)
        if isinstance(layers, str) and layers == "all":
            self.requested: list[str] | None = None
        else:
            if isinstance(layers, str):
                layers = [s.strip() for s in layers.split(",") if s.strip()]
            if not isinstance(layers, Iterable) or not all(isinstance(n, str) for n in layers):
                raise TypeError(f"layers: expected 'all', a comma-separated string or a list of layer names, got "
                                f"{layers!r}"[:200])
            self.requested = list(layers)
            if not self.requested:
                raise ValueError("layers: no layer names given; use 'all' or names such as "
                                 + ", ".join(list(self.modules)[:8]))
            unknown = [n for n in self.requested if n != INPUT and n not in self.modules]
            if unknown:
                raise ValueError(
                    f"layers: unknown layer name(s) {', '.join(map(repr, unknown))}; valid choices: "
                    + ", ".join([INPUT, *self.modules])
                )
        self.layer_names: list[str] = []
        self.not_maps: dict[str, tuple] = {}  # 4-D outputs without a spatial frame (tokens), by name
        self.not_spatial: dict[str, str] = {}  # "all": 4-D outputs left out, and why (see _spatial_only)
        self._tangents: dict[str, torch.Tensor | None] | None = None  # filled by jvp()

    def __call__(self, images: torch.Tensor, batch_size: int | None = None):
        """Return ``(features, frames)``: dicts layer name -> ``(B, C, h, w)`` tensor / :class:`LayerFrame`."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected a (B, C, H, W) tensor, got {shape}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a floating-point tensor, got dtype {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("images: empty batch (B = 0)")
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images: contain NaN or infinite values")
        bs = batch_size or images.shape[0]
        parts: dict[str, list[torch.Tensor]] = {}
        frames: dict[str, LayerFrame] = {}
        for i in range(0, images.shape[0], bs):
            feats, fr = self._run(images[i : i + bs])
            for k, v in feats.items():
                parts.setdefault(k, []).append(v)
            frames.update(fr)
        return {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}, frames

    def jvp(self, images: torch.Tensor, tangent: torch.Tensor):
        """``(features, tangents, frames)``: the maps of ``images`` and their derivatives along
        ``tangent`` (an image-shaped direction), by forward-mode automatic differentiation in one pass.
        A layer whose output carries no derivative (a module that detaches) gets None; a module
        without forward-mode support raises (NotImplementedError or RuntimeError).

        >>> g = torch.Generator().manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()).double()
        >>> x, v = (torch.rand(1, 1, 6, 6, generator=g, dtype=torch.float64) for _ in range(2))
        >>> f, t, _ = FeatureExtractor(net, ["0"]).jvp(x, v)
        >>> bool(torch.allclose(t["0"], net[0](v) - net[0].bias[:, None, None], rtol=0, atol=1e-12))
        True
        """
        import warnings

        import torch.autograd.forward_ad as fwad

        if not isinstance(tangent, torch.Tensor) or tangent.shape != images.shape:
            raise ValueError(f"tangent: expected the images' shape {tuple(images.shape)}, got "
                             f"{tuple(getattr(tangent, 'shape', ()))}")
        self._tangents = {}
        try:  # torch's forward mode scripts a helper on first use and warns that scripting is deprecated
            with warnings.catch_warnings(), fwad.dual_level():
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
                feats, frames = self._run(fwad.make_dual(images, tangent.to(images)))
            got = self._tangents
        finally:
            self._tangents = None
        tangents = {n: (tangent if n == INPUT else got.get(n)) for n in feats}
        return feats, tangents, frames  # the captured maps are detached: primals only

    def _run(self, x: torch.Tensor):
        captured: dict[str, torch.Tensor] = {}
        order: list[str] = []
        seen: dict[int, str] = {}  # id of a captured output -> the name it was captured under
        bad: dict[str, str] = {}
        wanted = None if self.requested is None else set(self.requested)

        def hook(name, is_container):
            def fn(_module, _inp, out):
                if wanted is not None and name not in wanted:
                    return
                if name in captured:
                    return  # a module called twice (e.g. a shared ReLU): its first call counts
                if not isinstance(out, torch.Tensor) or out.dim() != 4:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    bad[name] = str(shape)
                    return
                if wanted is None and is_container and id(out) in seen and torch.equal(out, captured[seen[id(out)]]):
                    # a container returning its last child's tensor unchanged: keep the deeper name. (The
                    # same tensor changed in place since, as by a residual block's `out += identity;
                    # relu_(out)`, is the container's own output and is captured under its name.)
                    return
                seen[id(out)] = name
                last = tracer.lookup_channels_last(out)
                if last is not None:  # (B, H, W, C): measured as (B, C, H, W), with the traced frame
                    channels_last.add(name)
                    frames_at_capture[name] = last
                    captured[name] = out.detach().permute(0, 3, 1, 2).clone()
                    if self._tangents is not None:
                        self._tangents[name] = _tangent_of(out, channels_last=True)
                else:
                    frames_at_capture[name] = tracer.lookup(out)
                    if tracer.is_tokens(out):
                        tokens[name] = tuple(out.shape)
                        if wanted is None:
                            return  # not a spatial map: listed in `not_maps`, not measured
                    # a copy: in-place operations later in the forward pass must not change it
                    captured[name] = out.detach().clone()
                    if self._tangents is not None:
                        self._tangents[name] = _tangent_of(out, channels_last=False)
                order.append(name)
                if wanted is not None and wanted <= set(captured) | {INPUT}:
                    raise _StopForward  # every requested layer is in: skip the rest of the model
            return fn

        tracer = _FrameTracer()
        tokens: dict[str, tuple] = {}
        frames_at_capture: dict[str, tuple | None] = {}
        channels_last: set[str] = set()
        handles = [m.register_forward_hook(hook(n, next(m.children(), None) is not None))
                   for n, m in self.modules.items()]
        was_training = self.model.training
        images = x
        x = x.clone()  # a model that modifies its input in place must not change the caller's images
        try:
            self.model.eval()
            with torch.no_grad(), tracer:
                tracer.seed(x)
                try:
                    self.model(x)
                except _StopForward:
                    pass
                except SystemExit as exc:  # a forward pass must not end the caller's process
                    raise ValueError(f"model: the forward pass called sys.exit({exc.code!r}); a model measured "
                                     f"here must return its outputs") from None
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        if wanted is not None:
            if bad:
                n, s = next(iter(bad.items()))
                raise ValueError(f"layers: layer {n!r} has a non-4-D output {s}; choose layers with "
                                 f"(B, C, H, W) outputs, e.g. {', '.join(order[:6]) or INPUT}")
            if tokens:
                n, shape = next(iter(tokens.items()))
                raise ValueError(f"layers: layer {n!r} output {shape} is not a spatial feature map: it comes from "
                                 f"a reshape of a map into tokens or attention heads (a vision transformer), which "
                                 f"has no spatial frame; measure layers with a traced frame (invariance layers)")
            missing = [n for n in self.requested if n != INPUT and n not in captured]
            if missing:
                raise ValueError(f"layers: layer(s) {', '.join(missing)} did not run in the forward pass")
        # keep only the deepest name for a tensor returned by several containers (hooks of
        # inner modules fire first, so the first name seen is the deepest)
        if wanted is None:
            self.layer_names, self.not_spatial = _spatial_only(order, captured, self.modules)
        else:
            self.layer_names = [n for n in self.requested if n != INPUT]
        self.not_maps = tokens
        size = tuple(x.shape[-2:])
        frames = {}
        feats = {}
        if wanted is not None and INPUT in wanted:
            feats[INPUT] = images.detach()
            frames[INPUT] = LayerFrame.identity(size)
        for n in self.layer_names:
            t = captured[n]
            fr = frames_at_capture.get(n)
            if fr is None:
                frames[n] = LayerFrame.assumed(t.shape[-2:], size)
            else:
                (ax, bx, rx), (ay, by, ry), exact = fr
                frames[n] = LayerFrame((ax, ay), (bx, by), tuple(t.shape[-2:]), size, exact, (rx, ry),
                                       "BHWC" if n in channels_last else "BCHW")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"model: layer {n!r} produced NaN or infinite values on these images; a map with "
                                 f"them has no error to measure (check the model's weights and input range)")
            feats[n] = t
        if wanted is not None:
            order_all = [n for n in self.requested]
            feats = {n: feats[n] for n in order_all}
            frames = {n: frames[n] for n in order_all}
        return feats, frames


def _tangent_of(out: torch.Tensor, channels_last: bool) -> torch.Tensor | None:
    import torch.autograd.forward_ad as fwad

    t = fwad.unpack_dual(out).tangent
    if t is None:
        return None
    return (t.permute(0, 3, 1, 2) if channels_last else t).clone()


def extract_features(model: nn.Module, images: torch.Tensor, layers: str | Iterable[str] = "all",
                     batch_size: int | None = None):
    """Shorthand for ``FeatureExtractor(model, layers)(images, batch_size)``.

    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    >>> feats, frames = extract_features(net, torch.rand(1, 1, 6, 10), "0,1")
    >>> list(feats), frames["1"].is_identity
    (['0', '1'], True)
    """
    return FeatureExtractor(model, layers)(images, batch_size)

