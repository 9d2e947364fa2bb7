"""The New experiment page with Streamlit's AppTest, against a real migrated SQLite database and the
real Valkey broker: what the page previews is compared with what the real `fitscope validate`
prints, and what it submits is read back from the database and from the broker's queue."""

from __future__ import annotations

import base64
import itertools
import json
import re
from pathlib import Path

import pytest
import redis
import yaml
from sqlalchemy import func, select
from streamlit.testing.v1 import AppTest

from services.broker import free_port
from services.db import session_scope
from services.models import Dataset, Experiment, Trial
from tests.servers import REPO, fitscope, fitscope_env

APP = REPO / "dashboard" / "app.py"
PAGE = "app_pages/new_experiment.py"
BAD_SPEC = """\
name: typos
method: grid
seeds: [0, 1]
parameters:
  widht: {values: [8, 64]}
  lr: {values: [0.01, -0.1]}
  optimizer: {value: adamm}
"""
HOUSES_CSV = "rooms,area,price\n" + "".join(f"{r},{40 + 7 * i},{100 + 13 * i + 5 * r}\n"
                                             for i, r in zip(range(40), itertools.cycle([1, 2, 3, 4]), strict=False))


@pytest.fixture
def db_url(migrated_sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    monkeypatch.setenv("FITSCOPE_SUBMITTED_BY", "ada")
    return migrated_sqlite_url


@pytest.fixture
def queue(broker_url: str, monkeypatch: pytest.MonkeyPatch):
    """The real broker, as the dashboard's broker; yields a client to read its queues."""
    monkeypatch.setenv("FITSCOPE_BROKER_URL", broker_url)
    client = redis.Redis.from_url(broker_url)
    yield client
    client.close()


def open_page() -> AppTest:
    app = AppTest.from_file(str(APP), default_timeout=60)
    app.run()
    app.switch_page(PAGE).run()
    assert not app.exception, app.exception
    return app


def messages(client: redis.Redis, queue: str = "cpu") -> list[dict]:
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def ids_in(message: dict) -> set[int]:
    """Every whole number in a Celery message's arguments (its body is base64 JSON: [args, kwargs,
    embed]): the trial ids, whether it runs one trial or a fused job of several."""
    assert message["properties"]["body_encoding"] == "base64" and message["content-type"] == "application/json"
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    found: set[int] = set()
    pending = [args, kwargs]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            found.add(value)
    return found


def assert_queued(client: redis.Redis, trial_ids: list[int]) -> None:
    """Every trial reached the broker: in one message each, or fewer fused messages."""
    sent = messages(client)
    assert 1 <= len(sent) <= len(trial_ids)
    assert all(m["headers"]["task"].startswith("fitscope.") for m in sent)
    assert set(trial_ids) <= set().union(*(ids_in(m) for m in sent))


def counts(engine) -> tuple[int, int, int]:
    with session_scope(engine) as session:
        return tuple(session.scalar(select(func.count()).select_from(table)) for table in (Experiment, Trial, Dataset))


def as_read(markdown: str) -> str:
    """What a viewer reads: the page escapes user text for Markdown (services.safe_text.markdown_text)."""
    return re.sub(r"\\(.)", r"\1", markdown).replace("\u2060", "")  # and no word joiners (no autolinks)


def error_text(app: AppTest) -> str:
    return "\n".join(as_read(error.value) for error in app.error)


def use_yaml(app: AppTest, text: str) -> AppTest:
    app.radio(key="new_source").set_value("YAML").run()
    app.text_area(key="new_yaml").input(text).run()
    assert not app.exception, app.exception
    return app


def validate_with_cli(tmp_path: Path, text: str, db_url: str, broker: str) -> tuple[int, str, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    done = fitscope("validate", str(path), env=fitscope_env(database_url=db_url, broker_url=broker,
                                                             home=tmp_path / "home"), timeout=60)
    return done.returncode, done.stdout.strip(), done.stderr


# --- submitting ------------------------------------------------------------------------------------

def test_an_example_grid_previews_as_the_cli_and_one_click_queues_every_trial(db_url, queue, engine_for, tmp_path):
    app = open_page()

    example = (REPO / "examples" / "capacity_vs_data.yaml").read_text()
    code, cli_line, _ = validate_with_cli(tmp_path, example, db_url, "redis://127.0.0.1:1/0")
    assert code == 0
    assert app.metric[0].value == "16"
    # "capacity-vs-data-size: 16 trials (grid, ...)"
    assert cli_line in [as_read(caption.value) for caption in app.caption]
    assert app.text_input(key="new_submitted_by").value == "ada"  # FITSCOPE_SUBMITTED_BY

    app.text_input(key="new_tags").input("capacity, moons, capacity").run()
    app.text_area(key="new_note").input("Expect the U at n_train=400.").run()
    app.button(key="new_submit").click().run()

    assert not app.error, error_text(app)
    engine = engine_for(db_url)
    with session_scope(engine) as session:
        experiment = session.scalars(select(Experiment)).one()
        trial_ids = session.scalars(select(Trial.id).where(Trial.status == "queued").order_by(Trial.ordinal)).all()
        assert (experiment.name, experiment.submitted_by) == ("capacity-vs-data-size", "ada")
        assert (experiment.tags, experiment.note) == (["capacity", "moons"], "Expect the U at n_train=400.")
        assert experiment.spec_text == example
    assert len(trial_ids) == 16
    assert_queued(queue, trial_ids)
    assert (f"Experiment #{experiment.id} (capacity-vs-data-size) submitted: 16 trials queued."
            in as_read(app.success[-1].value))
    links = {link.proto.page: link.proto.query_string for link in app.get("page_link")}
    assert links["experiment"] == links["fit_analysis"] == f"experiment={experiment.id}"


def test_widgets_build_the_grid_and_its_count_follows_them(db_url, queue, engine_for):
    app = open_page()
    app.radio(key="new_source").set_value("Widgets").run()
    app.text_input(key="new_w_name").input("three-widths").run()
    app.multiselect(key="new_w_widths").set_value([4, 16, 64]).run()
    app.multiselect(key="new_w_lrs").set_value([0.01, 0.1]).run()
    app.multiselect(key="new_w_optimizers").set_value(["sgd", "adam"]).run()
    app.number_input(key="new_w_seeds").set_value(3).run()
    app.number_input(key="new_w_epochs").set_value(4).run()

    assert app.metric[0].value == str(3 * 2 * 2 * 3)
    shown_yaml = app.code[0].value
    assert "width:\n    values:\n    - 4\n    - 16\n    - 64" in shown_yaml
    app.button(key="new_submit").click().run()

    assert not app.error, error_text(app)
    with session_scope(engine_for(db_url)) as session:
        trials = session.scalars(select(Trial).order_by(Trial.ordinal)).all()
        configs, trial_ids = [t.config for t in trials], [t.id for t in trials]
    assert len(configs) == 36
    assert_queued(queue, trial_ids)
    assert {(c["width"], c["lr"], c["optimizer"], c["seed"], c["epochs"]) for c in configs} == set(
        itertools.product([4, 16, 64], [0.01, 0.1], ["sgd", "adam"], [0, 1, 2], [4]))


def test_regularizer_and_momentum_widgets_become_axes_of_the_grid(db_url):
    app = open_page()
    app.radio(key="new_source").set_value("Widgets").run()
    app.multiselect(key="new_w_widths").set_value([64]).run()
    app.multiselect(key="new_w_l1").set_value([0.0, 0.001]).run()
    app.multiselect(key="new_w_input_noise").set_value([0.0, 0.1]).run()
    app.multiselect(key="new_w_patience").set_value([10]).run()
    app.multiselect(key="new_w_optimizers").set_value(["momentum", "nesterov"]).run()
    app.multiselect(key="new_w_momentum").set_value([0.5, 0.9]).run()

    assert not app.error, error_text(app)
    assert app.metric[0].value == str(2 * 2 * 2 * 2 * 2)  # l1, input noise, optimizer, momentum, seeds
    shown = yaml.safe_load(app.code[0].value)["parameters"]
    assert shown["l1"] == {"values": [0.0, 0.001]} and shown["input_noise"] == {"values": [0.0, 0.1]}
    assert shown["early_stopping"] == {"value": {"patience": 10}}
    assert shown["momentum"] == {"values": [0.5, 0.9]}

    app.multiselect(key="new_w_optimizers").set_value(["adam"]).run()  # momentum means nothing to adam
    assert "momentum" not in yaml.safe_load(app.code[0].value)["parameters"]


def test_edit_as_yaml_carries_the_grid_into_the_editor(db_url):
    app = open_page()
    app.button(key="new_example_edit").click().run()

    assert app.radio(key="new_source").value == "YAML"
    assert app.text_area(key="new_yaml").value == (REPO / "examples" / "capacity_vs_data.yaml").read_text()
    assert app.metric[0].value == "16"


# --- what validate says ----------------------------------------------------------------------------

def test_a_bad_spec_shows_exactly_the_cli_errors_and_cannot_be_submitted(db_url, queue, engine_for, tmp_path):
    app = use_yaml(open_page(), BAD_SPEC)

    code, _, stderr = validate_with_cli(tmp_path, BAD_SPEC, db_url, "redis://127.0.0.1:1/0")
    assert code == 2
    cli_errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(cli_errors) == 3  # the typo'd key, the negative rate and the unknown optimizer
    shown = as_read(app.error[0].value)
    assert shown.startswith("`fitscope validate` would refuse this spec")
    assert shown.split("```")[1].strip().splitlines() == cli_errors
    assert app.button(key="new_submit").disabled
    assert not app.metric
    assert counts(engine_for(db_url)) == (0, 0, 0) and messages(queue) == []


def test_a_grid_over_the_trial_cap_is_refused_with_the_cli_sentence(db_url, monkeypatch, tmp_path):
    monkeypatch.setenv("FITSCOPE_MAX_TRIALS_PER_EXPERIMENT", "10")
    spec = "name: big\nseeds: [0, 1, 2]\nparameters:\n  width: {values: [1, 2, 3, 4]}\n"
    app = use_yaml(open_page(), spec)

    assert "error: spec: the grid has 12 trials, over the cap of 10" in as_read(app.error[0].value)
    assert app.button(key="new_submit").disabled


def test_an_uploaded_spec_file_fills_the_editor(db_url):
    app = open_page()
    app.radio(key="new_source").set_value("YAML").run()
    text = "name: from-a-file\nseeds: [0, 1, 2]\nparameters:\n  lr: {values: [0.1, 0.01]}\n"

    app.get("file_uploader")[0].set_value(("grid.yaml", text.encode(), "application/x-yaml")).run()

    assert app.text_area(key="new_yaml").value == text
    assert app.metric[0].value == "6"


def test_an_uploaded_spec_that_is_not_utf8_is_one_sentence(db_url):
    app = open_page()
    app.radio(key="new_source").set_value("YAML").run()

    app.get("file_uploader")[0].set_value(("grid.yaml", b"name: caf\xe9\n", "application/x-yaml")).run()

    assert as_read(app.error[0].value) == "grid.yaml is not UTF-8 text; save it as UTF-8 and upload it again."
    assert not app.text_area(key="new_yaml").value


# --- the fields and the broker ---------------------------------------------------------------------

def test_too_many_tags_is_one_sentence_and_writes_nothing(db_url, queue, engine_for):
    app = open_page()
    app.text_input(key="new_tags").input(",".join(f"t{i}" for i in range(21))).run()

    app.button(key="new_submit").click().run()

    assert as_read(app.error[0].value) == ("Tags: 21 given, over the limit of 20; keep the ones you will search by.")
    assert counts(engine_for(db_url)) == (0, 0, 0) and messages(queue) == []


@pytest.mark.parametrize(("tags", "expected"), [
    ("ok, " + "x" * 51, "Tags: 'xxxxxxxxxxxxxxxxxxxx' is 51 characters; shorten it to at most 50"),
    ("ok, tab\there", "Tags: 'tab\\there' contains a newline or another control character; give a tag on one line"),
])
def test_a_tag_the_cli_would_refuse_is_refused_here_too(db_url, queue, engine_for, tags, expected):
    app = open_page()
    app.text_input(key="new_tags").input(tags).run()

    app.button(key="new_submit").click().run()

    assert as_read(app.error[0].value).startswith(expected), as_read(app.error[0].value)
    assert counts(engine_for(db_url)) == (0, 0, 0) and messages(queue) == []


def test_a_dead_broker_is_one_sentence_and_writes_nothing(db_url, engine_for, monkeypatch):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("FITSCOPE_BROKER_URL", dead)
    app = open_page()

    app.button(key="new_submit").click().run()

    assert as_read(app.error[0].value).startswith(f"Cannot reach the broker at {dead}")
    assert counts(engine_for(db_url)) == (0, 0, 0)
    assert not app.success


# --- CSV data sets ---------------------------------------------------------------------------------

def upload_csv(app: AppTest, name: str, content: bytes, target: str | None = None) -> AppTest:
    app.get("file_uploader")[0].set_value((name, content, "text/csv")).run()  # the only uploader on Example grid
    if target is not None:
        app.selectbox(key="new_csv_target").set_value(target).run()
    app.button(key="new_csv_store").click().run()
    assert not app.exception, app.exception
    return app


def test_an_uploaded_csv_is_stored_and_a_grid_trains_on_it(db_url, queue, engine_for):
    app = upload_csv(open_page(), "houses.csv", HOUSES_CSV.encode(), target="price")

    assert not app.error, error_text(app)
    with session_scope(engine_for(db_url)) as session:
        stored = session.scalars(select(Dataset)).one()
        assert (stored.name, stored.n_rows, stored.columns) == ("houses.csv", 40, ["rooms", "area", "price"])
    app.radio(key="new_source").set_value("Widgets").run()
    assert "csv: houses.csv" in app.multiselect(key="new_w_datasets").options
    spec = ("name: houses\nparameters:\n  dataset: {value: {csv: houses.csv, target: price}}\n"
            "  n_train: {values: [8, 16]}\n  epochs: {value: 2}\n")
    use_yaml(app, spec)
    assert app.metric[0].value == "2"

    app.button(key="new_submit").click().run()

    assert not app.error, error_text(app)
    with session_scope(engine_for(db_url)) as session:
        trials = session.scalars(select(Trial)).all()
        datasets, trial_ids = [t.config["dataset"] for t in trials], [t.id for t in trials]
    assert [d["sha256"] for d in datasets] == [stored.sha256] * 2 and {d["task"] for d in datasets} == {"regression"}
    assert_queued(queue, trial_ids)


def test_a_bad_csv_upload_is_an_error_box_with_the_submit_sentence_and_no_rows(db_url, engine_for):
    bad = HOUSES_CSV.replace("\n4,61,", "\n4,sixty-one,", 1)  # data line 4 is file line 5
    assert bad != HOUSES_CSV
    app = upload_csv(open_page(), "houses.csv", bad.encode(), target="price")

    assert len(app.error) == 1
    message = as_read(app.error[0].value)
    assert message.startswith("houses.csv: ") and "'area'" in message and "line 5" in message
    assert counts(engine_for(db_url)) == (0, 0, 0)


def test_a_csv_over_the_size_cap_is_refused_before_it_is_stored(db_url, engine_for, monkeypatch):
    monkeypatch.setenv("FITSCOPE_MAX_CSV_BYTES", "1000")
    content = HOUSES_CSV.encode() * 3
    app = upload_csv(open_page(), "houses.csv", content, target="price")

    assert as_read(app.error[0].value) == (f"houses.csv: the file is {len(content)} bytes, over the cap of 1000 "
                                  "(FITSCOPE_MAX_CSV_BYTES); use fewer rows or raise the cap")
    assert counts(engine_for(db_url)) == (0, 0, 0)


def test_a_spec_naming_a_csv_that_was_not_uploaded_is_refused(db_url, tmp_path):
    (tmp_path / "secret.csv").write_text(HOUSES_CSV)  # on the server, but never uploaded
    spec = f"name: sneaky\nparameters:\n  dataset: {{value: {{csv: {tmp_path / 'secret.csv'}, target: price}}}}\n"
    app = use_yaml(open_page(), spec)

    assert "the dashboard reads only CSV data sets uploaded on this page" in as_read(app.error[0].value)
    assert app.button(key="new_submit").disabled


def test_a_wandb_sweep_pasted_as_it_is_submits_as_untitled(db_url, queue, engine_for):
    sweep = ("program: train.py\nmethod: grid\nmetric: {name: val_loss, goal: minimize}\nparameters:\n"
             "  learning_rate: {values: [0.01, 0.1]}\n  width: {values: [4, 8]}\n  epochs: {value: 2}\n"
             "command: [\"${env}\", \"${interpreter}\", \"${program}\", \"${args}\"]\n")
    app = use_yaml(open_page(), sweep)
    assert not app.error, error_text(app)
    assert app.metric[0].value == "4"
    assert "untitled: 4 trials (grid, 1 seed(s))" in [caption.value for caption in app.caption]

    app.button(key="new_submit").click().run()

    assert not app.error, error_text(app)
    with session_scope(engine_for(db_url)) as session:
        experiment = session.scalars(select(Experiment)).one()
        assert experiment.name == "untitled" and experiment.spec_text == sweep
        assert sorted(session.scalars(select(Trial.config["lr"].as_float())).all()) == [0.01, 0.01, 0.1, 0.1]
    assert "(untitled) submitted: 4 trials queued." in app.success[-1].value
