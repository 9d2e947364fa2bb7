"""W&B sweep files as W&B's documentation writes them load as they are: no ``name`` (the file's stem),
``program``/``command``/``project``... accepted with a warning, ``run_cap`` read, and what W&B itself
refuses (no ``parameters``) refused in one sentence. The YAML below follows the examples of W&B's
"Define a sweep configuration", "Sweep configuration options" and "custom CLI commands" pages."""

from __future__ import annotations

import textwrap

import pytest

from services.spec import UNTITLED, SpecError, count_trials, expand, parse_spec

# "How do I use custom CLI commands with sweeps?": grid, program + command, no name.
CUSTOM_COMMAND = """
program:
  train.py
method: grid
parameters:
  batch_size:
    value: 8
  lr:
    value: 0.0001
command:
  - ${env}
  - python
  - ${program}
  - "-b"
  - your-training-config
  - ${args}
"""

# "Initialize a sweep": random search over categorical values and a bare min/max range.
RANDOM = """
method: random
name: sweep
metric:
  goal: maximize
  name: val_acc
parameters:
  batch_size:
    values: [16, 32, 64]
  epochs:
    values: [5, 10, 15]
  lr:
    max: 0.1
    min: 0.0001
"""

# A grid in the shape of W&B's examples, with the launcher keys and W&B's name of the learning rate.
GRID = """
program: train.py
project: fits
entity: my-team
description: learning rate against batch size
method: grid
metric:
  name: val_loss
  goal: minimize
parameters:
  learning_rate:
    values: [0.01, 0.001, 0.0001]
  batch_size:
    values: [16, 32, 64]
  epochs:
    value: 5
early_terminate:
  type: hyperband
  min_iter: 3
command:
  - ${env}
  - ${interpreter}
  - ${program}
  - ${args}
"""


def _spec(text: str, stem: str = "sweep"):
    return parse_spec(textwrap.dedent(text), default_name=stem)


def test_the_custom_command_example_has_one_trial_named_after_its_file() -> None:
    spec = _spec(CUSTOM_COMMAND, stem="custom-command")
    trials = expand(spec)
    assert spec.name == "custom-command"
    assert count_trials(spec) == len(trials) == 1
    assert (trials[0].batch_size, trials[0].lr) == (8, 0.0001)
    assert {w.split(":")[0] for w in spec.warnings} == {"program", "command"}


def test_the_grid_example_expands_to_every_combination_and_reads_learning_rate_as_lr() -> None:
    spec = _spec(GRID, stem="lr-vs-batch")
    trials = expand(spec)
    assert spec.name == "lr-vs-batch" and spec.description == "learning rate against batch size"
    assert count_trials(spec) == len(trials) == 9
    assert [(t.lr, t.batch_size) for t in trials] == [
        (lr, batch) for lr in (0.01, 0.001, 0.0001) for batch in (16, 32, 64)]
    assert {t.epochs for t in trials} == {5}
    warned = {w.split(":")[0] for w in spec.warnings}
    assert warned == {"program", "project", "entity", "early_terminate", "command", "parameters.learning_rate"}


def test_the_random_example_runs_run_cap_trials_drawn_within_its_ranges() -> None:
    spec = _spec(RANDOM + "run_cap: 20\n")
    trials = expand(spec)
    assert spec.name == "sweep" and (spec.metric_name, spec.metric_goal) == ("val_acc", "maximize")
    assert count_trials(spec) == len(trials) == 20
    assert {t.batch_size for t in trials} <= {16, 32, 64} and {t.epochs for t in trials} <= {5, 10, 15}
    assert all(0.0001 <= t.lr <= 0.1 for t in trials) and len({t.lr for t in trials}) == 20


def test_the_random_example_without_a_run_count_is_one_sentence_naming_count_and_run_cap() -> None:
    # W&B runs a random search until it is stopped; a queue needs to know how many trials to plan.
    with pytest.raises(SpecError) as caught:
        _spec(RANDOM)
    assert caught.value.problems == ["count: is required for method: random; say how many configurations to "
                                     "sample (W&B's run_cap is read as the count too)"]


def test_a_grid_larger_than_its_run_cap_is_refused() -> None:
    with pytest.raises(SpecError, match="run_cap: the grid has 9 trials, more than run_cap 4"):
        _spec(GRID + "run_cap: 4\n")
    assert count_trials(_spec(GRID + "run_cap: 9\n")) == 9


def test_without_a_file_the_name_is_untitled_and_a_given_name_wins() -> None:
    assert parse_spec(textwrap.dedent(CUSTOM_COMMAND), default_name=UNTITLED).name == "untitled"
    assert _spec(RANDOM + "run_cap: 2\n", stem="file-stem").name == "sweep"


def test_learning_rate_and_lr_together_are_refused() -> None:
    with pytest.raises(SpecError, match="parameters.learning_rate: is another name of lr, which is also given"):
        _spec("parameters:\n  lr: {value: 0.1}\n  learning_rate: {value: 0.2}\n")


def test_bayes_is_refused_in_one_sentence() -> None:
    with pytest.raises(SpecError) as caught:
        _spec(RANDOM.replace("method: random", "method: bayes"))
    assert caught.value.problems == ["method: bayes search is not supported; use grid or random"]
