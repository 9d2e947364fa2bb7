"""The dashboard against a real migrated SQLite database, filled by the real code paths: a spec is
submitted, trials are claimed and trained by the torch engine (or given up on, as when the worker
running them keeps dying), and pages are run with Streamlit's AppTest. The broker is a real Valkey."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import redis
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard import charts
from services.broker import free_port
from services.db import make_engine, session_scope
from services.migrate import upgrade
from services.models import Trial
from services.spec import parse_spec
from services.submission import Submitted, submit
from services.trials import claim_trial

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
EXPERIMENT_PAGE = "app_pages/experiment.py"

# Three tiny trials: two train for three epochs, the third is given up on (a failed trial).
TRAINED_SPEC = """
name: widths-on-moons
method: grid
seeds: [0]
parameters:
  dataset: {value: moons}
  n_train: {value: 32}
  n_val: {value: 32}
  n_test: {value: 16}
  batch_size: {value: full}
  epochs: {value: 3}
  width: {values: [4, 16, 32]}
"""
QUEUED_SPEC = """
name: still-waiting
seeds: [0, 1]
parameters:
  dataset: {value: circles}
  epochs: {value: 2}
  lr: {values: [0.01, 0.1]}
"""
GAVE_UP = "gave up after 1 attempts"


@dataclass(frozen=True)
class Filled:
    url: str
    trained: int  # experiment id: 2 succeeded, 1 failed
    queued: int  # experiment id: 4 queued trials, none started


def submit_spec(engine, text: str) -> Submitted:
    with session_scope(engine) as session:
        return submit(session, spec=parse_spec(text), spec_text=text, submitted_by="tester", max_trials=100)


def train(engine, trial_id: int) -> str:
    """What a worker does with a message: claim the trial, then run the real engine on it."""
    from worker.jobs import execute_job

    return execute_job(engine, [trial_id], worker="test-worker", redelivered=False)[str(trial_id)]


def give_up(engine, trial_id: int) -> None:
    """A worker claims the trial and dies; the re-delivered message finds it out of attempts."""
    with session_scope(engine) as session:
        assert claim_trial(session, trial_id, worker="dies", max_attempts=1) is not None
    with session_scope(engine) as session:
        assert claim_trial(session, trial_id, worker="next", max_attempts=1, redelivered=True) is None


@pytest.fixture(scope="module")
def _filled_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, int]:
    """One migrated, filled database per module (training takes a while); each test gets a copy."""
    path = tmp_path_factory.mktemp("filled") / "fitscope.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    try:
        trained = submit_spec(engine, TRAINED_SPEC)
        first, second, third = trained.trial_ids
        assert [train(engine, first), train(engine, second)] == ["succeeded", "succeeded"]
        give_up(engine, third)
        queued = submit_spec(engine, QUEUED_SPEC)
    finally:
        engine.dispose()  # the last connection to close checkpoints the WAL into the file
    return path, trained.experiment_id, queued.experiment_id


@pytest.fixture
def filled(_filled_template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Filled:
    template, trained, queued = _filled_template
    shutil.copyfile(template, tmp_path / "fitscope.db")
    url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", url)
    return Filled(url=url, trained=trained, queued=queued)


def run_app(*, page: str | None = None, query: dict[str, str] | None = None) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=60)
    app.run()
    assert not app.exception, app.exception
    if page is not None:
        app.query_params.update(query or {})
        app.switch_page(page).run()
        assert not app.exception, app.exception
    return app


def statuses(engine, experiment_id: int) -> list[str]:
    with session_scope(engine) as session:
        return [t.status for t in session.query(Trial).filter_by(experiment_id=experiment_id).order_by(Trial.ordinal)]


def markdown_text(app: AppTest) -> str:
    return "\n".join(element.value for element in app.markdown)


def plotly_figures(app: AppTest) -> list[dict]:
    return [figure_spec(element) for element in app.get("plotly_chart")]


def figure_spec(element) -> dict:
    """A plotly chart element's figure as the browser gets it, with plotly's typed arrays (numpy data
    travels as {"dtype", "bdata": base64}, which plotly.js decodes) turned back into lists."""
    return _plain(json.loads(element.proto.spec))


def _plain(value):
    import base64

    import numpy as np

    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            shape = [int(n) for n in str(value.get("shape", len(array))).split(",")]  # e.g. "60, 60"
            return array.reshape(shape).tolist()
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


# --- the experiments page -------------------------------------------------------------------------

def test_experiments_page_lists_every_experiment_with_counts_and_progress(filled: Filled):
    app = run_app()

    text = markdown_text(app)
    assert f"#{filled.trained} widths-on-moons" in text and f"#{filled.queued} still-waiting" in text
    assert "2 succeeded" in text and "1 failed" in text and "4 queued" in text
    assert [bar.proto.value for bar in app.get("progress")] == [0, 100]  # newest (all queued) first
    (figure,) = plotly_figures(app)
    assert [trace["name"] for trace in figure["data"]] == list(charts.STATUS_ORDER)
    assert {button.label for button in app.get("download_button")} == {"Trials CSV", "Epochs CSV"}
    links = {link.proto.query_string for link in app.get("page_link") if link.proto.page == "experiment"}
    assert links == {f"experiment={filled.trained}", f"experiment={filled.queued}"}
    assert "fitscope.db" in app.sidebar.caption[0].value


def test_experiments_page_on_an_empty_database_says_how_to_submit(migrated_sqlite_url, monkeypatch):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    app = run_app()
    assert "fitscope submit examples/quickstart.yaml" in app.info[0].value
    assert not app.get("plotly_chart")


def test_cancel_button_cancels_the_queued_trials_in_the_database(filled: Filled, engine_for):
    app = run_app()
    assert app.button(key=f"experiments_cancel_{filled.trained}").disabled  # nothing left to cancel

    app.button(key=f"experiments_cancel_{filled.queued}").click().run()

    assert statuses(engine_for(filled.url), filled.queued) == ["cancelled"] * 4
    assert "4 cancelled" in markdown_text(app)
    assert "4 queued trials cancelled" in app.toast[0].value


def test_requeue_button_resets_failed_trials_and_sends_them_to_the_broker(filled: Filled, broker_url, engine_for,
                                                                           monkeypatch):
    monkeypatch.setenv("FITSCOPE_BROKER_URL", broker_url)
    app = run_app()

    app.button(key=f"experiments_requeue_{filled.trained}").click().run()

    assert not app.error
    assert statuses(engine_for(filled.url), filled.trained) == ["succeeded", "succeeded", "queued"]
    client = redis.Redis.from_url(broker_url)
    try:
        assert client.llen("cpu") == 1
    finally:
        client.close()
    assert "1 trials re-queued" in app.toast[0].value


def test_requeue_with_a_dead_broker_is_one_sentence_and_changes_nothing(filled: Filled, engine_for, monkeypatch):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("FITSCOPE_BROKER_URL", dead)
    app = run_app()

    app.button(key=f"experiments_requeue_{filled.trained}").click().run()

    assert len(app.error) == 1
    assert app.error[0].value.startswith(f"Cannot reach the broker at {dead}")
    assert "Traceback" not in app.error[0].value
    assert statuses(engine_for(filled.url), filled.trained) == ["succeeded", "succeeded", "failed"]


def test_csv_exports_hold_every_trial_and_every_epoch(filled: Filled):
    from dashboard import data

    trials = pd.read_csv(pd.io.common.StringIO(data.csv_export(filled.trained, "trials")()))
    epochs = pd.read_csv(pd.io.common.StringIO(data.csv_export(filled.trained, "epochs")()))

    assert trials["status"].tolist() == ["succeeded", "succeeded", "failed"]
    assert trials["width"].tolist() == [4, 16, 32]
    assert len(epochs) == 2 * 3 and set(epochs.columns) >= {"trial_id", "epoch", "train_loss", "val_loss"}


def test_a_csv_export_whose_database_went_away_is_one_sentence(filled: Filled):
    from dashboard import data

    render = data.csv_export(filled.trained, "epochs")  # the page is drawn; the click comes later
    st.cache_resource.clear()  # close the engine's connections, then lose the file
    Path(filled.url.removeprefix("sqlite:///")).unlink()

    text = render()

    assert text.startswith(f"Could not read experiment {filled.trained}'s epochs from the database at sqlite:///")
    assert "Traceback" not in text and len(text.splitlines()) == 1


# --- the experiment page --------------------------------------------------------------------------

def test_experiment_page_shows_trials_curves_and_the_error_of_a_failed_trial(filled: Filled):
    app = run_app(page=EXPERIMENT_PAGE, query={"experiment": str(filled.trained)})

    assert app.subheader[0].value == f"#{filled.trained} widths-on-moons"
    assert app.selectbox(key="experiment_selected").value == filled.trained
    assert GAVE_UP in app.error[0].value and "Trial 2" in app.error[0].value
    colour_by = app.selectbox(key=f"experiment_colour_by_{filled.trained}")
    assert colour_by.options == ["width"]  # the only parameter that varies
    (figure,) = plotly_figures(app)
    assert len(figure["data"]) == 2 * 2  # two trained trials, train and validation each
    assert [trace["line"]["dash"] for trace in figure["data"]] == ["solid", "dash"] * 2
    table = app.dataframe[0].value
    assert table["status"].tolist() == ["succeeded", "succeeded", "failed"]
    assert table["width"].tolist() == [4, 16, 32]
    assert GAVE_UP in table["error"].iloc[2]
    assert table["final_val_loss"].notna().sum() == 2


def test_experiment_page_before_any_epoch_shows_the_waiting_message(filled: Filled):
    app = run_app(page=EXPERIMENT_PAGE, query={"experiment": str(filled.queued)})

    assert app.subheader[0].value == f"#{filled.queued} still-waiting"
    assert any("No trial has finished an epoch yet" in info.value for info in app.info)
    assert not app.get("plotly_chart")
    assert app.dataframe[0].value["status"].tolist() == ["queued"] * 4


def test_experiment_page_follows_the_selectbox(filled: Filled):
    app = run_app(page=EXPERIMENT_PAGE)
    assert app.subheader[0].value.startswith(f"#{filled.queued} ")  # the newest by default

    app.selectbox(key="experiment_selected").select(filled.trained).run()

    assert app.subheader[0].value.startswith(f"#{filled.trained} ")
    assert app.query_params["experiment"] == str(filled.trained)


def test_experiment_page_on_an_empty_database_says_how_to_submit(migrated_sqlite_url, monkeypatch):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    app = run_app(page=EXPERIMENT_PAGE)
    assert "fitscope submit examples/quickstart.yaml" in app.info[0].value


# --- a database that cannot be used ---------------------------------------------------------------

def test_a_database_without_the_schema_names_the_upgrade_command(sqlite_url, monkeypatch):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", sqlite_url)
    app = run_app()
    assert len(app.error) == 1
    assert "no fitscope schema yet" in app.error[0].value and "fitscope db upgrade" in app.error[0].value


def test_a_bad_setting_is_one_sentence_naming_the_variable(migrated_sqlite_url, monkeypatch):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    monkeypatch.setenv("FITSCOPE_BROKER_URL", "http://localhost:6379")
    app = run_app()
    assert len(app.main.error) == 1
    assert app.main.error[0].value.startswith("FITSCOPE_BROKER_URL='http://localhost:6379' is not a Redis URL")


def test_an_unreachable_database_is_one_sentence_and_the_password_stays_hidden(monkeypatch):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", f"postgresql+psycopg://fit:s3cret@127.0.0.1:{free_port()}/fit")
    app = run_app()
    assert len(app.error) == 1
    assert "Cannot reach the database" in app.error[0].value
    shown = app.error[0].value + "".join(caption.value for caption in app.sidebar.caption)
    assert "s3cret" not in shown and "***" in shown


MANY_SPEC = """
name: many
seeds: [0, 1, 2, 3, 4, 5]
parameters:
  dataset: {value: moons}
  epochs: {value: 2}
  lr: {values: [0.001, 0.01, 0.1, 1.0]}
  width: {values: [4, 8, 16, 32, 64]}
"""


def test_a_large_experiment_lists_a_bounded_searchable_trial_picker_and_a_spread_of_curves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trials import record_epochs

    url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    upgrade(url)
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", url)
    engine = make_engine(url)
    with session_scope(engine) as session:  # 120 trials, more than the picker lists
        submitted = submit(session, spec=parse_spec(MANY_SPEC), spec_text=MANY_SPEC, submitted_by="t", max_trials=200)
    with session_scope(engine) as session:
        for trial_id in submitted.trial_ids:
            record_epochs(session, trial_id, [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.8}])
    asked = submitted.trial_ids[-1]  # beyond the first 100: a link to it still shows it chosen

    app = run_app(page="app_pages/trial.py", query={"trial": str(asked)})
    picker = app.selectbox(key="trial_selected")
    assert picker.value == asked and len(picker.options) == 101  # the first 100, and the trial shown
    assert any("100 of 120 matching trials listed" in caption.value for caption in app.caption)
    app.text_input(key="trial_search").input("lr=1.0 width=64").run()
    listed = app.selectbox(key="trial_selected").options
    assert any("6 of 6 matching trials listed" in caption.value for caption in app.caption)
    assert len(listed) in (6, 7) and sum("lr=1.0" in text and "width=64" in text for text in listed) == 6

    app = run_app(page=EXPERIMENT_PAGE, query={"experiment": str(submitted.experiment_id)})
    caption = next(c.value for c in app.caption if "trials that have started" in c.value)
    assert "20 of the 120 trials that have started" in caption and "seed 0 of each of the 20 configurations" in caption
    engine.dispose()
