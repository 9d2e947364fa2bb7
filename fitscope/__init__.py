"""fitscope from Python: submit grids of training runs, wait for them, and read the results as
pandas DataFrames, through the same functions as the `fitscope` command and the dashboard.

    import fitscope

    client = fitscope.connect()                      # FITSCOPE_* settings, as the CLI reads them
    experiment = client.submit("examples/quickstart.yaml", wait=True)
    trials = client.trials(experiment.id)            # one row per trial: parameters, final metrics
    epochs = client.epochs(experiment.id)            # one row per trial and epoch
    fitscope.charts.learning_curves(epochs, trials, "width")   # the dashboard's figures

``fitscope.charts`` is the dashboard's figure builders (dashboard/charts.py): a DataFrame in, a
Plotly figure out. Every error a user can cause is one of the exceptions below, with one sentence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fitscope.client import Client, Experiment, Validation, connect
from services.actions import ExperimentNotFound, NotQueued, SpecFileError
from services.config import ConfigError
from services.datasets import DatasetError
from services.db import DatabaseUnreachable, SchemaNotAtHead
from services.progress import WaitTimedOut
from services.queue import BrokerUnreachable
from services.spec import SpecError

if TYPE_CHECKING:
    from dashboard import charts

__all__ = [
    "BrokerUnreachable", "Client", "ConfigError", "DatabaseUnreachable", "DatasetError", "Experiment",
    "ExperimentNotFound", "NotQueued", "SchemaNotAtHead", "SpecError", "SpecFileError", "Validation",
    "WaitTimedOut", "charts", "connect", "__version__",
]


def __getattr__(name: str):
    # Plotly loads only when a figure is wanted.
    if name == "charts":
        from dashboard import charts

        return charts
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("fitscope")
        except PackageNotFoundError:
            return "unknown"
    raise AttributeError(f"module 'fitscope' has no attribute {name!r}")
