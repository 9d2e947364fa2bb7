"""The README documents every trial parameter with its real default, and every setting."""

from __future__ import annotations

import re

from services.config import Settings
from services.trial_config import parameter_reference
from tests.servers import REPO

README = (REPO / "README.md").read_text()


def test_every_trial_parameter_is_documented_with_its_default():
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", README, flags=re.MULTILINE))
    for parameter in parameter_reference():
        assert parameter["name"] in rows, f"README lacks trial parameter {parameter['name']}"
        assert rows[parameter["name"]] == str(parameter["default"]), parameter["name"]


def test_every_setting_is_documented():
    for name in Settings.model_fields:
        assert f"`FITSCOPE_{name.upper()}`" in README, f"README lacks FITSCOPE_{name.upper()}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in README
    assert "make test" in (REPO / ".ci" / "run").read_text()
