"""The 2-D test functions a trial can optimize instead of a network: formulas, known minima and
saddle points, default starts and plotting ranges.

One definition serves the engine (torch tensors, float64) and the dashboard (numpy grids): a
formula uses only arithmetic and ``cos``, which each caller passes in. Pure: no torch, no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REACHED_WITHIN = 1e-3  # a final point this close to a known minimum or saddle has reached it


@dataclass(frozen=True)
class Point:
    """A known stationary point: ``kind`` is "minimum" or "saddle"; ``name`` is what tables show."""

    name: str
    x: float
    y: float
    kind: str = "minimum"


@dataclass(frozen=True)
class Surface:
    name: str
    formula: str  # as the README and the page print it
    value: Callable[[Any, Any, Callable[[Any], Any]], Any]  # f(x, y, cos)
    points: tuple[Point, ...]
    start: tuple[float, float]  # the default start
    x_range: tuple[float, float]  # what the page draws
    y_range: tuple[float, float]

    @property
    def minima(self) -> tuple[Point, ...]:
        return tuple(p for p in self.points if p.kind == "minimum")

    @property
    def saddles(self) -> tuple[Point, ...]:
        return tuple(p for p in self.points if p.kind == "saddle")


def _named(x: float, y: float, kind: str = "minimum") -> Point:
    return Point(f"({x:.3g}, {y:.3g})" if kind == "minimum" else "saddle", x, y, kind)


def _rastrigin_minima() -> tuple[Point, ...]:
    # The local minima of x^2 - 10 cos(2 pi x) sit a little inside each whole number k (Newton's method
    # on the derivative 2x + 20 pi sin(2 pi x)); the function is a sum over x and y.
    def root(k: int) -> float:
        x = float(k)
        for _ in range(50):
            x -= (2 * x + 20 * math.pi * math.sin(2 * math.pi * x)) / (2 + 40 * math.pi**2 * math.cos(2 * math.pi * x))
        return x

    roots = {k: root(k) for k in range(-5, 6)}
    return tuple(Point(f"({i}, {j})", roots[i], roots[j]) for i in range(-5, 6) for j in range(-5, 6))


SURFACES: dict[str, Surface] = {s.name: s for s in (
    Surface("himmelblau", "(x² + y − 11)² + (x + y² − 7)²",
            lambda x, y, cos: (x * x + y - 11) ** 2 + (x + y * y - 7) ** 2,
            (_named(3.0, 2.0), _named(-2.805118, 3.131313), _named(-3.779310, -3.283186),
             _named(3.584428, -1.848127),
             *(_named(x, y, "saddle") for x, y in ((0.086678, 2.884255), (-3.073026, -0.081353),
                                                   (3.385154, 0.073852), (-0.127961, -1.953715)))),
            start=(0.0, 0.0), x_range=(-5.0, 5.0), y_range=(-5.0, 5.0)),
    Surface("rosenbrock", "(1 − x)² + 100 (y − x²)²",
            lambda x, y, cos: (1 - x) ** 2 + 100 * (y - x * x) ** 2,
            (_named(1.0, 1.0),), start=(-1.2, 1.0), x_range=(-2.0, 2.0), y_range=(-1.0, 3.0)),
    Surface("saddle", "x² + y⁴/4 − y²/2",
            lambda x, y, cos: x * x + y**4 / 4 - y * y / 2,
            (_named(0.0, 1.0), _named(0.0, -1.0), _named(0.0, 0.0, "saddle")),
            start=(1.5, 0.01), x_range=(-2.0, 2.0), y_range=(-2.0, 2.0)),
    Surface("ill_conditioned", "x²/2 + 25 y²",
            lambda x, y, cos: x * x / 2 + 25 * y * y,
            (_named(0.0, 0.0),), start=(-4.0, 1.0), x_range=(-5.0, 5.0), y_range=(-2.0, 2.0)),
    Surface("six_hump_camel", "(4 − 2.1 x² + x⁴/3) x² + x y + (−4 + 4 y²) y²",
            lambda x, y, cos: (4 - 2.1 * x * x + x**4 / 3) * x * x + x * y + (-4 + 4 * y * y) * y * y,
            (_named(0.089842, -0.712656), _named(-0.089842, 0.712656), _named(-1.703607, 0.796084),
             _named(1.703607, -0.796084), _named(-1.607105, -0.568651), _named(1.607105, 0.568651),
             *(_named(x, y, "saddle") for x, y in ((0.0, 0.0), (1.109205, -0.768268), (-1.109205, 0.768268)))),
            start=(-1.5, 1.0), x_range=(-2.0, 2.0), y_range=(-1.2, 1.2)),
    Surface("rastrigin", "20 + x² − 10 cos(2πx) + y² − 10 cos(2πy)",
            lambda x, y, cos: 20 + x * x - 10 * cos(2 * math.pi * x) + y * y - 10 * cos(2 * math.pi * y),
            _rastrigin_minima(), start=(2.3, 2.6), x_range=(-5.12, 5.12), y_range=(-5.12, 5.12)),
)}
SURFACE_NAMES = tuple(SURFACES)


def is_surface(dataset: Any) -> bool:
    """Whether a trial's ``dataset`` is one of the 2-D test functions."""
    return isinstance(dataset, str) and dataset in SURFACES


def value_at(name: str, x: float, y: float) -> float:
    """The function ``name`` at one point, in Python floats."""
    try:
        return float(SURFACES[name].value(x, y, math.cos))
    except OverflowError:
        return math.inf


def reached(name: str, x: float, y: float) -> str | None:
    """The name of the known minimum within REACHED_WITHIN of (x, y), "saddle" for a known saddle
    point, or None."""
    for point in SURFACES[name].points:
        if math.hypot(x - point.x, y - point.y) <= REACHED_WITHIN:
            return point.name
    return None


def nearest_minimum(name: str, x: float, y: float) -> tuple[str, float]:
    """The known minimum closest to (x, y) and its distance."""
    best = min(SURFACES[name].minima, key=lambda p: math.hypot(x - p.x, y - p.y))
    return best.name, math.hypot(x - best.x, y - best.y)
