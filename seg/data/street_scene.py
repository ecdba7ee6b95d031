"""Procedural street scenes for the synthetic Cityscapes (:mod:`seg.data.synthetic` writes them as files).

A :class:`Scene` is a list of Cityscapes polygon objects (label name and polygon, in the real
``*_gtFine_polygons.json`` schema) covering all 19 evaluated classes plus some void ones, laid out along a
street in perspective: ground, skyline, walls and fences, trees, a train, vehicles, two-wheelers and their
riders, pedestrians, poles and signs, void objects and the ego vehicle. Everything is a deterministic function
of the random generator given to :func:`build_scene`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

Polygon = list[tuple[float, float]]


# --------------------------------------------------------------------------------------------
# geometry


def _clip(poly: Polygon, w: int, h: int) -> Polygon:
    """Sutherland-Hodgman clip of a polygon to the image rectangle [0, w-1] x [0, h-1]."""
    edges = (
        (lambda p: p[0] >= 0, lambda a, b: _cut_x(a, b, 0.0)),
        (lambda p: p[0] <= w - 1, lambda a, b: _cut_x(a, b, w - 1.0)),
        (lambda p: p[1] >= 0, lambda a, b: _cut_y(a, b, 0.0)),
        (lambda p: p[1] <= h - 1, lambda a, b: _cut_y(a, b, h - 1.0)),
    )
    out = list(poly)
    for inside, cut in edges:
        if not out:
            break
        src, out = out, []
        for i, cur in enumerate(src):
            prev = src[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cut(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cut(prev, cur))
    return out


def _cut_x(a: tuple[float, float], b: tuple[float, float], x: float) -> tuple[float, float]:
    t = (x - a[0]) / (b[0] - a[0])
    return (x, a[1] + t * (b[1] - a[1]))


def _cut_y(a: tuple[float, float], b: tuple[float, float], y: float) -> tuple[float, float]:
    t = (y - a[1]) / (b[1] - a[1])
    return (a[0] + t * (b[0] - a[0]), y)


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 16, rng: np.random.Generator | None = None):
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1.0 if rng is None else rng.uniform(0.8, 1.1, n)
    return list(zip(cx + rx * r * np.cos(ang), cy + ry * r * np.sin(ang), strict=True))


def _compound(
    draw: Callable[[np.ndarray, float], None], x0: float, y0: float, bw: float, bh: float
) -> Polygon:
    """Outline of a shape made of several cv2 primitives (person, bicycle, ...) as ONE polygon.

    ``draw(canvas, scale)`` paints in a unit box scaled to ``bw x bh`` pixels; the outer contour becomes the
    polygon, placed with its top-left corner at (x0, y0).
    """
    pad = 2
    cw, ch = max(int(np.ceil(bw)), 3), max(int(np.ceil(bh)), 3)
    canvas = np.zeros((ch + 2 * pad, cw + 2 * pad), np.uint8)
    draw(canvas, pad)
    contours, _ = cv2.findContours(canvas, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    c = max(contours, key=cv2.contourArea)
    c = cv2.approxPolyDP(c, 0.6, True)[:, 0, :].astype(np.float64)
    return [(x0 + px - pad, y0 + py - pad) for px, py in c]


# --------------------------------------------------------------------------------------------
# scene description


@dataclass
class Item:
    """A foreground thing: (label, polygon) parts drawn together, ordered by ``depth`` (bottom y)."""

    depth: float
    parts: list[tuple[str, Polygon]]
    vx: float = 0.0  # horizontal speed in pixels per video frame


@dataclass
class Scene:
    width: int
    height: int
    background: list[tuple[str, Polygon]] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    overlay: list[tuple[str, Polygon]] = field(default_factory=list)  # always on top (ego vehicle)

    def objects(self, t: float = 0.0) -> list[tuple[str, Polygon]]:
        """Polygons in drawing order (later ones cover earlier ones), moving items shifted to time ``t``."""
        out = list(self.background)
        for item in sorted(self.items, key=lambda it: it.depth):
            dx = item.vx * t
            out += [(lab, [(x + dx, y) for x, y in poly]) for lab, poly in item.parts]
        out += self.overlay
        clipped = []
        for lab, poly in out:
            poly = _clip(poly, self.width, self.height)
            pts = [[int(round(x)), int(round(y))] for x, y in poly]
            if len(pts) >= 3 and len({tuple(p) for p in pts}) >= 3:
                clipped.append((lab, pts))
        return clipped


class _Street:
    """Road geometry: a trapezoid from the bottom of the image to a vanishing point on the horizon."""

    def __init__(self, rng: np.random.Generator, w: int, h: int):
        self.w, self.h = w, h
        self.hz = h * rng.uniform(0.38, 0.46)
        self.vx = w * rng.uniform(0.42, 0.58)
        self.top = w * rng.uniform(0.02, 0.04)  # half width of the road at the horizon
        self.left = w * rng.uniform(0.08, 0.22)
        self.right = w * rng.uniform(0.78, 0.92)
        self.walk = w * rng.uniform(0.16, 0.26)  # sidewalk width at the bottom

    def t(self, y: float) -> float:
        """Depth parameter: 0 at the horizon, 1 at the bottom of the image."""
        return (y - self.hz) / (self.h - self.hz)

    def road_x(self, y: float) -> tuple[float, float]:
        t = self.t(y)
        return (self.vx - self.top) * (1 - t) + self.left * t, (self.vx + self.top) * (1 - t) + self.right * t

    def walk_x(self, y: float, side: int) -> tuple[float, float]:
        """Outer and inner x of the sidewalk on ``side`` (-1 left, +1 right) at height y."""
        a, b = self.road_x(y)
        wid = self.walk * self.t(y) + self.top * 0.8 * (1 - self.t(y))
        return (a - wid, a) if side < 0 else (b + wid, b)


def _person(rng: np.random.Generator, x: float, yb: float, ph: float, riding: bool = False) -> Polygon:
    pw = ph * 0.42
    lean = rng.uniform(-0.05, 0.05)

    def draw(c: np.ndarray, p: int) -> None:
        s = np.array([pw, ph])

        def pt(u: float, v: float) -> tuple[int, int]:
            return int(p + u * s[0]), int(p + v * s[1])

        th = max(1, int(pw * 0.16))
        cv2.circle(c, pt(0.5 + lean, 0.08), max(1, int(ph * 0.075)), 255, -1)
        cv2.ellipse(
            c, pt(0.5 + lean / 2, 0.33), (max(1, int(pw * 0.22)), max(1, int(ph * 0.18))), 0, 0, 360, 255, -1
        )
        cv2.line(c, pt(0.5, 0.2), pt(0.15, 0.5 if not riding else 0.35), 255, th)
        cv2.line(c, pt(0.5, 0.2), pt(0.85, 0.5 if not riding else 0.35), 255, th)
        if riding:  # legs bent forward onto the pedals
            cv2.line(c, pt(0.5, 0.5), pt(0.85, 0.7), 255, th + 1)
            cv2.line(c, pt(0.85, 0.7), pt(0.75, 0.98), 255, th)
        else:
            stride = rng.uniform(0.1, 0.3)
            cv2.line(c, pt(0.45, 0.5), pt(0.5 - stride, 0.98), 255, th + 1)
            cv2.line(c, pt(0.55, 0.5), pt(0.5 + stride, 0.98), 255, th + 1)

    return _compound(draw, x - pw / 2, yb - ph, pw, ph)


def _two_wheeler(x: float, yb: float, bw: float, motor: bool) -> Polygon:
    bh = bw * (0.6 if motor else 0.55)

    def draw(c: np.ndarray, p: int) -> None:
        r = int(bh * 0.3)
        th = max(1, int(bw * (0.08 if motor else 0.04)))
        a, b = (p + r, p + int(bh) - r), (p + int(bw) - r, p + int(bh) - r)
        cv2.circle(c, a, r, 255, th if not motor else -1)
        cv2.circle(c, b, r, 255, th if not motor else -1)
        seat = (p + int(bw * 0.4), p + int(bh * 0.35))
        bar = (p + int(bw * 0.75), p + int(bh * 0.1))
        cv2.line(c, a, seat, 255, th)
        cv2.line(c, seat, b, 255, th)
        cv2.line(c, seat, bar, 255, th)
        cv2.line(c, bar, b, 255, th)
        if motor:  # engine block and tank
            cv2.ellipse(
                c, (p + int(bw * 0.5), p + int(bh * 0.5)), (int(bw * 0.25), int(bh * 0.2)), 0, 0, 360, 255, -1
            )

    return _compound(draw, x - bw / 2, yb - bh, bw, bh)


def _vehicle(kind: str, x: float, yb: float, vw: float) -> Polygon:
    """Side-ish silhouettes: a car with a cabin, a truck with cab and box, a bus or a train as long boxes."""
    if kind == "car":
        vh = vw * 0.5
        u = [0, 0, 0.15, 0.3, 0.72, 0.9, 1, 1]
        v = [1, 0.5, 0.42, 0.02, 0.02, 0.42, 0.5, 1]
    elif kind == "truck":
        vh = vw * 0.75
        u = [0, 0, 0.68, 0.68, 0.86, 1, 1]
        v = [1, 0, 0, 0.3, 0.3, 0.55, 1]
    elif kind == "bus":
        vh = vw * 0.38
        u = [0, 0, 0.03, 0.97, 1, 1]
        v = [1, 0.05, 0, 0, 0.05, 1]
    else:  # train: long, with a sloped nose
        vh = vw * 0.16
        u = [0, 0, 0.93, 1, 1]
        v = [1, 0, 0, 0.35, 1]
    return [(x - vw / 2 + a * vw, yb - vh + b * vh) for a, b in zip(u, v, strict=True)]


def build_scene(rng: np.random.Generator, width: int, height: int) -> Scene:
    """A random street scene; every evaluated class appears at least once."""
    st = _Street(rng, width, height)
    sc = Scene(width, height)
    # The parts share one generator, so this call order is the order of the random draws: reordering (or
    # adding a draw to) any part changes every scene of a seed, and with it the generated data sets.
    _ground(rng, st, sc)
    _skyline(rng, st, sc)
    _walls_and_fences(rng, st, sc)
    _trees(rng, st, sc)
    _train(rng, st, sc)
    _vehicles(rng, st, sc)
    _two_wheelers(rng, st, sc)
    _pedestrians(rng, st, sc)
    _poles_and_signs(rng, st, sc)
    _void_objects(rng, st, sc)
    _ego_vehicle(rng, sc)
    return sc


def _ground(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Sky, ground (terrain beyond the sidewalks, a bare patch sometimes), road, sidewalks, a parking bay."""
    w, h, hz = st.w, st.h, st.hz
    bg = sc.background
    bg.append(("sky", _rect(0, 0, w - 1, hz + 2)))
    bg.append(("terrain", _rect(0, hz, w - 1, h - 1)))
    if rng.random() < 0.5:
        gx = rng.uniform(0, 0.6) * w
        bg.append(("ground", _rect(gx, hz, gx + w * rng.uniform(0.1, 0.3), hz + (h - hz) * 0.25)))
    ys = (hz, h - 1)
    for side in (-1, 1):
        (o0, i0), (o1, i1) = st.walk_x(ys[0], side), st.walk_x(ys[1], side)
        bg.append(("sidewalk", [(o0, ys[0]), (i0, ys[0]), (i1, ys[1]), (o1, ys[1])]))
    (a0, b0), (a1, b1) = st.road_x(ys[0]), st.road_x(ys[1])
    bg.append(("road", [(a0, ys[0]), (b0, ys[0]), (b1, ys[1]), (a1, ys[1])]))
    if rng.random() < 0.5:  # a parking bay cut into one sidewalk
        side = int(rng.choice([-1, 1]))
        y0, y1 = hz + (h - hz) * 0.55, hz + (h - hz) * 0.75
        (o0, i0), (o1, i1) = st.walk_x(y0, side), st.walk_x(y1, side)
        m0, m1 = (o0 + i0) / 2, (o1 + i1) / 2
        bg.append(("parking", [(m0, y0), (i0, y0), (i1, y1), (m1, y1)]))


def _skyline(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Buildings (some with gables) along the horizon, left to right, with trees between them."""
    w, h, hz = st.w, st.h, st.hz
    x = -rng.uniform(0, 0.05) * w
    while x < w:
        bw = w * rng.uniform(0.07, 0.2)
        bh = h * rng.uniform(0.1, 0.34)
        base = hz + h * 0.02
        if rng.random() < 0.22:
            r = bw * 0.6
            sc.background.append(("vegetation", _ellipse(x + bw / 2, hz - r * 0.6, r, r * 0.8, rng=rng)))
        else:
            poly = _rect(x, hz - bh, x + bw, base)
            if rng.random() < 0.3:
                poly = [
                    (x, base),
                    (x, hz - bh),
                    (x + bw / 2, hz - bh - bw * 0.3),
                    (x + bw, hz - bh),
                    (x + bw, base),
                ]
            sc.background.append(("building", poly))
        x += bw


def _walls_and_fences(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Walls and fences on the horizon and along both sidewalks; a guard rail sometimes."""
    w, h, hz = st.w, st.h, st.hz
    # Along the horizon, in front of the buildings.
    for lab in ("wall", "fence", "fence" if rng.random() < 0.5 else "wall"):
        x0 = rng.uniform(-0.1, 0.8) * w
        bw, bh = w * rng.uniform(0.12, 0.3), h * rng.uniform(0.05, 0.1)
        y1 = hz + h * rng.uniform(0.0, 0.03)
        sc.background.append((lab, _rect(x0, y1 - bh, x0 + bw, y1)))
    # A wall on one side and a fence on the other, running along the outer sidewalk edge in perspective.
    wall_side = int(rng.choice([-1, 1]))
    for lab, side in (("wall", wall_side), ("fence", -wall_side)):
        ya = hz + (h - hz) * rng.uniform(0.05, 0.15)
        yb = hz + (h - hz) * rng.uniform(0.3, 0.55)
        (oa, _), (ob, _) = st.walk_x(ya, side), st.walk_x(yb, side)
        k = h * rng.uniform(0.12, 0.2)  # height at the bottom of the image, shrinking with distance
        sc.items.append(
            Item(yb, [(lab, [(oa, ya), (ob, yb), (ob, yb - k * st.t(yb)), (oa, ya - k * st.t(ya))])])
        )
    if rng.random() < 0.4:
        side = int(rng.choice([-1, 1]))
        y0, y1 = hz + (h - hz) * 0.1, hz + (h - hz) * 0.35
        (_, i0), (_, i1) = st.walk_x(y0, side), st.walk_x(y1, side)
        g = h * 0.02
        sc.background.append(("guard rail", [(i0, y0 - g), (i1, y1 - 3 * g), (i1, y1), (i0, y0)]))


def _trees(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Two to four trees at the outer sidewalk edges, sized by depth."""
    h, hz = st.h, st.hz
    for _ in range(int(rng.integers(2, 5))):
        side = int(rng.choice([-1, 1]))
        yb = hz + (h - hz) * rng.uniform(0.05, 0.5)
        o, _i = st.walk_x(yb, side)
        t = st.t(yb)
        r = h * (0.06 + 0.25 * t)
        trunk = _rect(o - r * 0.08, yb - r * 1.4, o + r * 0.08, yb)
        crown = _ellipse(o, yb - r * 1.6, r, r * 0.9, rng=rng)
        sc.items.append(Item(yb, [("vegetation", trunk), ("vegetation", crown)]))


def _train(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """A moving train on a (still) rail track near the horizon."""
    w, h, hz = st.w, st.h, st.hz
    yb = hz + (h - hz) * rng.uniform(0.06, 0.14)
    tx = w * rng.uniform(0.2, 0.8)
    tw = w * rng.uniform(0.35, 0.6)
    sc.items.append(
        Item(yb - 0.5, [("rail track", _rect(tx - tw, yb - h * 0.01, tx + tw, yb + h * 0.015))], vx=0)
    )
    sc.items.append(
        Item(yb, [("train", _vehicle("train", tx, yb, tw))], vx=float(rng.choice([-1, 1])) * w * 0.01)
    )


def _on_road(rng: np.random.Generator, st: _Street, t_lo: float, t_hi: float) -> tuple[float, float, float]:
    """A random point on the road between depths ``t_lo`` and ``t_hi``: x, bottom y and its depth t."""
    yb = st.hz + (st.h - st.hz) * rng.uniform(t_lo, t_hi)
    a, b = st.road_x(yb)
    return rng.uniform(a, b), yb, st.t(yb)


def _vehicles(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Two to four cars (with license plates), a truck and a bus on the road, sized by depth."""
    w = st.w
    kinds = ["car"] * int(rng.integers(2, 5)) + ["truck", "bus"]
    for kind in kinds:
        x, yb, t = _on_road(rng, st, 0.15, 0.95)
        base = {"car": 0.28, "truck": 0.26, "bus": 0.45}[kind]
        vw = w * base * (0.15 + 0.85 * t)
        parts = [(kind, _vehicle(kind, x, yb, vw))]
        if kind == "car":  # plates are labelled (id -1) but never drawn into label images: they stay car
            pw = vw * 0.12
            parts.append(("license plate", _rect(x - pw / 2, yb - vw * 0.14, x + pw / 2, yb - vw * 0.09)))
        sc.items.append(Item(yb, parts, vx=float(rng.uniform(-1, 1)) * w * 0.015))


def _two_wheelers(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Bicycles and motorcycles ridden on the road (rider drawn over the bike), one parked on a sidewalk."""
    w, h, hz = st.w, st.h, st.hz
    # The third vehicle's kind is drawn once, before the loop, as the tuple is built.
    for motor in (False, True, bool(rng.random() < 0.5)):
        x, yb, t = _on_road(rng, st, 0.3, 0.95)
        bw = w * (0.15 if motor else 0.12) * (0.2 + 0.8 * t)
        lab = "motorcycle" if motor else "bicycle"
        ph = bw * (0.9 if motor else 1.1)
        rider = _person(rng, x - bw * 0.05, yb - bw * (0.3 if motor else 0.2), ph, riding=True)
        sc.items.append(Item(yb, [(lab, _two_wheeler(x, yb, bw, motor)), ("rider", rider)], vx=w * 0.012))
    if rng.random() < 0.7:
        side = int(rng.choice([-1, 1]))
        yb = hz + (h - hz) * rng.uniform(0.4, 0.9)
        o, i = st.walk_x(yb, side)
        bw = w * 0.1 * (0.2 + 0.8 * st.t(yb))
        sc.items.append(Item(yb, [("bicycle", _two_wheeler((o + i) / 2, yb, bw, False))]))


def _pedestrians(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Two to five pedestrians walking on the sidewalks, sized by depth."""
    w, h, hz = st.w, st.h, st.hz
    for _ in range(int(rng.integers(2, 6))):
        side = int(rng.choice([-1, 1]))
        yb = hz + (h - hz) * rng.uniform(0.15, 1.0)
        o, i = st.walk_x(yb, side)
        ph = h * 0.45 * (0.15 + 0.85 * st.t(yb))
        # Draw order: the x position, then the person's own draws (in _person), then the walking speed.
        sc.items.append(
            Item(
                yb,
                [("person", _person(rng, rng.uniform(min(o, i), max(o, i)), yb, ph))],
                vx=w * rng.uniform(-0.006, 0.006),
            )
        )


def _poles_and_signs(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Two to four poles at the inner sidewalk edges, alternating sides, carrying traffic lights and signs."""
    n_poles = int(rng.integers(2, 5))
    for k in range(n_poles):
        sc.items.append(_pole(rng, st, k, n_poles))


def _pole(rng: np.random.Generator, st: _Street, k: int, n_poles: int) -> Item:
    """Pole ``k`` of ``n_poles``: even ones and the last carry a light, odd ones and the first a sign."""
    w, h, hz = st.w, st.h, st.hz
    side = -1 if k % 2 == 0 else 1
    yb = hz + (h - hz) * rng.uniform(0.15, 0.85)
    o, i = st.walk_x(yb, side)
    x = i + (o - i) * 0.25
    t = st.t(yb)
    ph = h * (0.25 + 0.5 * t)
    pw = max(2.0, w * 0.008 * (0.4 + t))
    parts: list[tuple[str, Polygon]] = [("pole", _rect(x - pw / 2, yb - ph, x + pw / 2, yb))]
    top = yb - ph
    s = max(4.0, h * 0.09 * (0.3 + t))
    if k % 2 == 0 or k == n_poles - 1:
        parts.append(("traffic light", _rect(x - s * 0.25, top, x + s * 0.25, top + s * 0.8)))
    if k % 2 == 1 or k == 0:
        cy = top + s * (1.3 if k == 0 else 0.3)  # below the light on the first pole
        parts.append(("traffic sign", _sign(rng, x, cy, s)))
    return Item(yb, parts)


def _sign(rng: np.random.Generator, x: float, cy: float, s: float) -> Polygon:
    """A round, triangular (point down) or rectangular traffic sign of size ``s`` centred at (x, cy)."""
    shape = int(rng.integers(0, 3))
    if shape == 0:
        return _ellipse(x, cy, s * 0.35, s * 0.35)
    if shape == 1:
        return [(x - s * 0.4, cy - s * 0.3), (x + s * 0.4, cy - s * 0.3), (x, cy + s * 0.4)]
    return _rect(x - s * 0.4, cy - s * 0.3, x + s * 0.4, cy + s * 0.3)


def _void_objects(rng: np.random.Generator, st: _Street, sc: Scene) -> None:
    """Some void objects on the sidewalks, each with odds 0.6: a static box and a dynamic cart."""
    h, hz = st.h, st.hz
    for lab in ("static", "dynamic"):
        if rng.random() < 0.6:
            side = int(rng.choice([-1, 1]))
            yb = hz + (h - hz) * rng.uniform(0.3, 0.9)
            o, i = st.walk_x(yb, side)
            s = h * 0.08 * (0.2 + 0.8 * st.t(yb))
            cx = (o + i) / 2
            sc.items.append(Item(yb, [(lab, _rect(cx - s * 0.6, yb - s, cx + s * 0.6, yb))]))


def _ego_vehicle(rng: np.random.Generator, sc: Scene) -> None:
    """The ego vehicle's bonnet at the bottom, as in every Cityscapes frame (on top of everything)."""
    w, h = sc.width, sc.height
    eh = h * rng.uniform(0.04, 0.08)
    sc.overlay.append(
        (
            "ego vehicle",
            [(0, h - 1), (0, h - eh * 0.6), (w * 0.5, h - eh), (w - 1, h - eh * 0.6), (w - 1, h - 1)],
        )
    )
