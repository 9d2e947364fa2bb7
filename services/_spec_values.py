"""One parameter of a grid spec: its values or distribution, checked against its TrialConfig field,
enumerated for a grid and sampled for a random search.

Private to :mod:`services.spec`. The checks append ``"path: message"`` strings to a list instead of
raising, so the spec can report every problem at once.
"""

from __future__ import annotations

import difflib
import math
import random
import types
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from services.trial_config import TrialConfig

MAX_VALUES = 1000  # per parameter: the items of a values list, or the points a grid enumerates
MAX_DRAWS = 1000  # tries to draw a normal-family value that the field accepts

# distribution -> (required keys, optional keys), as in W&B's sweep format
_DISTRIBUTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "constant": (("value",), ()),
    "categorical": (("values",), ("probabilities",)),
    "int_uniform": (("min", "max"), ()),
    "uniform": (("min", "max"), ()),
    "q_uniform": (("min", "max"), ("q",)),
    "log_uniform": (("min", "max"), ()),
    "q_log_uniform": (("min", "max"), ("q",)),
    "log_uniform_values": (("min", "max"), ()),
    "q_log_uniform_values": (("min", "max"), ("q",)),
    "inv_log_uniform": (("min", "max"), ()),
    "inv_log_uniform_values": (("min", "max"), ()),
    "normal": ((), ("mu", "sigma")),
    "q_normal": ((), ("mu", "sigma", "q")),
    "log_normal": ((), ("mu", "sigma")),
    "q_log_normal": ((), ("mu", "sigma", "q")),
}
DISTRIBUTIONS = tuple(_DISTRIBUTIONS)
_GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")
_NORMAL_FAMILY = ("normal", "q_normal", "log_normal", "q_log_normal")
_EXPONENT_BOUNDS = ("log_uniform", "q_log_uniform", "inv_log_uniform")  # min/max are ln exponents
_POSITIVE_BOUNDS = ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values")
_PARAMETER_KEYS = ("value", "values", "probabilities", "distribution", "min", "max", "q", "mu", "sigma")
_WANDB_DEFAULTS = {"q": 1, "mu": 0, "sigma": 1}
_INVALID = object()


class DrawError(Exception):
    """A random draw found no value its field accepts; the message is a spec problem line."""


@dataclass(frozen=True)
class Parameter:
    """One validated parameter of a spec.

    ``distribution`` is W&B's name for it (``value`` is ``constant``, ``values`` is ``categorical``,
    bare ``min``/``max`` are ``int_uniform`` or ``uniform``). ``values`` holds the checked choices of
    constant and categorical and, under ``method: grid``, the points int_uniform and q_uniform
    enumerate. ``min``/``max``/``q``/``mu``/``sigma`` are the spec's numbers; ``integer`` says draws
    are whole numbers.
    """

    name: str
    distribution: str
    values: tuple[Any, ...] = ()
    probabilities: tuple[float, ...] | None = None
    min: float | None = None
    max: float | None = None
    q: float | None = None
    mu: float | None = None
    sigma: float | None = None
    integer: bool = False


@cache
def _adapter(name: str) -> TypeAdapter[Any]:
    # strict: YAML's `yes` is not 1, "0.1" is not a number and 1.5 is not a width
    field = TrialConfig.model_fields[name]
    annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return TypeAdapter(annotation, config=ConfigDict(strict=True))


def _numeric_kind(annotation: Any) -> Literal["int", "float"] | None:
    if annotation is float or annotation is int:
        return annotation.__name__
    origin = get_origin(annotation)
    if origin is Annotated:
        return _numeric_kind(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        kinds = {_numeric_kind(arg) for arg in get_args(annotation)}
        return "float" if "float" in kinds else "int" if "int" in kinds else None
    return None


def numeric_kind(name: str) -> Literal["int", "float"] | None:
    """Whether a TrialConfig field takes whole numbers, any number, or neither (a choice of words)."""
    return _numeric_kind(TrialConfig.model_fields[name].annotation)


def describe(value: Any) -> str:
    """A short phrase for a value in an error message: 'text "abc"', 'a list', 'a boolean (true)'."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        text = repr(value)
        return f"the number {text if len(text) <= 40 else text[:37] + '...'}"
    if isinstance(value, str):
        return f"text {value if len(value) <= 40 else value[:37] + '...'!r}"
    return {list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def suggest(key: Any, choices: tuple[str, ...], *, listed: tuple[str, ...] = (), noun: str = "one of") -> str:
    """'; did you mean X?' for a near miss among ``choices``, else '; expected one of A, B, C'
    (``listed``, when given, is the shorter list to show)."""
    close = difflib.get_close_matches(str(key), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; expected {noun} {', '.join(listed or choices)}"


def _pydantic_message(exc: ValidationError) -> str:
    messages = list(dict.fromkeys(error["msg"] for error in exc.errors()))
    rest = [message.removeprefix("Input should be ") for message in messages[1:]]
    return ", or ".join([messages[0], *rest])


@cache
def _takes_tuple(name: str) -> bool:
    annotation = TrialConfig.model_fields[name].annotation  # betas, or start (a tuple or None)
    return any(get_origin(a) is tuple for a in (annotation, *get_args(annotation)))


@cache
def _mapping_model(name: str) -> type[BaseModel] | None:
    """The model a field takes as a mapping (dataset: CsvDataset, early_stopping: EarlyStopping), if any."""
    annotation = TrialConfig.model_fields[name].annotation
    models = [arg for arg in (get_args(annotation) or (annotation,))
              if isinstance(arg, type) and issubclass(arg, BaseModel)]
    return models[0] if len(models) == 1 else None


def _mapping_problems(model: type[BaseModel], value: dict[Any, Any], path: str) -> list[str]:
    """One line per bad key of a mapping value, named by its own path (``...value.target: is required``),
    instead of pydantic's union message that lists every word the field would also accept."""
    try:
        model.model_validate(value, strict=True)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join([path, *(str(part) for part in error["loc"])])
            if error["type"] == "extra_forbidden":
                lines.append(f"{where}: unknown key{suggest(error['loc'][-1], tuple(model.model_fields))}")
            elif error["type"] == "missing":
                lines.append(f"{where}: is required")
            else:
                lines.append(f"{where}: {error['msg']}, got {describe(error['input'])}")
        return lines
    return []


def _check_tuple(name: str, value: list[Any], path: str, problems: list[str]) -> Any:
    try:
        return _adapter(name).validate_python(tuple(value))
    except ValidationError as exc:
        for error in exc.errors():
            index = error["loc"][0] if error["loc"] and isinstance(error["loc"][0], int) else None
            if error["type"] == "missing":  # too few items: [] or [1] for start: [x, y]; said once
                if any(problem.startswith(f"{path}: item ") for problem in problems):
                    continue
                problems.append(f"{path}: item {index + 1 if index is not None else 1} is missing, got "
                                f"{len(value)} items; give every item, e.g. start: [x, y] or betas: [0.9, 0.999]")
            elif index is None or index >= len(value):
                problems.append(f"{path}: {error['msg']}, got {len(value)} items")
            else:
                problems.append(f"{path}[{index}]: {error['msg']}, got {describe(value[index])}")
        return _INVALID


def check_value(name: str, value: Any, path: str, problems: list[str], *, context: str = "") -> Any:
    """``value`` as the field ``name`` stores it, or _INVALID after recording why it is not valid."""
    if isinstance(value, list) and _takes_tuple(name):
        # YAML writes betas: [0.9, 0.99] as a list; strict mode wants the tuple
        return _check_tuple(name, value, path, problems)
    try:
        return _adapter(name).validate_python(value)
    except ValidationError as exc:
        model = _mapping_model(name) if isinstance(value, dict) else None
        lines = _mapping_problems(model, value, path) if model is not None else []
        if lines:
            problems.extend(lines)
            return _INVALID
        got = f", got {describe(value)}" if not context else ""
        problems.append(f"{path}: {context}{_pydantic_message(exc)}{got}")
        return _INVALID


def _number(body: dict[Any, Any], key: str, path: str, problems: list[str], *, whole: bool = False) -> Any:
    value = body.get(key, _WANDB_DEFAULTS.get(key))
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{path}.{key}: must be a number, got {describe(value)}")
        return None
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        problems.append(f"{path}.{key}: must be a finite number, got {describe(value)}")
        return None
    if whole and isinstance(value, float):
        if not value.is_integer():
            problems.append(f"{path}.{key}: must be a whole number, got {value!r}")
            return None
        return int(value)
    return value


def _exp(exponent: float) -> float:
    try:
        return math.exp(exponent)
    except OverflowError:
        return math.inf


def _support(distribution: str, low: float, high: float) -> tuple[float, float]:
    """The smallest and largest value a min/max distribution draws, before quantising."""
    base = distribution.removeprefix("q_")
    if base == "log_uniform":
        return _exp(low), _exp(high)
    if base == "inv_log_uniform":
        return _exp(-high), _exp(-low)
    return low, high


def _multiple(k: int, q: Any, *, integer: bool) -> Any:
    # through Decimal so that 3 x 0.1 is 0.3, not 0.30000000000000004
    return k * q if integer else float(Decimal(k) * Decimal(repr(float(q))))


def _multiples(low: float, high: float, q: Any, *, integer: bool) -> tuple[int, int] | None:
    """First and last k with low <= k*q <= high (None when the range is too wide to count)."""
    a, b = low / q, high / q
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    k_low, k_high = math.ceil(a), math.floor(b)
    # float division lands a hair off whole numbers: let the exact multiple decide
    if _multiple(k_low - 1, q, integer=integer) >= low:
        k_low -= 1
    elif _multiple(k_low, q, integer=integer) < low:
        k_low += 1
    if _multiple(k_high + 1, q, integer=integer) <= high:
        k_high += 1
    elif _multiple(k_high, q, integer=integer) > high:
        k_high -= 1
    return k_low, k_high


def parse_parameter(
    name: str, body: Any, *, method: str | None, problems: list[str], warnings: list[str]
) -> Parameter | None:
    """Check one entry of ``parameters:``; None (with problems recorded) when it is not valid."""
    path = f"parameters.{name}"
    if not isinstance(body, dict):
        problems.append(f"{path}: must be a mapping such as {{value: ...}} or {{values: [...]}}, "
                        f"got {describe(body)}")
        return None
    start = len(problems)
    for key in body:
        if key == "parameters":
            problems.append(f"{path}.parameters: nested parameters are not supported; "
                            "list each trial parameter directly under parameters")
        elif key not in _PARAMETER_KEYS:
            problems.append(f"{path}.{key}: unknown key{suggest(key, _PARAMETER_KEYS)}")
    distribution = _distribution_of(body, path, problems)
    if distribution is None or len(problems) > start:
        return None
    required, optional = _DISTRIBUTIONS[distribution]
    for key in body:
        if key != "distribution" and key not in required + optional:
            problems.append(f"{path}.{key}: does not apply to distribution {distribution}; remove it")
    for key in required:
        if body.get(key) is None:
            problems.append(f"{path}.{key}: is required for distribution {distribution}")
    if len(problems) > start:
        return None
    if method == "grid" and distribution not in _GRID_DISTRIBUTIONS:
        problems.append(f"{path}.distribution: {distribution} cannot be enumerated under method: grid; "
                        "list the points to try with values: or use method: random")
    if distribution == "constant":
        value = check_value(name, body["value"], f"{path}.value", problems)
        parameter = Parameter(name, distribution, values=(value,))
    elif distribution == "categorical":
        parameter = _categorical(name, body, path=path, method=method, problems=problems, warnings=warnings)
    else:
        parameter = _numeric(name, body, distribution, path=path, method=method, problems=problems)
    return parameter if len(problems) == start else None


def _distribution_of(body: dict[Any, Any], path: str, problems: list[str]) -> str | None:
    if "distribution" in body:
        raw = body["distribution"]
        if isinstance(raw, str) and raw in _DISTRIBUTIONS:
            return raw
        if raw in ("bayes", "grid", "random"):
            problems.append(f"{path}.distribution: {raw} is a method, not a distribution; "
                            f"set method: {raw} at the top of the spec")
        else:
            problems.append(f"{path}.distribution: unknown distribution {describe(raw)}"
                            f"{suggest(raw, DISTRIBUTIONS)}")
        return None
    if "value" in body and "values" in body:
        problems.append(f"{path}: give either value or values, not both")
        return None
    if "value" in body:
        return "constant"
    if "values" in body:
        return "categorical"
    if "min" in body or "max" in body:
        bounds = (body.get("min"), body.get("max"))
        whole = all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        return "int_uniform" if whole else "uniform"  # W&B's inference
    if "mu" in body or "sigma" in body:
        problems.append(f"{path}: mu and sigma need distribution: normal, q_normal, log_normal or q_log_normal")
        return None
    problems.append(f"{path}: give value, values, or a distribution with min and max")
    return None


def _categorical(
    name: str, body: dict[Any, Any], *, path: str, method: str | None, problems: list[str], warnings: list[str]
) -> Parameter | None:
    raw = body["values"]
    if not isinstance(raw, list):
        problems.append(f"{path}.values: must be a list such as [8, 64], got {describe(raw)}")
        return None
    if not raw:
        problems.append(f"{path}.values: must list at least one value")
        return None
    if len(raw) > MAX_VALUES:
        problems.append(f"{path}.values: lists {len(raw)} values, over the limit of {MAX_VALUES}")
        return None
    values: list[Any] = []
    for index, item in enumerate(raw):
        value = check_value(name, item, f"{path}.values[{index}]", problems)
        if value is _INVALID:
            continue
        if method == "grid" and value in values:
            problems.append(f"{path}.values[{index}]: {value!r} is listed twice; list each value once")
        values.append(value)
    probabilities = body.get("probabilities")
    if probabilities is not None and method == "grid":
        warnings.append(f"{path}.probabilities: ignored under method: grid, which tries every value")
        probabilities = None
    elif probabilities is not None:
        probabilities = _probabilities(probabilities, len(raw), path=f"{path}.probabilities", problems=problems)
    return Parameter(name, "categorical", values=tuple(values), probabilities=probabilities)


def _probabilities(raw: Any, size: int, *, path: str, problems: list[str]) -> tuple[float, ...] | None:
    if not isinstance(raw, list) or len(raw) != size:
        got = f"{len(raw)} numbers" if isinstance(raw, list) else describe(raw)
        problems.append(f"{path}: must be a list of {size} numbers, one per value, got {got}")
        return None
    start = len(problems)
    numbers = [_number({"p": p}, "p", f"{path}[{i}]", problems) for i, p in enumerate(raw)]
    for index, p in enumerate(numbers):
        if p is not None and p < 0:
            problems.append(f"{path}[{index}]: must be >= 0, got {p}")
    if len(problems) > start:
        return None
    if not math.isclose(sum(numbers), 1.0, abs_tol=1e-6):
        problems.append(f"{path}: must sum to 1, got {sum(numbers):g}")
        return None
    return tuple(float(p) for p in numbers)


def _numeric(
    name: str, body: dict[Any, Any], distribution: str, *, path: str, method: str | None, problems: list[str]
) -> Parameter | None:
    kind = numeric_kind(name)
    if kind is None:
        problems.append(f"{path}.distribution: {distribution} draws numbers but {name} is a choice of "
                        "words; list the ones to try with values:")
        return None
    has_q = distribution.startswith("q_")
    q = _number(body, "q", path, problems) if has_q else None
    integer = distribution == "int_uniform"
    if q is not None:
        if q <= 0:
            problems.append(f"{path}.q: must be > 0, got {q}")
            return None
        if kind == "int":
            if not float(q).is_integer():
                problems.append(f"{path}.q: must be a whole number because {name} is a whole number, got {q}")
                return None
            q, integer = int(q), True
    elif has_q:
        return None
    if kind == "int" and not integer:
        problems.append(f"{path}.distribution: {distribution} draws fractional numbers but {name} is a "
                        "whole number; use int_uniform, a q_ distribution with a whole-number q, or values:")
        return None
    if distribution in _NORMAL_FAMILY:
        return _normal(name, body, distribution, path=path, q=q, integer=integer, problems=problems)
    low = _number(body, "min", path, problems, whole=distribution == "int_uniform")
    high = _number(body, "max", path, problems, whole=distribution == "int_uniform")
    if low is None or high is None:
        return None
    if low >= high:
        problems.append(f"{path}.min: must be less than max ({low} >= {high}); for one value use value:")
        return None
    if distribution in _POSITIVE_BOUNDS and low <= 0:
        problems.append(f"{path}.min: must be > 0 for {distribution}, got {low}")
        return None
    first, last = _support(distribution, low, high)
    points = None
    if q is not None:
        points = _multiples(first, last, q, integer=integer)
        if points is None or points[0] > points[1]:
            problems.append(f"{path}.q: no multiple of {q} lies between {first:g} and {last:g}; "
                            "lower q or widen min and max")
            return None
        first, last = _multiple(points[0], q, integer=integer), _multiple(points[1], q, integer=integer)
    start = len(problems)
    hint = (f" ({distribution} takes natural-log exponents; for plain bounds use log_uniform_values)"
            if distribution in _EXPONENT_BOUNDS else "")
    for label, bound, extreme, raw in (("min", first, "smallest", low), ("max", last, "largest", high)):
        context = "" if bound == raw else f"the {extreme} {name} it draws is {bound:.6g}; "
        if check_value(name, bound, f"{path}.{label}", problems, context=context) is _INVALID and hint:
            problems[-1] += hint
    if len(problems) > start:
        return None
    values: tuple[Any, ...] = ()
    if method == "grid" and distribution in _GRID_DISTRIBUTIONS:
        k_low, k_high = points if points is not None else (low, high)
        size = k_high - k_low + 1
        if size > MAX_VALUES:
            problems.append(f"{path}: {distribution} gives {size} values from {first} to {last} under method: "
                            f"grid, over the limit of {MAX_VALUES}; narrow min and max, raise q, list values:, "
                            "or use method: random")
            return None
        adapter = _adapter(name)
        step = q if q is not None else 1
        values = tuple(adapter.validate_python(_multiple(k, step, integer=integer)) for k in range(k_low, k_high + 1))
    return Parameter(name, distribution, values=values, min=low, max=high, q=q, integer=integer)


def _normal(
    name: str, body: dict[Any, Any], distribution: str, *, path: str, q: Any, integer: bool, problems: list[str]
) -> Parameter | None:
    mu = _number(body, "mu", path, problems)
    sigma = _number(body, "sigma", path, problems)
    if mu is None or sigma is None:
        return None
    if sigma <= 0:
        problems.append(f"{path}.sigma: must be > 0, got {sigma}")
        return None
    center = _exp(mu) if distribution.removeprefix("q_") == "log_normal" else mu
    if q is not None and math.isfinite(center / q):
        center = _multiple(round(center / q), q, integer=integer)
    context = "" if center == mu else f"the center of the distribution, {name}={center:.6g}, is invalid: "
    if check_value(name, center, f"{path}.mu", problems, context=context) is _INVALID:
        return None
    return Parameter(name, distribution, mu=mu, sigma=sigma, q=q, integer=integer)


def sample(parameter: Parameter, rng: random.Random) -> Any:
    """One random-search draw of ``parameter``, within its bounds (DrawError if none fits)."""
    distribution = parameter.distribution
    if distribution in ("constant", "categorical"):
        if parameter.probabilities is not None:
            return rng.choices(parameter.values, weights=parameter.probabilities)[0]
        return rng.choice(parameter.values)
    if distribution in _NORMAL_FAMILY:
        return _sample_normal(parameter, rng)
    low, high = parameter.min, parameter.max
    if distribution == "int_uniform":
        return rng.randint(low, high)
    base = distribution.removeprefix("q_")
    if base in _POSITIVE_BOUNDS:
        drawn = math.exp(rng.uniform(math.log(low), math.log(high)))
    elif base in _EXPONENT_BOUNDS:
        exponent = rng.uniform(low, high)
        drawn = math.exp(-exponent if base == "inv_log_uniform" else exponent)
    else:
        drawn = rng.uniform(low, high)
    first, last = _support(distribution, low, high)
    if parameter.q is None:
        return min(max(drawn, first), last)  # exp/log round-trips can step an ulp outside
    k_low, k_high = _multiples(first, last, parameter.q, integer=parameter.integer)
    k = min(max(round(drawn / parameter.q), k_low), k_high)
    return _multiple(k, parameter.q, integer=parameter.integer)


def _sample_normal(parameter: Parameter, rng: random.Random) -> Any:
    adapter = _adapter(parameter.name)
    for _ in range(MAX_DRAWS):
        drawn = rng.normalvariate(parameter.mu, parameter.sigma)
        if parameter.distribution.removeprefix("q_") == "log_normal":
            drawn = _exp(drawn)
        if parameter.q is not None:
            if not math.isfinite(drawn / parameter.q):
                continue
            drawn = _multiple(round(drawn / parameter.q), parameter.q, integer=parameter.integer)
        try:
            return adapter.validate_python(drawn)
        except ValidationError:
            continue  # outside the field's range: draw again (a truncated distribution)
    raise DrawError(f"parameters.{parameter.name}: {parameter.distribution} drew no valid {parameter.name} in "
                    f"{MAX_DRAWS} tries; move mu inside the allowed range or lower sigma")
