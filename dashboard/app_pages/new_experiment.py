"""New experiment: start from an example grid, build one with widgets, or paste/upload YAML; add
your own CSV data set; see what `fitscope validate` would say while you edit; one click submits it
through the same path as `fitscope submit` (one transaction, then the queue messages)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, get_args

import streamlit as st
import yaml

from dashboard import actions, data
from services.datasets import DatasetError
from services.db import DatabaseUnreachable
from services.queue import BrokerUnreachable
from services.safe_text import markdown_text, terminal_text
from services.spec import SpecError
from services.trial_config import BuiltinDataset, Optimizer, Schedule

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_GRIDS = {  # label -> file in examples/; each finishes in a minute or two on one CPU worker
    "Capacity vs data size": "capacity_vs_data.yaml",
    "Regularizers": "regularizers.yaml",
    "Optimizers and schedules": "optimizers_and_schedules.yaml",
    "Learning-rate range test": "lr_range_test.yaml",
    "Vanishing gradients": "vanishing_gradients.yaml",
    "Loss surfaces (2-D test functions)": "loss_surfaces.yaml",
    # Fine-tuning: the parent first; the second names it by trial id (1 on a fresh database: edit it in YAML).
    "Fine-tuning 1: the pre-trained parent": "fine_tuning_parent.yaml",
    "Fine-tuning 2: fine-tuned vs from scratch": "fine_tuning.yaml",
}
SOURCES = ("Example grid", "Widgets", "YAML")

# Session-state keys, prefixed with the page's name.
SOURCE = "new_source"
YAML_TEXT = "new_yaml"
YAML_FILE = "new_yaml_file"
YAML_FILE_ERROR = "new_yaml_file_error"
CSV_FILE = "new_csv_file"
CSV_ERROR = "new_csv_error"
UPLOADS = "new_uploads"  # name -> actions.StoredCsv, the CSV data sets stored from this browser session
SUBMITTER = "new_submitted_by"
SUBMITTED = "new_submitted"  # the last submission: experiment id, name, trials
SUBMIT_ERROR = "new_submit_error"

# Choices the grid widgets offer; anything else can be written in YAML.
WIDTHS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DEPTHS = (0, 1, 2, 3, 4, 6, 8)
TRAINING_SIZES = (20, 50, 100, 200, 500, 1000, 2000, 5000)
WEIGHT_DECAYS = (0.0, 0.0001, 0.001, 0.01, 0.1, 1.0)
DROPOUTS = (0.0, 0.1, 0.2, 0.3, 0.5)
L1_PENALTIES = (0.0, 0.00001, 0.0001, 0.001, 0.01)
INPUT_NOISES = (0.0, 0.05, 0.1, 0.2, 0.5)
PATIENCES = (5, 10, 20, 50)  # early stopping: epochs without a better validation loss
MOMENTA = (0.0, 0.5, 0.9, 0.95, 0.99)
LEARNING_RATES = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
BATCH_SIZES = (16, 32, 64, 128, 256, "full")


# --- where the spec comes from ---------------------------------------------------------------------

def edit_as_yaml(text: str) -> None:
    """Carry a spec into the YAML editor, to change what the widgets cannot."""
    st.session_state[YAML_TEXT] = text
    st.session_state[SOURCE] = "YAML"


def example_grid() -> str:
    available = {label: name for label, name in EXAMPLE_GRIDS.items() if (EXAMPLES_DIR / name).is_file()}
    if not available:
        st.info(f"The example grids are read from {EXAMPLES_DIR}, which this installation does not have; "
                "build a grid with the widgets or paste YAML instead.")
        return ""
    label = st.selectbox("Example grid", list(available), key="new_example")
    text = (EXAMPLES_DIR / available[label]).read_text(encoding="utf-8")
    st.code(text, language="yaml")
    st.button("Edit as YAML", key="new_example_edit", icon=":material/edit:", on_click=edit_as_yaml, args=(text,))
    return text


def grid_widgets(uploads: dict[str, actions.StoredCsv]) -> str:
    """The grid as widgets: one choice per parameter, several values make an axis of the grid."""
    csv_options = {f"csv: {name}": {"csv": name, "target": stored.target, "missing": stored.missing}
                   for name, stored in uploads.items()}
    name_col, description_col = st.columns([1, 2])
    name = name_col.text_input("Name", value="my-grid", key="new_w_name", max_chars=200)
    description = description_col.text_input("Description", key="new_w_description")
    data_col, model_col, regular_col = st.columns(3)
    datasets = data_col.multiselect("Data sets", [*get_args(BuiltinDataset), *csv_options], default=["moons"],
                                    key="new_w_datasets", help="Upload a CSV below to add your own.")
    n_train = data_col.multiselect("Training-set sizes (n_train)", TRAINING_SIZES, key="new_w_n_train",
                                   help="None chosen: the data set's default (200 synthetic rows, all real rows).")
    widths = model_col.multiselect("Widths (units per hidden layer)", WIDTHS, default=[8, 64], key="new_w_widths")
    depths = model_col.multiselect("Depths (hidden layers)", DEPTHS, default=[2], key="new_w_depths")
    weight_decay = regular_col.multiselect("Weight decay", WEIGHT_DECAYS, default=[0.0], key="new_w_weight_decay")
    dropout = regular_col.multiselect("Dropout", DROPOUTS, default=[0.0], key="new_w_dropout")
    l1 = regular_col.multiselect("L1 penalty", L1_PENALTIES, default=[0.0], key="new_w_l1",
                                 help="Added to the loss on the weights (not biases): pushes weights to exactly 0.")
    input_noise = regular_col.multiselect("Input noise (std)", INPUT_NOISES, default=[0.0], key="new_w_input_noise",
                                          help="Gaussian noise added to the training inputs at every step.")
    patiences = regular_col.multiselect("Early stopping (patience)", PATIENCES, key="new_w_patience",
                                        help="None chosen: no early stopping. Otherwise stop after this many "
                                             "epochs without a better validation loss and keep the best weights.")
    optim_col, schedule_col, run_col = st.columns(3)
    optimizers = optim_col.multiselect("Optimizers", get_args(Optimizer), default=["adam"], key="new_w_optimizers")
    learning_rates = optim_col.multiselect("Learning rates", LEARNING_RATES, default=[0.01], key="new_w_lrs")
    momenta = optim_col.multiselect("Momentum", MOMENTA, default=[0.9], key="new_w_momentum",
                                    help="Used by the momentum and nesterov optimizers (SGD) only.")
    schedules = schedule_col.multiselect("Schedules", get_args(Schedule), default=["constant"], key="new_w_schedules")
    batch_size = schedule_col.selectbox("Batch size", BATCH_SIZES, index=1, key="new_w_batch_size")
    seeds = run_col.number_input("Seeds per configuration", 1, 20, 2, key="new_w_seeds")
    epochs = run_col.number_input("Epochs", 1, 100_000, 50, key="new_w_epochs")
    axes: dict[str, list[Any]] = {
        "dataset": [csv_options.get(choice, choice) for choice in datasets], "n_train": n_train,
        "depth": depths, "width": widths, "weight_decay": weight_decay, "dropout": dropout, "l1": l1,
        "input_noise": input_noise, "early_stopping": [{"patience": int(patience)} for patience in patiences],
        "optimizer": optimizers, "lr": learning_rates, "schedule": schedules,
        "momentum": momenta if set(optimizers) & {"momentum", "nesterov"} else [],
        "batch_size": [batch_size], "epochs": [int(epochs)],
        # A range test starts from min_lr: four decades below the smallest rate (lr is where it ends).
        "min_lr": [min(learning_rates) / 1e4] if "lr_range_test" in schedules and learning_rates else [],
    }
    spec: dict[str, Any] = {"name": name.strip(), "description": description.strip() or None, "method": "grid",
                            "metric": {"name": "val_loss", "goal": "minimize"}, "seeds": list(range(int(seeds))),
                            "parameters": {key: _axis(values) for key, values in axes.items() if values}}
    if spec["description"] is None:
        del spec["description"]
    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100)
    with st.expander("The grid as YAML", expanded=False):
        st.code(text, language="yaml")
        st.button("Edit as YAML", key="new_widgets_edit", icon=":material/edit:", on_click=edit_as_yaml, args=(text,))
    return text


def _axis(values: list[Any]) -> dict[str, Any]:
    return {"value": values[0]} if len(values) == 1 else {"values": list(values)}


def yaml_uploaded() -> None:
    """Put an uploaded spec file into the editor, or say why it cannot be read."""
    st.session_state.pop(YAML_FILE_ERROR, None)
    uploaded = st.session_state.get(YAML_FILE)
    if uploaded is None:
        return
    content, limit = uploaded.getvalue(), data.settings().max_spec_bytes
    if len(content) > limit:
        st.session_state[YAML_FILE_ERROR] = (f"{uploaded.name} is {len(content)} bytes, over the cap of {limit} "
                                             "(FITSCOPE_MAX_SPEC_BYTES); a spec lists values, not data.")
        return
    try:
        st.session_state[YAML_TEXT] = content.decode("utf-8")
    except UnicodeDecodeError:
        st.session_state[YAML_FILE_ERROR] = f"{uploaded.name} is not UTF-8 text; save it as UTF-8 and upload it again."


def yaml_editor() -> str:
    st.file_uploader("Upload a spec file", type=["yaml", "yml"], key=YAML_FILE, on_change=yaml_uploaded,
                     help="Its text replaces the editor's.")
    if YAML_FILE_ERROR in st.session_state:
        st.error(markdown_text(st.session_state[YAML_FILE_ERROR]))
    return st.text_area("Spec (YAML)", key=YAML_TEXT, height=420,
                        placeholder="name: my-grid\nparameters:\n  width: {values: [8, 64]}\n  lr: {value: 0.01}")


# --- your own data ---------------------------------------------------------------------------------

def store_csv_clicked(target: str | None, missing: str) -> None:
    st.session_state.pop(CSV_ERROR, None)
    uploaded = st.session_state.get(CSV_FILE)
    if uploaded is None:
        return
    try:
        stored = actions.store_csv(file_name=uploaded.name, content=uploaded.getvalue(), target=target or "",
                                missing=missing)
    except DatasetError as exc:
        st.session_state[CSV_ERROR] = str(exc)
        return
    except DatabaseUnreachable as exc:
        st.session_state[CSV_ERROR] = data.sentence(str(exc))
        return
    st.session_state[UPLOADS][stored.name] = stored


def csv_uploader(uploads: dict[str, actions.StoredCsv]) -> None:
    with st.expander("Your own data (CSV)", expanded=bool(uploads) or CSV_ERROR in st.session_state):
        st.caption("A header row, numeric feature columns and a target column; an optional `split` column says "
                   "train/val/test per row. It is checked like `fitscope submit` checks a spec's CSV, then stored "
                   "in the database so every worker trains on the same rows.")
        uploaded = st.file_uploader("CSV data set", type=["csv"], key=CSV_FILE)
        columns = _header(uploaded.getvalue()) if uploaded is not None else []
        target_col, missing_col = st.columns(2)
        if columns:
            target = target_col.selectbox("Target column", columns, index=len(columns) - 1, key="new_csv_target")
        else:
            target = target_col.text_input("Target column", key="new_csv_target_name")
        missing = missing_col.selectbox("Missing values", ("error", "drop_rows", "mean"), key="new_csv_missing",
                                        help="error: refuse empty cells; drop_rows: drop those rows; mean: fill "
                                             "feature cells with the training mean.")
        st.button("Check and store", key="new_csv_store", icon=":material/upload:", disabled=uploaded is None,
                  on_click=store_csv_clicked, args=(target, missing))
        if CSV_ERROR in st.session_state:
            st.error(markdown_text(st.session_state[CSV_ERROR]))
        for name, stored in uploads.items():
            name, target = markdown_text(name), markdown_text(stored.target)
            st.success(f"{name}: {stored.rows} rows, {len(stored.columns)} columns, target {target} "
                       f"({stored.task}). Choose csv: {name} among the data sets, or write "
                       f"dataset: {{csv: {name}, target: {target}}} in YAML.", icon=":material/table:")


def _header(content: bytes) -> list[str]:
    """The column names on a CSV's first line, to choose the target from; [] when it cannot be read
    (the checks then say why)."""
    try:
        first_line = content[:65_536].decode("utf-8-sig").splitlines()[0]
        return [name.strip() for name in next(csv.reader(io.StringIO(first_line))) if name.strip()]
    except (UnicodeDecodeError, IndexError, StopIteration, csv.Error):
        return []


# --- what validate says, and submitting -------------------------------------------------------------

def validation(spec_text: str, uploads: dict[str, str]) -> actions.SpecPreview | None:
    """The live preview: the trial count as `fitscope validate` prints it, or its every problem."""
    if not spec_text.strip():
        st.info("Paste a spec, upload one, or start from an example grid.", icon=":material/edit_note:")
        return None
    found = actions.preview(spec_text, uploads)
    if found.warnings:
        st.warning(_lines("warning", found.warnings))
    if found.problems:
        st.error(f"`fitscope validate` would refuse this spec:\n\n{_lines('error', found.problems)}")
        return found
    st.metric("Trials", found.trials)
    st.caption(f"{markdown_text(found.name)}: {found.trials} trials ({found.method}, {found.seeds} seed(s))")
    return found


def _lines(prefix: str, messages: tuple[str, ...]) -> str:
    """The messages as a code block, shown literally: its fence is longer than any run of backticks
    inside (a spec's own text may hold some), and control characters are shown as escapes."""
    text = "\n".join(f"{prefix}: {terminal_text(message)}" for message in messages)
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}\n{text}\n{fence}"


def submit_form(spec_text: str, found: actions.SpecPreview | None, uploads: dict[str, str]) -> None:
    who_col, tags_col = st.columns(2)
    submitted_by = who_col.text_input("Submitted by", key=SUBMITTER, max_chars=actions.MAX_SUBMITTER_CHARS,
                                      disabled=actions.signed_in(),
                                      help="You, as you signed in." if actions.signed_in() else None)
    tags_text = tags_col.text_input("Tags", key="new_tags", placeholder="capacity, moons",
                                    help=f"Separated by commas; at most {actions.MAX_TAGS}, each at most "
                                         f"{actions.MAX_TAG_CHARS} characters. The Experiments page searches them.")
    note = st.text_area("Note", key="new_note", height=80, max_chars=actions.MAX_NOTE_CHARS,
                        placeholder="What you expect to see, and why.")
    ready = found is not None and not found.problems
    label = f"Submit {found.trials} trials" if ready else "Submit"
    if st.button(label, key="new_submit", type="primary", icon=":material/send:", disabled=not ready):
        st.session_state.pop(SUBMIT_ERROR, None)
        st.session_state[SUBMITTED] = _submit(spec_text, found.name, submitted_by, tags_text, note, uploads)
    if SUBMIT_ERROR in st.session_state:
        st.error(markdown_text(st.session_state[SUBMIT_ERROR]))
    if last := st.session_state.get(SUBMITTED):
        st.success(f"Experiment #{last['id']} ({markdown_text(last['name'])}) submitted: {last['trials']} trials "
                   "queued.",
                   icon=":material/check_circle:")
        open_col, fit_col = st.columns(2)
        open_col.page_link("app_pages/experiment.py", label=f"Open experiment #{last['id']}",
                           icon=":material/monitoring:", query_params={"experiment": str(last["id"])})
        fit_col.page_link("app_pages/fit_analysis.py", label="Fit analysis", icon=":material/insights:",
                          query_params={"experiment": str(last["id"])})


def _submit(spec_text: str, name: str, submitted_by: str, tags_text: str, note: str,
            uploads: dict[str, str]) -> dict[str, Any] | None:
    """Submit and return what to show; on a problem, keep its sentence for the error box and return None."""
    try:
        who, tags, note_text = actions.check_fields(submitted_by=submitted_by, tags_text=tags_text, note=note)
        submitted = actions.submit(spec_text=spec_text, submitted_by=who, tags=tags, note=note_text, uploads=uploads)
    except SpecError as exc:
        st.session_state[SUBMIT_ERROR] = _lines("error", tuple(exc.problems))
        return None
    except DatasetError as exc:
        st.session_state[SUBMIT_ERROR] = str(exc)
        return None
    except (actions.FieldError, BrokerUnreachable, DatabaseUnreachable) as exc:
        st.session_state[SUBMIT_ERROR] = data.sentence(str(exc))
        return None
    return {"id": submitted.experiment_id, "name": name, "trials": len(submitted.trials)}


# --- the page --------------------------------------------------------------------------------------

st.session_state.setdefault(UPLOADS, {})
st.session_state.setdefault(SOURCE, SOURCES[0])
if SUBMITTER not in st.session_state or actions.signed_in():
    st.session_state[SUBMITTER] = actions.default_submitter()
uploads: dict[str, actions.StoredCsv] = st.session_state[UPLOADS]
upload_hashes = {name: stored.sha256 for name, stored in uploads.items()}

st.title("New experiment")
source = st.radio("Start from", SOURCES, key=SOURCE, horizontal=True, label_visibility="collapsed")
if source == "Example grid":
    spec_text = example_grid()
elif source == "Widgets":
    spec_text = grid_widgets(uploads)
else:
    spec_text = yaml_editor()
csv_uploader(uploads)
st.subheader("Check and submit")
found = validation(spec_text, upload_hashes)
submit_form(spec_text, found, upload_hashes)
