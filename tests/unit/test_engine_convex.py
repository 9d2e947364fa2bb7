"""On convex problems, training long enough reaches the known optimum within 1%."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from services.trial_config import TrialConfig
from worker.training import train_trial
from worker.training.data import make_dataset


@pytest.mark.parametrize("poly_degree", [1, 3])
def test_linear_regression_reaches_the_least_squares_loss(poly_degree: int) -> None:
    # Linear regression on the features [x, x^2, ..., x^d] is convex: its optimum is least squares.
    config = TrialConfig(dataset="sine", n_train=200, n_val=50, n_test=0, noise=0.2, model="linear",
                         poly_degree=poly_degree, loss="mse", optimizer="adam", lr=0.1, batch_size="full",
                         epochs=300, schedule="cosine")
    result = train_trial(config)

    x = make_dataset(config).x_train.double()
    y = make_dataset(config).y_train.double()
    design = torch.cat([x ** k for k in range(1, poly_degree + 1)] + [torch.ones_like(x)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution
    optimum = (design @ solution - y).square().mean().item()

    assert result.status == "succeeded"
    assert result.final_metrics["final_train_loss"] == pytest.approx(optimum, rel=0.01)
    assert result.final_metrics["final_train_loss"] >= optimum * (1 - 1e-4)  # nothing beats the optimum


@pytest.mark.parametrize("loss", ["bce", "cross_entropy"])
def test_logistic_regression_reaches_scikit_learns_optimum(loss: str) -> None:
    config = TrialConfig(dataset="moons", n_train=300, n_val=50, n_test=0, noise=0.3, model="linear", loss=loss,
                         optimizer="adam", lr=0.1, batch_size="full", epochs=300, schedule="cosine")
    result = train_trial(config)

    splits = make_dataset(config)
    x, y = splits.x_train.double().numpy(), splits.y_train.numpy()
    reference = LogisticRegression(C=1e12, solver="lbfgs", max_iter=10_000, tol=1e-12).fit(x, y)
    optimum = log_loss(y, reference.predict_proba(x))

    assert result.status == "succeeded"
    assert result.final_metrics["final_train_loss"] == pytest.approx(optimum, rel=0.01)
    assert result.final_metrics["final_train_loss"] >= optimum * (1 - 1e-3)
    # The data-set baseline (the class prior) is ln 2 for balanced classes, well above the optimum.
    assert result.final_metrics["baseline_train_loss"] == pytest.approx(np.log(2), rel=1e-5)
