"""The grid spec: parsing, validation messages, grid expansion and random search."""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import services.spec as spec_module
from services.spec import GridSpec, SpecError, count_trials, expand, load_spec, parse_spec
from services.trial_config import SYNTHETIC_CLASSIFICATION, TRIAL_PARAMETERS, TrialConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw")


def _parse(text: str) -> GridSpec:
    return parse_spec(textwrap.dedent(text))


def _problems(text: str, *, max_trials: int = 10_000) -> list[str]:
    """The problems a spec is rejected with, whether at parse time or on expansion."""
    with pytest.raises(SpecError) as caught:
        expand(_parse(text), max_trials=max_trials)
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def _random_spec(name: str, body: dict[str, Any], *, count: int = 400, sampler_seed: int = 0) -> GridSpec:
    return load_spec({"name": "draws", "method": "random", "count": count, "sampler_seed": sampler_seed,
                      "parameters": {name: body}})


# --- grids ----------------------------------------------------------------------------------------


def test_grid_is_the_cartesian_product_of_values_and_seeds_in_order() -> None:
    widths, lrs, seeds = [8, 64, 512], [0.01, 0.1], [0, 1, 2]
    spec = load_spec({"name": "p", "seeds": seeds,
                      "parameters": {"width": {"values": widths}, "lr": {"values": lrs}}})

    trials = expand(spec)

    assert count_trials(spec) == len(trials) == len(widths) * len(lrs) * len(seeds)
    # last parameter varies fastest, seeds innermost
    assert [(t.width, t.lr, t.seed) for t in trials] == list(itertools.product(widths, lrs, seeds))


def test_parameters_left_out_keep_trial_config_defaults() -> None:
    trials = expand(_parse("""
        name: defaults
        parameters:
          width: {values: [8, 16]}
    """))
    defaults = TrialConfig().model_dump()
    for trial in trials:
        varied = {"width"}
        assert {k: v for k, v in trial.model_dump().items() if k not in varied} == {
            k: v for k, v in defaults.items() if k not in varied
        }


@pytest.mark.parametrize("text", ["name: just defaults", "name: just defaults\nparameters: {}", "parameters:\n"])
def test_a_spec_without_parameters_is_refused_in_one_sentence_as_wandb_refuses_it(text: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, default_name="file")
    assert caught.value.problems == [
        "parameters: is required; say what to vary, e.g. parameters: {width: {values: [8, 64]}} "
        "(W&B refuses a sweep without parameters too)"]


def test_one_fixed_value_gives_one_default_trial() -> None:
    trials = expand(_parse("name: just defaults\nparameters: {width: {value: 16}}"))
    assert trials == [TrialConfig(width=16)]


def test_value_fixes_a_parameter_without_multiplying_the_grid() -> None:
    spec = _parse("""
        name: value vs values
        seeds: [3, 4]
        parameters:
          noise: {value: 0.35}
          depth: {values: [1, 2, 3]}
    """)
    trials = expand(spec)
    assert len(trials) == 3 * 2
    assert {t.noise for t in trials} == {0.35}
    assert spec.parameters["noise"].distribution == "constant"
    assert spec.parameters["depth"].distribution == "categorical"


def test_int_uniform_and_q_uniform_enumerate_under_grid() -> None:
    spec = _parse("""
        name: enumerations
        parameters:
          depth: {distribution: int_uniform, min: 1, max: 4}
          width: {distribution: q_uniform, min: 8, max: 64, q: 8}
          noise: {distribution: q_uniform, min: 0.05, max: 0.5, q: 0.1}
          n_train: {min: 100, max: 103}
    """)
    assert spec.parameters["depth"].values == (1, 2, 3, 4)
    assert spec.parameters["width"].values == tuple(range(8, 65, 8))
    # multiples of q inside [min, max], exact decimals rather than 0.30000000000000004
    assert spec.parameters["noise"].values == (0.1, 0.2, 0.3, 0.4, 0.5)
    assert spec.parameters["n_train"].distribution == "int_uniform"  # inferred, like W&B
    trials = expand(spec)
    assert len(trials) == count_trials(spec) == 4 * 8 * 5 * 4
    assert all(isinstance(t.width, int) for t in trials)


def test_q_uniform_keeps_bounds_that_are_exact_multiples() -> None:
    # 0.07 / 0.01 is 7.000000000000001 and 0.29 / 0.01 is 28.999999999999996 in floats
    spec = _parse("""
        name: edges
        parameters:
          noise: {distribution: q_uniform, min: 0.07, max: 0.29, q: 0.01}
    """)
    assert spec.parameters["noise"].values == tuple(round(k * 0.01, 2) for k in range(7, 30))


def test_yaml_reads_exponent_numbers_and_leaves_dates_as_text() -> None:
    spec = _parse("""
        name: 2024-01-01
        parameters:
          lr: {values: [1e-3, 5E-2, 1.0e-4]}
    """)
    assert spec.name == "2024-01-01"
    assert spec.parameters["lr"].values == (0.001, 0.05, 0.0001)


def test_top_level_defaults_and_raw() -> None:
    text = "name: '  spaced  '\nparameters: {width: {value: 8}}\n"
    spec = parse_spec(text)
    assert (spec.name, spec.method, spec.count, spec.seeds) == ("spaced", "grid", None, [0])
    assert (spec.metric_name, spec.metric_goal, spec.fuse, spec.warnings) == ("val_loss", "minimize", True, [])
    assert spec.raw == yaml.safe_load(text)
    json.dumps(spec.raw)  # storable as JSON


def test_load_spec_copies_its_input() -> None:
    data = {"name": "copy", "parameters": {"width": {"values": [8]}}}
    spec = load_spec(data)
    data["parameters"]["width"]["values"].append(16)
    assert spec.raw["parameters"]["width"]["values"] == [8]


def test_wandb_keys_are_accepted_with_warnings() -> None:
    spec = _parse("""
        name: from wandb
        program: train.py
        command: [python, train.py]
        entity: me
        project: fits
        early_terminate: {type: hyperband, min_iter: 3}
        run_cap: 10
        controller: {type: local}
        job: some-job
        metric: {name: val_acc, goal: maximize, target: 0.99}
        parameters:
          width: {values: [8, 16]}
    """)
    ignored = ["program", "command", "entity", "project", "early_terminate", "controller", "job"]  # run_cap is used
    assert [warning.split(" (")[0] for warning in spec.warnings] == [
        f"{k}: a W&B sweep key, accepted and ignored" for k in ignored] + [
        "metric.target: accepted for W&B compatibility and ignored"
    ]
    assert "early_stopping parameter" in spec.warnings[ignored.index("early_terminate")]
    assert (spec.metric_name, spec.metric_goal) == ("val_acc", "maximize")
    assert len(expand(spec)) == 2


def test_probabilities_under_grid_are_ignored_with_a_warning() -> None:
    spec = _parse("""
        name: p
        parameters:
          optimizer: {values: [sgd, adam], probabilities: [0.2, 0.8]}
    """)
    assert [t.optimizer for t in expand(spec)] == ["sgd", "adam"]
    assert any(w.startswith("parameters.optimizer.probabilities:") for w in spec.warnings)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_and_expand_to_their_count(path: Path) -> None:
    spec = parse_spec(path.read_text())
    assert spec.warnings == []
    assert len(expand(spec)) == count_trials(spec)
    json.dumps(spec.raw)


def test_quickstart_is_the_documented_eight_trials() -> None:
    trials = expand(parse_spec((EXAMPLES / "quickstart.yaml").read_text()))
    assert sorted((t.width, t.lr, t.seed) for t in trials) == sorted(
        itertools.product([8, 64], [0.01, 0.05], [0, 1]))
    assert {(t.dataset, t.epochs) for t in trials} == {("moons", 5)}


# --- random search --------------------------------------------------------------------------------

LN = math.log


@pytest.mark.parametrize(
    ("name", "body", "low", "high", "step"),
    [
        ("lr", {"distribution": "uniform", "min": 0.001, "max": 0.5}, 0.001, 0.5, None),
        ("weight_decay", {"min": 0.0, "max": 2}, 0.0, 2.0, None),  # inferred uniform
        ("depth", {"distribution": "int_uniform", "min": 1, "max": 4}, 1, 4, 1),
        ("width", {"min": 3, "max": 9}, 3, 9, 1),  # inferred int_uniform
        ("width", {"distribution": "q_uniform", "min": 8, "max": 64, "q": 8}, 8, 64, 8),
        ("noise", {"distribution": "q_uniform", "min": 0.05, "max": 0.95, "q": 0.1}, 0.1, 0.9, 0.1),
        ("lr", {"distribution": "log_uniform", "min": LN(1e-4), "max": LN(0.1)}, 1e-4, 0.1, None),
        ("lr", {"distribution": "q_log_uniform", "min": LN(0.01), "max": LN(1), "q": 0.01}, 0.01, 1, 0.01),
        ("lr", {"distribution": "log_uniform_values", "min": 1e-4, "max": 0.1}, 1e-4, 0.1, None),
        ("width", {"distribution": "q_log_uniform_values", "min": 8, "max": 256, "q": 8}, 8, 256, 8),
        ("lr", {"distribution": "inv_log_uniform", "min": LN(10), "max": LN(1e4)}, 1e-4, 0.1, None),
        ("lr", {"distribution": "inv_log_uniform_values", "min": 1e-4, "max": 0.1}, 1e-4, 0.1, None),
        ("noise", {"distribution": "normal", "mu": 0.5, "sigma": 0.3}, 0.0, 10.0, None),
        ("momentum", {"distribution": "normal", "mu": 0.9, "sigma": 0.2}, 0.0, 1.0 - 1e-12, None),
        ("width", {"distribution": "q_normal", "mu": 64, "sigma": 40, "q": 4}, 4, 4096, 4),
        ("lr", {"distribution": "log_normal", "mu": LN(0.01), "sigma": 1.5}, 1e-300, 10.0, None),
        ("width", {"distribution": "q_log_normal", "mu": LN(64), "sigma": 1, "q": 1}, 1, 4096, 1),
    ],
    ids=lambda v: v["distribution"] if isinstance(v, dict) and "distribution" in v else None,
)
def test_random_draws_stay_within_bounds(name: str, body: dict[str, Any], low: float, high: float,
                                         step: float | None) -> None:
    trials = expand(_random_spec(name, body))
    drawn = [getattr(t, name) for t in trials]
    assert len(drawn) == 400
    assert all(low <= x <= high for x in drawn), (min(drawn), max(drawn))
    if step is not None:
        assert all(math.isclose(x / step, round(x / step), abs_tol=1e-9) for x in drawn)
    if step is not None and float(step).is_integer() and TrialConfig.model_fields[name].annotation is int:
        assert all(isinstance(x, int) for x in drawn)
    assert len(set(drawn)) > 1  # it is a distribution, not a constant


def test_int_uniform_draws_reach_both_ends() -> None:
    drawn = {t.depth for t in expand(_random_spec("depth", {"distribution": "int_uniform", "min": 1, "max": 4}))}
    assert drawn == {1, 2, 3, 4}


def test_log_uniform_values_is_uniform_in_log_space() -> None:
    low, high = 1e-4, 0.1
    draws = [t.lr for t in expand(_random_spec("lr", {"distribution": "log_uniform_values", "min": low, "max": high},
                                               count=2000))]
    below_geometric_mean = sum(x < math.sqrt(low * high) for x in draws) / len(draws)
    assert 0.4 < below_geometric_mean < 0.6  # a uniform draw would put ~3% there


def test_probabilities_weight_the_choice() -> None:
    spec = _random_spec("optimizer", {"values": ["sgd", "adam", "rmsprop"], "probabilities": [0.0, 1.0, 0.0]})
    assert {t.optimizer for t in expand(spec)} == {"adam"}
    spec = _random_spec("optimizer", {"values": ["sgd", "adam"], "probabilities": [0.5, 0.5]})
    assert {t.optimizer for t in expand(spec)} == {"sgd", "adam"}


def test_random_search_is_deterministic_in_its_sampler_seed() -> None:
    body = {"distribution": "log_uniform_values", "min": 1e-4, "max": 0.1}
    first = expand(_random_spec("lr", body, count=20, sampler_seed=7))
    again = expand(_random_spec("lr", body, count=20, sampler_seed=7))
    other = expand(_random_spec("lr", body, count=20, sampler_seed=8))
    assert first == again
    assert [t.lr for t in first] != [t.lr for t in other]
    unseeded = load_spec({"name": "u", "method": "random", "count": 20, "parameters": {"lr": body}})
    assert expand(unseeded) == expand(_random_spec("lr", body, count=20, sampler_seed=0))


def test_random_search_replicates_each_configuration_over_the_seeds() -> None:
    spec = _parse("""
        name: replicated
        method: random
        count: 7
        seeds: [5, 1, 9]
        parameters:
          lr: {distribution: uniform, min: 0.001, max: 1}
          width: {distribution: int_uniform, min: 1, max: 512}
    """)
    trials = expand(spec)
    assert count_trials(spec) == len(trials) == 7 * 3
    for i in range(7):
        group = trials[i * 3:(i + 1) * 3]
        assert [t.seed for t in group] == [5, 1, 9]
        assert len({t.model_copy(update={"seed": 0}) for t in group}) == 1
    assert len({(t.lr, t.width) for t in trials}) == 7


# --- invalid specs --------------------------------------------------------------------------------

_G = "name: t\nparameters:\n"  # a valid head; the cases below add parameters under it
_R = "name: t\nmethod: random\ncount: 5\nparameters:\n"

INVALID = [
    ("not-yaml", "name: t\n- item\n", "spec: is not valid YAML at line 2"),
    ("unclosed-list", "name: [unclosed", "spec: is not valid YAML at line"),
    ("lone-surrogate", "name: \ud800\n", "spec: the character at position 6 is not valid Unicode"),
    ("two-documents", "name: a\n---\nname: b\n", "spec: is not valid YAML at line 2"),
    ("list-at-top", "- name: x\n", "spec: must be a mapping"),
    ("scalar-at-top", "just some words\n", "spec: must be a mapping"),
    ("empty", "  \n", "spec: is empty"),
    ("missing-name", "parameters: {width: {value: 8}}\n", "name: is required"),
    ("empty-name", "name: '   '\n", "name: must not be empty"),
    ("name-too-long", f"name: {'x' * 201}\n", "name: is 201 characters long, over the limit of 200"),
    ("name-not-text", "name: [a, b]\n", "name: must be text"),
    ("description-not-text", "name: t\ndescription: {a: 1}\n", "description: must be text"),
    ("unknown-top-key", "name: t\nparamters: {}\n", "paramters: unknown key; did you mean parameters?"),
    ("key-not-text", "name: t\n1: x\n", "spec: keys must be text, got the number 1"),
    ("duplicate-key", _G + "  width: {value: 8}\n  width: {value: 16}\n", "spec: key 'width' appears twice"),
    ("method-bayes", "name: t\nmethod: bayes\n", "method: bayes search is not supported; use grid or random"),
    ("method-typo", "name: t\nmethod: gird\n", "method: must be grid or random"),
    ("grid-with-count", "name: t\ncount: 3\n", "count: only applies to method: random"),
    ("random-without-count", "name: t\nmethod: random\n", "count: is required for method: random"),
    ("count-zero", "name: t\nmethod: random\ncount: 0\n", "count: must be a whole number >= 1"),
    ("count-text", "name: t\nmethod: random\ncount: many\n", "count: must be a whole number >= 1"),
    ("metric-goal", "name: t\nmetric: {name: val_loss, goal: lower}\n", "metric.goal: must be minimize or maximize"),
    ("metric-unknown-key", "name: t\nmetric: {nmae: x}\n", "metric.nmae: unknown key; did you mean name?"),
    ("fuse-not-bool", "name: t\nfuse: maybe\n", "fuse: must be true or false"),
    ("sampler-seed-negative", "name: t\nsampler_seed: -1\n", "sampler_seed: must be a whole number"),
    ("parameters-not-mapping", "name: t\nparameters: [width]\n", "parameters: must be a mapping"),
    ("unknown-parameter", _G + "  widht: {values: [8]}\n", "parameters.widht: unknown parameter; did you mean width?"),
    ("seed-as-parameter", _G + "  seed: {values: [0, 1]}\n", "parameters.seed: set replicate seeds with the top-level"),
    ("parameter-not-mapping", _G + "  width: 8\n", "parameters.width: must be a mapping such as"),
    ("parameter-unknown-key", _G + "  width: {vals: [8]}\n",
     "parameters.width.vals: unknown key; did you mean values?"),
    ("nested-parameters", _G + "  optimizer: {parameters: {lr: {value: 0.1}}}\n",
     "parameters.optimizer.parameters: nested parameters are not supported"),
    ("value-and-values", _G + "  width: {value: 8, values: [8, 16]}\n",
     "parameters.width: give either value or values, not both"),
    ("nothing-given", _G + "  width: {}\n", "parameters.width: give value, values, or a distribution"),
    ("mu-without-distribution", _R + "  lr: {mu: 0.1}\n", "parameters.lr: mu and sigma need distribution"),
    ("empty-values", _G + "  width: {values: []}\n", "parameters.width.values: must list at least one value"),
    ("values-not-list", _G + "  width: {values: 8}\n", "parameters.width.values: must be a list"),
    ("too-many-values", _G + f"  width: {{values: {list(range(1, 1003))}}}\n",
     "parameters.width.values: lists 1002 values, over the limit of 1000"),
    ("duplicate-values", _G + "  width: {values: [8, 16, 8]}\n", "parameters.width.values[2]: 8 is listed twice"),
    ("lr-zero", _G + "  lr: {values: [0.1, 0.01, 0]}\n", "parameters.lr.values[2]: Input should be greater than 0"),
    ("lr-text", _G + "  lr: {value: fast}\n", "parameters.lr.value: Input should be a valid number"),
    ("lr-quoted-number", _G + "  lr: {value: '0.1'}\n", "parameters.lr.value: Input should be a valid number"),
    ("lr-too-big", _G + "  lr: {value: 11}\n", "parameters.lr.value: Input should be less than or equal to 10"),
    ("width-fraction", _G + "  width: {values: [8, 1.5]}\n",
     "parameters.width.values[1]: Input should be a valid integer"),
    ("width-bool", _G + "  width: {value: yes}\n",
     "parameters.width.value: Input should be a valid integer, got a boolean"),
    ("lr-bool", _G + "  lr: {value: true}\n", "parameters.lr.value: Input should be a valid number, got a boolean"),
    ("noise-nan", _G + "  noise: {value: .nan}\n", "parameters.noise.value: Input should be a finite number"),
    ("lr-inf", _G + "  lr: {value: .inf}\n", "parameters.lr.value: Input should be a finite number"),
    ("n-train-negative", _G + "  n_train: {value: -100}\n",
     "parameters.n_train.value: Input should be greater than or equal to 4"),
    ("activation-unknown", _G + "  activation: {values: [relu, swish]}\n",
     "parameters.activation.values[1]: Input should be 'relu', 'leaky_relu', 'tanh', 'sigmoid' or 'gelu'"),
    ("batch-size-word", _G + "  batch_size: {value: half}\n",
     "parameters.batch_size.value: Input should be a valid integer, or 'full'"),
    ("unknown-distribution", _R + "  lr: {distribution: log_unifrom, min: 0.1, max: 1}\n",
     "parameters.lr.distribution: unknown distribution text 'log_unifrom'; did you mean log_uniform?"),
    ("method-as-distribution", _R + "  lr: {distribution: bayes}\n", "parameters.lr.distribution: bayes is a method"),
    ("missing-max", _R + "  lr: {distribution: uniform, min: 0.1}\n",
     "parameters.lr.max: is required for distribution uniform"),
    ("key-not-for-distribution", _R + "  lr: {distribution: uniform, min: 0.1, max: 1, q: 0.1}\n",
     "parameters.lr.q: does not apply to distribution uniform"),
    ("probabilities-on-value", _R + "  width: {value: 8, probabilities: [1]}\n",
     "parameters.width.probabilities: does not apply to distribution constant"),
    ("min-not-below-max", _R + "  lr: {distribution: uniform, min: 0.5, max: 0.5}\n",
     "parameters.lr.min: must be less than max"),
    ("min-text", _R + "  lr: {distribution: uniform, min: low, max: 0.5}\n", "parameters.lr.min: must be a number"),
    ("int-uniform-fraction", _R + "  depth: {distribution: int_uniform, min: 1.5, max: 4}\n",
     "parameters.depth.min: must be a whole number"),
    ("log-values-min-zero", _R + "  lr: {distribution: log_uniform_values, min: 0, max: 0.1}\n",
     "parameters.lr.min: must be > 0 for log_uniform_values"),
    ("bound-outside-field", _R + "  lr: {distribution: uniform, min: 0, max: 1}\n",
     "parameters.lr.min: Input should be greater than 0"),
    ("log-uniform-exponents", _R + "  weight_decay: {distribution: log_uniform, min: 0.0001, max: 3}\n",
     "parameters.weight_decay.max: the largest weight_decay it draws is 20.0855"),
    ("q-no-multiple", _R + "  noise: {distribution: q_uniform, min: 0.11, max: 0.19, q: 0.1}\n",
     "parameters.noise.q: no multiple of 0.1 lies between"),
    ("q-negative", _R + "  noise: {distribution: q_uniform, min: 0, max: 1, q: -0.1}\n",
     "parameters.noise.q: must be > 0"),
    ("q-fraction-for-int", _R + "  width: {distribution: q_uniform, min: 8, max: 64, q: 0.5}\n",
     "parameters.width.q: must be a whole number because width is a whole number"),
    ("sigma-zero", _R + "  noise: {distribution: normal, mu: 0.5, sigma: 0}\n", "parameters.noise.sigma: must be > 0"),
    ("mu-outside-field", _R + "  lr: {distribution: normal, mu: -1, sigma: 0.1}\n",
     "parameters.lr.mu: Input should be greater than 0"),
    ("fractional-distribution-on-int", _R + "  width: {distribution: uniform, min: 8, max: 64}\n",
     "parameters.width.distribution: uniform draws fractional numbers but width is a whole number"),
    ("numeric-distribution-on-words", _R + "  activation: {distribution: int_uniform, min: 1, max: 3}\n",
     "parameters.activation.distribution: int_uniform draws numbers but activation is a choice of words"),
    ("continuous-under-grid", _G + "  lr: {distribution: log_uniform_values, min: 0.0001, max: 0.1}\n",
     "parameters.lr.distribution: log_uniform_values cannot be enumerated under method: grid"),
    ("int-uniform-too-wide-for-grid", _G + "  n_train: {distribution: int_uniform, min: 4, max: 1000000}\n",
     "parameters.n_train: int_uniform gives 999997 values"),
    ("probabilities-length", _R + "  optimizer: {values: [sgd, adam], probabilities: [1]}\n",
     "parameters.optimizer.probabilities: must be a list of 2 numbers, one per value, got 1 numbers"),
    ("probabilities-sum", _R + "  optimizer: {values: [sgd, adam], probabilities: [0.5, 0.6]}\n",
     "parameters.optimizer.probabilities: must sum to 1"),
    ("probabilities-negative", _R + "  optimizer: {values: [sgd, adam], probabilities: [-0.5, 1.5]}\n",
     "parameters.optimizer.probabilities[0]: must be >= 0"),
    ("duplicate-seeds", "name: t\nseeds: [3, 3]\n", "seeds[1]: 3 is listed twice; seeds must be unique"),
    ("seeds-not-list", "name: t\nseeds: 3\n", "seeds: must be a list of whole numbers"),
    ("seeds-empty", "name: t\nseeds: []\n", "seeds: must list at least one seed"),
    ("seed-negative", "name: t\nseeds: [-1]\n", "seeds[0]: Input should be greater than or equal to 0"),
    ("seed-fraction", "name: t\nseeds: [0.5]\n", "seeds[0]: Input should be a valid integer"),
    ("too-many-seeds", f"name: t\nseeds: {list(range(1001))}\n", "seeds: lists 1001 seeds, over the limit of 1000"),
    ("python-tag", "name: !!python/object/apply:os.system ['echo hacked']\n",
     "spec: YAML tag !!python/object/apply:os.system is not allowed"),
    ("custom-tag", "name: !secret x\n", "spec: YAML tag !secret is not allowed"),
    ("bad-tagged-value", "name: !!int abc\n", "spec: a value could not be read as YAML says it should"),
    ("deep-nesting", "name: t\njob: " + "[" * 30 + "]" * 30 + "\n", "spec: nests deeper than 20 levels at line 2"),
    ("alias-to-itself", "name: t\njob: &a [*a]\n", "job: nests deeper than 20 levels"),
    ("alias-bomb", "name: t\njob:\n  a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
     + "".join(f"  {c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True)),
     "spec: has more than 50000 values"),
    ("date-in-ignored-key", "name: t\njob: !!timestamp 2024-01-01\n", "spec: YAML tag !!timestamp is not allowed"),
    ("nan-in-ignored-key", "name: t\nearly_terminate: {eta: .nan}\n", "early_terminate.eta: must be a finite number"),
    ("nan-run-cap", "name: t\nrun_cap: .nan\n", "run_cap: must be a whole number >= 1"),
    ("loss-does-not-fit-dataset", _G + "  dataset: {value: sine}\n  loss: {value: cross_entropy}\n",
     "parameters: trial 1 (dataset=sine, loss=cross_entropy): loss 'cross_entropy' does not fit dataset 'sine'"),
]


def test_there_are_many_distinct_invalid_cases() -> None:
    assert len({text for _, text, _ in INVALID}) == len(INVALID) >= 25


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in INVALID], ids=[i for i, _, _ in INVALID])
def test_invalid_spec_is_one_clear_problem_naming_its_path(text: str, expected: str) -> None:
    problems = _problems(text)
    assert any(expected in problem for problem in problems), problems
    for problem in problems:
        path, _, message = problem.partition(": ")
        assert path and message and "\n" not in problem and "Traceback" not in problem


def test_every_problem_is_reported_at_once() -> None:
    problems = _problems("""
        name: ''
        method: grid
        count: 4
        seeds: [1, 1]
        parameters:
          widht: {values: [8]}
          lr: {values: [-1, 0.1, nope]}
    """)
    for prefix in ("name:", "count:", "seeds[1]:", "parameters.widht:", "parameters.lr.values[0]:",
                   "parameters.lr.values[2]:"):
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)


def test_unknown_parameter_without_a_near_miss_lists_the_parameters() -> None:
    (problem,) = _problems(_G + "  zzzzzz: {value: 1}\n")
    assert all(name in problem for name in TRIAL_PARAMETERS if name not in ("seed", "fold", "folds"))


def test_text_over_max_bytes_is_rejected_before_parsing() -> None:
    text = "name: big\nparameters: {width: {value: 8}}\ndescription: '" + "é" * 600 + "'\n"
    size = len(text.encode("utf-8"))
    with pytest.raises(SpecError, match=f"spec: is {size} bytes, over the limit of 1000 bytes"):
        parse_spec(text, max_bytes=1000)
    assert parse_spec(text, max_bytes=size).name == "big"


def test_bytes_that_are_not_utf8_are_rejected() -> None:
    with pytest.raises(SpecError, match="spec: is not UTF-8 text"):
        parse_spec(b"name: \xff\xfe")  # type: ignore[arg-type]


def test_load_spec_rejects_a_non_mapping() -> None:
    with pytest.raises(SpecError, match="spec: must be a mapping"):
        load_spec(["name", "x"])  # type: ignore[arg-type]


def test_cross_field_failures_are_capped_at_five_reports() -> None:
    problems = _problems(_G + "  dataset: {value: sine}\n  loss: {value: cross_entropy}\n"
                              "  width: {values: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}\nseeds: [0, 1]\n")
    trial_lines = [p for p in problems if p.startswith("parameters: trial ")]
    # each failing configuration is named by its first trial: 2 seeds per configuration
    assert [p.split(" (")[0] for p in trial_lines] == [f"parameters: trial {n}" for n in (1, 3, 5, 7, 9)]
    assert problems[-1] == "parameters: 5 more configurations fail the same way"


def test_a_huge_grid_is_rejected_before_any_trial_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _parse("""
        name: huge
        seeds: [0, 1, 2]
        parameters:
          n_train: {distribution: int_uniform, min: 4, max: 1003}
          n_val: {distribution: int_uniform, min: 4, max: 1003}
          width: {distribution: int_uniform, min: 1, max: 1000}
          data_seed: {distribution: int_uniform, min: 0, max: 999}
    """)
    expected = 1000**4 * 3
    assert count_trials(spec) == expected

    def no_trials(**_: Any) -> TrialConfig:
        raise AssertionError("a trial was built before the cap was checked")

    monkeypatch.setattr(spec_module, "TrialConfig", no_trials)
    with pytest.raises(SpecError, match=f"spec: the grid has {expected} trials, over the cap of 10000"):
        expand(spec)


def test_cap_counts_random_search_as_count_times_seeds() -> None:
    spec = _random_spec("lr", {"distribution": "uniform", "min": 0.01, "max": 1}, count=50)
    assert count_trials(spec) == 50
    with pytest.raises(SpecError, match="has 50 trials, over the cap of 49"):
        expand(spec, max_trials=49)
    assert len(expand(spec, max_trials=50)) == 50


# --- properties -----------------------------------------------------------------------------------

# Parameters drawn independently must not conflict: the real data sets cap n_train by their size,
# so the property draws only from the synthetic ones (cross-field rules have their own tests).
_VALUES = {
    "dataset": st.sampled_from(SYNTHETIC_CLASSIFICATION),
    "width": st.integers(1, 4096),
    "depth": st.integers(0, 16),
    "n_train": st.integers(4, 1_000_000),
    "lr": st.floats(1e-6, 10),
    "noise": st.floats(0, 10),
    "activation": st.sampled_from(ACTIVATIONS),
    "optimizer": st.sampled_from(OPTIMIZERS),
    "batch_size": st.integers(1, 1_000_000) | st.just("full"),
}
def _reads_as_text(name: str) -> bool:
    """The spec's YAML reader takes 1e-3 as a number (stock PyYAML does not), so a name like 0e0 that
    PyYAML's dumper leaves unquoted reads back as a number: valid specs must not draw such names."""
    try:
        float(name)
    except ValueError:
        return name.strip() != ""
    return False


_NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1,
                 max_size=40).filter(_reads_as_text)


@st.composite
def grid_specs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(_VALUES)), unique=True, min_size=1, max_size=5))
    parameters: dict[str, Any] = {}
    for name in names:
        values = draw(st.lists(_VALUES[name], min_size=1, max_size=4, unique=True))
        parameters[name] = {"value": values[0]} if len(values) == 1 and draw(st.booleans()) else {"values": values}
    seeds = draw(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4, unique=True))
    return {"name": draw(_NAMES), "seeds": seeds, "parameters": parameters}


def _value_lists(data: dict[str, Any]) -> list[list[Any]]:
    return [body["values"] if "values" in body else [body["value"]] for body in data["parameters"].values()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid_specs())
def test_any_valid_grid_expands_to_the_product_of_its_values(data: dict[str, Any]) -> None:
    for spec in (load_spec(data), parse_spec(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))):
        trials = expand(spec)
        lists = _value_lists(data)
        assert len(trials) == count_trials(spec) == math.prod(len(v) for v in lists) * len(data["seeds"])
        names = list(data["parameters"])
        got = [(*(getattr(t, n) for n in names), t.seed) for t in trials]
        assert got == list(itertools.product(*lists, data["seeds"]))
        assert spec.name == data["name"].strip()


_BAD_VALUES = st.sampled_from(["oops", -5, None, [1], {"a": 1}, math.nan, True, ""])
# Parameters whose default is None (n_train, early_stopping, grad_clip) accept None: not a breakage there.
_ACCEPTS_NONE = {name for name, field in TrialConfig.model_fields.items() if field.default is None}


def _bad_value_for(name: str, draw: st.DrawFn) -> Any:
    return draw(_BAD_VALUES.filter(lambda value: not (value is None and name in _ACCEPTS_NONE)))


def _replace_a_value(data: dict[str, Any], draw: st.DrawFn) -> None:
    if not data["parameters"]:
        data["parameters"]["width"] = {"values": [8]}
    name = draw(st.sampled_from(sorted(data["parameters"])))
    body = data["parameters"][name]
    if "values" in body:
        body["values"][draw(st.integers(0, len(body["values"]) - 1))] = _bad_value_for(name, draw)
    else:
        body["value"] = _bad_value_for(name, draw)


def _mutations(draw: st.DrawFn, data: dict[str, Any]) -> None:
    known = {*spec_module._KEYS, *spec_module._WANDB_IGNORED}
    choice = draw(st.integers(0, 8))
    if choice == 0:
        _replace_a_value(data, draw)
    elif choice == 1:
        del data["name"]
    elif choice == 2:
        data["seeds"] = draw(st.sampled_from(["0", -1, [], [1, 1], 3.5, {"a": 1}, [True]]))
    elif choice == 3:
        data[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in known))] = 1
    elif choice == 4:
        data["method"] = draw(st.one_of(st.none(), st.integers(), st.text()).filter(
            lambda m: m not in ("grid", "random")))
    elif choice == 5:
        data["count"] = draw(st.integers(1, 100))  # count under grid
    elif choice == 6:
        data["parameters"]["depth"] = {"distribution": "int_uniform", "min": 1}  # required max dropped
    elif choice == 7:
        data["parameters"][draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in TRIAL_PARAMETERS))] = {
            "value": 1}
    else:
        name = draw(st.sampled_from(sorted(_VALUES)))
        data["parameters"][name] = _bad_value_for(name, draw)


@settings(max_examples=200, deadline=None)
@given(grid_specs(), st.data())
def test_a_mutated_spec_raises_spec_error_and_nothing_else(data: dict[str, Any], mutation: st.DataObject) -> None:
    _mutations(mutation.draw, data)
    with pytest.raises(SpecError):
        expand(load_spec(data))
    with pytest.raises(SpecError):
        expand(parse_spec(yaml.safe_dump(data, allow_unicode=True, sort_keys=False)))


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_PARAMETER_BODIES = st.dictionaries(
    st.sampled_from(["value", "values", "probabilities", "distribution", "min", "max", "q", "mu", "sigma", "x"]),
    _ANY | st.sampled_from(["int_uniform", "uniform", "q_uniform", "log_uniform_values", "normal", "q_normal",
                            "log_normal", "categorical", "constant", "q_log_uniform_values", "inv_log_uniform"]),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries(
    {"name": st.text(max_size=5) | _ANY},
    optional={
        "method": st.sampled_from(["grid", "random"]) | _ANY,
        "count": st.integers(-2, 30) | _ANY,
        "seeds": st.lists(st.integers(-1, 5), max_size=4) | _ANY,
        "metric": _ANY,
        "fuse": _ANY,
        "job": _ANY,
        "parameters": st.dictionaries(st.sampled_from([*TRIAL_PARAMETERS, "bogus"]), _PARAMETER_BODIES | _ANY,
                                      max_size=4) | _ANY,
    },
))
def test_arbitrary_data_gives_a_spec_or_a_spec_error(data: dict[str, Any]) -> None:
    try:
        spec = load_spec(data)
        trials = expand(spec, max_trials=500)
    except SpecError as exc:
        assert exc.problems and all(": " in p for p in exc.problems)
    else:
        assert len(trials) == count_trials(spec)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.text(alphabet="[]{}:-,&*!| \n'\"ab01.", max_size=80))
def test_arbitrary_text_gives_a_spec_or_a_spec_error(text: str) -> None:
    try:
        parse_spec(text)
    except SpecError as exc:
        assert exc.problems


@pytest.mark.parametrize(("name", "value"), [("start", []), ("start", [1.0]), ("betas", [0.9])])
def test_a_pair_with_too_few_items_is_one_sentence(name, value):
    # hypothesis found start: [] raising IndexError while the message was built
    parameters = {"dataset": {"value": "himmelblau"} if name == "start" else {"value": "moons"},
                  name: {"value": value}}
    with pytest.raises(SpecError, match=rf"parameters\.{name}\.value: item {len(value) + 1} is missing"):
        load_spec({"name": "x", "method": "grid", "parameters": parameters})
