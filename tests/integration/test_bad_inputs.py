"""Hostile and broken input through the real CLI, against a migrated database and a running broker.

Every case is a spec file (with the CSV files it names beside it) or an environment a user could
give `fitscope validate` and `fitscope submit`. Each must end with exit code 2 and exactly one line
on stderr, ``error: <one sentence>`` containing the expected words, and must leave every table as it
was. The corpus runs in-process (typer's CliRunner on ``services.cli.app``, with the settings cache
cleared per case) because a subprocess costs about a second per call; a handful of cases also run
as a real `fitscope` process, as a user would.

The parser-level corpora are in tests/unit/test_spec.py and tests/unit/test_csv.py; this file is the
end-to-end evidence that the same inputs never reach the database or print a traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from services.broker import EmbeddedBroker, free_port
from services.cli import app
from services.config import get_settings
from services.db import make_engine, session_scope
from services.migrate import upgrade
from services.models import Dataset, EpochMetric, Experiment, Trial
from tests.servers import fitscope, fitscope_env

pytestmark = pytest.mark.integration

FOLDER, FIFO = object(), object()  # special "files" a case can put beside its spec
GOOD_CSV = b"a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n9,10,0\n"


def _spec_naming(*csv_files: str, extra: str = "") -> str:
    """A valid spec whose data sets are the given CSV files (target column y)."""
    datasets = ", ".join(f"{{csv: {name}, target: y}}" for name in csv_files)
    return f"name: csv case\nparameters:\n  dataset: {{values: [{datasets}]}}\n  epochs: {{value: 2}}\n{extra}"


def _grid(parameters: str) -> str:
    return f"name: t\nparameters:\n{parameters}"


@dataclass(frozen=True)
class Bad:
    """One bad input. ``spec`` is the text (or bytes) of spec.yaml; ``files`` are written beside it
    (bytes, a callable making bytes, FOLDER or FIFO); ``env`` adds settings, where ``{dir}`` is the
    case's folder and ``{free_port}`` a port nothing listens on; ``spec_path`` replaces spec.yaml as
    the argument."""

    id: str
    expected: str
    spec: str | bytes = "name: fine\nparameters: {width: {value: 8}}\n"  # a valid spec: parameters are required
    files: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    commands: tuple[str, ...] = ("validate", "submit")
    spec_path: str | None = None


SPECS = [
    # YAML that tries to run code or escape plain data
    Bad("python-object-tag", "YAML tag !!python/object/apply:os.system is not allowed",
        "name: !!python/object/apply:os.system ['touch {dir}/pwned']\n"),
    Bad("python-name-tag-on-the-top", "YAML tag !!python/name:os.system is not allowed",
        "--- !!python/name:os.system\nname: t\n"),
    Bad("include-tag", "YAML tag !include is not allowed", "name: !include other.yaml\n"),
    Bad("binary-tag", "YAML tag !!binary is not allowed", "name: t\njob: !!binary aGVsbG8=\n"),
    Bad("billion-laughs", "has more than 50000 values",
        "name: t\njob:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"  {c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))),
    Bad("deep-flow-nesting", "nests deeper than 20 levels", "name: t\njob: " + "[" * 500 + "]" * 500 + "\n"),
    Bad("deep-block-nesting", "nests deeper than 20 levels",
        "name: t\nparameters:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(30)) + "  " * 31 + "v\n"),
    Bad("alias-to-itself", "nests deeper than 20 levels", "name: t\njob: &a [*a]\n"),
    Bad("sixty-thousand-keys", "has more than 50000 values",
        "name: t\njob: {" + ", ".join(f"k{i}: {i}" for i in range(60_000)) + "}\n"),
    # sizes and counts
    Bad("huge-grid", "the grid has 10000000 trials, over the cap of 10000",
        _grid("".join(f"  {p}: {{values: [{', '.join(map(str, range(1, 11)))}]}}\n"
                      for p in ("width", "depth", "n_test", "epochs", "batch_size", "data_seed", "true_degree")))),
    Bad("grid-over-a-lowered-cap", "the grid has 6 trials, over the cap of 5",
        "name: t\nseeds: [0, 1, 2]\nparameters:\n  width: {values: [8, 16]}\n",
        env={"FITSCOPE_MAX_TRIALS_PER_EXPERIMENT": "5"}),
    Bad("random-search-of-a-billion", "has 1000000000 trials, over the cap of 10000",
        "name: t\nmethod: random\ncount: 1000000000\nparameters:\n"
        "  lr: {distribution: log_uniform_values, min: 0.001, max: 0.1}\n"),
    Bad("too-many-seeds", "seeds: lists 1001 seeds, over the limit of 1000", f"name: t\nseeds: {list(range(1001))}\n"),
    Bad("too-many-values", "lists 1001 values, over the limit of 1000",
        _grid(f"  width: {{values: {list(range(1, 1002))}}}\n")),
    Bad("int-uniform-too-wide-for-a-grid", "int_uniform gives 999997 values",
        _grid("  n_train: {distribution: int_uniform, min: 4, max: 1000000}\n")),
    Bad("epochs-a-billion", "parameters.epochs.value: Input should be less than or equal to 10000",
        _grid("  epochs: {value: 1000000000}\n")),
    Bad("width-ten-to-the-thirty", "parameters.width.value: Input should be less than or equal to 4096",
        _grid("  width: {value: 1000000000000000000000000000000}\n")),
    # NaN, infinities and negative sizes
    Bad("nan-learning-rate", "parameters.lr.values[1]: Input should be a finite number",
        _grid("  lr: {values: [0.1, .nan]}\n")),
    Bad("inf-width", "parameters.width.value: Input should be a valid integer, got the number inf",
        _grid("  width: {value: .inf}\n")),
    Bad("minus-inf-noise", "parameters.noise.value: Input should be a finite number",
        _grid("  noise: {value: -.inf}\n")),
    Bad("inf-seed", "seeds[0]: Input should be a valid integer", "name: t\nseeds: [.inf]\n"),
    Bad("negative-n-train", "parameters.n_train.value: Input should be greater than or equal to 4",
        _grid("  n_train: {value: -100}\n")),
    Bad("negative-width", "parameters.width.values[0]: Input should be greater than or equal to 1",
        _grid("  width: {values: [-8, 16]}\n")),
    Bad("zero-epochs", "parameters.epochs.value: Input should be greater than or equal to 1",
        _grid("  epochs: {value: 0}\n")),
    Bad("negative-batch-size", "parameters.batch_size.value: Input should be greater than or equal to 1, or 'full'",
        _grid("  batch_size: {value: -32}\n")),
    Bad("beta-of-one-and-a-half", "parameters.betas.value[1]: Input should be less than 1, got the number 1.5",
        _grid("  betas: {value: [0.9, 1.5]}\n")),
    # wrong types
    Bad("quoted-number", "parameters.lr.value: Input should be a valid number, got text '0.1'",
        _grid("  lr: {value: '0.1'}\n")),
    Bad("word-for-a-number", "parameters.width.value: Input should be a valid integer, got text 'sixty-four'",
        _grid("  width: {value: sixty-four}\n")),
    Bad("yes-for-a-number", "parameters.epochs.value: Input should be a valid integer, got a boolean (true)",
        _grid("  epochs: {value: yes}\n")),
    Bad("number-for-a-word", "parameters.activation.value: Input should be 'relu'",
        _grid("  activation: {value: 3}\n")),
    Bad("list-for-a-name", "name: must be text, got a list", "name: [a, b]\n"),
    Bad("mapping-for-seeds", "seeds: must be a list of whole numbers", "name: t\nseeds: {a: 1}\n"),
    Bad("list-at-the-top", "spec: must be a mapping", "- name: t\n"),
    Bad("list-inside-a-value-list", "parameters.width.values[0]: Input should be a valid integer, got a list",
        _grid("  width: {values: [[8, 16]]}\n")),
    Bad("unknown-key-in-early-stopping",
        "parameters.early_stopping.value.patiense: unknown key; did you mean patience?",
        _grid("  early_stopping: {value: {patiense: 5}}\n")),
    Bad("csv-data-set-without-target", "parameters.dataset.value.target: is required",
        _grid("  dataset: {csv: data.csv}\n")),
    Bad("csv-data-set-with-unknown-key", "parameters.dataset.value.sep: unknown key",
        _grid("  dataset: {csv: data.csv, target: y, sep: ';'}\n")),
    Bad("duplicate-key", "spec: key 'width' appears twice", _grid("  width: {value: 8}\n  width: {value: 16}\n")),
    Bad("two-documents", "spec: is not valid YAML at line 2", "name: a\n---\nname: b\n"),
    # names: unicode is welcome (see the test below), control characters are not
    Bad("name-with-a-tab", "name: must be one line without control characters", 'name: "a\\tb"\n'),
    Bad("name-with-a-line-break", "name: must be one line without control characters", 'name: "first\\nsecond"\n'),
    Bad("name-with-nul", "name: must not contain NUL characters", 'name: "a\\0b"\n'),
    Bad("name-of-201-accented-letters", "name: is 201 characters long, over the limit of 200",
        "name: " + "é" * 201 + "\n"),
    Bad("unicode-parameter-typo", "parameters.wïdth: unknown parameter; did you mean width?",
        _grid("  wïdth: {value: 8}\n")),
    # the spec file itself
    Bad("spec-in-latin-1", "is not UTF-8 text; save it as UTF-8", "name: café\n".encode("latin-1")),
    Bad("spec-in-utf-16", "is not UTF-8 text; save it as UTF-8", "name: t\n".encode("utf-16")),
    Bad("spec-of-binary-garbage", "is not UTF-8 text", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8"),
    Bad("empty-spec", "spec: is empty", b""),
    Bad("spec-over-the-size-cap", "bytes, over the cap of 1000 (FITSCOPE_MAX_SPEC_BYTES)",
        "name: t\ndescription: " + "x" * 2000 + "\n", env={"FITSCOPE_MAX_SPEC_BYTES": "1000"}),
    Bad("spec-is-a-folder", "is a folder; pass the path of a YAML grid spec", spec_path="."),
    Bad("spec-is-a-pipe", "is not a regular file (a device or pipe)", files={"pipe.yaml": FIFO}, spec_path="pipe.yaml"),
    Bad("spec-not-found", "not found; pass the path of a YAML grid spec", spec_path="nope.yaml"),
    Bad("spec-name-too-long-for-the-file-system", "cannot be opened (File name too long)",
        spec_path="s" * 300 + ".yaml"),
]

CSVS = [
    Bad("csv-in-latin-1", "not UTF-8 text (byte 0xe9", _spec_naming("data.csv"),
        {"data.csv": "a,b,y\n1,2,café\n3,4,thé\n".encode("latin-1")}),
    Bad("csv-in-utf-16", "the file is UTF-16 text, not UTF-8", _spec_naming("data.csv"),
        {"data.csv": GOOD_CSV.decode().encode("utf-16")}),
    Bad("csv-in-utf-16-without-bom", "contains NUL bytes", _spec_naming("data.csv"),
        {"data.csv": GOOD_CSV.decode().encode("utf-16-le")}),
    Bad("csv-of-binary-garbage", "not UTF-8 text", _spec_naming("data.csv"),
        {"data.csv": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8"}),
    Bad("csv-empty", "the file is empty", _spec_naming("data.csv"), {"data.csv": b""}),
    Bad("csv-header-only", "a header but no data rows", _spec_naming("data.csv"), {"data.csv": b"a,b,y\n"}),
    Bad("csv-of-one-row", "only 1 data row", _spec_naming("data.csv"), {"data.csv": b"a,b,y\n1,2,0\n"}),
    Bad("csv-ragged-short-row", "line 3 has 2 cells but the header has 3", _spec_naming("data.csv"),
        {"data.csv": b"a,b,y\n1,2,0\n3,4\n5,6,1\n"}),
    Bad("csv-ragged-long-row", "line 4 has 4 cells but the header has 3", _spec_naming("data.csv"),
        {"data.csv": b"a,b,y\n1,2,0\n3,4,1\n5,6,1,9\n"}),
    Bad("csv-text-in-a-numeric-column", "column 'b' has text on line 3, but", _spec_naming("data.csv"),
        {"data.csv": b"a,b,y\n1,2,0\n3,abc,1\n5,6,0\n"}),
    Bad("csv-infinite-value", "infinite value 'inf' on line 2", _spec_naming("data.csv"),
        {"data.csv": b"a,b,y\n1,inf,0\n3,4,1\n"}),
    Bad("csv-missing-cell", "column 'b' has a missing value ('NaN') on line 2", _spec_naming("data.csv"),
        {"data.csv": b"a,b,y\n1,NaN,0\n3,4,1\n"}),
    Bad("csv-unterminated-quote", "line 3 is not valid CSV (unexpected end of data)", _spec_naming("data.csv"),
        {"data.csv": b'a,b,y\n1,2,0\n"3,4,1\n'}),
    Bad("csv-semicolons", "separated by ';', not commas",
        _spec_naming("data.csv"), {"data.csv": b"a;b;y\n1;2;0\n3;4;1\n"}),
    Bad("csv-without-the-target", "target column 'y' is not in the header", _spec_naming("data.csv"),
        {"data.csv": b"a,b,label\n1,2,0\n3,4,1\n"}),
    Bad("csv-a-million-columns", "the file has 1000001 columns, over the cap of 1000 (FITSCOPE_MAX_CSV_COLUMNS)",
        _spec_naming("data.csv"),
        {"data.csv": lambda: b",".join(b"c%d" % i for i in range(1_000_000)) + b",y\n" + b"0," * 1_000_000 + b"1\n"}),
    Bad("csv-over-the-size-cap", "bytes, over the cap of 1000 (FITSCOPE_MAX_CSV_BYTES)", _spec_naming("data.csv"),
        {"data.csv": b"a,b,y\n" + b"1,2,0\n" * 400}, env={"FITSCOPE_MAX_CSV_BYTES": "1000"}),
    Bad("csv-over-the-row-cap", "more than 10 data rows, over the cap (FITSCOPE_MAX_CSV_ROWS)",
        _spec_naming("data.csv"),
        {"data.csv": b"a,y\n" + b"".join(b"%d,%d\n" % (i, i % 2) for i in range(20))},
        env={"FITSCOPE_MAX_CSV_ROWS": "10"}),
    Bad("csv-n-train-over-its-rows", "n_train 500 is more than its 3 training rows",
        _spec_naming("data.csv", extra="  n_train: {value: 500}\n"), {"data.csv": GOOD_CSV}),
    Bad("csv-fewer-rows-than-folds", "data.csv: folds 5 needs at least 5 training and validation rows, but it has 4",
        _spec_naming("data.csv", extra="folds: 5\n"), {"data.csv": GOOD_CSV}),
    Bad("csv-not-found", "CSV file 'missing.csv' not found", _spec_naming("missing.csv")),
    Bad("csv-is-a-folder", "CSV file 'data' is a folder", _spec_naming("data"), {"data": FOLDER}),
    Bad("csv-is-a-pipe", "is not a regular file (a device, pipe or socket)",
        _spec_naming("data.csv"), {"data.csv": FIFO}),
    Bad("csv-under-an-unknown-home", "starts with a ~ that names no home folder", _spec_naming("~nosuchuser/d.csv")),
    Bad("csv-name-too-long-for-the-file-system", "cannot be read (File name too long)",
        _spec_naming("d" * 300 + ".csv")),
    # the first file is fine and would be stored; the second is not, so nothing may be stored
    Bad("csv-good-then-bad", "bad.csv: line 3 has 2 cells", _spec_naming("good.csv", "bad.csv"),
        {"good.csv": GOOD_CSV, "bad.csv": b"a,b,y\n1,2,0\n3,4\n"}),
]

URLS = [
    Bad("database-url-mysql", "FITSCOPE_DATABASE_URL uses 'mysql', which fitscope does not support",
        env={"FITSCOPE_DATABASE_URL": "mysql://root:pw@localhost/x"}),
    Bad("database-url-garbage", "FITSCOPE_DATABASE_URL='::::' is not a database URL",
        env={"FITSCOPE_DATABASE_URL": "::::"}),
    Bad("database-url-port-not-a-number", "is not a database URL; use sqlite:///",
        env={"FITSCOPE_DATABASE_URL": "postgresql://u:sekrit@db:port/x"}),
    Bad("database-unreachable", "cannot reach the database at postgresql+psycopg://u:***@127.0.0.1:",
        env={"FITSCOPE_DATABASE_URL": "postgresql://u:sekrit@127.0.0.1:{free_port}/x"}, commands=("submit",)),
    Bad("database-file-not-sqlite", "cannot be read (file is not a database)",
        files={"garbage.db": b"\x89not a database" * 100},
        env={"FITSCOPE_DATABASE_URL": "sqlite:///{dir}/garbage.db"}, commands=("submit",)),
    Bad("database-without-schema", "has no fitscope schema yet; run `fitscope db upgrade`",
        env={"FITSCOPE_DATABASE_URL": "sqlite:///{dir}/fresh.db"}, commands=("submit",)),
    Bad("broker-url-http", "FITSCOPE_BROKER_URL='http://broker' is not a Redis URL",
        env={"FITSCOPE_BROKER_URL": "http://broker"}),
    Bad("broker-url-port-not-a-number", "has a port that is not a number from 1 to 65535",
        env={"FITSCOPE_BROKER_URL": "redis://127.0.0.1:six/0"}),
    Bad("broker-url-database-not-a-number", "ends in '/queue', not a database number",
        env={"FITSCOPE_BROKER_URL": "redis://127.0.0.1:6379/queue"}),
    Bad("broker-unreachable", "cannot reach the broker at redis://:***@127.0.0.1:",
        env={"FITSCOPE_BROKER_URL": "redis://:sekrit@127.0.0.1:{free_port}/0"}, commands=("submit",)),
    Bad("checkpoint-url-s3", "FITSCOPE_CHECKPOINT_URL='s3://bucket/ckpt' is not a file:// URL",
        env={"FITSCOPE_CHECKPOINT_URL": "s3://bucket/ckpt"}),
    Bad("checkpoint-url-relative", "is not a file:// URL of an absolute folder",
        env={"FITSCOPE_CHECKPOINT_URL": "file://shared/ckpt"}),
    Bad("checkpoint-url-bare-path", "is not a file:// URL of an absolute folder",
        env={"FITSCOPE_CHECKPOINT_URL": "/shared/ckpt"}),
    Bad("setting-text-for-a-number", "FITSCOPE_MAX_TRIALS_PER_EXPERIMENT: Input should be a valid integer",
        env={"FITSCOPE_MAX_TRIALS_PER_EXPERIMENT": "lots"}),
    Bad("setting-nan", "FITSCOPE_METRICS_FLUSH_S: Input should be less than or equal to 3600, got 'nan'",
        env={"FITSCOPE_METRICS_FLUSH_S": "nan"}),
]

CASES = SPECS + CSVS + URLS
# Run again as a real `fitscope submit` process: one of each kind.
SUBPROCESS_CASES = ("python-object-tag", "csv-in-latin-1", "csv-good-then-bad", "database-url-port-not-a-number",
                    "checkpoint-url-s3")


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One migrated SQLite database for the whole corpus: no case may add a row to it."""
    url = f"sqlite:///{tmp_path_factory.mktemp('bad-inputs') / 'fitscope.db'}"
    upgrade(url)
    yield url


def _row_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with session_scope(engine) as session:
            return {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                    for model in (Experiment, Trial, Dataset, EpochMetric)}
    finally:
        engine.dispose()


def _write_case(case: Bad, folder: Path) -> tuple[Path, dict[str, str]]:
    """The case's files in ``folder``; returns the spec argument and the case's settings."""
    text = case.spec.replace("{dir}", str(folder)) if isinstance(case.spec, str) else case.spec
    spec = folder / "spec.yaml"
    spec.write_bytes(text.encode() if isinstance(text, str) else text)
    for name, content in case.files.items():
        if content is FOLDER:
            (folder / name).mkdir()
        elif content is FIFO:
            os.mkfifo(folder / name)
        else:
            (folder / name).write_bytes(content() if callable(content) else content)
    env = {key: value.replace("{dir}", str(folder)).replace("{free_port}", str(free_port()))
           for key, value in case.env.items()}
    return (folder / case.spec_path if case.spec_path else spec), env


def _assert_one_sentence(stderr: str, expected: str, context: str) -> None:
    assert "Traceback" not in stderr, context
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), context
    assert expected in stderr, context
    assert "sekrit" not in stderr, context  # a password in a URL is never printed


def test_the_corpus_is_large_and_every_case_distinct():
    assert len(CASES) >= 60
    assert len({case.id for case in CASES}) == len(CASES)
    assert set(SUBPROCESS_CASES) <= {case.id for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_input_is_one_sentence_exit_2_and_writes_nothing(case: Bad, database: str, broker: EmbeddedBroker,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec, env = _write_case(case, tmp_path)
    settings = {"FITSCOPE_DATABASE_URL": database, "FITSCOPE_BROKER_URL": broker.url,
                "FITSCOPE_HOME": str(tmp_path / "home"), **env}
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    before = _row_counts(database)
    runner = CliRunner()
    for command in case.commands:
        get_settings.cache_clear()  # settings are read once per process; each call reads this case's
        result = runner.invoke(app, [command, str(spec)])
        context = f"{command}: exit {result.exit_code}, stderr {result.stderr!r}, exception {result.exception!r}"
        assert result.exit_code == 2, context
        assert isinstance(result.exception, SystemExit), context  # exited on purpose, no exception escaped
        _assert_one_sentence(result.stderr, case.expected, context)
        assert result.stdout == "", context
    assert _row_counts(database) == before
    assert not (tmp_path / "pwned").exists()  # nothing in the spec ran


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_a_bad_input_through_a_real_fitscope_process(case_id: str, database: str, broker: EmbeddedBroker,
                                                    tmp_path: Path):
    [case] = [c for c in CASES if c.id == case_id]
    spec, env = _write_case(case, tmp_path)
    before = _row_counts(database)
    result = fitscope("submit", str(spec), env=fitscope_env(database_url=database, broker_url=broker.url,
                                                            home=tmp_path / "home", **env), timeout=60)
    context = f"exit {result.returncode}, stderr {result.stderr!r}"
    assert result.returncode == 2, context
    _assert_one_sentence(result.stderr, case.expected, context)
    assert _row_counts(database) == before


# Accepted: letters of any script, emoji (joined ones too), combining accents, right-to-left text.
UNICODE_NAMES = ["Ünïcødé 実験 🚀", "👩\u200d🔬 capacity", "e\u0301te\u0301", "مرحبا بالعالم", "Ω" * 200]


@pytest.mark.parametrize("name", UNICODE_NAMES, ids=["mixed", "emoji-zwj", "combining", "rtl", "200-omegas"])
def test_a_unicode_name_is_accepted_and_stored_as_written(name: str, migrated_sqlite_url: str, broker_url: str,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: '{name}'\nparameters:\n  epochs: {{value: 1}}\n", encoding="utf-8")
    for key, value in {"FITSCOPE_DATABASE_URL": migrated_sqlite_url, "FITSCOPE_BROKER_URL": broker_url,
                       "FITSCOPE_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["submit", str(spec), "--json"])
    assert result.exit_code == 0, result.stderr
    engine = make_engine(migrated_sqlite_url)
    try:
        with session_scope(engine) as session:
            assert session.scalars(select(Experiment.name)).all() == [name]
    finally:
        engine.dispose()
