"""The engine: every trial trains here, alone (a stack of one) or with others as one batched model.

A grid is mostly small models that differ only in numbers. Trained one at a time, Python and kernel
launches dominate; stacked (fused_stack.py), every trial rides on the same kernel calls. The trials
of one call share a fusion key (services.planner): the same data, layers, loss, batch size,
optimizer family and device. Everything else stays per trial:

- identity: each trial's initial weights are drawn from a generator seeded by its seed exactly as
  build_model draws them (bitwise the same), and that generator then draws its data order each
  epoch; its dropout masks and input noise come from its own noise generator, so a trial's numbers
  do not depend on the trials it trains beside.
- numbers: lr and schedule, weight decay, l1, momentum, betas and gradient clipping are per-trial
  tensors; so are dropout and input noise, and batch norm's running statistics; each trial runs its
  own number of epochs.
- endings: early stopping, divergence (a NaN in one trial ends that trial only) and cancellation
  (``on_epoch`` returns the trials asked to stop). An ended trial is frozen: left out of every
  optimizer update, so its weights are never written again (never multiplied by 0, and a NaN in
  them cannot leak); once half the stack has ended, the stack is compacted to the trials still
  training. Its result is built and handed to ``on_trials_end`` right after the epoch it ended in.

Each step: optional Gaussian input noise -> forward (dropout, batch norm on the batch) -> data loss
-> backward (+ l1's subgradient on the weights) -> optional gradient clipping -> optimizer step at
the step's rate. After each epoch every trial is evaluated in eval mode, without gradients, on the
full training and validation sets (one forward pass), giving its row of metrics; reported losses
are the data loss alone. At its end a trial keeps the weights of its best-validation epoch (the
ones early stopping keeps, and the test set and the prediction artifacts see).

Watch it fit: at about 20 epochs of each trial (snapshots.py: the first, log-spaced ones, the one it
ended at, its best), the trials of the stack that want a frame are drawn on the picture's inputs in
one evaluation; the frames are kept per trial, in the checkpoint too, and stored as one artifact.

Resumable: after each epoch but the last, ``checkpoint(epoch, capture)`` may call ``capture()`` for a
checkpoint.JobState - the stack's rows, weights, best weights and optimizer state, and per trial its
schedule, both generators, best epoch, early stopper and ending - and ``resume=state`` goes on from
there in a freshly built job, bitwise as if it had never stopped (timings aside); trials that had
ended stay ended, their results kept in the state. The same configs on the CPU give bitwise the same
numbers run to run; the global RNGs are never read.

Per-step Python does not grow with the number of trials; per-epoch Python does (data order,
metrics rows). The end of the trials that end together is measured for all of them at once (test
metrics, weight statistics, prediction artifacts: one stacked forward per input, then the same
reductions and roundings on every row).

Against a plain nn.Module loop (tests/unit/reference_loop.py), the numbers agree to float rounding
(epoch losses to about 1e-6), except that dropout masks and input noise are drawn for a stretch of
steps at once (same distribution, other draws). A trial's ``epoch_seconds`` is its share of the
stack's epoch (the epoch's wall time over the trials that ran it), so summing them over all trials
gives the job's time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from services.planner import fusion_key
from worker.training.batches import batch_bounds
from worker.training.checkpoint import JobState, TrialState
from worker.training.data import make_dataset
from worker.training.fine_tuning import start_from
from worker.training.fused_optim import StepRates, row_order
from worker.training.fused_results import PerTrialLoss, measure_rows, per_trial_loss, trial_results
from worker.training.fused_stack import NoiseAhead, StackedModel, StackedTraining, initial_rows
from worker.training.losses import (
    baseline_loss,
    build_loss,
    constant_predictor,
    model_outputs,
    resolve_loss,
)
from worker.training.models import Dropout, build_model, fit_input_features, make_noise_generator
from worker.training.results import (
    CannotResume,
    EarlyStopper,
    EpochMetrics,
    TrialResult,
    divergence,
    epoch_metrics,
    resolve_device,
)
from worker.training.snapshots import Snapshots, snapshot_epochs

if TYPE_CHECKING:
    from services.trial_config import TrialConfig

log = logging.getLogger(__name__)

OnEpoch = Callable[[dict[int, EpochMetrics]], "set[int] | None"]
OnTrialsEnd = Callable[[dict[int, TrialResult]], None]
# ``checkpoint(epoch, capture)``: called after each epoch but the last; calls ``capture()`` when it
# wants the state (capturing copies every tensor, so it is done only when asked).
CheckpointHook = Callable[[int, Callable[[], JobState]], None]


def train_fused(
    configs: Sequence[TrialConfig],
    *,
    on_epoch: OnEpoch = lambda rows: None,
    on_trials_end: OnTrialsEnd = lambda results: None,
    device: str | None = None,
    csv_content: bytes | None = None,
    checkpoint: CheckpointHook | None = None,
    resume: JobState | None = None,
    parents: Sequence[dict | None] | None = None,
) -> list[TrialResult]:
    """Train compatible trials together (or one alone); returns one TrialResult per config, in order.
    ``device`` overrides the configs' device (cpu, cuda, auto); ``csv_content`` is the stored file of a
    CSV data set. ``on_epoch`` gets ``{trial index: EpochMetrics}`` of every trial that finished the
    epoch and returns the indices asked to stop (they end as cancelled). ``on_trials_end`` gets ``{trial
    index: TrialResult}`` of the trials that ended in an epoch, right after it, so a caller can record
    them while the others train on. ``checkpoint(epoch, capture)`` is offered the job's state after each
    epoch but the last (``capture()`` copies it into a JobState, so call it only when saving);
    ``resume`` (a JobState of these same configs) goes on after its epoch exactly as if the job had
    never stopped, and raises CannotResume, before training, when it does not fit. ``parents`` gives,
    per config, the weights artifact of the trial its ``init_from`` names (fine_tuning.weights_artifact;
    None for a trial that starts from its own draw). Raises ValueError when the configs cannot be fused
    (see services.planner) or a parent's first layer does not fit."""
    _check_fusable(configs)
    first = configs[0]
    if first.is_surface:  # a 2-D test function: the points themselves are the stack (surfaces.py)
        from worker.training.surfaces import train_surfaces

        return train_surfaces(configs, on_epoch=on_epoch, on_trials_end=on_trials_end, device=device,
                              checkpoint=checkpoint, resume=resume)
    target = resolve_device(device or first.device)
    started = time.perf_counter()
    splits = make_dataset(first, csv_content=csv_content)
    loss_name = resolve_loss(first, task=splits.task,
                             n_classes=None if splits.task == "regression" else splits.n_outputs)
    # One template model gives the layers; with dropout layers if any trial has dropout.
    template = build_model(first.model_copy(update={"dropout": max(c.dropout for c in configs)}),
                           splits.n_features, model_outputs(loss_name, splits.n_outputs),
                           generator=torch.Generator(), task=splits.task)
    fit_input_features(template, splits.x_train)
    template.to(target)
    generators = [torch.Generator().manual_seed(config.seed) for config in configs]  # init, then data order
    order = row_order(configs)  # stack rows: trials that step alike side by side
    rows = initial_rows(template, [generators[i] for i in order])  # drawn for every trial: same data order
    if parents is not None and any(parent is not None for parent in parents):
        start_from(template, rows, [parents[i] for i in order])  # fine-tuning: the parents' best weights
    training = StackedTraining(StackedModel(template, rows.to(target)), [configs[i] for i in order], slots=order)
    x_train, y_train, x_val, y_val = (
        t.to(target) for t in (splits.x_train, splits.y_train, splits.x_val, splits.y_val))
    # targets [n, 1] -> [n]; multi-label ones stay [n, labels]
    y_train_rows, y_val_rows = (y if splits.task == "multilabel" else y.reshape(-1) for y in (y_train, y_val))
    n_train = x_train.shape[0]
    x_both = torch.cat([x_train, x_val])
    batch_size = n_train if first.batch_size == "full" else min(first.batch_size, n_train)
    # Batch norm cannot normalise one example: a last batch of one joins the batch before it.
    bounds = batch_bounds(n_train, batch_size=batch_size,
                          merge_single=any(isinstance(layer, nn.BatchNorm1d) for layer in training.model.layers))
    steps = len(bounds)
    loss_fn, row_loss = build_loss(first, loss_name), per_trial_loss(first, loss_name)
    constant = constant_predictor(splits.y_train, loss=loss_name, n_outputs=splits.n_outputs)
    baselines = {"baseline_train_loss": baseline_loss(constant, y_train, loss_fn=loss_fn),
                 "baseline_val_loss": baseline_loss(constant, y_val, loss_fn=loss_fn)}
    snapshots = Snapshots.of(splits, device=target)  # None: these data get no prediction picture
    # planned once per number of epochs, not per trial (a plan is a few dozen numpy calls)
    plans = {epochs: snapshot_epochs(epochs) if snapshots else frozenset() for epochs in {c.epochs for c in configs}}
    trials = [_Trial(index=i, config=config, rates=StepRates(config, steps=steps),
                     stopper=EarlyStopper(config.early_stopping) if config.early_stopping else None,
                     data_generator=generator, noise_generator=make_noise_generator(config.seed, target),
                     planned=plans[config.epochs])
              for i, (config, generator) in enumerate(zip(configs, generators, strict=True))]
    results: dict[int, TrialResult] = {}
    if resume is not None:
        training = _resume(resume, configs=configs, trials=trials, results=results, template=template, device=target)
    set_up_s = time.perf_counter() - started
    last_epoch = max(config.epochs for config in configs)

    for epoch in range((resume.epoch if resume else 0) + 1, last_epoch + 1):
        model = training.model
        epoch_started = time.perf_counter()
        running = [trials[index] for index in training.slots]  # row order; some may have ended
        rates = [trial.rates.epoch(epoch) for trial in running]
        grad_norms, step_losses = _train_one_epoch(training, running, x_train, y_train_rows, row_loss, rates=rates,
                                                   batch_size=batch_size, bounds=bounds)
        with torch.no_grad():
            outputs = model.evaluate(x_both)  # the training and validation sets in one pass
            train = measure_rows(outputs[:, :, :n_train], y_train_rows, row_loss, loss=loss_name)
            val = measure_rows(outputs[:, :, n_train:], y_val_rows, row_loss, loss=loss_name)
            # per row: the gradient norm, the weight norm, then each Linear layer's gradient norm
            norms = torch.cat([grad_norms[:, :1], model.row_norms()[:, None], grad_norms[:, 1:]], 1).tolist()
        if step_losses is not None:
            _record_range_test(running, rates=rates, step_losses=step_losses)
        share = (time.perf_counter() - epoch_started) / sum(trial.status == "running" for trial in running)

        rows: dict[int, EpochMetrics] = {}
        improved = []
        for row, trial in enumerate(running):
            if trial.status != "running":
                continue
            trial.seconds += share
            bad = divergence(train[row]["loss"], val[row]["loss"], epoch)
            if bad:
                trial.end(training, row, status="diverged", message=bad)
                continue
            metrics = epoch_metrics(epoch, train[row], val[row], lr=rates[row][0], seconds=share,
                                    grad_norm=norms[row][0], weight_norm=norms[row][1],
                                    layer_grad_norms=norms[row][2:])
            trial.last, trial.epochs_run = metrics, trial.epochs_run + 1
            rows[trial.index] = metrics
            if "exact_match" in train[row]:  # multi-label: no column of its own, kept per trial
                trial.exact_match.append([epoch, train[row]["exact_match"], val[row]["exact_match"]])
            if trial.best is None or metrics.val_loss < trial.best.val_loss:
                trial.best = metrics
                improved.append(row)
        training.keep_best(improved)
        asked_to_stop = (on_epoch(rows) if rows else None) or set()
        for row, trial in enumerate(running):
            if trial.index not in rows:
                continue
            if trial.index in asked_to_stop:
                trial.end(training, row, status="cancelled", message=f"cancelled after epoch {epoch}")
            elif trial.stopper is not None and trial.stopper.should_stop(rows[trial.index].val_loss):
                trial.stopped_epoch = epoch
                trial.end(training, row, status="succeeded")
            elif epoch == trial.config.epochs:
                trial.end(training, row, status="succeeded")
            else:
                trial.rates.after_epoch(rows[trial.index].val_loss)
        if snapshots is not None:
            _take_snapshots(snapshots, training, running, rows, epoch=epoch)
        ended = [trial for trial in running if trial.status != "running" and trial.index not in results]
        if ended:  # their test metrics and artifacts in one stacked pass, then reported at once
            results.update(trial_results(ended, template, splits=splits, loss_fn=loss_fn, loss=loss_name,
                                         device=target, baselines=baselines, set_up_s=set_up_s / len(configs),
                                         snapshots=snapshots))
            on_trials_end({trial.index: results[trial.index] for trial in ended})
        if not any(trial.status == "running" for trial in running):
            break
        training.compact()
        if checkpoint is not None and epoch < last_epoch:
            checkpoint(epoch, partial(_capture, epoch, configs=configs, trials=trials, training=training,
                                      results=results))
    return [results[index] for index in range(len(configs))]


def _take_snapshots(snapshots: Snapshots, training: StackedTraining, running: list[_Trial],
                    rows: dict[int, EpochMetrics], *, epoch: int) -> None:
    """The frames of the trials that measured this epoch and planned it or ended at it (their row
    still holds this epoch's weights): one evaluation on the picture's inputs for all of them. A
    trial that ended at its best epoch gets none here: its best-epoch frame, taken at its end from
    the same weights, would replace it (Snapshots.artifact keeps an epoch's later frame)."""
    wanted = [row for row, trial in enumerate(running) if trial.index in rows
              and (epoch in trial.planned or trial.status != "running")
              and not (trial.status != "running" and trial.best is not None and trial.best.epoch == epoch)]
    if not wanted:
        return
    metrics = [(epoch, rows[running[row].index].train_loss, rows[running[row].index].val_loss) for row in wanted]
    for row, frame in zip(wanted, snapshots.frames(training.model, wanted, metrics=metrics), strict=True):
        running[row].frames.append(frame)


def _capture(epoch: int, *, configs: Sequence[TrialConfig], trials: list[_Trial], training: StackedTraining,
             results: dict[int, TrialResult]) -> JobState:
    return JobState(epoch=epoch, configs=[config.model_dump_json() for config in configs],
                    stack=training.state(), trials=[trial.state() for trial in trials], results=dict(results))


def _resume(state: JobState, *, configs: Sequence[TrialConfig], trials: list[_Trial], results: dict[int, TrialResult],
            template: nn.Module, device: torch.device) -> StackedTraining:
    """Put back every piece of state that training moves into the freshly built job (data, template
    and generators were rebuilt exactly as at the start); returns the stack as it was."""
    if state.configs != [config.model_dump_json() for config in configs]:
        raise CannotResume("the checkpoint was written by a job of other trials or other settings")
    try:
        for trial, trial_state in zip(trials, state.trials, strict=True):
            trial.restore(trial_state)
        training = StackedTraining.resumed(template, configs, state.stack, device=device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        # e.g. a GPU generator's state on a CPU worker (device: auto), or a stack of another shape
        raise CannotResume(f"the checkpoint does not fit this run ({type(exc).__name__}: {exc})") from None
    results.update(state.results)
    return training


def train_trial(
    config: TrialConfig,
    *,
    on_epoch: Callable[[EpochMetrics], bool | None] = lambda metrics: None,
    device: str | None = None,
    csv_content: bytes | None = None,
    checkpoint: CheckpointHook | None = None,
    resume: JobState | None = None,
    parent: dict | None = None,
) -> TrialResult:
    """One trial, trained as a stack of one (:func:`train_fused` of ``[config]``): ``on_epoch`` gets
    each epoch's metrics and returns True to cancel the trial there."""
    [result] = train_fused([config], on_epoch=lambda rows: {0} if on_epoch(rows[0]) else None, device=device,
                           csv_content=csv_content, checkpoint=checkpoint, resume=resume, parents=[parent])
    return result


@dataclass
class _Trial:
    """One trial's own state inside the stack."""

    index: int
    config: TrialConfig
    rates: StepRates
    stopper: EarlyStopper | None
    data_generator: torch.Generator  # drew the initial weights; now each epoch's data order
    noise_generator: torch.Generator  # dropout masks and input noise
    last: EpochMetrics | None = None  # its latest epoch's metrics
    epochs_run: int = 0
    best: EpochMetrics | None = None
    best_weights: torch.Tensor | None = None  # its row at its best epoch, kept when it ends
    status: str = "running"
    message: str | None = None
    stopped_epoch: int | None = None
    seconds: float = 0.0
    lr_range: list[tuple[float, float]] | None = None  # lr_range_test: every step's (rate, batch loss)
    planned: frozenset[int] = frozenset()  # the epochs it takes a snapshot at (snapshots.snapshot_epochs)
    frames: list[dict] = field(default_factory=list)  # its snapshots so far
    exact_match: list[list[float]] = field(default_factory=list)  # multi-label: [epoch, train, val] per epoch

    def __post_init__(self) -> None:
        if self.config.schedule == "lr_range_test":
            self.lr_range = []

    def end(self, training: StackedTraining, row: int, *, status: str, message: str | None = None) -> None:
        self.status, self.message = status, message
        if self.best is not None:
            self.best_weights = training.best[row].clone()
        training.freeze(row)

    def state(self) -> TrialState:
        return TrialState(
            status=self.status, message=self.message, stopped_epoch=self.stopped_epoch, epochs_run=self.epochs_run,
            last=self.last, best=self.best, stopper=self.stopper.state() if self.stopper else None,
            rates=self.rates.state(), generator=self.data_generator.get_state(),
            noise_generator=self.noise_generator.get_state(), seconds=self.seconds,
            frames=list(self.frames), exact_match=[list(entry) for entry in self.exact_match],
            lr_range=None if self.lr_range is None else list(self.lr_range))

    def restore(self, state: TrialState) -> None:
        if (state.stopper is None) != (self.stopper is None):
            raise ValueError("the checkpoint was written by a trial with other early stopping")
        self.status, self.message, self.stopped_epoch = state.status, state.message, state.stopped_epoch
        self.epochs_run, self.last, self.best, self.seconds = state.epochs_run, state.last, state.best, state.seconds
        self.frames, self.exact_match = list(state.frames or []), [list(entry) for entry in state.exact_match or []]
        if self.stopper is not None:
            self.stopper.restore(state.stopper)
        self.rates.restore(state.rates)
        if self.lr_range is not None:
            self.lr_range = [tuple(point) for point in state.lr_range or []]
        # set_state on the generators themselves: they are the ones the epochs draw from.
        self.data_generator.set_state(state.generator)
        self.noise_generator.set_state(state.noise_generator)


# Up to this many numbers (trials x rows x features), an epoch's shuffled copy of the data is made
# once (64 MB of float32); beyond it, each step gathers its own rows.
EPOCH_GATHER_NUMBERS = 16_000_000


def _train_one_epoch(training: StackedTraining, running: list[_Trial], x: torch.Tensor, y: torch.Tensor,
                     row_loss: PerTrialLoss, *, rates: list[list[float]], batch_size: int,
                     bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step per batch (``bounds``: each step's rows) for every row; returns each row's
    last gradient norms (before clipping: all parameters, then each Linear layer; StackedTraining.step)
    and, when a trial runs a range test, every step's batch loss per row ``[steps, slots]``. Each
    trial's batches come in its own order, drawn from its generator (nothing is drawn when one batch
    covers the set)."""
    n = x.shape[0]
    training_rows = training.training
    if batch_size >= n:
        x_epoch, y_epoch = x.expand(len(running), *x.shape), y.expand(len(running), *y.shape)
        order = None
    else:
        identity = torch.arange(n)
        order = torch.stack([torch.randperm(n, generator=trial.data_generator) if is_training else identity
                             for trial, is_training in zip(running, training_rows, strict=True)]).to(x.device)
        if order.numel() * max(1, x.shape[1]) <= EPOCH_GATHER_NUMBERS:
            x_epoch, y_epoch, order = _gather(x, order), _gather(y, order), None  # once an epoch; slices per step
        # else: every trial's copy of a large data set would not fit; gather each step's rows instead
    model = training.model
    noise = NoiseAhead(
        dropout=[trial.config.dropout for trial in running],
        input_noise=[trial.config.input_noise for trial in running],
        generators=[trial.noise_generator if is_training else None
                    for trial, is_training in zip(running, training_rows, strict=True)],
        dropout_layers=sum(isinstance(layer, Dropout) for layer in model.layers), width=running[0].config.width,
        features=x.shape[1], n=n, batch_size=batch_size, device=x.device)
    step_rates = [list(column) for column in zip(*rates, strict=True)]  # per step, each row's rate
    # Batch norm's running statistics move only in the rows that still train.
    frozen = (torch.tensor([not is_training for is_training in training_rows], device=x.device).view(-1, 1, 1)
              if model.statistics and not all(training_rows) else None)
    norm = None
    # A range test plots loss against each step's rate: keep every step's batch loss (on the device
    # until the epoch ends, so no step waits for a read).
    step_losses = [] if any(trial.lr_range is not None for trial in running) else None
    for step, (start, end) in enumerate(bounds):
        if order is None:
            inputs, labels = x_epoch[:, start:end], y_epoch[:, start:end]
        else:
            rows = order[:, start:end]
            inputs, labels = _gather(x, rows), _gather(y, rows)
        input_noise, dropout_scales = noise.rows(start, end)
        if input_noise is not None:
            inputs = inputs + input_noise
        losses, grads = model.loss_and_gradients(inputs, labels, row_loss, dropout_scales=dropout_scales, frozen=frozen,
                                                 want_losses=step_losses is not None)
        if step_losses is not None:
            step_losses.append(losses.detach())
        norm = training.step(grads, lr=step_rates[step], want_norm=step == len(bounds) - 1)
    return norm, None if step_losses is None else torch.stack(step_losses)


def _gather(data: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``data[index]`` (rows of ``data`` by a 2-D ``index``): index_select copies whole rows, about
    3x faster than advanced indexing on 2,000 x 20 inputs gathered for 32 trials."""
    return data.index_select(0, index.reshape(-1)).view(*index.shape, *data.shape[1:])


def _record_range_test(running: list[_Trial], *, rates: list[list[float]], step_losses: torch.Tensor) -> None:
    """Add this epoch's (rate, batch loss) of every step to each range-test trial still training."""
    losses = step_losses.T.tolist()  # [slots, steps]
    for row, trial in enumerate(running):
        if trial.lr_range is not None and trial.status == "running":
            trial.lr_range.extend(zip(rates[row], losses[row], strict=True))


def _check_fusable(configs: Sequence[TrialConfig]) -> None:
    # Any one trial trains as a stack of one; several must share what shapes the computation.
    # (Whether a group is worth fusing - a model's size - is the planner's choice, not checked here.)
    if not configs:
        raise ValueError("train_fused needs at least one trial")
    for i, config in enumerate(configs):
        if fusion_key(config) != fusion_key(configs[0]):
            raise ValueError(f"trial {i} differs from trial 0 in data, layers, loss, batch size, optimizer or "
                             "device, so they cannot be fused; see services.planner.fusion_key")
