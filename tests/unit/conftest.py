"""Unit tests train tiny models: several torch threads only add synchronisation (and contention on a
busy 2-core machine), so each unit test runs on one, as a worker's training process does."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def keep_model(monkeypatch):
    """Train one trial and also hand back its final weights (the best epoch's, as the trial ends):
    ``run(config, rows) -> (result, module, splits, stacked)``, with ``module`` the trial's own
    nn.Module holding them and ``stacked`` the engine's stack of one that held them."""
    from worker.training import fused_results, train_trial
    from worker.training.data import make_dataset
    from worker.training.fused_stack import module_weights
    from worker.training.losses import model_outputs, resolve_loss
    from worker.training.models import build_model

    kept: dict = {}
    original = fused_results.stacked_prediction_artifacts

    def capture(model, has_best, **kwargs):
        kept["stacked"] = model
        return original(model, has_best, **kwargs)

    monkeypatch.setattr(fused_results, "stacked_prediction_artifacts", capture)

    def run(config, rows: list | None = None):
        result = train_trial(config, on_epoch=rows.append if rows is not None else lambda metrics: None)
        stacked, splits = kept["stacked"], make_dataset(config)
        outputs = model_outputs(resolve_loss(config, task=splits.task, n_classes=splits.n_outputs), splits.n_outputs)
        module = build_model(config, splits.n_features, outputs, task=splits.task)
        missing, unexpected = module.load_state_dict(module_weights(stacked.template, stacked.flat()[0]), strict=False)
        assert not unexpected and all(name.endswith("num_batches_tracked") for name in missing)
        return result, module.eval(), splits, stacked

    return run
