"""A second corpus of hostile input, beside tests/integration/test_bad_inputs.py's: text that would
reverse or rewrite a teammate's terminal, trials no machine can hold, files outside the spec's
folder, ids and paths that used to end in tracebacks, and URLs whose secrets must never be shown.

Each case is a `fitscope` command line run in-process against a migrated SQLite file and the real
broker; it must end with its exit code and exactly one line on stderr, ``error: <sentence>``,
containing the expected words, with no secret, no escape character and no bidirectional control
in any output, and leave every table as it was. A second test runs commands that show hostile text
stored in the database (`status`, `workers`) and checks that it reaches the terminal neutralised.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.broker import EmbeddedBroker, free_port
from services.cli import app
from services.config import get_settings
from services.db import make_engine, session_scope
from services.migrate import upgrade
from services.spec import parse_spec
from services.submission import submit
from tests.integration.test_bad_inputs import _row_counts

pytestmark = pytest.mark.integration

SECRETS = ("sekrit", "s3cr3t-token", "kr@it")
NEUTRALISED = ("\x1b", "\x07", "\x9b", "\u202e", "\u202b", "\u2066", "\u202c", "\r")


@dataclass(frozen=True)
class Hostile:
    """``args`` is the command line after `fitscope` ({spec}: the case's spec.yaml, {dir}: its
    folder, {free_port}: a port nothing listens on); ``files`` are written beside the spec (a str
    value starting with "->" makes a symbolic link to that target)."""

    id: str
    expected: str
    args: str = "submit {spec}"
    spec: str = "name: fine\nparameters:\n  epochs: {value: 1}\n"
    files: dict[str, bytes | str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


def _spec(name_yaml: str = "fine", parameters: str = "  epochs: {value: 1}\n", extra: str = "") -> str:
    return f"name: {name_yaml}\n{extra}parameters:\n{parameters}"


def _csv_spec(path: str) -> str:
    return _spec(parameters=f"  dataset: {{value: {{csv: '{path}', target: y}}}}\n  epochs: {{value: 1}}\n")


BIDI = "contains the bidirectional control character"
OUTSIDE = "is outside the spec's folder"
NOT_AN_ID = "is not an id; ids are whole numbers from 1 to 9223372036854775807"
CASES = [
    # text that would display in another order than it is stored, refused at input
    Hostile("name-right-to-left-override", f"name: {BIDI} U+202E (right-to-left override)",
            spec=_spec('"invoice\\u202Efdp.exe"')),
    Hostile("name-left-to-right-isolate", f"name: {BIDI} U+2066 (left-to-right isolate)",
            spec=_spec('"a\\u2066b"')),
    Hostile("name-pop-directional-formatting", f"name: {BIDI} U+202C (pop directional formatting)",
            spec=_spec('"a\\u202Cb"')),
    Hostile("name-right-to-left-embedding", f"name: {BIDI} U+202B (right-to-left embedding)",
            spec=_spec('"a\\u202Bb"')),
    Hostile("description-right-to-left-override", f"description: {BIDI} U+202E",
            spec=_spec(extra='description: "safe\\u202Eevil"\n')),
    Hostile("tag-right-to-left-override", f"--tag 'ab\\u202ecd' {BIDI} U+202E",
            args="submit {spec} --tag ab\u202ecd"),
    Hostile("note-right-to-left-embedding", f"note: {BIDI} U+202B", args="submit {spec} --note x\u202by"),
    Hostile("submitter-right-to-left-override", f"submitted_by: {BIDI} U+202E",
            env={"FITSCOPE_SUBMITTED_BY": "ada\u202eevol"}),
    # escape sequences: refused where a value must be one line, never echoed raw
    Hostile("name-clears-the-screen", "name: must be one line without control characters",
            spec=_spec('"\\e[2J\\e[Hhello"')),
    Hostile("name-sets-the-window-title", "name: must be one line without control characters",
            spec=_spec('"\\e]0;pwned\\a"')),
    Hostile("tag-colours-the-terminal", "--tag '\\x1b[31mred' contains a newline or another control character",
            args="submit {spec} --tag \x1b[31mred"),
    Hostile("worker-name-with-an-escape", "--name '\\x1b]0;owned\\x07' contains control or formatting characters",
            args="worker --name \x1b]0;owned\x07"),
    Hostile("worker-name-with-an-override", "--name 'w\\u202ekrow' contains control or formatting characters",
            args="worker --name w\u202ekrow"),
    # trials that cannot run, refused at submit before anything is enumerated or stored
    Hostile("poly-degree-ten-on-a-thousand-features",
            "poly_degree 10 on 1000 input features makes 2.91e+23 polynomial features, over the cap of 100000",
            spec=_spec(parameters="  dataset: {value: linear}\n  n_features: {value: 1000}\n"
                                  "  poly_degree: {value: 10}\n")),
    Hostile("validate-refuses-what-submit-would", "over FITSCOPE_MAX_TRIAL_MEMORY_MB=4096", args="validate {spec}",
            spec=_spec(parameters="  width: {value: 4096}\n  depth: {value: 16}\n  n_train: {value: 1000000}\n")),
    Hostile("poly-degree-five-on-two-hundred-features", "polynomial features, over the cap of 100000",
            spec=_spec(parameters="  dataset: {value: linear}\n  n_features: {value: 200}\n"
                                  "  poly_degree: {value: 5}\n")),
    Hostile("widest-deepest-model-on-a-million-rows",
            "trial 1: a trial with width 4096, depth 16, batch_size full, 2 input features (poly_degree 1) and "
            "1000000/500/500 train/val/test rows needs about",
            spec=_spec(parameters="  width: {value: 4096}\n  depth: {value: 16}\n  n_train: {value: 1000000}\n"
                                  "  batch_size: {value: full}\n")),
    Hostile("one-big-trial-in-a-grid", "trial 3: a trial with width 4096, depth 8",
            spec=_spec(parameters="  width: {values: [8, 4096]}\n  depth: {value: 8}\n  n_train: {value: 100000}\n"
                                  "  batch_size: {value: 4096}\n  seeds: {values: [0, 1]}\n".replace(
                                      "  seeds: {values: [0, 1]}\n", ""), extra="seeds: [0, 1]\n")),
    Hostile("over-a-lowered-memory-cap", "over FITSCOPE_MAX_TRIAL_MEMORY_MB=100",
            spec=_spec(parameters="  width: {value: 1024}\n  depth: {value: 4}\n  n_train: {value: 20000}\n"),
            env={"FITSCOPE_MAX_TRIAL_MEMORY_MB": "100"}),
    Hostile("memory-cap-of-zero", "FITSCOPE_MAX_TRIAL_MEMORY_MB: Input should be greater than or equal to 16",
            env={"FITSCOPE_MAX_TRIAL_MEMORY_MB": "0"}),
    Hostile("repeated-milestones", "milestones lists epoch 30 more than once, which would decay the rate twice",
            spec=_spec(parameters="  schedule: {value: multistep}\n  milestones: {value: [30, 30]}\n")),
    Hostile("milestones-repeated-out-of-order", "milestones lists epoch 5 more than once",
            spec=_spec(parameters="  schedule: {value: multistep}\n  milestones: {value: [5, 10, 5]}\n")),
    # CSV paths outside the spec's folder: never read, never stored, never echoed
    Hostile("csv-etc-passwd", f"CSV file '/etc/passwd' {OUTSIDE}", spec=_csv_spec("/etc/passwd")),
    Hostile("csv-dot-dot-traversal", f"CSV file '../../../../../../etc/hostname' {OUTSIDE}",
            spec=_csv_spec("../../../../../../etc/hostname")),
    Hostile("csv-proc-environ", f"CSV file '/proc/self/environ' {OUTSIDE}", spec=_csv_spec("/proc/self/environ")),
    Hostile("csv-link-to-outside", f"CSV file 'data.csv' {OUTSIDE}", spec=_csv_spec("data.csv"),
            files={"data.csv": "->/etc/passwd"}),
    Hostile("csv-home-dotfile", OUTSIDE, spec=_csv_spec("~/.bashrc")),
    Hostile("csv-outside-the-data-root-too", "or FITSCOPE_DATA_ROOT", spec=_csv_spec("/etc/hosts"),
            env={"FITSCOPE_DATA_ROOT": "{dir}/data"}),
    # ids and paths that ended in tracebacks
    Hostile("status-of-a-20-digit-id", f"experiment id 100000000000000000000 {NOT_AN_ID}",
            args="status 100000000000000000000"),
    Hostile("status-of-id-zero", f"experiment id 0 {NOT_AN_ID}", args="status 0"),
    Hostile("cancel-of-a-20-digit-id", NOT_AN_ID, args="cancel 100000000000000000000"),
    Hostile("requeue-of-a-20-digit-id", NOT_AN_ID, args="requeue 100000000000000000000"),
    Hostile("export-of-a-20-digit-id", NOT_AN_ID, args="export 100000000000000000000"),
    Hostile("export-to-a-full-disk", "--output '/dev/full' could not be written (No space left on device)",
            args="export 1 -o /dev/full", code=1),
    Hostile("upgrade-to-an-unknown-revision", "cannot upgrade to revision 'zzz' (Can't locate revision",
            args="db upgrade zzz"),
    Hostile("upgrade-to-a-shell-command", "cannot upgrade to revision 'head; rm -rf /'",
            args="db upgrade 'head; rm -rf /'"),
    Hostile("status-of-a-missing-sqlite-file", "has no fitscope schema yet; run `fitscope db upgrade`",
            args="status", env={"FITSCOPE_DATABASE_URL": "sqlite:///{dir}/not/there/x.db"}),
    # secrets in every form of URL a user can write
    Hostile("database-password-in-the-query", "cannot reach the database at postgresql+psycopg://u@127.0.0.1:",
            args="status", env={"FITSCOPE_DATABASE_URL": "postgresql://u@127.0.0.1:{free_port}/x?password=sekrit"}),
    Hostile("database-sslpassword-and-token", "sslpassword=***",
            args="status", env={"FITSCOPE_DATABASE_URL": "postgresql://u:sekrit@127.0.0.1:{free_port}/x"
                                                         "?sslpassword=sekrit&application_name=ok"}),
    Hostile("database-password-with-an-escape", "cannot reach the database at postgresql+psycopg://u:***@",
            args="status", env={"FITSCOPE_DATABASE_URL": "postgresql://u:sek\x1brit@127.0.0.1:{free_port}/x"}),
    Hostile("broker-token-as-user", "cannot reach the broker at redis://***@127.0.0.1:",
            env={"FITSCOPE_BROKER_URL": "redis://s3cr3t-token@127.0.0.1:{free_port}/0"}),
    Hostile("broker-password-with-slash-and-at", "FITSCOPE_BROKER_URL='redis://:***@127.0.0.1:1/0'",
            env={"FITSCOPE_BROKER_URL": "redis://:se/kr@it@127.0.0.1:1/0"}),
    Hostile("broker-tls-to-a-plain-valkey", "over TLS within 5 s",
            env={"FITSCOPE_BROKER_URL": "rediss://:sekrit@{broker}/0"}),
    Hostile("broker-url-with-escapes", "not a database number",
            env={"FITSCOPE_BROKER_URL": "redis://127.0.0.1:6379/0\x1b[2J"}),
    Hostile("checkpoint-url-with-credentials", "FITSCOPE_CHECKPOINT_URL='file://u:***@host/x' is not a file:// URL",
            env={"FITSCOPE_CHECKPOINT_URL": "file://u:sekrit@host/x"}),
]


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One migrated SQLite file with one experiment (for `export 1`); no case may add a row."""
    url = f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'fitscope.db'}"
    upgrade(url)
    engine = make_engine(url)
    text = "name: kept\nparameters:\n  epochs: {value: 1}\n"
    with session_scope(engine) as session:
        submit(session, spec=parse_spec(text), spec_text=text, submitted_by="t", max_trials=10)
    engine.dispose()
    return url


def _fill(text: str, folder: Path, broker: EmbeddedBroker) -> str:
    return (text.replace("{dir}", str(folder)).replace("{free_port}", str(free_port()))
            .replace("{broker}", f"{broker.host}:{broker.port}"))


def _assert_clean(output: str, context: str) -> None:
    for secret in SECRETS:
        assert secret not in output, context
    for char in NEUTRALISED:
        assert char not in output, context


def test_the_corpus_is_large_and_every_case_distinct():
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_hostile_input_is_one_clean_sentence(case: Hostile, database: str, broker: EmbeddedBroker,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(case.spec, encoding="utf-8")
    for name, content in case.files.items():
        if isinstance(content, str) and content.startswith("->"):
            os.symlink(content[2:], tmp_path / name)
        else:
            (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
    settings = {"FITSCOPE_DATABASE_URL": database, "FITSCOPE_BROKER_URL": broker.url,
                "FITSCOPE_HOME": str(tmp_path / "home"),
                **{key: _fill(value, tmp_path, broker) for key, value in case.env.items()}}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    before = _row_counts(database)
    args = [_fill(arg, tmp_path, broker).replace("{spec}", str(spec)) for arg in shlex.split(case.args)]
    result = CliRunner().invoke(app, args)
    context = f"{args}: exit {result.exit_code}, stderr {result.stderr!r}, exception {result.exception!r}"
    assert result.exit_code == case.code, context
    assert isinstance(result.exception, SystemExit), context
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), context
    assert case.expected in result.stderr, context
    _assert_clean(result.stdout + result.stderr, context)
    assert _row_counts(database) == before
    assert not (tmp_path / "not").exists()  # a read-only command created no folder


def test_hostile_text_in_the_database_reaches_the_terminal_neutralised(migrated_sqlite_url: str,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """What older versions (or another client) stored: shown by `status` and `workers` as escapes."""
    from services.workers import register

    name = "\x1b]0;owned\x07[click](http://evil.example) \u202eexe.txt"
    note = "line one\x1b[2J\x1b[Hline two\r\x9b31m"
    engine = make_engine(migrated_sqlite_url)
    text = "name: placeholder\nparameters:\n  epochs: {value: 1}\n"
    with session_scope(engine) as session:
        submitted = submit(session, spec=parse_spec(text), spec_text=text, submitted_by="t", max_trials=10,
                           tags=["ok"], note="fine")
    with session_scope(engine) as session:
        from services.models import Experiment

        experiment = session.get(Experiment, submitted.experiment_id)
        experiment.name, experiment.note, experiment.tags = name, note, ["\x1b[31mred"]
        register(session, name="w\x1b[2Jorker\u202e", host="h\x07", pid=1, queues=["cpu"], device="cpu\x1b[1m",
                 torch_version="2\x1b]0;x\x07", concurrency=1)
    engine.dispose()
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", migrated_sqlite_url)
    runner = CliRunner()
    for args in (["status"], ["status", str(submitted.experiment_id)], ["status", "--search", "\x1b[2J"],
                 ["workers"], ["status", "--json"], ["workers", "--json"]):
        get_settings.cache_clear()
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.stderr, result.exception)
        _assert_clean(result.stdout + result.stderr, str(args))
        if "--json" in args:
            json.loads(result.stdout)  # still data a script can read, with the text intact in it
    get_settings.cache_clear()
    shown = runner.invoke(app, ["status"]).stdout
    assert "\\x1b]0;owned\\x07[click]" in shown  # the name column keeps 28 characters
    assert "line one\\x1b[2J\\x1b[Hline two\\r\\x9b31m" in shown and "#\\x1b[31mred" in shown
    workers = runner.invoke(app, ["workers"]).stdout
    assert "w\\x1b[2Jorker\\u202e" in workers
