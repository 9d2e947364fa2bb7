"""Who submitted an experiment, its tags and note: capped, kept, shown and searchable from the CLI."""

from __future__ import annotations

import json

import pytest

from tests.servers import REPO, fitscope, fitscope_env

pytestmark = pytest.mark.integration

QUICKSTART = str(REPO / "examples" / "quickstart.yaml")


def test_tags_and_note_are_capped_kept_and_searchable(migrated_sqlite_url, broker_url, tmp_path):
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_SUBMITTED_BY="Alice")
    too_many = [arg for i in range(21) for arg in ("--tag", f"t{i}")]
    for args, field in ((too_many, "--tag"), (["--tag", "x" * 51], "--tag"), (["--note", "n" * 2001], "--note")):
        refused = fitscope("submit", QUICKSTART, *args, env=env)
        assert refused.returncode == 2, refused.stderr
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith(f"error: {field}") and "at most" in line
    for tag in ("two\nlines", "bell\x07", "c1\x85c1"):
        refused = fitscope("submit", QUICKSTART, "--tag", tag, env=env)
        [line] = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and line.startswith("error: --tag ") and "control character" in line, line
    assert json.loads(fitscope("status", "--json", env=env).stdout) == []  # nothing was written

    submitted = fitscope("submit", QUICKSTART, "--json", "--tag", "baseline", "--tag", " baseline ", "--tag", "moons",
                         "--note", "first try\nwith the defaults", env=env)
    assert submitted.returncode == 0, submitted.stderr
    experiment_id = json.loads(submitted.stdout)["experiment_id"]

    for text in ("alice", "DEFAULTS"):  # the submitter, the note (services.queries covers the rest)
        found = json.loads(fitscope("status", "--search", text, "--json", env=env).stdout)
        assert [e["id"] for e in found] == [experiment_id], text
    [summary] = found
    assert (summary["submitted_by"], summary["tags"], summary["note"]) == (
        "Alice", ["baseline", "moons"], "first try\nwith the defaults")
    table = fitscope("status", "--search", "BASELINE", env=env).stdout
    assert "#baseline #moons  first try with the defaults" in table
    missing = fitscope("status", "--search", "bob%", env=env)
    assert missing.returncode == 0 and "no experiment matches 'bob%'" in missing.stdout
    too_long = fitscope("status", "--search", "x" * 201, env=env)
    assert too_long.returncode == 2 and too_long.stderr.startswith("error: --search is 201 characters")


def test_who_cancelled_and_who_requeued_are_recorded_from_the_cli(migrated_sqlite_url, broker_url, tmp_path):
    """The CLI acts as FITSCOPE_SUBMITTED_BY (a signed-in dashboard user is covered by
    tests/browser/test_sign_in.py); the latest actor is kept and `status --json` shows both."""
    env = fitscope_env(database_url=migrated_sqlite_url, broker_url=broker_url, home=tmp_path,
                       FITSCOPE_SUBMITTED_BY="Alice")
    submitted = fitscope("submit", QUICKSTART, "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    experiment_id = json.loads(submitted.stdout)["experiment_id"]

    def who() -> tuple:
        [summary] = json.loads(fitscope("status", "--json", env=env).stdout)
        return summary["submitted_by"], summary["cancelled_by"], summary["requeued_by"]

    assert who() == ("Alice", None, None)
    bob = {**env, "FITSCOPE_SUBMITTED_BY": "Bob"}
    assert fitscope("cancel", str(experiment_id), env=bob).returncode == 0
    assert who() == ("Alice", "Bob", None)
    carol = {**env, "FITSCOPE_SUBMITTED_BY": "Carol"}
    requeued = fitscope("requeue", str(experiment_id), env=carol)
    assert requeued.returncode == 0, requeued.stderr
    assert who() == ("Alice", "Bob", "Carol")
    missing = fitscope("cancel", "999", env=bob)  # no such experiment: nothing recorded anywhere
    assert missing.returncode == 2 and who() == ("Alice", "Bob", "Carol")
