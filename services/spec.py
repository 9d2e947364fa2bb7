"""The grid spec: the YAML file that names an experiment and the trials it runs.

The format is a superset of the Weights & Biases sweep format (``method``, ``metric``, ``parameters``
with ``value``/``values``/``distribution``) plus fitscope's ``seeds`` replicate axis. The flow is
``parse_spec`` (or ``load_spec`` for an already-parsed mapping) -> ``count_trials`` -> ``expand``.
Every value is checked against its :class:`TrialConfig` field before anything is expanded, and every
problem found is reported at once in one :class:`SpecError` as ``"path: message"`` lines.

Pure: no database, no torch; the only input is the text or mapping it is given.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from services._spec_values import (
    DrawError,
    Parameter,
    check_value,
    describe,
    parse_parameter,
    sample,
    suggest,
)
from services.safe_text import bidi_problem
from services.surfaces import is_surface
from services.trial_config import NOT_FOR_SURFACES, TRIAL_PARAMETERS, TrialConfig, surface_refusal

__all__ = [
    "GridSpec", "Parameter", "SpecError", "count_trials", "expand", "load_spec", "parse_spec",
]

MAX_NESTING = 20  # a real spec nests 4 deep (parameters.lr.values[0])
MAX_NODES = 50_000  # values in the spec, counting what anchors and aliases expand to
MAX_SEEDS = 1000
MAX_NAME_CHARS = 200
MAX_METRIC_NAME_CHARS = 100  # the experiments.metric_name column
MAX_CROSS_FIELD_REPORTS = 5

_KEYS = ("name", "description", "method", "count", "metric", "seeds", "folds", "sampler_seed", "fuse",
         "parameters", "run_cap")
MAX_FOLDS = 20
# The rest of W&B's sweep schema: keys that make sense to its agent, not to fitscope. Accepted so W&B
# files load as they are, each with a warning that says what fitscope does instead.
_WANDB_IGNORED = {
    "program": "fitscope trains its own models; the script is not run",
    "command": "fitscope trains its own models; the command is not run",
    "entity": "results go to fitscope's database, not to a W&B entity",
    "project": "results go to fitscope's database, not to a W&B project",
    "early_terminate": "use the early_stopping parameter to stop trials early",
    "controller": "fitscope's queue schedules the trials",
    "job": "fitscope trains its own models; the job is not run",
    "image_uri": "fitscope trains its own models; the image is not run",
}
# W&B's examples name the learning rate learning_rate; fitscope's trial parameter is lr.
_PARAMETER_ALIASES = {"learning_rate": "lr"}
UNTITLED = "untitled"  # the name of a spec without one, where there is no file name to take
_METRIC_KEYS = ("name", "goal", "target")
_SAFE_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq", "map", "merge"))


class SpecError(ValueError):
    """A spec a user got wrong. ``problems`` are ``"path: message"`` lines, one per problem."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class GridSpec:
    """A validated spec. ``parameters`` keeps the spec's order, which is the grid's nesting order
    (the last parameter varies fastest); ``raw`` is the mapping as parsed, for storing alongside."""

    name: str
    description: str | None
    method: Literal["grid", "random"]
    count: int | None
    metric_name: str
    metric_goal: Literal["minimize", "maximize"]
    seeds: list[int]
    sampler_seed: int
    fuse: bool
    parameters: dict[str, Parameter]
    warnings: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    folds: int | None = None  # k-fold cross-validation: each configuration and seed runs once per fold

    @property
    def replicates(self) -> int:
        """Runs of each configuration: one per seed and fold."""
        return len(self.seeds) * (self.folds or 1)


class _SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml where PyYAML has it
    """SafeLoader with YAML 1.2's reading of two scalars that trip people up in 1.1:
    ``1e-3`` is a number (not the text "1e-3") and ``2024-01-01`` is text (not a date)."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_spec(text: str, *, max_bytes: int = 1_000_000, default_name: str | None = None) -> GridSpec:
    """Parse and validate a spec from YAML text (at most ``max_bytes`` bytes of UTF-8). A spec
    without ``name`` is called ``default_name`` (its file's stem; UNTITLED where there is no file),
    as W&B does not require one; with no default, ``name`` is required."""
    return load_spec(_read_yaml(text, max_bytes=max_bytes), default_name=default_name)


def load_spec(data: dict[str, Any], *, default_name: str | None = None) -> GridSpec:
    """Validate an already-parsed spec mapping; raises SpecError listing every problem found."""
    if not isinstance(data, dict):
        raise SpecError([f"spec: must be a mapping with keys such as name: and parameters:, got {describe(data)}"])
    problems: list[str] = []
    warnings: list[str] = []
    _check_structure(data, problems)
    for key in data:
        if key in _WANDB_IGNORED:
            warnings.append(f"{key}: a W&B sweep key, accepted and ignored ({_WANDB_IGNORED[key]})")
        elif isinstance(key, str) and key not in _KEYS:
            problems.append(f"{key}: unknown key{suggest(key, _KEYS + tuple(_WANDB_IGNORED), listed=_KEYS)}")
    given_name = data.get("name")
    if given_name is None and default_name is not None:
        given_name = default_name.strip()[:MAX_NAME_CHARS] or UNTITLED
    name = _name(given_name, problems)
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        problems.append(f"description: must be text, got {describe(description)}; quote it")
    elif description is not None and "\x00" in description:
        problems.append("description: must not contain NUL characters")
    method = _method(data.get("method", "grid"), problems)
    run_cap = _run_cap(data.get("run_cap"), problems)
    count = _count(data.get("count", run_cap if method == "random" else None), method, problems)
    metric_name, metric_goal = _metric(data.get("metric"), problems, warnings)
    seeds = _seeds(data.get("seeds", [0]), problems)
    folds = _folds(data.get("folds"), problems)
    sampler_seed = data.get("sampler_seed")
    if sampler_seed is None:
        sampler_seed = 0  # a fixed default keeps random search reproducible: preview == submission
    elif isinstance(sampler_seed, bool) or not isinstance(sampler_seed, int) or not 0 <= sampler_seed < 2**31:
        problems.append(f"sampler_seed: must be a whole number from 0 to {2**31 - 1}, got {describe(sampler_seed)}")
    elif method == "grid":
        warnings.append("sampler_seed: only applies to method: random and is ignored")
    fuse = data.get("fuse", True)
    if not isinstance(fuse, bool):
        problems.append(f"fuse: must be true or false, got {describe(fuse)}")
    parameters = _parameters(data.get("parameters"), method, problems, warnings)
    _warn_unused_min_lr(parameters, warnings)
    _check_surface_parameters(parameters, problems)
    if not problems and data.get("parameters") in (None, {}):
        problems.append("parameters: is required; say what to vary, e.g. parameters: {width: {values: [8, 64]}} "
                        "(W&B refuses a sweep without parameters too)")
    if not problems and run_cap is not None and method == "grid":
        total = math.prod(len(parameter.values) for parameter in parameters.values()) * len(seeds) * (folds or 1)
        if total > run_cap:
            problems.append(f"run_cap: the grid has {total} trials, more than run_cap {run_cap}; raise run_cap, "
                            "or drop values, seeds or folds")
    if problems:
        raise SpecError(problems)
    return GridSpec(
        name=name, description=description, method=method, count=count, metric_name=metric_name,
        metric_goal=metric_goal, seeds=seeds, sampler_seed=sampler_seed, fuse=fuse, parameters=parameters,
        warnings=warnings, raw=copy.deepcopy(data), folds=folds,
    )


_MIN_LR_SCHEDULES = ("cosine", "warmup_cosine", "lr_range_test")


def _warn_unused_min_lr(parameters: dict[str, Parameter], warnings: list[str]) -> None:
    # min_lr means something to three schedules only; set beside none of them, say it does nothing.
    if "min_lr" not in parameters:
        return
    schedule = parameters.get("schedule")
    schedules = set(schedule.values) if schedule is not None and schedule.values else {"constant"}
    if schedule is not None and not schedule.values:
        return  # a drawn schedule: which ones come up is not known here
    if not schedules & set(_MIN_LR_SCHEDULES):
        warnings.append(f"min_lr: only schedules {', '.join(_MIN_LR_SCHEDULES)} use it, so it is ignored with "
                        f"schedule {', '.join(sorted(map(str, schedules)))}")


def count_trials(spec: GridSpec) -> int:
    """How many trials ``expand`` would give, without building them: the product of the grid's
    value counts (or ``count`` for random search) times the number of seeds."""
    if spec.method == "random":
        return (spec.count or 0) * spec.replicates
    return math.prod(len(parameter.values) for parameter in spec.parameters.values()) * spec.replicates


def expand(spec: GridSpec, *, max_trials: int = 10_000) -> list[TrialConfig]:
    """Every trial of ``spec``, seeds (then folds) innermost: each configuration once per seed and fold,
    in spec order.

    Raises SpecError when the spec has more than ``max_trials`` trials (checked before anything is
    built) or when configurations fail TrialConfig's cross-field checks (the first few are named).
    """
    total = count_trials(spec)
    if total > max_trials:
        what = "grid" if spec.method == "grid" else f"random search ({spec.count} x {spec.replicates} seeds and folds)"
        raise SpecError([f"spec: the {what} has {total} trials, over the cap of {max_trials}; "
                         "drop values or seeds, or split it into several experiments"])
    names = list(spec.parameters)
    if spec.method == "grid":
        configurations: Any = itertools.product(*(p.values for p in spec.parameters.values()))
    else:
        rng = random.Random(spec.sampler_seed)
        try:
            configurations = [
                tuple(sample(p, rng) for p in spec.parameters.values()) for _ in range(spec.count or 0)
            ]
        except DrawError as exc:
            raise SpecError([str(exc)]) from None
    trials: list[TrialConfig] = []
    failures: list[str] = []
    failed = 0
    for index, combination in enumerate(configurations):
        settings = dict(zip(names, combination, strict=True))
        try:
            folds = {"folds": spec.folds, "fold": 1} if spec.folds else {}
            first = TrialConfig(**settings, seed=spec.seeds[0], **folds)
        except ValidationError as exc:
            failed += 1
            if failed <= MAX_CROSS_FIELD_REPORTS:
                label = ", ".join(f"{key}={value}" for key, value in settings.items()) or "defaults"
                failures.append(f"parameters: trial {index * spec.replicates + 1} ({label}): {_message(exc)}")
            continue
        # seeds and folds were checked on load, so the copies need no second validation
        trials.extend(first.model_copy(update={"seed": seed, **({"fold": fold} if spec.folds else {})})
                      for seed in spec.seeds for fold in range(1, (spec.folds or 1) + 1))
    if failed > MAX_CROSS_FIELD_REPORTS:
        failures.append(f"parameters: {failed - MAX_CROSS_FIELD_REPORTS} more configurations fail the same way")
    if failures:
        raise SpecError(failures)
    return trials


def _message(exc: ValidationError) -> str:
    return "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())


# --- reading YAML -------------------------------------------------------------------------------


def _read_yaml(text: str | bytes, *, max_bytes: int) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError([f"spec: is not UTF-8 text (byte {exc.start}); save the file as UTF-8"]) from None
    if not isinstance(text, str):
        raise SpecError([f"spec: must be YAML text, got {describe(text)}"])
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise SpecError([f"spec: is {size} bytes, over the limit of {max_bytes} bytes; a spec lists values, not data"])
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a mis-decoded file
        raise SpecError([f"spec: the character at position {exc.start} is not valid Unicode; "
                         "save the file as UTF-8"]) from None
    try:
        _check_events(text)
        loader = _SpecLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError(["spec: is empty; write a mapping with name: and parameters:"])
            _check_nodes(node)
            try:
                return loader.construct_document(node)
            except (ValueError, KeyError, TypeError, ArithmeticError) as exc:  # e.g. `!!int abc`, `0x_`
                raise SpecError([f"spec: a value could not be read as YAML says it should ({exc}); "
                                 "quote it to make it text"]) from None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        raise SpecError([f"spec: is not valid YAML{where}: {exc.problem or exc.context}{context}"]) from None
    except yaml.reader.ReaderError as exc:
        raise SpecError([f"spec: is not valid YAML: character {exc.character!r} at position {exc.position} "
                         "is not allowed"]) from None
    except yaml.YAMLError as exc:
        raise SpecError([f"spec: is not valid YAML: {' '.join(str(exc).split())}"]) from None


def _check_events(text: str) -> None:
    """Reject deep nesting before PyYAML's recursive composer sees it (the event parser is flat)."""
    depth = events = 0
    for event in yaml.parse(text, Loader=_SpecLoader):
        events += 1
        if events > MAX_NODES:
            raise SpecError([f"spec: has more than {MAX_NODES} values; a spec lists values, not data"])
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                raise SpecError([f"spec: nests deeper than {MAX_NESTING} levels at line {event.start_mark.line + 1}; "
                                 "a spec needs 4 (parameters.lr.values)"])
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1


def _check_nodes(root: yaml.Node) -> None:
    """Plain YAML only (no !!python/... or other tags) and no key given twice in one mapping."""
    problems: list[str] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:  # an alias: its node was checked where its anchor is
            continue
        seen.add(id(node))
        line = node.start_mark.line + 1
        if node.tag not in _SAFE_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            problems.append(f"spec: YAML tag {tag} is not allowed (line {line}); "
                            "a spec is plain YAML: mappings, lists, text and numbers")
            continue
        if isinstance(node, yaml.MappingNode):
            keys = Counter(key.value for key, _ in node.value if isinstance(key, yaml.ScalarNode) and key.value != "<<")
            for key in sorted(k for k, n in keys.items() if n > 1):
                problems.append(f"spec: key {key!r} appears twice in one mapping (line {line}); keep one")
            stack.extend(child for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    if problems:
        raise SpecError(problems)


def _check_structure(data: dict[str, Any], problems: list[str]) -> None:
    """Bound depth and size (aliases and self-references included) and keep ``raw`` JSON-storable."""
    stack: list[tuple[Any, str, int, bool]] = [(data, "spec", 0, False)]
    nodes = 0
    while stack:
        value, path, depth, finite_only = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SpecError([f"spec: has more than {MAX_NODES} values (anchors and aliases included); "
                             "write the spec out plainly"])
        if depth > MAX_NESTING:
            top = re.split(r"[.\[]", path, maxsplit=1)[0]  # an alias to itself makes an endless path
            raise SpecError([f"{top}: nests deeper than {MAX_NESTING} levels; a spec needs 4"])
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    problems.append(f"{path}: keys must be text, got {describe(key)}")
                    continue
                child = key if path == "spec" else f"{path}.{key}"
                stored_only = path == "spec" and (key in _WANDB_IGNORED or key == "metric")
                stack.append((item, child, depth + 1, finite_only or stored_only))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1, finite_only) for i, item in enumerate(value))
        elif value is not None and not isinstance(value, str | int | float | bool):
            problems.append(f"{path}: {type(value).__name__} values are not supported; use text or numbers")
        elif finite_only and isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{path}: must be a finite number, got {value}")


# --- top-level keys ---------------------------------------------------------------------------


def _name(value: Any, problems: list[str]) -> str:
    if value is None:
        problems.append("name: is required; give the experiment a short name, e.g. name: capacity-vs-data")
        return ""
    if not isinstance(value, str):
        problems.append(f"name: must be text, got {describe(value)}; quote it")
        return ""
    value = value.strip()
    if not value:
        problems.append("name: must not be empty")
    elif len(value) > MAX_NAME_CHARS:
        problems.append(f"name: is {len(value)} characters long, over the limit of {MAX_NAME_CHARS}")
    elif "\x00" in value:
        problems.append("name: must not contain NUL characters")
    elif any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in value):
        problems.append("name: must be one line without control characters (tabs, line breaks); "
                        "put details in description")
    elif problem := bidi_problem("name", value):
        problems.append(problem)
    return value


def _method(value: Any, problems: list[str]) -> Any:
    if value in ("grid", "random"):
        return value
    if value == "bayes":
        problems.append("method: bayes search is not supported; use grid or random")
    else:
        problems.append(f"method: must be grid or random, got {describe(value)}")
    return None


def _run_cap(value: Any, problems: list[str]) -> int | None:
    """W&B's most runs of a sweep: the count of a random search without one, a cap on a grid."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"run_cap: must be a whole number >= 1, got {describe(value)}")
        return None
    return value


def _count(value: Any, method: str | None, problems: list[str]) -> int | None:
    if method == "grid":
        if value is not None:
            problems.append("count: only applies to method: random; remove it or set method: random")
        return None
    if value is None:
        if method == "random":
            problems.append("count: is required for method: random; say how many configurations to sample "
                            "(W&B's run_cap is read as the count too)")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"count: must be a whole number >= 1, got {describe(value)}")
        return None
    return value


def _metric(value: Any, problems: list[str], warnings: list[str]) -> tuple[str, Any]:
    if value is None:
        return "val_loss", "minimize"
    if not isinstance(value, dict):
        problems.append(f"metric: must be a mapping such as {{name: val_loss, goal: minimize}}, got {describe(value)}")
        return "val_loss", "minimize"
    for key in value:
        if key == "target":
            warnings.append("metric.target: accepted for W&B compatibility and ignored")
        elif key not in _METRIC_KEYS:
            problems.append(f"metric.{key}: unknown key{suggest(key, _METRIC_KEYS)}")
    name = value.get("name", "val_loss")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"metric.name: must be the name of a metric such as val_loss, got {describe(name)}")
    elif len(name.strip()) > MAX_METRIC_NAME_CHARS or "\x00" in name:
        problems.append(f"metric.name: must be at most {MAX_METRIC_NAME_CHARS} characters without NUL, "
                        "such as val_loss")
    goal = value.get("goal", "minimize")
    if goal not in ("minimize", "maximize"):
        problems.append(f"metric.goal: must be minimize or maximize, got {describe(goal)}")
    return str(name).strip(), goal


def _seeds(value: Any, problems: list[str]) -> list[int]:
    if not isinstance(value, list):
        problems.append(f"seeds: must be a list of whole numbers such as [0, 1, 2], got {describe(value)}")
        return []
    if not value:
        problems.append("seeds: must list at least one seed, e.g. seeds: [0]")
    if len(value) > MAX_SEEDS:
        problems.append(f"seeds: lists {len(value)} seeds, over the limit of {MAX_SEEDS}")
        return []
    seeds: list[int] = []
    for index, item in enumerate(value):
        seed = check_value("seed", item, f"seeds[{index}]", problems)
        if not isinstance(seed, int):
            continue
        if seed in seeds:
            problems.append(f"seeds[{index}]: {seed} is listed twice; seeds must be unique")
        seeds.append(seed)
    return seeds


def _check_surface_parameters(parameters: dict[str, Parameter], problems: list[str]) -> None:
    """A grid with a 2-D test function among its data sets must not set what a surface lacks (a network,
    data): the trials of that function would silently ignore it."""
    dataset = parameters.get("dataset")
    surface = next((value for value in (dataset.values if dataset else ()) if is_surface(value)), None)
    if surface is None:
        return
    for name in parameters:
        if name in NOT_FOR_SURFACES:
            others = "" if all(is_surface(v) for v in dataset.values) else (
                " (or put the test functions in an experiment of their own)")
            problems.append(f"parameters.{name}: {surface_refusal(name, surface)}{others}")


def _folds(value: Any, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_FOLDS:
        problems.append(f"folds: must be a whole number from 2 to {MAX_FOLDS} (the parts of k-fold "
                        f"cross-validation), got {describe(value)}; leave it out for one train/validation split")
        return None
    return value


def _parameters(value: Any, method: str | None, problems: list[str], warnings: list[str]) -> dict[str, Parameter]:
    if value is None or value == {}:
        return {}  # refused by load_spec once nothing else is wrong: the sentence that matters comes first
    if not isinstance(value, dict):
        problems.append(f"parameters: must be a mapping of trial parameters such as width: {{values: [8, 64]}}, "
                        f"got {describe(value)}")
        return {}
    parameters: dict[str, Parameter] = {}
    for name, body in value.items():
        if not isinstance(name, str):
            continue  # reported by _check_structure
        if name in _PARAMETER_ALIASES:
            alias, name = name, _PARAMETER_ALIASES[name]
            if name in value:
                problems.append(f"parameters.{alias}: is another name of {name}, which is also given; keep one")
                continue
            warnings.append(f"parameters.{alias}: read as {name}, fitscope's name of this parameter")
        if name == "seed":
            problems.append("parameters.seed: set replicate seeds with the top-level seeds: list, "
                            "e.g. seeds: [0, 1, 2]")
        elif name in ("fold", "folds"):
            problems.append(f"parameters.{name}: set cross-validation with the top-level folds: K (2 to "
                            f"{MAX_FOLDS}), e.g. folds: 5; every configuration then runs once per fold")
        elif name not in TRIAL_PARAMETERS:
            known = tuple(p for p in TRIAL_PARAMETERS if p not in ("seed", "fold", "folds"))
            problems.append(f"parameters.{name}: unknown parameter{suggest(name, known, noun='a trial parameter:')}")
        else:
            if isinstance(body, dict) and "csv" in body:
                body = {"value": body}  # dataset: {csv: data.csv, target: y} is one CSV data set
            parameter = parse_parameter(name, body, method=method, problems=problems, warnings=warnings)
            if parameter is not None:
                parameters[name] = parameter
    return parameters

