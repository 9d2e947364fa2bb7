"""The Experiments (queue) page with Streamlit's AppTest against a real migrated SQLite database and
the real Valkey broker: the search, what each card shows and links to, cancel and re-queue, and the
workers panel fed by services.workers (the rows real workers write)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import redis
from sqlalchemy import update
from streamlit.testing.v1 import AppTest

from services.db import session_scope
from services.models import Trial, WorkerNode, utcnow
from services.spec import parse_spec
from services.submission import submit
from services.trials import claim_trial
from services.workers import register
from tests.dashboard.test_new_experiment import assert_queued
from tests.servers import REPO

APP = REPO / "dashboard" / "app.py"
SPEC = "name: {name}\ndescription: {description}\nparameters:\n  lr: {{values: [0.01, 0.1]}}\n  epochs: {{value: 2}}\n"
NO_WORKER = "No worker online: start one with `fitscope worker`"


@pytest.fixture
def db(migrated_sqlite_url: str, monkeypatch: pytest.MonkeyPatch, engine_for):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    return engine_for(migrated_sqlite_url)


def add_experiment(engine, *, name: str, description: str = "a grid", submitted_by: str = "ada",
                   tags: tuple[str, ...] = (), note: str | None = None) -> list[int]:
    text = SPEC.format(name=name, description=description)
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(text), spec_text=text, submitted_by=submitted_by,
                           max_trials=100, tags=tags, note=note)
    return submitted.trial_ids


def add_worker(engine, name: str, *, queues=("cpu",), concurrency: int = 1) -> None:
    with session_scope(engine) as session:
        register(session, name=name, host="box-1", pid=4242, queues=list(queues), device="cpu",
                 torch_version="2.13.0", concurrency=concurrency)


def open_page() -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    assert not app.exception, app.exception
    return app


def card_titles(app: AppTest) -> list[str]:
    return [m.value.split("**")[1] for m in app.markdown if m.value.startswith("**#")]


def statuses(engine, trial_ids: list[int]) -> list[str]:
    with session_scope(engine) as session:
        return [session.get(Trial, trial_id).status for trial_id in trial_ids]


# --- search ----------------------------------------------------------------------------------------

def test_the_search_finds_experiments_by_name_description_note_tags_and_submitter(db):
    add_experiment(db, name="widths-on-moons", tags=("capacity",))
    add_experiment(db, name="optimizers", description="sgd against adam", submitted_by="grace")
    add_experiment(db, name="dropout", note="Does dropout close the GAP?", tags=("regularizers", "moons"))
    app = open_page()
    assert card_titles(app) == ["#3 dropout", "#2 optimizers", "#1 widths-on-moons"]

    def search(text: str) -> list[str]:
        app.text_input(key="experiments_search").input(text).run()
        assert not app.exception, app.exception
        return card_titles(app)

    assert search("MOONS") == ["#3 dropout", "#1 widths-on-moons"]  # a tag, and a name; any case
    assert search("adam") == ["#2 optimizers"]  # description
    assert search("the gap") == ["#3 dropout"]  # note
    assert search("grace") == ["#2 optimizers"]  # submitter
    assert search("capacity") == ["#1 widths-on-moons"]  # tag
    assert search("50%_") == []
    # Markdown-escaped, so a viewer reads it as typed
    assert "No experiment's name, description, note, tags or submitter contains '50%\\_'." in app.info[0].value
    assert search("") == ["#3 dropout", "#2 optimizers", "#1 widths-on-moons"]


def test_a_card_shows_submitter_tags_and_note_and_links_to_its_pages(db):
    add_experiment(db, name="dropout", submitted_by="grace", tags=("regularizers", "v2.1"),
                   note="Does dropout close the gap?")
    app = open_page()

    (heading,) = [m.value for m in app.markdown if m.value.startswith("**#1 dropout**")]
    assert "by grace" in heading and ":gray-badge[regularizers]" in heading and ":gray-badge[v2\\.1]" in heading
    assert "Does dropout close the gap?" in [c.value.replace("\\", "") for c in app.caption]
    links = {(link.proto.page, link.proto.query_string) for link in app.get("page_link")}
    assert {("experiment", "experiment=1"), ("fit_analysis", "experiment=1")} <= links
    assert {button.label for button in app.get("download_button")} == {"Trials CSV", "Epochs CSV"}


# --- actions under a search ------------------------------------------------------------------------

def test_cancel_then_requeue_under_a_search_change_the_database_and_reach_the_broker(db, broker_url, monkeypatch):
    monkeypatch.setenv("FITSCOPE_BROKER_URL", broker_url)
    kept = add_experiment(db, name="keep-running")
    stopped = add_experiment(db, name="stop-me", tags=("doomed",))
    app = open_page()
    app.text_input(key="experiments_search").input("doomed").run()
    assert card_titles(app) == ["#2 stop-me"]

    app.button(key="experiments_cancel_2").click().run()

    assert statuses(db, stopped) == ["cancelled", "cancelled"] and statuses(db, kept) == ["queued", "queued"]
    assert "2 queued trials cancelled" in app.toast[0].value
    app.button(key="experiments_requeue_2").click().run()

    assert statuses(db, stopped) == ["queued", "queued"]
    client = redis.Redis.from_url(broker_url)
    try:
        assert_queued(client, stopped)  # both trials, in one fused job or one message each
    finally:
        client.close()


# --- workers ---------------------------------------------------------------------------------------

def test_the_workers_panel_shows_a_registered_worker_and_the_trial_it_runs(db):
    (first, _) = add_experiment(db, name="busy")
    add_worker(db, "cpu1@box-1", queues=("cpu", "gpu"), concurrency=2)
    with session_scope(db) as session:
        assert claim_trial(session, first, worker="cpu1@box-1/777", max_attempts=3) is not None
    app = open_page()

    assert NO_WORKER not in "".join(w.value for w in app.warning)
    table = app.dataframe[0].value
    row = table.iloc[0].to_dict()
    assert (row["worker"], row["status"], row["queues"], row["processes"]) == ("cpu1@box-1", "online", "cpu, gpu", 2)
    assert (row["running trials"], row["host"], row["device"], row["torch"]) == (str(first), "box-1", "cpu", "2.13.0")


def test_a_silent_worker_is_shown_lost_in_red(db):
    add_worker(db, "old@box-1")
    add_worker(db, "new@box-1")
    with session_scope(db) as session:  # old's last heartbeat was 5 minutes ago (FITSCOPE_WORKER_LOST_AFTER_S: 60)
        session.execute(update(WorkerNode).where(WorkerNode.name == "old@box-1")
                        .values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    app = open_page()

    table = app.dataframe[0].value
    assert table[["worker", "status"]].values.tolist() == [["new@box-1", "online"], ["old@box-1", "lost"]]
    styles = app.dataframe[0].proto.arrow_data.styler.styles
    assert "color: #d62728" in styles
    assert re.findall(r"_row(\d+)_col\d+", styles) == ["1"] * len(table.columns)  # the lost row, every cell


def test_no_worker_online_says_how_to_start_one(db):
    add_experiment(db, name="waiting")
    app = open_page()

    assert NO_WORKER in app.warning[0].value
    assert not [frame for frame in app.dataframe]
    assert card_titles(app) == ["#1 waiting"]


def test_a_stopped_worker_is_listed_but_does_not_count_as_online(db):
    from services.workers import mark_stopped

    add_worker(db, "done@box-1")
    with session_scope(db) as session:
        mark_stopped(session, "done@box-1")
    app = open_page()

    assert NO_WORKER in app.warning[0].value
    assert app.dataframe[0].value[["worker", "status"]].values.tolist() == [["done@box-1", "stopped"]]
