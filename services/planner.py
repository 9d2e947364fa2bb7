"""Which trials of a grid train together as one batched model (fused execution), and in which jobs.

A grid is mostly small models that differ only in numbers. Trials that share everything that shapes
the computation (the data, the network's layers, the loss, the batch size, the optimizer family, the
device) are stacked into one model and trained by one task (worker/training/fused.py); their numbers
(seed, lr, momentum, betas, weight decay, l1, dropout, input noise, gradient clipping, early
stopping, the schedule and its parameters, epochs) stay per trial. Everything else runs one trial at
a time, as before.

Pure: no torch, no I/O, so the submitter can plan without the engine installed.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.trial_config import TrialConfig

# About how many weights one fused job may hold (every trial's, stacked; the optimizer keeps a few
# more copies): ~32 MB of float32 per copy. Wide models are compute-bound anyway, so stacking many
# of them would only add memory, not speed.
FUSED_WEIGHT_BUDGET = 8_000_000
# A linear model has inputs x outputs weights: at most ~20,000 for a 1,000-column CSV of 20 classes.
_LINEAR_WEIGHTS = 20_000


def fusable(config: TrialConfig) -> str | None:
    """None when the trial can train inside a fused job, else the reason (one sentence) it cannot."""
    if _is_mlp(config) and config.norm == "batch":
        return ("batch norm keeps running statistics and merges one-example batches into the one "
                "before, which the stacked model does not do")
    if 2 * approximate_weights(config) > FUSED_WEIGHT_BUDGET:
        return (f"the model has about {approximate_weights(config):,} weights, so two of them exceed the "
                f"fused job's budget of {FUSED_WEIGHT_BUDGET:,}; wide models gain nothing from fusing")
    return None


def fusion_key(config: TrialConfig) -> tuple:
    """Trials with equal keys (and both fusable) can be stacked: same data and split, same layers,
    loss, batch size, optimizer family and device. What is left out may differ per trial."""
    data = (config.dataset, config.train_size, config.n_val, config.n_test, config.val_fraction,
            config.test_fraction, config.noise, config.label_noise, config.n_classes, config.n_features,
            config.true_degree, config.data_seed, config.poly_degree)
    if _is_mlp(config):
        layers: tuple = ("mlp", config.width, config.depth, config.activation, config.norm)
    else:
        layers = ("linear",)  # width, activation, norm and dropout do not exist in a linear model
    loss = (config.loss, config.huber_delta, config.label_smoothing)
    return (data, layers, loss, config.batch_size, config.optimizer, config.device)


def approximate_weights(config: TrialConfig) -> int:
    """About how many weights one trial's model has (the input and output layers counted as if they
    had ``width`` inputs or outputs): what a fused job's size is measured in."""
    if not _is_mlp(config):
        return _LINEAR_WEIGHTS
    return config.depth * config.width * (config.width + 1) + config.width


def plan_jobs(configs: Sequence[TrialConfig], *, max_trials: int,
              weight_budget: int = FUSED_WEIGHT_BUDGET) -> list[list[int]]:
    """Group trials (by their index in ``configs``) into jobs. A job of several indices trains them
    fused; a job of one index is an ordinary trial. Each job has at most ``max_trials`` trials and
    about ``weight_budget`` weights. A group too big for one job is split into jobs of near-equal
    size (70 trials, max 64: two jobs of 35), so several workers share it evenly. Jobs are listed
    in grid order of their first trial; trials keep grid order inside a job."""
    groups: dict[tuple, list[int]] = {}
    jobs: list[list[int]] = []
    for index, config in enumerate(configs):
        if fusable(config) is None:
            groups.setdefault(fusion_key(config), []).append(index)
        else:
            jobs.append([index])
    for members in groups.values():
        per_trial = max(1, approximate_weights(configs[members[0]]))
        largest = max(1, min(max_trials, weight_budget // per_trial))
        count = -(-len(members) // largest)  # ceil
        size, extra = divmod(len(members), count)
        start = 0
        for job in range(count):
            end = start + size + (1 if job < extra else 0)
            jobs.append(members[start:end])
            start = end
    return sorted(jobs, key=lambda job: job[0])


def _is_mlp(config: TrialConfig) -> bool:
    return config.model == "mlp" and config.depth > 0
