"""Which trials of a grid train together as one batched model (fused execution), and in which jobs.

A grid is mostly small models that differ only in numbers. Trials that share everything that shapes
the computation (the data, the network's layers, the loss, the batch size, the optimizer family, the
device) are stacked into one model and trained by one task (worker/training/fused.py); their numbers
(seed, lr, momentum, betas, weight decay, l1, dropout, input noise, gradient clipping, early
stopping, the schedule and its parameters, epochs) stay per trial. Everything else runs one trial at
a time, as before. A group is cut into several jobs when it is too big for one, or when the workers
have more training processes than the grid has jobs (``slots``), so fusing never leaves them idle.

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
# A fused job is split to fill idle training processes only while each half keeps this many trials
# (FITSCOPE_FUSE_MIN_TRIALS's default): below it, stacking gains too little over one trial at a time.
MIN_FUSED_TRIALS = 8
# A 2-D test function's trial is two numbers and its optimizer's state: a whole grid of them (any
# functions, any optimizers) is one job of up to this many trials, never split to fill processes
# (each job would cost more in set-up and writes than its steps).
SURFACE_JOB_TRIALS = 1000
# ...and of at most this many path points: a surface job keeps every step of every trial's path
# (float64 x and y) in memory and in its checkpoint, so 1,000 trials of 10,000 steps would be 160 MB.
SURFACE_PATH_POINTS = 2_000_000  # 32 MB


def fusable(config: TrialConfig) -> str | None:
    """None when the trial can train inside a fused job, else the reason (one sentence) it cannot."""
    if 2 * approximate_weights(config) > FUSED_WEIGHT_BUDGET:
        return (f"the model has about {approximate_weights(config):,} weights, so two of them exceed the "
                f"fused job's budget of {FUSED_WEIGHT_BUDGET:,}; wide models gain nothing from fusing")
    return None


def fusion_key(config: TrialConfig) -> tuple:
    """Trials with equal keys (and both fusable) can be stacked: same data and split, same layers,
    loss, batch size, optimizer family and device. What is left out may differ per trial. Every 2-D
    test function trial on one device shares one key: the surface engine steps each function and
    optimizer family on its own rows (worker/training/surfaces.py)."""
    if config.is_surface:
        return ("surface", config.device)
    data = (config.dataset, config.train_size, config.n_val, config.n_test, config.val_fraction,
            config.test_fraction, config.noise, config.label_noise, config.n_classes, config.n_features,
            config.true_degree, config.data_seed, config.poly_degree, config.folds, config.fold)
    if _is_mlp(config):
        layers: tuple = ("mlp", config.width, config.depth, config.activation, config.norm)
    else:
        layers = ("linear",)  # width, activation, norm and dropout do not exist in a linear model
    loss = (config.loss, config.huber_delta, config.label_smoothing)
    # The device also decides the queue (TrialConfig.queue) and a job goes to its first trial's
    # queue, so keying on the device keeps cpu and gpu trials out of each other's jobs.
    return (data, layers, loss, config.batch_size, config.optimizer, config.device)


def approximate_weights(config: TrialConfig) -> int:
    """About how many weights one trial's model has (the input and output layers counted as if they
    had ``width`` inputs or outputs): what a fused job's size is measured in."""
    if config.is_surface:
        return 2
    if not _is_mlp(config):
        return _LINEAR_WEIGHTS
    return config.depth * config.width * (config.width + 1) + config.width


def plan_jobs(configs: Sequence[TrialConfig], *, max_trials: int, weight_budget: int = FUSED_WEIGHT_BUDGET,
              slots: int = 1, min_trials: int = MIN_FUSED_TRIALS,
              memory_budget_mb: int | None = None) -> list[list[int]]:
    """Group trials (by their index in ``configs``) into jobs. A job of several indices trains them
    fused; a job of one index is an ordinary trial.

    1. Trials with equal fusion keys form a group; each unfusable trial is a job of its own.
    2. Each job has at most ``max_trials`` trials, about ``weight_budget`` weights and, with
       ``memory_budget_mb`` (FITSCOPE_MAX_TRIAL_MEMORY_MB), an estimated peak memory within it (the
       data once, every trial's weights and activations: services/admission.py): a group too big for
       one job is split into jobs of near-equal size (70 trials, max 64: two jobs of 35).
    3. While there are fewer jobs than ``slots`` (the training processes that will take them), the
       largest job (the earliest in grid order among equals) is split into two halves, the first
       one trial larger when odd, as long as each half keeps at least ``min_trials`` trials: fusing
       fewer gains too little to be worth a process of its own. So a 64-trial grid on two idle
       processes trains as two jobs of 32, not as one job while the other process waits; a job of
       one trial counts as a job too. ``slots=1`` plans as if nothing else were free.

    Jobs are listed in grid order of their first trial; trials keep grid order inside a job. Pure and
    deterministic: the same arguments always give the same jobs."""
    groups: dict[tuple, list[int]] = {}
    jobs: list[list[int]] = []
    for index, config in enumerate(configs):
        if fusable(config) is None:
            groups.setdefault(fusion_key(config), []).append(index)
        else:
            jobs.append([index])
    for members in groups.values():
        if configs[members[0]].is_surface:
            steps = max(configs[i].epochs for i in members) + 1
            per_job = max(1, min(SURFACE_JOB_TRIALS, SURFACE_PATH_POINTS // steps))
            jobs += _near_equal(members, -(-len(members) // per_job))
            continue
        per_trial = max(1, approximate_weights(configs[members[0]]))
        largest = max(1, min(max_trials, weight_budget // per_trial,
                             _trials_within(configs[members[0]], memory_budget_mb)))
        jobs += _near_equal(members, -(-len(members) // largest))  # ceil
    jobs.sort(key=lambda job: job[0])
    while len(jobs) < slots:
        # max() keeps the first of equals: the earliest; surface jobs are never split (see SURFACE_JOB_TRIALS)
        largest = max((job for job in jobs if not configs[job[0]].is_surface), key=len, default=[])
        if len(largest) // 2 < max(1, min_trials):
            break  # the largest cannot be split, so no job can
        at = jobs.index(largest)
        jobs[at:at + 1] = _near_equal(largest, 2)
        jobs.sort(key=lambda job: job[0])
    return jobs


def _trials_within(config: TrialConfig, memory_budget_mb: int | None) -> int:
    """How many trials like ``config`` one job may stack within ``memory_budget_mb`` (no limit: None)."""
    from services.admission import estimate_trial

    if memory_budget_mb is None:
        return 2**31
    estimate = estimate_trial(config)
    shared, own = estimate.data + estimate.polynomial, max(1, estimate.weights + estimate.activations)
    return max(1, (memory_budget_mb * 2**20 - shared) // own)


def _near_equal(members: list[int], count: int) -> list[list[int]]:
    """``members`` cut into ``count`` consecutive runs whose sizes differ by at most one (the larger
    ones first), so the trials keep their order."""
    size, extra = divmod(len(members), count)
    runs, start = [], 0
    for run in range(count):
        end = start + size + (1 if run < extra else 0)
        runs.append(members[start:end])
        start = end
    return runs


def _is_mlp(config: TrialConfig) -> bool:
    return config.model == "mlp" and config.depth > 0
