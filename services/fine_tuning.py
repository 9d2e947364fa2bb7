"""Fine-tuning at submit: a trial with ``init_from: TRIAL_ID`` starts from the best-epoch weights that
a finished trial of the same database kept (worker/training/fine_tuning.py writes and reads them as a
TrialArtifact of kind WEIGHTS_KIND). Checked here, inside the submission's transaction, so a spec
whose parent is missing, unfinished, or has another first layer is one sentence and no rows.

Pure but for the session it is handed: no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from services.trial_config import MULTILABEL_2D_LABELS, TrialConfig

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

WEIGHTS_KIND = "best_weights"  # the TrialArtifact kind of a trial's kept best-epoch weights
WEIGHTS_FORMAT = "fitscope-weights-1"
# Numbers a trial may keep (float32, base64 in JSON: ~530 KB); larger models keep none and cannot be
# fine-tuned from. Width 256 at depth 2 on 64 inputs is ~83,000.
MAX_KEPT_WEIGHTS = 100_000


def first_layer_shape(config: TrialConfig, *, csv_shape: tuple[int, int] | None = None) -> tuple[int | None, int]:
    """(outputs, inputs) of the trial's first linear layer, as the engine will build it; outputs is
    None where only the data can say (the classes of a CSV's linear model)."""
    from services.admission import _shape, polynomial_feature_count

    _, _, _, inputs, outputs = _shape(config, csv_shape)
    if config.task == "regression" and config.poly_degree > 1:
        inputs = polynomial_feature_count(inputs, config.poly_degree)
    if config.model == "mlp" and config.depth > 0:
        return config.width, inputs
    if config.task == "regression":
        return 1, inputs
    if config.multilabel:  # one output per label
        return (len(MULTILABEL_2D_LABELS) if isinstance(config.dataset, str) else len(config.dataset.target)), inputs
    if config.resolved_loss == "bce":
        return 1, inputs
    return (None if not isinstance(config.dataset, str) else outputs), inputs


def parent_problems(session: Session, configs: Iterable[TrialConfig], *,
                    csv_shape_of: Callable[[TrialConfig], tuple[int, int] | None] = lambda _: None) -> list[str]:
    """One sentence for the first trial whose ``init_from`` cannot be honoured: no such trial, not
    finished, no kept weights, or a first layer of another shape (both named). Empty when all can."""
    from sqlalchemy import select

    from services.models import Trial, TrialArtifact, TrialStatus

    configs = list(configs)
    wanted = sorted({config.init_from for config in configs if config.init_from is not None})
    if not wanted:
        return []
    status = dict(session.execute(select(Trial.id, Trial.status).where(Trial.id.in_(wanted))).all())
    kept = dict(session.execute(select(TrialArtifact.trial_id, TrialArtifact.data).where(
        TrialArtifact.trial_id.in_(wanted), TrialArtifact.kind == WEIGHTS_KIND)).all())
    for ordinal, config in enumerate(configs, start=1):
        parent = config.init_from
        if parent is None:
            continue
        where = f"parameters.init_from: trial {ordinal} starts from trial {parent}, which"
        if parent not in status:
            return [f"{where} does not exist in this database; take the id of a finished trial from "
                    "`fitscope export ID --what trials` or its Trial page"]
        if status[parent] != TrialStatus.succeeded:
            return [f"{where} is {status[parent]}, not succeeded; wait for it to finish or start from a trial "
                    "that succeeded"]
        if parent not in kept:
            return [f"{where} kept no weights (a model of more than {MAX_KEPT_WEIGHTS:,} numbers keeps none); "
                    "start from a smaller trial"]
        theirs = _first_layer(kept[parent])
        outputs, inputs = first_layer_shape(config, csv_shape=csv_shape_of(config))
        if theirs is None or theirs[1] != inputs or (outputs is not None and theirs[0] != outputs):
            shown = "?" if outputs is None else outputs
            return [f"{where} has a first layer of {_text(theirs)} but this trial's is {shown} x {inputs} "
                    "(outputs x inputs); fine-tune on data with as many input features and the same width"]
    return []


def _first_layer(artifact: dict) -> tuple[int, int] | None:
    layers = artifact.get("layers") or []
    if not layers or not layers[0].get("shapes"):
        return None
    shape = layers[0]["shapes"][0]
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


def _text(shape: tuple[int, int] | None) -> str:
    return "unknown shape" if shape is None else f"{shape[0]} x {shape[1]}"
