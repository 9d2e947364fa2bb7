"""Watch it fit: the epochs a trial's picture is kept at, what a frame holds (the best one is the final
picture), its size, and that a resumed job keeps the very same frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from services.trial_config import TrialConfig
from tests.unit.test_fused_resume import _run
from worker.training import fused
from worker.training.artifacts import CURVE_POINTS, GRID
from worker.training.checkpoint import job_state_from_bytes
from worker.training.fused import train_trial
from worker.training.fused_results import MULTILABEL_ARTIFACT
from worker.training.fused_stack import StackedModel
from worker.training.snapshots import (
    ARTIFACT,
    PLANNED,
    SNAPSHOTS,
    Snapshots,
    decode_bytes,
    encode_bytes,
    snapshot_epochs,
)

SMALL = dict(n_train=60, n_val=40, n_test=20, width=16, depth=2, batch_size=20)


@pytest.mark.parametrize("epochs", [1, 2, 17, 18, 19, 50, 200, 1000, 10_000])
def test_planned_epochs_are_the_first_log_spaced_ones_and_the_last(epochs: int) -> None:
    planned = sorted(snapshot_epochs(epochs))
    assert planned[0] == 1 and planned[-1] == epochs
    assert len(planned) == min(epochs, PLANNED)  # unique, and all of them when there are few
    if epochs > 100:  # log-spaced: consecutive ratios stay within a small band, after the crowded start
        ratios = np.diff(np.log(planned[4:]))
        assert ratios.max() < 2.5 * ratios.min() and (np.diff(planned) > 0).all()


def _frames(artifact: dict) -> list[dict]:
    return artifact["frames"]


def test_the_frames_are_the_planned_epochs_and_the_best_and_the_best_one_is_the_final_picture() -> None:
    rows = []
    config = TrialConfig(dataset="moons", noise=0.35, epochs=40, lr=0.02, **SMALL)
    result = train_trial(config, on_epoch=rows.append)
    frames = _frames(result.artifacts[ARTIFACT])
    epochs = [frame["epoch"] for frame in frames]
    assert epochs == sorted(snapshot_epochs(40) | {result.best_epoch}) and len(epochs) <= SNAPSHOTS
    assert result.best_epoch not in snapshot_epochs(40), "the case must add a best epoch of its own"
    for frame in frames:  # each frame's losses are its epoch's row
        row = rows[frame["epoch"] - 1]
        assert (frame["train_loss"], frame["val_loss"]) == (row.train_loss, row.val_loss)

    final = result.artifacts["boundary_2d"]
    best = next(frame for frame in frames if frame["epoch"] == result.best_epoch)
    classes = decode_bytes(best["predicted_class"]).reshape(GRID, GRID)
    probability = decode_bytes(best["probability"]).reshape(GRID, GRID) / 255
    np.testing.assert_array_equal(classes, np.asarray(final["predicted_class"]))
    np.testing.assert_allclose(probability, np.asarray(final["probability"]), atol=0.5 / 255 + 5e-4)
    last = frames[-1]  # the last epoch's frame is another picture: the model kept training past its best
    assert last["epoch"] == 40 and last["predicted_class"] != best["predicted_class"]


def test_when_the_best_epoch_is_the_last_its_frame_is_the_final_picture() -> None:
    result = train_trial(TrialConfig(dataset="circles", noise=0.05, epochs=8, lr=0.01, **SMALL))
    assert result.best_epoch == 8, "the case needs a validation loss still falling at the end"
    [last] = [frame for frame in _frames(result.artifacts[ARTIFACT]) if frame["epoch"] == 8]
    final = result.artifacts["boundary_2d"]
    np.testing.assert_array_equal(decode_bytes(last["predicted_class"]).reshape(GRID, GRID),
                                  np.asarray(final["predicted_class"]))


def test_an_early_stopped_trial_keeps_the_epoch_it_stopped_at() -> None:
    config = TrialConfig(dataset="moons", noise=0.4, epochs=300, lr=0.05, early_stopping={"patience": 3}, **SMALL)
    result = train_trial(config)
    stopped = result.final_metrics["stopped_epoch"]
    epochs = [frame["epoch"] for frame in _frames(result.artifacts[ARTIFACT])]
    assert stopped is not None and stopped < 300 and epochs[-1] == stopped
    assert set(epochs) == {e for e in snapshot_epochs(300) if e <= stopped} | {stopped, result.best_epoch}


def test_a_fitted_curve_keeps_its_inputs_once_and_the_best_frame_is_the_final_curve() -> None:
    result = train_trial(TrialConfig(dataset="sine", epochs=30, lr=0.01, **SMALL))
    artifact, final = result.artifacts[ARTIFACT], result.artifacts["curve_1d"]
    assert artifact["kind"] == "curve_1d" and artifact["x"] == final["x"]
    [best] = [frame for frame in artifact["frames"] if frame["epoch"] == result.best_epoch]
    assert best["y_pred"] == final["y_pred"]


def test_a_trial_stores_its_frames_under_200_kb_even_when_they_do_not_compress() -> None:
    # The largest grid there is (GRID x GRID cells), 20 frames, 20 classes, noise in every cell.
    rng = np.random.default_rng(0)
    frames = [{"epoch": epoch, "train_loss": 0.123456789, "val_loss": 0.987654321,
               "predicted_class": encode_bytes(rng.integers(0, 20, GRID * GRID)),
               "probability": encode_bytes(rng.integers(0, 256, GRID * GRID))} for epoch in range(SNAPSHOTS)]
    worst = {"kind": "boundary_2d", "x_range": [-1.0, 1.0], "y_range": [-1.0, 1.0], "resolution": GRID,
             "class_names": [f"class {k}" for k in range(20)], "encoding": "x" * 200, "frames": frames}
    assert len(json.dumps(worst)) < 200_000
    # and a real overfitting trial, every artifact it stores together
    result = train_trial(TrialConfig(dataset="spirals", n_classes=5, noise=0.3, epochs=40, width=64, lr=0.01,
                                     n_train=60, n_val=40, n_test=0, batch_size=20))
    sizes = {kind: len(json.dumps(data)) for kind, data in result.artifacts.items()}
    assert sum(sizes.values()) < 200_000 and sizes[ARTIFACT] < 80_000, sizes


def test_a_multi_label_boundary_colours_each_label_set_and_a_resume_keeps_every_frame() -> None:
    configs = [TrialConfig(dataset="multilabel_2d", noise=0.1, epochs=12, lr=lr, seed=seed, **SMALL)
               for seed, lr in ((0, 0.01), (1, 0.03))]
    full, _, _, _ = _run(configs)
    _, _, _, data = _run(configs, stop_after=5)  # killed after its checkpoint at epoch 5
    resumed, _, _, _ = _run(configs, resume=job_state_from_bytes(data))
    for before, after in zip(full, resumed, strict=True):
        assert after.artifacts[ARTIFACT] == before.artifacts[ARTIFACT]
        assert after.artifacts[MULTILABEL_ARTIFACT] == before.artifacts[MULTILABEL_ARTIFACT]
    picture = full[0].artifacts["boundary_2d"]
    assert picture["class_names"] == ["none", "inside_circle", "above_line", "inside_circle + above_line"]
    assert set(np.unique(picture["predicted_class"])) <= {0, 1, 2, 3} and len(np.unique(picture["train_label"])) == 4
    frame = full[0].artifacts[ARTIFACT]["frames"][-1]
    assert decode_bytes(frame["predicted_class"]).max() <= 3
    probability = decode_bytes(frame["probability"]) / 255  # a label set's chance: at least 1/4 for 2 labels
    assert probability.min() >= 0.25 - 1 / 255 and torch.tensor(probability).max() <= 1


def test_a_stored_frame_that_would_inflate_past_its_cells_is_refused_without_inflating_it():
    import base64
    import zlib

    values = np.random.default_rng(0).integers(0, 256, 3600).astype(np.uint8)
    np.testing.assert_array_equal(decode_bytes(encode_bytes(values), most=3600), values)
    bomb = base64.b64encode(zlib.compress(bytes(50_000_000), 9)).decode()  # 50 MB of zeros in ~50 KB
    with pytest.raises(ValueError, match="more than 3600"):
        decode_bytes(bomb, most=3600)
    with pytest.raises(ValueError, match="more than 1000000"):
        decode_bytes(bomb)


def _old_way(monkeypatch) -> None:
    """The engine as it was before a trial's end shared its grid evaluation: every trial that ended
    took a last-epoch frame (even at its best epoch), and the best-epoch frames evaluated the grid
    again instead of reusing the end pictures' outputs."""
    frames = Snapshots.frames
    monkeypatch.setattr(Snapshots, "frames", lambda self, model, rows, *, metrics, outputs=None:
                        frames(self, model, rows, metrics=metrics))

    def take_snapshots(snapshots, training, running, rows, *, epoch):
        wanted = [row for row, trial in enumerate(running) if trial.index in rows
                  and (epoch in trial.planned or trial.status != "running")]
        metrics = [(epoch, rows[running[row].index].train_loss, rows[running[row].index].val_loss) for row in wanted]
        for row, frame in zip(wanted, snapshots.frames(training.model, wanted, metrics=metrics), strict=True):
            running[row].frames.append(frame)

    monkeypatch.setattr(fused, "_take_snapshots", take_snapshots)


def _grid_evaluations(monkeypatch, cells: int) -> tuple[list[int], list[int]]:
    """(every evaluation on the picture's ``cells`` inputs, those of each trial end) as a run goes."""
    evaluate, trial_results = StackedModel.evaluate, fused.trial_results
    everywhere, per_end = [], []

    def counted(self, x, **kwargs):
        if x.shape[0] == cells:
            everywhere.append(1)
        return evaluate(self, x, **kwargs)

    def ends(*args, **kwargs):
        before = len(everywhere)
        try:
            return trial_results(*args, **kwargs)
        finally:
            per_end.append(len(everywhere) - before)

    monkeypatch.setattr(StackedModel, "evaluate", counted)
    monkeypatch.setattr(fused, "trial_results", ends)
    return everywhere, per_end


# Trials that end at their best epoch and others past it, early stopping, a single trial: each kind
# of picture (boundary, multi-label boundary, fitted curve).
SHARED_EVALUATION = {
    "classification": ([dict(dataset="moons", noise=0.35, epochs=epochs, lr=lr, seed=seed, early_stopping=early)
                        for seed, (epochs, lr, early) in enumerate([(40, 0.02, None), (8, 0.01, None), (25, 0.05, None),
                                                                    (30, 0.2, None), (60, 0.05, {"patience": 3})])],
                       GRID * GRID),
    "one trial": ([dict(dataset="circles", noise=0.05, epochs=8, lr=0.01)], GRID * GRID),
    "fitted curve": ([dict(dataset="sine", epochs=epochs, lr=lr, seed=seed)
                      for seed, (epochs, lr) in enumerate([(30, 0.01), (40, 0.3), (20, 0.003)])], CURVE_POINTS),
    # a trial that diverges in its first epoch (no best weights, no pictures) ends with one that has them
    "no best beside a best": ([dict(dataset="sine", optimizer="sgd", lr=lr, seed=seed, epochs=epochs, batch_size=8)
                                for seed, (lr, epochs) in enumerate([(0.05, 1), (10.0, 5), (0.02, 5)])], CURVE_POINTS),
    "multi-label": ([dict(dataset="multilabel_2d", noise=0.1, epochs=30, lr=lr, seed=seed)
                     for seed, lr in ((0, 0.1), (1, 0.03))], GRID * GRID),
}


@pytest.mark.parametrize("case", SHARED_EVALUATION)
def test_a_trial_end_evaluates_the_grid_once_and_stores_what_two_evaluations_stored(monkeypatch, case) -> None:
    overrides, cells = SHARED_EVALUATION[case]
    configs = [TrialConfig(**{**SMALL, **override}) for override in overrides]
    with monkeypatch.context() as patches:
        now, per_end = _grid_evaluations(patches, cells)
        shared, _, _, _ = _run(configs)
    with monkeypatch.context() as patches:
        _old_way(patches)
        before, _ = _grid_evaluations(patches, cells)
        separate, _, _, _ = _run(configs)
    assert per_end and all(count == 1 for count in per_end), per_end  # the pictures' evaluation, reused
    assert len(now) < len(before)
    # a trial ended at its best epoch (no last-epoch frame of its own now), and (more than one trial)
    # another went on past it (its last-epoch frame is its own)
    ends = {result.best_epoch == result.final_metrics["final_epoch"] for result in shared if result.best_epoch}
    assert ends == ({True} if len(configs) == 1 or case == "no best beside a best" else {True, False}), ends
    for new, old in zip(shared, separate, strict=True):
        assert (new.artifacts[ARTIFACT]["frames"] if new.best_epoch else not new.artifacts)
        assert new.artifacts == old.artifacts
        assert json.dumps(new.artifacts) == json.dumps(old.artifacts)
        assert new.best_weights == old.best_weights and new.best_epoch == old.best_epoch
        drop = ("train_seconds",)
        assert ({k: v for k, v in new.final_metrics.items() if k not in drop}
                == {k: v for k, v in old.final_metrics.items() if k not in drop})


@pytest.mark.parametrize("width", [16, 64])  # several rows per evaluation, and one at a time
def test_a_snapshot_of_some_rows_evaluates_only_those_rows(width: int) -> None:
    # Trials of one stack that want a frame at an epoch are often not all of them (other epochs,
    # early stopping): the grid is evaluated for those rows alone, with the frames a full one gives.
    from torch.utils.flop_counter import FlopCounterMode

    from worker.training.data import make_dataset
    from worker.training.fused_stack import initial_rows
    from worker.training.models import build_model

    config = TrialConfig(**{**SMALL, "dataset": "moons", "width": width})
    splits = make_dataset(config)
    template = build_model(config, splits.n_features, splits.n_outputs, generator=torch.Generator())
    model = StackedModel(template, initial_rows(template, [torch.Generator().manual_seed(s) for s in range(6)]))
    snapshots = Snapshots.of(splits, device=torch.device("cpu"))
    metrics = [(1, 0.5, 0.6)] * 6
    with FlopCounterMode(display=False) as every:
        all_frames = snapshots.frames(model, list(range(6)), metrics=metrics)
    with FlopCounterMode(display=False) as some:
        frames = snapshots.frames(model, [4, 1], metrics=metrics[:2])
    assert frames == [all_frames[4], all_frames[1]]
    assert some.get_total_flops() * 3 == every.get_total_flops()
