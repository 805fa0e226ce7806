"""Procedural generator of produce-like pictures (healthy vs rotten).

Each of the 14 fruits/vegetables has its own shape, colours and details (stems,
leaves, seeds, ridges...). Rotten variants add dark brown/black lesions of
varying size and count, browning/desaturation, wrinkles and fuzzy mould. Every
picture gets a random background, position, scale, rotation, lighting, colour
balance, blur and noise.

Only numpy and OpenCV are used, so the module can be imported without
TensorFlow. All randomness comes from the ``numpy.random.Generator`` passed in,
so results are reproducible.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES: tuple[str, ...] = (
    "Apple__Healthy",
    "Apple__Rotten",
    "Banana__Healthy",
    "Banana__Rotten",
    "Bellpepper__Healthy",
    "Bellpepper__Rotten",
    "Carrot__Healthy",
    "Carrot__Rotten",
    "Cucumber__Healthy",
    "Cucumber__Rotten",
    "Grape__Healthy",
    "Grape__Rotten",
    "Guava__Healthy",
    "Guava__Rotten",
    "Jujube__Healthy",
    "Jujube__Rotten",
    "Mango__Healthy",
    "Mango__Rotten",
    "Orange__Healthy",
    "Orange__Rotten",
    "Pomegranate__Healthy",
    "Pomegranate__Rotten",
    "Potato__Healthy",
    "Potato__Rotten",
    "Strawberry__Healthy",
    "Strawberry__Rotten",
    "Tomato__Healthy",
    "Tomato__Rotten",
)

_S = 256  # side of the square sprite canvas every produce is drawn on
_MAX_WORK = 256  # pictures are drawn at most this large, then resized
_C = _S / 2.0
_YY, _XX = np.mgrid[0:_S, 0:_S].astype(np.float32)
_PI = math.pi

Color = np.ndarray


# --------------------------------------------------------------------------
# small drawing helpers
# --------------------------------------------------------------------------


def _rgb(h: float, s: float, v: float) -> Color:
    """HSV (hue in degrees, s/v in 0..1) to a float32 RGB triple."""
    r, g, b = colorsys.hsv_to_rgb((h / 360.0) % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.array([r, g, b], dtype=np.float32)


def _jit(
    rng: np.random.Generator,
    h: float,
    s: float,
    v: float,
    dh: float = 5.0,
    ds: float = 0.07,
    dv: float = 0.07,
) -> Color:
    """A colour near HSV ``(h, s, v)``."""
    return _rgb(h + rng.uniform(-dh, dh), s + rng.uniform(-ds, ds), v + rng.uniform(-dv, dv))


def _lerp(img: np.ndarray, color: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Blend ``img`` towards ``color`` (triple or image) with weight map ``m``, in place.

    Only the bounding box of the non-zero weights is touched; returns ``img``.
    """
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return img
    cols = np.flatnonzero(m.any(axis=0))
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    sub = img[win]
    col = color[win] if np.ndim(color) == 3 else color
    sub += (col - sub) * m[win][..., None]
    return img


def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts, dtype=np.float64) * 16).astype(np.int32)


def _poly_mask(pts: np.ndarray, shape: tuple[int, int] = (_S, _S)) -> np.ndarray:
    """Anti-aliased filled polygon as a float mask in 0..1."""
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [_fixed(pts)], 255, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _line_mask(
    lines: list[np.ndarray], thickness: int, shape: tuple[int, int] = (_S, _S)
) -> np.ndarray:
    """Anti-aliased open polylines as a float mask in 0..1."""
    canvas = np.zeros(shape, np.uint8)
    cv2.polylines(
        canvas, [_fixed(p) for p in lines], False, 255, max(1, int(thickness)), cv2.LINE_AA, shift=4
    )
    return canvas.astype(np.float32) / 255.0


def _ellipse(cx: float, cy: float, ax: float, ay: float, angle: float = 0.0) -> np.ndarray:
    """Soft-edged filled ellipse mask (angle in radians)."""
    out = np.zeros((_S, _S), np.float32)
    win = _window(cx, cy, max(ax, ay) + 2)
    if win is None:
        return out
    ca, sa = math.cos(angle), math.sin(angle)
    dx, dy = _XX[win] - float(cx), _YY[win] - float(cy)
    u = (dx * ca + dy * sa) / float(ax)
    w = (-dx * sa + dy * ca) / float(ay)
    q = np.sqrt(u * u + w * w)
    out[win] = np.clip((1.0 - q) * float(min(ax, ay)) + 0.5, 0.0, 1.0)
    return out


def _window(cx: float, cy: float, half: float) -> tuple[slice, slice] | None:
    """Slices of the sprite canvas covering a square of half-side ``half`` around (cx, cy)."""
    x0, x1 = max(int(cx - half), 0), min(int(cx + half) + 2, _S)
    y0, y1 = max(int(cy - half), 0), min(int(cy + half) + 2, _S)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _smooth_noise(
    rng: np.random.Generator, cells: int, shape: tuple[int, int] = (_S, _S)
) -> np.ndarray:
    """Low-frequency value noise in 0..1."""
    small = rng.random((cells + 1, cells + 1)).astype(np.float32)
    big = cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    lo, hi = float(big.min()), float(big.max())
    return (big - lo) / max(hi - lo, 1e-6)


def _fine_noise(
    rng: np.random.Generator, sigma: float, shape: tuple[int, int] = (_S, _S)
) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian noise blurred by ``sigma`` pixels."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if sigma > 0:
        n = cv2.GaussianBlur(n, (0, 0), sigma)
    return n / (float(n.std()) + 1e-6)


def _blur(m: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(m.astype(np.float32, copy=False), (0, 0), max(float(sigma), 0.3))


def _radial_pts(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    radius: float,
    amp: float,
    extra: Callable[[np.ndarray], np.ndarray] | None = None,
    sx: float = 1.0,
    sy: float = 1.0,
    n: int = 180,
) -> np.ndarray:
    """Closed outline ``r(t) = radius * (1 + random harmonics + extra(t))``."""
    t = np.linspace(0.0, 2 * _PI, n, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4, 5):
        r += rng.uniform(-amp, amp) / k * np.cos(k * t + rng.uniform(0, 2 * _PI))
    if extra is not None:
        r += extra(t)
    return np.stack([cx + sx * radius * r * np.cos(t), cy + sy * radius * r * np.sin(t)], axis=1)


def _angdist(t: np.ndarray, t0: float) -> np.ndarray:
    return np.abs((t - t0 + _PI) % (2 * _PI) - _PI)


def _star(
    cx: float,
    cy: float,
    r_out: float,
    r_in: float,
    points: int,
    rot: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Star polygon (calyx, crown)."""
    t = rot + np.arange(2 * points) * _PI / points
    r = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    r = r * rng.uniform(0.8, 1.15, size=r.shape)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _tube(centre: np.ndarray, half_width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Outline polygon around a centre line, and the unit normals along it."""
    tan = np.gradient(centre, axis=0)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True) + 1e-9
    nrm = np.stack([-tan[:, 1], tan[:, 0]], axis=1)
    left = centre + nrm * half_width[:, None]
    right = centre - nrm * half_width[:, None]
    return np.concatenate([left, right[::-1]], axis=0), nrm


def _dots(
    rng: np.random.Generator,
    mask: np.ndarray,
    count: int,
    r_lo: float,
    r_hi: float,
    min_cover: float = 0.9,
) -> np.ndarray:
    """Mask of ``count`` small discs placed where ``mask`` > ``min_cover``."""
    out = np.zeros((_S, _S), np.uint8)
    ys, xs = np.nonzero(mask > min_cover)
    if len(xs) == 0 or count <= 0:
        return out.astype(np.float32)
    idx = rng.integers(0, len(xs), size=count)
    for x, y in zip(xs[idx], ys[idx], strict=True):
        r = rng.uniform(r_lo, r_hi)
        cv2.circle(
            out,
            (round(x * 16), round(y * 16)),
            max(1, round(r * 16)),
            255,
            -1,
            cv2.LINE_AA,
            shift=4,
        )
    return out.astype(np.float32) / 255.0


def _sample_in(
    rng: np.random.Generator, mask: np.ndarray, thr: float = 0.95
) -> tuple[float, float]:
    ys, xs = np.nonzero(mask > thr)
    if len(xs) == 0:
        return _C, _C
    i = int(rng.integers(0, len(xs)))
    return float(xs[i]), float(ys[i])


def _blob(
    rng: np.random.Generator, cx: float, cy: float, radius: float, irregular: float = 0.35
) -> np.ndarray:
    """Irregular round patch mask."""
    pts = _radial_pts(rng, cx, cy, radius, irregular, n=64)
    return _poly_mask(pts)


# --------------------------------------------------------------------------
# sprite model
# --------------------------------------------------------------------------


@dataclass
class _Sprite:
    """One produce drawn on an ``_S`` x ``_S`` canvas, before shading."""

    albedo: np.ndarray
    body: np.ndarray
    gloss: float
    parts_rgb: np.ndarray = field(default_factory=lambda: np.zeros((_S, _S, 3), np.float32))
    parts_a: np.ndarray = field(default_factory=lambda: np.zeros((_S, _S), np.float32))
    bump: np.ndarray = field(default_factory=lambda: np.zeros((_S, _S), np.float32))
    normals: np.ndarray | None = None
    gloss_map: np.ndarray | None = None
    # Where rot was painted (lesions, soft rot, shrivelled berries; mould is added later).
    # Bookkeeping only: it never feeds back into the picture or the random stream.
    rot: np.ndarray = field(default_factory=lambda: np.zeros((_S, _S), np.float32))

    def add_part(self, mask: np.ndarray, color: np.ndarray) -> None:
        """Paint an opaque part (stem, leaf, calyx) over the body."""
        self.parts_rgb = _lerp(self.parts_rgb, color, mask)
        self.parts_a = np.maximum(self.parts_a, mask)

    @property
    def radius(self) -> float:
        return math.sqrt(max(float(self.body.sum()), 1.0) / _PI)


def _base(color: Color) -> np.ndarray:
    return np.broadcast_to(color, (_S, _S, 3)).astype(np.float32).copy()


def _stem(
    rng: np.random.Generator,
    x0: float,
    y0: float,
    length: float,
    width: float,
    bend: float = 0.4,
    angle: float = -_PI / 2,
) -> tuple[np.ndarray, float, float]:
    """Curved stem mask starting at (x0, y0); returns mask and tip position."""
    s = np.linspace(0.0, 1.0, 12)
    a = angle + rng.uniform(-bend, bend) * s
    dx = np.cumsum(np.cos(a)) / len(s) * length
    dy = np.cumsum(np.sin(a)) / len(s) * length
    pts = np.stack([x0 + dx, y0 + dy], axis=1)
    pts = np.concatenate([[[x0, y0 + width]], pts], axis=0)
    mask = _line_mask([pts], round(width))
    return mask, float(pts[-1, 0]), float(pts[-1, 1])


def _leaf(rng: np.random.Generator, x: float, y: float, length: float, angle: float) -> np.ndarray:
    """Leaf-shaped mask with its base at (x, y)."""
    cx = x + math.cos(angle) * length / 2
    cy = y + math.sin(angle) * length / 2
    return _ellipse(cx, cy, length / 2, length * rng.uniform(0.18, 0.3), angle)


def _green(rng: np.random.Generator, dark: bool = False) -> Color:
    return _jit(rng, 105, 0.65, 0.32 if dark else 0.5, dh=15, ds=0.12, dv=0.1)


def _brown(rng: np.random.Generator) -> Color:
    return _jit(rng, 28, 0.6, 0.3, dh=8, ds=0.1, dv=0.08)


# --------------------------------------------------------------------------
# produce
# --------------------------------------------------------------------------


def _apple(rng: np.random.Generator, rotten: bool) -> _Sprite:
    radius = _S * rng.uniform(0.3, 0.36)
    cx, cy = _C, _C + 0.04 * _S
    dip = rng.uniform(0.07, 0.14)

    def extra(t: np.ndarray) -> np.ndarray:
        return -dip * np.exp(-((_angdist(t, -_PI / 2) / 0.32) ** 2)) - 0.05 * np.exp(
            -((_angdist(t, _PI / 2) / 0.5) ** 2)
        )

    pts = _radial_pts(rng, cx, cy, radius, 0.05, extra, sx=rng.uniform(1.0, 1.1))
    body = _poly_mask(pts)
    mode = rng.choice(3, p=[0.6, 0.2, 0.2])
    if mode == 0:
        base, sec, cover = _jit(rng, 356, 0.8, 0.6), _jit(rng, 35, 0.75, 0.85), 0.2
    elif mode == 1:
        base, sec, cover = _jit(rng, 95, 0.7, 0.78), _jit(rng, 70, 0.6, 0.9), 0.15
    else:
        base, sec, cover = _jit(rng, 5, 0.75, 0.68), _jit(rng, 55, 0.65, 0.85), 0.45
    top_y = cy - radius * (1 - dip)
    phi = np.arctan2(_YY - top_y, _XX - cx)
    streak_vals = rng.random(48)
    streak = np.interp((phi + _PI) / (2 * _PI) * 47, np.arange(48), streak_vals).astype(np.float32)
    low = _smooth_noise(rng, 4)
    mix = np.clip(cover + 0.55 * (streak - 0.5) + 0.5 * (low - 0.5), 0, 1)
    albedo = _lerp(_base(base), sec, mix)
    lent = _dots(rng, body, int(rng.integers(40, 110)), 0.6, 1.4)
    albedo = _lerp(albedo, np.clip(sec * 1.15, 0, 1), lent * 0.6)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.6, 0.9))
    width = radius * rng.uniform(0.06, 0.09)
    stem, tx, ty = _stem(rng, cx, top_y + 0.06 * radius, radius * rng.uniform(0.3, 0.45), width)
    sp.add_part(stem, _brown(rng))
    if rng.random() < 0.5:
        side = rng.choice([-1.0, 1.0])
        leaf = _leaf(
            rng,
            tx,
            ty + width,
            radius * rng.uniform(0.5, 0.8),
            -_PI / 2 + side * rng.uniform(0.6, 1.3),
        )
        sp.add_part(leaf, _green(rng))
    return sp


def _tomato(rng: np.random.Generator, rotten: bool) -> _Sprite:
    radius = _S * rng.uniform(0.29, 0.35)
    cx, cy = _C, _C + 0.03 * _S
    ph = rng.uniform(0, 2 * _PI)

    def extra(t: np.ndarray) -> np.ndarray:
        return 0.025 * np.cos(5 * t + ph) - 0.05 * np.exp(-((_angdist(t, -_PI / 2) / 0.35) ** 2))

    pts = _radial_pts(rng, cx, cy, radius, 0.03, extra, sx=rng.uniform(1.05, 1.2))
    body = _poly_mask(pts)
    base = _jit(rng, 5, 0.92, 0.88, dh=4, ds=0.06, dv=0.08)
    albedo = _base(base)
    if rng.random() < 0.35:
        shoulder = np.clip(1 - (_YY - (cy - radius)) / (radius * 0.9), 0, 1) * _smooth_noise(rng, 3)
        albedo = _lerp(albedo, _jit(rng, 25, 0.85, 0.9), shoulder * 0.6)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.85, 1.0))
    top = cy - radius * rng.uniform(0.72, 0.85)
    green = _green(rng, dark=True)
    calyx = _poly_mask(
        _star(
            cx,
            top,
            radius * rng.uniform(0.35, 0.5),
            radius * 0.1,
            int(rng.integers(5, 7)),
            rng.uniform(0, _PI),
            rng,
        )
    )
    sp.add_part(calyx, green)
    stub, _, _ = _stem(rng, cx, top, radius * rng.uniform(0.08, 0.18), radius * 0.06)
    sp.add_part(stub, green * 0.85)
    return sp


def _orange(rng: np.random.Generator, rotten: bool) -> _Sprite:
    radius = _S * rng.uniform(0.3, 0.36)
    pts = _radial_pts(rng, _C, _C, radius, 0.03, sx=rng.uniform(0.97, 1.05))
    body = _poly_mask(pts)
    base = _jit(rng, 30, 0.92, 0.95, dh=5, ds=0.06, dv=0.05)
    albedo = _lerp(_base(base), _jit(rng, 40, 0.9, 0.95), _smooth_noise(rng, 3) * 0.5)
    pores = _fine_noise(rng, 1.2)
    albedo *= (1 + 0.05 * pores)[..., None]
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.3, 0.5))
    sp.bump = -0.9 * np.clip(pores, 0, None)
    nx, ny = _C + rng.uniform(-0.4, 0.4) * radius, _C + rng.uniform(-0.4, 0.4) * radius
    button = _ellipse(nx, ny, radius * 0.06, radius * 0.05, rng.uniform(0, _PI))
    sp.add_part(button, _jit(rng, 70, 0.5, 0.4, dh=20))
    if rng.random() < 0.2:
        leaf = _leaf(rng, nx, ny, radius * rng.uniform(0.6, 0.9), rng.uniform(0, 2 * _PI))
        sp.add_part(leaf, _green(rng, dark=True))
    return sp


def _guava(rng: np.random.Generator, rotten: bool) -> _Sprite:
    radius = _S * rng.uniform(0.28, 0.33)
    bulge = rng.uniform(0.14, 0.24)

    def extra(t: np.ndarray) -> np.ndarray:
        return bulge * np.sin(t)

    pts = _radial_pts(
        rng,
        _C,
        _C - 0.02 * _S,
        radius,
        0.04,
        extra,
        sx=rng.uniform(0.95, 1.05),
        sy=rng.uniform(1.05, 1.2),
    )
    body = _poly_mask(pts)
    green, yellow = _jit(rng, 75, 0.5, 0.72, dh=8), _jit(rng, 55, 0.45, 0.88, dh=6)
    albedo = _lerp(_base(green), yellow, _smooth_noise(rng, 3) * rng.uniform(0.3, 0.9))
    dark = _dots(rng, body, int(rng.integers(120, 260)), 1.2, 2.6)
    light = _dots(rng, body, int(rng.integers(40, 120)), 0.6, 1.4)
    albedo = _lerp(albedo, green * 0.6, dark * 0.75)
    albedo = _lerp(albedo, np.clip(yellow * 1.15, 0, 1), light * 0.6)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.1, 0.25))
    bottom_y = float(pts[:, 1].max()) - radius * 0.12
    crown = _poly_mask(
        _star(_C, bottom_y, radius * 0.1, radius * 0.04, 5, rng.uniform(0, _PI), rng)
    )
    sp.add_part(crown, _jit(rng, 30, 0.55, 0.25))
    top_y = float(pts[:, 1].min()) + radius * 0.05
    stub, _, _ = _stem(rng, _C, top_y, radius * 0.12, radius * 0.05)
    sp.add_part(stub, _brown(rng))
    return sp


def _jujube(rng: np.random.Generator, rotten: bool) -> _Sprite:
    radius = _S * rng.uniform(0.22, 0.27)
    pts = _radial_pts(rng, _C, _C, radius, 0.03, sx=1.0, sy=rng.uniform(1.4, 1.9))
    body = _poly_mask(pts)
    red = _jit(rng, 5, 0.8, 0.45, dh=5, ds=0.1, dv=0.08)
    if rng.random() < 0.6:
        albedo = _base(red)
        albedo = _lerp(albedo, red * 1.25, _smooth_noise(rng, 4) * 0.5)
    else:
        yellow = _jit(rng, 62, 0.5, 0.82, dh=8)
        patches = np.clip((_smooth_noise(rng, 4) - rng.uniform(0.3, 0.6)) * 5, 0, 1)
        albedo = _lerp(_base(yellow), red, patches)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.75, 1.0))
    top_y = float(pts[:, 1].min()) + radius * 0.04
    stub, _, _ = _stem(rng, _C, top_y, radius * rng.uniform(0.12, 0.25), radius * 0.06)
    sp.add_part(stub, _brown(rng))
    return sp


def _mango(rng: np.random.Generator, rotten: bool) -> _Sprite:
    a, b = _S * rng.uniform(0.19, 0.23), _S * rng.uniform(0.35, 0.4)
    t = np.linspace(0, 2 * _PI, 180, endpoint=False)
    y = b * np.sin(t)
    x = a * np.cos(t) * (1 + 0.12 * np.sin(t)) + 0.25 * a * (y / b) ** 2 * rng.choice([-1, 1])
    pts = np.stack([_C + x, _C + y], axis=1)
    body = _poly_mask(pts)
    combos = [
        ((95, 0.65, 0.55), (55, 0.8, 0.85)),
        ((95, 0.65, 0.55), (5, 0.8, 0.75)),
        ((50, 0.85, 0.92), (15, 0.85, 0.85)),
        ((75, 0.6, 0.6), (40, 0.85, 0.92)),
    ]
    c1, c2 = combos[int(rng.integers(len(combos)))]
    ang = rng.uniform(0, 2 * _PI)
    proj = ((_XX - _C) * math.cos(ang) + (_YY - _C) * math.sin(ang)) / b
    grad = np.clip(0.5 + 0.6 * proj + 0.35 * (_smooth_noise(rng, 3) - 0.5), 0, 1)
    albedo = _lerp(_base(_jit(rng, *c1)), _jit(rng, *c2), grad)
    lent = _dots(rng, body, int(rng.integers(30, 90)), 0.6, 1.2)
    albedo = _lerp(albedo, np.clip(albedo * 1.25, 0, 1), lent * 0.5)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.45, 0.7))
    top_y = float(pts[:, 1].min()) + b * 0.04
    top_x = float(pts[np.argmin(pts[:, 1]), 0])
    stub, _, _ = _stem(rng, top_x, top_y, b * rng.uniform(0.06, 0.14), a * 0.07)
    sp.add_part(stub, _jit(rng, 60, 0.6, 0.3))
    return sp


def _pomegranate(rng: np.random.Generator, rotten: bool) -> _Sprite:
    radius = _S * rng.uniform(0.29, 0.33)
    cx, cy = _C, _C + 0.06 * _S
    ph = rng.uniform(0, 2 * _PI)

    def extra(t: np.ndarray) -> np.ndarray:
        return 0.035 * np.cos(6 * t + ph)

    pts = _radial_pts(rng, cx, cy, radius, 0.03, extra)
    body = _poly_mask(pts)
    red = _jit(rng, 350, 0.75, 0.58, dh=6, ds=0.08, dv=0.1)
    pale = _jit(rng, 15, 0.5, 0.75, dh=10)
    albedo = _lerp(_base(red), pale, np.clip(_smooth_noise(rng, 5) - 0.45, 0, 1) * 1.3)
    albedo *= (1 + 0.04 * _fine_noise(rng, 1.0))[..., None]
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.25, 0.45))
    cw = radius * rng.uniform(0.28, 0.36)
    top = cy - radius * 0.9
    h = radius * rng.uniform(0.35, 0.5)
    teeth = int(rng.integers(5, 8))
    xs = np.linspace(-cw, cw, 2 * teeth + 1)
    ys = np.where(np.arange(2 * teeth + 1) % 2 == 0, -h * 1.25, -h * 0.75)
    ys = ys * rng.uniform(0.9, 1.1, size=ys.shape)
    crown_pts = np.concatenate(
        [
            [[cx - cw * 0.8, top + radius * 0.1]],
            np.stack([cx + xs * 1.15, top + ys], axis=1),
            [[cx + cw * 0.8, top + radius * 0.1]],
        ]
    )
    sp.add_part(_poly_mask(crown_pts), red * rng.uniform(0.55, 0.75))
    return sp


def _bellpepper(rng: np.random.Generator, rotten: bool) -> _Sprite:
    a, b = _S * rng.uniform(0.27, 0.32), _S * rng.uniform(0.3, 0.36)
    n_exp = rng.uniform(2.4, 3.2)
    lobes = int(rng.integers(3, 5))
    t = np.linspace(0, 2 * _PI, 200, endpoint=False)
    ct, st = np.cos(t), np.sin(t)
    r = (np.abs(ct) ** n_exp + np.abs(st) ** n_exp) ** (-1 / n_exp)
    r *= 1 + 0.08 * np.cos(lobes * (t - _PI / 2)) * np.clip(st, 0, None)
    r *= 1 - 0.08 * np.exp(-((_angdist(t, -_PI / 2) / 0.3) ** 2))
    cx, cy = _C, _C + 0.05 * _S
    pts = np.stack([cx + a * r * ct, cy + b * r * st], axis=1)
    body = _poly_mask(pts)
    colors = [(358, 0.9, 0.78), (48, 0.92, 0.95), (115, 0.8, 0.48), (26, 0.95, 0.95)]
    base = _jit(rng, *colors[rng.choice(4, p=[0.3, 0.25, 0.25, 0.2])], dh=4)
    albedo = _base(base)
    creases = []
    for k in range(lobes - 1):
        x0 = cx + a * (-0.7 + 1.4 * (k + 0.5) / (lobes - 1)) * rng.uniform(0.8, 1.0)
        yy = np.linspace(cy - b * 0.7, cy + b * 0.95, 16)
        xx = x0 + a * 0.05 * np.sin(np.linspace(0, _PI, 16) * rng.uniform(1, 2))
        creases.append(np.stack([xx, yy], axis=1))
    cr = _blur(_line_mask(creases, int(max(2, a * 0.03))), a * 0.04) * body
    albedo = _lerp(albedo, base * 0.6, np.clip(cr * 1.5, 0, 1))
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.9, 1.0))
    sp.bump = -a * 0.12 * _blur(cr, a * 0.06)
    green = _green(rng, dark=True)
    top = cy - b * 0.92
    ring = _ellipse(cx, top + b * 0.04, a * rng.uniform(0.22, 0.3), b * 0.07)
    sp.add_part(ring, green)
    stem, _, _ = _stem(
        rng, cx, top, b * rng.uniform(0.3, 0.45), a * rng.uniform(0.13, 0.18), bend=0.8
    )
    sp.add_part(stem, green * 1.1)
    return sp


def _cucumber(rng: np.random.Generator, rotten: bool) -> _Sprite:
    length = _S * rng.uniform(0.8, 0.9)
    hw = _S * rng.uniform(0.085, 0.12)
    s = np.linspace(-0.5, 0.5, 60)
    bend = rng.uniform(-0.12, 0.12) * length
    centre = np.stack([_C + s * length, _C + bend * (s * s * 4 - 0.33)], axis=1)
    prof = hw * np.clip(np.sqrt(np.clip(1 - (np.abs(s) / 0.5) ** 6, 0, 1)), 0.15, 1)
    prof *= 1 + 0.08 * np.cos(s * rng.uniform(3, 7) + rng.uniform(0, 6))
    outline, nrm = _tube(centre, prof)
    body = _poly_mask(outline)
    dark = _jit(rng, 115, 0.7, 0.35, dh=10, ds=0.1, dv=0.08)
    light = _jit(rng, 85, 0.55, 0.62, dh=10)
    albedo = _base(dark)
    stripes = []
    for frac in np.linspace(-0.8, 0.8, int(rng.integers(4, 8))):
        off = frac + rng.uniform(-0.08, 0.08)
        stripes.append(centre + nrm * (prof * off)[:, None])
    st = _blur(_line_mask(stripes, int(max(2, hw * 0.12))), hw * 0.08)
    albedo = _lerp(albedo, light, np.clip(st * rng.uniform(0.5, 0.9), 0, 1))
    albedo = _lerp(albedo, light, _smooth_noise(rng, 4) * 0.25)
    bumps = _dots(rng, body, int(rng.integers(30, 80)), 0.8, 1.8)
    albedo = _lerp(albedo, np.clip(light * 1.2, 0, 1), bumps * 0.6)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.4, 0.6))
    sp.bump = 1.5 * _blur(bumps, 1.0)
    end = centre[-1] - (centre[-1] - centre[-2]) * 2
    sp.add_part(_ellipse(end[0], end[1], hw * 0.22, hw * 0.18), _jit(rng, 55, 0.5, 0.75))
    start = centre[0]
    stub = _line_mask([np.stack([start, start - (centre[1] - centre[0]) * 4])], int(hw * 0.25))
    sp.add_part(stub, _jit(rng, 60, 0.5, 0.35))
    return sp


def _carrot(rng: np.random.Generator, rotten: bool) -> _Sprite:
    length = _S * rng.uniform(0.62, 0.72)
    hw0 = _S * rng.uniform(0.08, 0.11)
    s = np.linspace(0.0, 1.0, 50)
    bend = rng.uniform(-0.1, 0.1) * length
    y0 = _C - length * 0.38
    centre = np.stack([_C + bend * s * s, y0 + s * length], axis=1)
    prof = hw0 * (np.clip(1 - s, 0.03, 1) ** rng.uniform(0.7, 1.1))
    prof[:4] *= np.sqrt(np.linspace(0.55, 1.0, 4))
    outline, nrm = _tube(centre, prof)
    body = _poly_mask(outline)
    base = _jit(rng, 24, 0.9, 0.9, dh=4, ds=0.06, dv=0.08)
    albedo = _lerp(_base(base), base * 0.85, _smooth_noise(rng, 4) * 0.5)
    ridges = []
    for _ in range(int(rng.integers(10, 24))):
        i = int(rng.integers(3, 45))
        a0, a1 = rng.uniform(-0.9, 0.1), rng.uniform(0.0, 0.9)
        ridges.append(
            np.stack([centre[i] + nrm[i] * prof[i] * a0, centre[i] + nrm[i] * prof[i] * a1])
        )
    rm = _blur(_line_mask(ridges, 1), 0.7) * body
    albedo = _lerp(albedo, base * 0.6, np.clip(rm, 0, 1))
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.15, 0.3))
    sp.bump = -2.0 * rm
    top = centre[0]
    green = _green(rng)
    if rng.random() < 0.7:
        fronds = []
        for _ in range(int(rng.integers(3, 8))):
            ang = -_PI / 2 + rng.uniform(-0.7, 0.7)
            ln = _S * rng.uniform(0.12, 0.22)
            ss = np.linspace(0, 1, 8)
            aa = ang + rng.uniform(-0.4, 0.4) * ss
            fronds.append(
                np.stack(
                    [
                        top[0] + np.cumsum(np.cos(aa)) * ln / 8,
                        top[1] + hw0 * 0.2 + np.cumsum(np.sin(aa)) * ln / 8,
                    ],
                    axis=1,
                )
            )
        sp.add_part(_line_mask(fronds, int(max(2, hw0 * 0.18))), green)
    else:
        sp.add_part(_ellipse(top[0], top[1] + hw0 * 0.1, hw0 * 0.45, hw0 * 0.2), green)
    return sp


def _banana(rng: np.random.Generator, rotten: bool) -> _Sprite:
    span = rng.uniform(0.9, 1.5)
    rc = _S * 0.4 / math.sin(span / 2)
    a = np.linspace(-span / 2, span / 2, 70) + _PI / 2
    ccy = _C - rc * math.cos(span / 2) * 0.5 - rc * 0.5 * (1 - math.cos(span / 2))
    centre = np.stack([_C + rc * np.cos(a), ccy - rc * 0.25 + rc * np.sin(a) * 1.0], axis=1)
    centre -= centre.mean(axis=0) - np.array([_C, _C])
    s = np.linspace(0, 1, 70)
    hw = _S * rng.uniform(0.06, 0.085)
    prof = hw * np.clip(np.sin(_PI * s) ** 0.55, 0.12, 1)
    outline, nrm = _tube(centre, prof)
    body = _poly_mask(outline)
    if rng.random() < 0.25:
        base = _jit(rng, 65, 0.7, 0.85, dh=6)
    else:
        base = _jit(rng, 52, 0.85, 0.95, dh=4, ds=0.07, dv=0.04)
    albedo = _base(base)
    ends = np.clip(
        1
        - np.minimum(
            np.hypot(_XX - centre[0, 0], _YY - centre[0, 1]),
            np.hypot(_XX - centre[-1, 0], _YY - centre[-1, 1]),
        )
        / (_S * 0.15),
        0,
        1,
    )
    albedo = _lerp(albedo, _jit(rng, 75, 0.7, 0.7), ends * 0.6)
    ridge = centre + nrm * (prof * rng.uniform(-0.35, 0.35))[:, None]
    rm = _blur(_line_mask([ridge], 2), 1.5) * body
    albedo = _lerp(albedo, base * 0.78, rm * 0.7)
    if rng.random() < 0.3:
        fr = _dots(rng, body, int(rng.integers(3, 15)), 0.8, 1.6)
        albedo = _lerp(albedo, _jit(rng, 30, 0.7, 0.35), fr * 0.8)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.3, 0.45))
    sp.bump = -2.5 * rm
    tip = centre[-1] + (centre[-1] - centre[-3])
    sp.add_part(_ellipse(tip[0], tip[1], hw * 0.22, hw * 0.18), _jit(rng, 25, 0.5, 0.15))
    st_dir = centre[0] - centre[3]
    st_dir /= np.linalg.norm(st_dir) + 1e-9
    stem = np.stack([centre[1], centre[0] + st_dir * hw * rng.uniform(1.2, 2.0)])
    sp.add_part(_line_mask([stem], int(hw * 0.4)), _jit(rng, 60, 0.55, 0.4))
    return sp


def _potato(rng: np.random.Generator, rotten: bool) -> _Sprite:
    radius = _S * rng.uniform(0.26, 0.3)
    pts = _radial_pts(rng, _C, _C, radius, 0.14, sx=rng.uniform(1.2, 1.5), sy=1.0)
    body = _poly_mask(pts)
    mode = rng.choice(3, p=[0.6, 0.2, 0.2])
    if mode == 0:
        base = _jit(rng, 32, 0.45, 0.72, dh=5, ds=0.08, dv=0.08)
    elif mode == 1:
        base = _jit(rng, 8, 0.5, 0.55, dh=5)
    else:
        base = _jit(rng, 45, 0.4, 0.85, dh=5)
    albedo = _lerp(_base(base), base * 0.8, _smooth_noise(rng, 6) * 0.6)
    speck = _fine_noise(rng, 0.8)
    albedo *= (1 + 0.07 * speck)[..., None]
    dirt = _dots(rng, body, int(rng.integers(20, 80)), 0.6, 1.5)
    albedo = _lerp(albedo, base * 0.6, dirt * 0.5)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.03, 0.1))
    eyes = _dots(
        rng, _blur(body, 8), int(rng.integers(5, 12)), radius * 0.035, radius * 0.06, min_cover=0.6
    )
    sp.albedo = _lerp(sp.albedo, base * 0.5, eyes * 0.8)
    sp.bump = -3.0 * _blur(eyes, 2.0) + 0.8 * _fine_noise(rng, 3.0)
    return sp


def _strawberry(rng: np.random.Generator, rotten: bool) -> _Sprite:
    length = _S * rng.uniform(0.62, 0.72)
    wmax = _S * rng.uniform(0.25, 0.3)
    u = np.linspace(0, 1, 60)
    knee = rng.uniform(0.22, 0.32)
    half = np.where(
        u < knee,
        wmax * np.sqrt(np.clip(u / knee, 0, 1)) * 0.85 + 0.15 * wmax,
        wmax * ((1 - u) / (1 - knee)) ** rng.uniform(0.6, 0.9),
    )
    half = np.maximum(half, wmax * 0.04)
    y = _C - length * 0.45 + u * length
    pts = np.concatenate([np.stack([_C + half, y], axis=1), np.stack([_C - half, y], axis=1)[::-1]])
    body = _poly_mask(pts)
    red = _jit(rng, 356, 0.88, 0.8, dh=5, ds=0.07, dv=0.1)
    albedo = _base(red)
    if rng.random() < 0.3:
        pale = np.clip(1 - (_YY - y[0]) / (length * 0.35), 0, 1)
        albedo = _lerp(albedo, _jit(rng, 15, 0.55, 0.9), pale * 0.6)
    gap = _S * rng.uniform(0.055, 0.07)
    seeds = np.zeros((_S, _S), np.float32)
    pits = np.zeros((_S, _S), np.float32)
    for row, yy in enumerate(np.arange(y[0] + gap, y[-1] - gap * 0.5, gap)):
        for xx in np.arange(_C - wmax + (row % 2) * gap / 2, _C + wmax, gap):
            jx, jy = xx + rng.uniform(-1.5, 1.5), yy + rng.uniform(-1.5, 1.5)
            if body[int(min(max(jy, 0), _S - 1)), int(min(max(jx, 0), _S - 1))] < 0.9:
                continue
            cv2.ellipse(pits, (int(jx), int(jy)), (4, 4), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
            cv2.ellipse(
                seeds, (int(jx), int(jy)), (1, 2), rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA
            )
    albedo = _lerp(albedo, red * 0.7, pits * 0.5)
    albedo = _lerp(albedo, _jit(rng, 50, 0.65, 0.9), seeds)
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.55, 0.8))
    sp.bump = -1.2 * _blur(pits, 1.0)
    green = _green(rng)
    top = (_C, y[0] + length * 0.03)
    leaves = np.zeros((_S, _S), np.float32)
    for k in range(int(rng.integers(5, 9))):
        ang = rng.uniform(-0.2, _PI + 0.2) if k > 1 else rng.uniform(0.2, _PI - 0.2)
        leaves = np.maximum(leaves, _leaf(rng, top[0], top[1], _S * rng.uniform(0.1, 0.18), ang))
    sp.add_part(leaves, green)
    stub, _, _ = _stem(rng, top[0], top[1], _S * rng.uniform(0.04, 0.09), _S * 0.015)
    sp.add_part(stub, green * 0.9)
    return sp


def _grape(rng: np.random.Generator, rotten: bool) -> _Sprite:
    rb = _S * rng.uniform(0.065, 0.085)
    rows = [5, 6, 5, 5, 4, 3, 2, 1][: int(rng.integers(5, 9))]
    mode = rng.choice(3, p=[0.5, 0.35, 0.15])
    if mode == 0:
        base = _jit(rng, 285, 0.55, 0.35, dh=12, ds=0.12, dv=0.08)
        bloom = rng.uniform(0.1, 0.3)
    elif mode == 1:
        base = _jit(rng, 78, 0.5, 0.75, dh=8)
        bloom = rng.uniform(0.0, 0.1)
    else:
        base = _jit(rng, 350, 0.6, 0.48, dh=8)
        bloom = rng.uniform(0.05, 0.2)
    centres = []
    top_y = _C - len(rows) * rb * 0.85
    for i, n in enumerate(rows):
        for j in range(n):
            x = _C + (j - (n - 1) / 2) * rb * 1.75 + rng.uniform(-0.25, 0.25) * rb
            y = top_y + i * rb * 1.6 + rng.uniform(-0.25, 0.25) * rb
            if rng.random() < 0.1 and i > 0:
                continue
            centres.append((x, y, rb * rng.uniform(0.85, 1.1)))
    order = rng.permutation(len(centres))
    albedo = np.zeros((_S, _S, 3), np.float32)
    body = np.zeros((_S, _S), np.float32)
    normals = np.zeros((_S, _S, 3), np.float32)
    normals[..., 2] = 1.0
    shrivel = np.zeros((_S, _S), np.float32)
    p_bad = rng.uniform(0.2, 0.6) if rotten else 0.0
    bad_col = _jit(rng, 25, 0.55, 0.28, dh=10)
    for k in order:
        x, y, r = centres[k]
        ex, ey = r * rng.uniform(0.9, 1.0), r * rng.uniform(1.0, 1.15)
        m = _ellipse(x, y, ex, ey, rng.uniform(0, _PI))
        col = base * rng.uniform(0.88, 1.12)
        col = col + (np.array([0.75, 0.78, 0.85], np.float32) - col) * bloom
        if rng.random() < p_bad:
            col = bad_col * rng.uniform(0.6, 1.2)
            shrivel = np.maximum(shrivel, m)
        albedo = _lerp(albedo, np.clip(col, 0, 1), m)
        body = np.maximum(body, m)
        win = _window(x, y, max(ex, ey) + 2)
        if win is None:
            continue
        nx = np.clip((_XX[win] - x) / ex, -1, 1)
        ny = np.clip((_YY[win] - y) / ey, -1, 1)
        nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0.02, 1))
        nn = np.stack([nx, ny, nz], axis=-1)
        nn /= np.linalg.norm(nn, axis=-1, keepdims=True)
        normals[win] = _lerp(normals[win], nn, m[win])
    sp = _Sprite(albedo, body, gloss=rng.uniform(0.4, 0.7))
    sp.normals = normals
    if rotten:
        wr = _wrinkle_mask(rng, shrivel, int(rng.integers(10, 30)), rb * 0.9)
        sp.albedo = _lerp(sp.albedo, sp.albedo * 0.45, wr * shrivel)
        sp.rot = np.maximum(sp.rot, shrivel)
    stem_col = _jit(rng, 40, 0.5, 0.35, dh=15)
    branches = [np.array([[_C, top_y - rb * 1.8], [_C + rng.uniform(-0.5, 0.5) * rb, top_y + rb]])]
    for _ in range(3):
        bx = _C + rng.uniform(-2, 2) * rb
        branches.append(np.array([[_C, top_y - rb * 0.6], [bx, top_y + rb * 0.5]]))
    sp.add_part(
        _line_mask(branches, int(max(2, rb * 0.22))) * np.clip(1 - body + (top_y > _YY), 0, 1),
        stem_col,
    )
    return sp


_FRUIT_DRAWERS: dict[str, Callable[[np.random.Generator, bool], _Sprite]] = {
    "Apple": _apple,
    "Banana": _banana,
    "Bellpepper": _bellpepper,
    "Carrot": _carrot,
    "Cucumber": _cucumber,
    "Grape": _grape,
    "Guava": _guava,
    "Jujube": _jujube,
    "Mango": _mango,
    "Orange": _orange,
    "Pomegranate": _pomegranate,
    "Potato": _potato,
    "Strawberry": _strawberry,
    "Tomato": _tomato,
}


# --------------------------------------------------------------------------
# rot and blemishes
# --------------------------------------------------------------------------


def _wrinkle_mask(
    rng: np.random.Generator, region: np.ndarray, count: int, length: float
) -> np.ndarray:
    lines = []
    for _ in range(count):
        x, y = _sample_in(rng, region, 0.8)
        ang = rng.uniform(0, 2 * _PI)
        n = 10
        turns = ang + np.cumsum(rng.uniform(-0.5, 0.5, n))
        seg = length * rng.uniform(0.4, 1.0) / n
        xs = x + np.cumsum(np.cos(turns)) * seg
        ys = y + np.cumsum(np.sin(turns)) * seg
        lines.append(np.stack([xs, ys], axis=1))
    return _blur(_line_mask(lines, int(rng.integers(1, 3))), 0.8)


def _lesion(
    rng: np.random.Generator,
    albedo: np.ndarray,
    body: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Dark brown/black rotten spot with a lighter halo; returns albedo and spot mask."""
    mask = np.zeros((_S, _S), np.float32)
    win = _window(cx, cy, radius * 3.3 + 4)
    if win is None:
        return albedo, mask
    core = _blob(rng, cx, cy, radius, 0.45)[win]
    soft = _blur(core, radius * rng.uniform(0.08, 0.25))
    halo_blob = _blob(rng, cx, cy, radius * rng.uniform(1.15, 1.5), 0.4)[win]
    halo = _blur(halo_blob, radius * 0.3)
    dist = np.clip(np.hypot(_XX[win] - cx, _YY[win] - cy) / max(radius, 1.0), 0, 1)
    dark = _jit(rng, 22, 0.7, 0.1, dh=10, ds=0.15, dv=0.06)
    mid = _jit(rng, 25, 0.7, 0.3, dh=10, ds=0.12, dv=0.08)
    tex = _fine_noise(rng, rng.uniform(1.0, 3.0), core.shape)
    spot_col = np.broadcast_to(dark, (*core.shape, 3)).copy()
    _lerp(spot_col, mid, np.clip(dist ** rng.uniform(0.8, 2.0) + 0.15 * tex, 0, 1))
    if rng.random() < 0.4:  # concentric rings, like in anthracnose/brown rot
        rings = 0.5 + 0.5 * np.sin(dist * rng.uniform(12, 22))
        spot_col *= (0.75 + 0.35 * rings)[..., None]
    halo_col = _jit(rng, 35, 0.6, 0.5, dh=10)
    sub, bw = albedo[win], body[win]
    _lerp(sub, halo_col, halo * bw * rng.uniform(0.3, 0.6))
    m = soft * bw
    _lerp(sub, spot_col, m)
    mask[win] = m
    return albedo, mask


def _rot(rng: np.random.Generator, sp: _Sprite) -> list[tuple[float, float, float]]:
    """Apply rot to the sprite's albedo; return the mould patches to paint after shading."""
    body, radius = sp.body, sp.radius
    severity = rng.uniform(0.15, 1.0)
    grey = sp.albedo.mean(axis=-1, keepdims=True)
    tint = _jit(rng, 30, 0.5, 0.35, dh=10, ds=0.1, dv=0.1)
    dull = 0.45 * np.broadcast_to(grey, sp.albedo.shape) + 0.55 * tint
    amount = (0.08 + 0.3 * severity * rng.random()) * (0.3 + 0.7 * _smooth_noise(rng, 4))
    sp.albedo = _lerp(sp.albedo, dull, amount * body)
    rot_mask = np.zeros((_S, _S), np.float32)
    n_lesions = 1 + int(rng.integers(0, 1 + round(5 * severity)))
    for i in range(n_lesions):
        if i == 0:
            r = radius * rng.uniform(0.2, 0.25 + 0.25 * severity)
        else:
            r = radius * rng.uniform(0.08, 0.14 + 0.2 * severity)
        cx, cy = _sample_in(rng, body)
        sp.albedo, m = _lesion(rng, sp.albedo, body, cx, cy, r)
        rot_mask = np.maximum(rot_mask, m)
    if rng.random() < 0.25:  # large soft, watery rot
        cx, cy = _sample_in(rng, body)
        soft = _blur(_blob(rng, cx, cy, radius * rng.uniform(0.35, 0.6), 0.4), radius * 0.2) * body
        sp.albedo = _lerp(
            sp.albedo,
            sp.albedo * 0.4 + _jit(rng, 28, 0.6, 0.12) * 0.6,
            soft * rng.uniform(0.5, 0.85),
        )
        rot_mask = np.maximum(rot_mask, soft)
    sp.rot = np.maximum(sp.rot, rot_mask)
    if rng.random() < 0.45:
        wr = _wrinkle_mask(rng, body, int(rng.integers(4, 14)), radius * 0.6) * body
        sp.albedo = _lerp(sp.albedo, sp.albedo * 0.5, wr)
        sp.bump = sp.bump - 2.5 * wr
    sp.gloss_map = sp.gloss * rng.uniform(0.2, 0.7) * (1 - rot_mask)
    # stems and leaves wilt
    sp.parts_rgb = _lerp(
        sp.parts_rgb, _brown(rng) * 0.8, np.full((_S, _S), rng.uniform(0.3, 0.8), np.float32)
    )
    moulds = []
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = _sample_in(rng, body)
            moulds.append((cx, cy, radius * rng.uniform(0.12, 0.32)))
    return moulds


def _healthy_marks(rng: np.random.Generator, sp: _Sprite) -> None:
    """Small natural blemishes so that 'any spot' does not mean 'rotten'."""
    radius = sp.radius
    if rng.random() < 0.35:
        spots = _dots(rng, sp.body, int(rng.integers(1, 5)), radius * 0.012, radius * 0.03)
        sp.albedo = _lerp(sp.albedo, _jit(rng, 28, 0.55, 0.3), spots * 0.8)
    if rng.random() < 0.2:
        x, y = _sample_in(rng, sp.body)
        ang = rng.uniform(0, _PI)
        ln = radius * rng.uniform(0.08, 0.2)
        scar = _line_mask([np.array([[x, y], [x + ln * math.cos(ang), y + ln * math.sin(ang)]])], 1)
        sp.albedo = _lerp(sp.albedo, _jit(rng, 40, 0.3, 0.75), _blur(scar, 0.6) * sp.body * 0.6)


def _mould(
    rng: np.random.Generator,
    img: np.ndarray,
    body: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    rot: np.ndarray | None = None,
) -> np.ndarray:
    """Fuzzy white/grey/blue-green mould patch painted over a shaded sprite (in place).

    ``rot``, when given, is raised (in place) to the patch's coverage."""
    win = _window(cx, cy, radius * 2.6 + 4)
    if win is None:
        return img
    patch = _blur(_blob(rng, cx, cy, radius, 0.5)[win], radius * 0.3)
    fibres = _fine_noise(rng, 0.7, patch.shape)
    clumps = _fine_noise(rng, 2.5, patch.shape)
    cover = np.clip(patch * (1.7 + 0.4 * clumps) - 0.35, 0, 1) * body[win]
    if rng.random() < 0.7:
        col = _jit(rng, 60, 0.06, 0.88, dh=40, ds=0.05, dv=0.08)
    else:
        col = _jit(rng, 165, 0.3, 0.65, dh=25, ds=0.1, dv=0.1)
    texture = (
        np.broadcast_to(col, (*patch.shape, 3)) * np.clip(0.8 + 0.2 * fibres, 0.4, 1.2)[..., None]
    )
    strength = rng.uniform(0.75, 0.95)
    _lerp(img[win], texture, cover * strength)
    if rot is not None:
        rot[win] = np.maximum(rot[win], cover * strength)
    return img


# --------------------------------------------------------------------------
# shading, background, composition
# --------------------------------------------------------------------------


def _normals_from_mask(mask: np.ndarray, bump: np.ndarray) -> np.ndarray:
    binm = (mask > 0.5).astype(np.uint8)
    d = cv2.distanceTransform(binm, cv2.DIST_L2, 5)
    dmax = max(float(d.max()), 1.0)
    u = d / dmax
    h = np.sqrt(np.clip(1 - (1 - u) ** 2, 0, 1)) * dmax * 0.9
    h = (_blur(h, 2.0) + bump).astype(np.float32)
    hx = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=3) / 8.0
    hy = cv2.Sobel(h, cv2.CV_32F, 0, 1, ksize=3) / 8.0
    n = np.stack([-hx, -hy, np.ones_like(h)], axis=-1)
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _shade(
    albedo: np.ndarray,
    normals: np.ndarray,
    gloss: np.ndarray | float,
    light: np.ndarray,
    ambient: float,
    shininess: float,
) -> np.ndarray:
    diffuse = np.clip(normals @ light, 0, 1)
    half = light + np.array([0, 0, 1], np.float32)
    half /= np.linalg.norm(half)
    spec = np.clip(normals @ half, 0, 1) ** shininess
    out = albedo * (ambient + (1 - ambient) * diffuse)[..., None]
    return out + (0.55 * spec * gloss)[..., None]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    col = _rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.45), rng.uniform(0.35, 0.95))
    img = np.broadcast_to(col, (h, w, 3)).astype(np.float32).copy()
    ang = rng.uniform(0, 2 * _PI)
    grad = (xx / w - 0.5) * math.cos(ang) + (yy / h - 0.5) * math.sin(ang)
    img *= (1 + rng.uniform(0.0, 0.35) * grad)[..., None]
    kind = rng.choice(4, p=[0.4, 0.25, 0.2, 0.15])
    if kind == 1:  # wood
        wood = _rgb(rng.uniform(20, 40), rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.8))
        warp = _smooth_noise(rng, 3, (h, w)) * rng.uniform(5, 20)
        grain = 0.5 + 0.5 * np.sin(
            (yy if rng.random() < 0.5 else xx) / max(h, w) * rng.uniform(40, 120) + warp
        )
        img = np.broadcast_to(wood, (h, w, 3)) * (0.8 + 0.25 * grain)[..., None]
    elif kind == 2:  # cloth / checks
        period = rng.uniform(0.03, 0.12) * max(h, w)
        check = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
        col2 = _rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.5), rng.uniform(0.5, 1.0))
        img = _lerp(img, col2, check * rng.uniform(0.3, 1.0))
    elif kind == 3:  # mottled paper / stone
        img = img * (0.85 + 0.3 * _smooth_noise(rng, 8, (h, w)))[..., None]
    img = img * (1 + 0.04 * _fine_noise(rng, 1.5, (h, w)))[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def _draw_sprite(
    class_index: int, rng: np.random.Generator, light: np.ndarray, ambient: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one produce; returns premultiplied RGB, alpha and the visible rot (0..1) on the
    sprite canvas."""
    fruit, state = CLASS_NAMES[class_index].split("__")
    rotten = state == "Rotten"
    sp = _FRUIT_DRAWERS[fruit](rng, rotten)
    moulds: list[tuple[float, float, float]] = []
    if rotten:
        moulds = _rot(rng, sp)
    else:
        _healthy_marks(rng, sp)
    normals = sp.normals if sp.normals is not None else _normals_from_mask(sp.body, sp.bump)
    if sp.normals is not None and rotten:
        normals = _lerp(normals, _normals_from_mask(sp.body, sp.bump), np.clip(-sp.bump, 0, 1))
    gloss = sp.gloss_map if sp.gloss_map is not None else sp.gloss
    shininess = float(rng.uniform(15, 60))
    rgb = _shade(np.clip(sp.albedo, 0, 1), normals, gloss, light, ambient, shininess)
    for cx, cy, r in moulds:
        rgb = _mould(rng, rgb, sp.body, cx, cy, r, sp.rot)
    if sp.parts_a.max() > 0:
        pn = _normals_from_mask(sp.parts_a, np.zeros_like(sp.parts_a))
        prgb = _shade(np.clip(sp.parts_rgb, 0, 1), pn, 0.2, light, ambient + 0.15, 20.0)
        rgb = _lerp(rgb, prgb, sp.parts_a)
    alpha = np.maximum(sp.body, sp.parts_a)
    visible_rot = sp.rot * sp.body * (1 - sp.parts_a)  # stems and leaves hide what is below
    return np.clip(rgb, 0, 1.2) * alpha[..., None], alpha, visible_rot


def render(
    class_index: int, rng: np.random.Generator, size: tuple[int, int] = (256, 256)
) -> np.ndarray:
    """Render one picture of class ``CLASS_NAMES[class_index]``.

    ``size`` is ``(height, width)``; the result is an RGB ``uint8`` array of
    shape ``(height, width, 3)``.
    """
    return render_with_lesion(class_index, rng, size)[0]


def render_with_lesion(
    class_index: int, rng: np.random.Generator, size: tuple[int, int] = (256, 256)
) -> tuple[np.ndarray, np.ndarray]:
    """``render`` plus where the rot is: a ``bool`` array of shape ``(height, width)``.

    The mask is True where lesions, soft rot, mould or shrivelled berries cover at least half
    of a pixel and are not hidden by a stem or leaf (all False for healthy classes). The
    picture is the one ``render`` draws from the same generator state.
    """
    if not 0 <= class_index < len(CLASS_NAMES):
        raise ValueError(f"class_index must be in [0, {len(CLASS_NAMES)}), got {class_index}")
    h, w = int(size[0]), int(size[1])
    if h < 8 or w < 8:
        raise ValueError(f"size too small: {size}")
    lt = np.array(
        [rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), rng.uniform(0.6, 1.2)], np.float32
    )
    light = lt / np.linalg.norm(lt)
    ambient = float(rng.uniform(0.3, 0.5))
    # draw at a working resolution of at most _MAX_WORK pixels, then resize
    k = min(1.0, _MAX_WORK / max(h, w))
    wh, ww = max(8, round(h * k)), max(8, round(w * k))
    canvas = _background(rng, wh, ww)
    sprite, alpha, rotten = _draw_sprite(class_index, rng, light, ambient)
    if rng.random() < 0.5:
        sprite, alpha, rotten = (a[:, ::-1].copy() for a in (sprite, alpha, rotten))

    ys, xs = np.nonzero(alpha > 0.05)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    bcx, bcy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    angle = float(rng.uniform(0, 360))
    rad = math.radians(angle)
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], np.float32) - [bcx, bcy]
    rot = np.array([[math.cos(rad), math.sin(rad)], [-math.sin(rad), math.cos(rad)]], np.float32)
    rc = corners @ rot.T
    ext_w, ext_h = float(np.ptp(rc[:, 0])), float(np.ptp(rc[:, 1]))
    # scale the object to a share of the picture, but keep it inside the frame
    target = rng.uniform(0.55, 0.92) * min(wh, ww)
    scale = min(target / max(ext_w, ext_h), 1.02 * ww / ext_w, 1.02 * wh / ext_h)
    half_w, half_h = ext_w * scale / 2, ext_h * scale / 2
    tx = rng.uniform(min(half_w, ww - half_w) - 0.03 * ww, max(half_w, ww - half_w) + 0.03 * ww)
    ty = rng.uniform(min(half_h, wh - half_h) - 0.03 * wh, max(half_h, wh - half_h) + 0.03 * wh)
    m = cv2.getRotationMatrix2D((float(bcx), float(bcy)), angle, scale)
    m[0, 2] += tx - bcx
    m[1, 2] += ty - bcy

    # soft shadow away from the light
    shadow_dir = -light[:2] / max(float(np.linalg.norm(light[:2])), 1e-3)
    ms = m.copy()
    ms[:, 2] += shadow_dir * target * rng.uniform(0.02, 0.07)
    shadow = cv2.warpAffine(alpha, ms, (ww, wh), flags=cv2.INTER_LINEAR, borderValue=0)
    shadow = _blur(shadow, target * rng.uniform(0.02, 0.06))
    canvas *= (1 - rng.uniform(0.25, 0.55) * shadow)[..., None]

    wa = cv2.warpAffine(alpha, m, (ww, wh), flags=cv2.INTER_LINEAR, borderValue=0)
    lesion = cv2.warpAffine(rotten, m, (ww, wh), flags=cv2.INTER_LINEAR, borderValue=0)
    wrgb = cv2.warpAffine(sprite, m, (ww, wh), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    img = canvas * (1 - wa)[..., None] + wrgb

    # camera: exposure, white balance, vignette, blur, noise, gamma
    img *= rng.uniform(0.8, 1.15) * rng.uniform(0.93, 1.07, size=3).astype(np.float32)
    if rng.random() < 0.3:
        yy = np.arange(wh, dtype=np.float32)[:, None] / wh - 0.5
        xx = np.arange(ww, dtype=np.float32)[None, :] / ww - 0.5
        img *= (1 - rng.uniform(0.1, 0.35) * 2 * (xx * xx + yy * yy))[..., None]
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.0) * min(wh, ww) / 224)
    img += rng.uniform(0.0, 0.02) * rng.standard_normal(img.shape, dtype=np.float32)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    lut = np.clip((np.arange(256) / 255.0) ** rng.uniform(0.85, 1.15) * 255 + 0.5, 0, 255)
    out = cv2.LUT(out, lut.astype(np.uint8))
    if (wh, ww) != (h, w):
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
        lesion = cv2.resize(lesion, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(out), lesion >= 0.5


def make_dataset(
    n_per_class: int, seed: int, size: tuple[int, int] = (256, 256)
) -> tuple[list[np.ndarray], np.ndarray]:
    """``n_per_class`` pictures of every class; returns (images, integer labels).

    Each picture has its own generator seeded from ``(seed, class, index)``,
    so a dataset is identical whatever the order or parallelism of rendering.
    """
    images: list[np.ndarray] = []
    labels: list[int] = []
    for c in range(len(CLASS_NAMES)):
        for i in range(n_per_class):
            images.append(render(c, np.random.default_rng([seed, c, i]), size))
            labels.append(c)
    return images, np.asarray(labels, dtype=np.int64)


def write_dataset(
    folder: str | Path,
    n_per_class: int,
    seed: int,
    size: tuple[int, int] = (256, 256),
    quality: int = 90,
) -> list[Path]:
    """Write a dataset as JPEGs, one sub-folder per class; returns the file paths."""
    root = Path(folder)
    paths: list[Path] = []
    for c, name in enumerate(CLASS_NAMES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = render(c, np.random.default_rng([seed, c, i]), size)
            path = root / name / f"{name}_{seed}_{i:05d}.jpg"
            ok, buf = cv2.imencode(
                ".jpg",
                cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                [cv2.IMWRITE_JPEG_QUALITY, int(quality)],
            )
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {path}")
            path.write_bytes(buf.tobytes())
            paths.append(path)
    return paths
