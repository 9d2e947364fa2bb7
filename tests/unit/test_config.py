from __future__ import annotations

import pytest

from services.config import ConfigError, get_settings


def test_defaults_use_sqlite_under_home_and_the_embedded_broker(monkeypatch, tmp_path):
    monkeypatch.setenv("FITSCOPE_HOME", str(tmp_path / "home"))
    settings = get_settings()
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'home' / 'fitscope.db'}"
    assert settings.uses_embedded_broker
    assert settings.effective_broker_url == "redis://127.0.0.1:6479/0"
    assert settings.max_trials_per_experiment == 10_000


def test_bare_postgresql_url_is_given_the_installed_driver(monkeypatch):
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", "postgresql://u:secret@db:5432/fit")
    assert get_settings().effective_database_url.startswith("postgresql+psycopg://u:secret@db:5432/fit")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FITSCOPE_DATABASE_URL", "not a url", "FITSCOPE_DATABASE_URL='not a url' is not a database URL"),
        ("FITSCOPE_DATABASE_URL", "mysql://root@localhost/x", "uses 'mysql', which fitscope does not support"),
        ("FITSCOPE_BROKER_URL", "amqp://guest@localhost//", "is not a Redis URL"),
        ("FITSCOPE_BROKER_URL", "localhost:6379", "is not a Redis URL"),
        ("FITSCOPE_MAX_TRIALS_PER_EXPERIMENT", "-3", "FITSCOPE_MAX_TRIALS_PER_EXPERIMENT"),
        ("FITSCOPE_DASHBOARD_PORT", "eighty", "FITSCOPE_DASHBOARD_PORT"),
    ],
)
def test_a_bad_setting_is_one_sentence_naming_the_variable(monkeypatch, variable, value, expected):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        get_settings()
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_error_messages_never_print_a_password(monkeypatch):
    monkeypatch.setenv("FITSCOPE_BROKER_URL", "amqp://guest:hunter2@localhost//")
    with pytest.raises(ConfigError) as caught:
        get_settings()
    assert "hunter2" not in str(caught.value)
