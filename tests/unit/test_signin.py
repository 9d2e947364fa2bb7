"""Dashboard sign-in settings (services/signin.py): refused beyond loopback without them, refused
half set, never printed; the secrets file Streamlit reads is private and parses as TOML."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib

import pytest

from services import signin
from services.config import ConfigError, make_settings
from services.launcher import dashboard_command
from tests.servers import REPO

CLIENT_SECRET = "client-secret-\"quoted\"-\\-ünï"
COOKIE_SECRET = "c" * 40
FULL = {
    "FITSCOPE_OIDC_SERVER_METADATA_URL": "https://accounts.google.com/.well-known/openid-configuration",
    "FITSCOPE_OIDC_CLIENT_ID": "fitscope.apps.example",
    "FITSCOPE_OIDC_CLIENT_SECRET": CLIENT_SECRET,
    "FITSCOPE_OIDC_REDIRECT_URI": "https://fitscope.example.org/oauth2callback",
    "FITSCOPE_OIDC_COOKIE_SECRET": COOKIE_SECRET,
}


@pytest.fixture(autouse=True)
def _no_sign_in_from_the_outside(monkeypatch, tmp_path):
    for name in FULL:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FITSCOPE_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_needs_no_sign_in(host):
    settings = make_settings(bind_host=host)
    assert signin.required_config(settings) is None
    assert "--secrets.files" not in dashboard_command(settings)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.20", "fitscope.example.org"])
def test_beyond_loopback_without_sign_in_is_refused_in_one_sentence_naming_the_settings(host):
    with pytest.raises(ConfigError) as caught:
        signin.required_config(make_settings(bind_host=host))
    message = str(caught.value)
    assert "\n" not in message and message.count(". ") == 0
    assert all(name in message for name in FULL)
    assert "FITSCOPE_BIND_HOST=127.0.0.1" in message
    with pytest.raises(ConfigError):
        dashboard_command(make_settings(bind_host=host))


def test_the_cli_refuses_to_start_the_dashboard_beyond_loopback_without_sign_in(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FITSCOPE_")}
    env.update(FITSCOPE_BIND_HOST="0.0.0.0", FITSCOPE_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    for command in ("dashboard", "up"):
        result = subprocess.run([sys.executable, "-m", "services.cli", command], env=env, capture_output=True,
                                text=True, timeout=120, cwd=REPO)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: the dashboard would listen on 0.0.0.0, beyond this machine, "
                                        "without sign-in: set FITSCOPE_OIDC_SERVER_METADATA_URL")
        assert not (tmp_path / "broker").exists()  # `up` refused before starting anything


@pytest.mark.parametrize("missing", sorted(FULL))
def test_half_configured_sign_in_names_what_is_missing(monkeypatch, missing):
    for name, value in FULL.items():
        if name != missing:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv(missing, "")  # compose's ${VAR:-} for an unset variable
    with pytest.raises(ConfigError, match=f"half configured: set {missing} as well"):
        signin.oidc_config(make_settings(bind_host="127.0.0.1"))


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("FITSCOPE_OIDC_REDIRECT_URI", "https://fitscope.example.org/", "followed by /oauth2callback"),
    ("FITSCOPE_OIDC_SERVER_METADATA_URL", "accounts.google.com", "is not an http(s) URL"),
    ("FITSCOPE_OIDC_COOKIE_SECRET", "tiny-s3cret", "openssl rand -hex 32"),
])
def test_an_unusable_sign_in_setting_is_one_sentence(monkeypatch, name, value, expected):
    for key, full in FULL.items():
        monkeypatch.setenv(key, full)
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        signin.oidc_config(make_settings())
    assert expected in str(caught.value) and name in str(caught.value)
    assert value not in str(caught.value) or name != "FITSCOPE_OIDC_COOKIE_SECRET"  # a secret is never echoed


def test_configured_sign_in_writes_a_private_secrets_file_and_never_shows_a_secret(monkeypatch, tmp_path):
    for name, value in FULL.items():
        monkeypatch.setenv(name, value)
    settings = make_settings(bind_host="0.0.0.0")
    folder = tmp_path / "home" / "private"
    folder.mkdir(parents=True, mode=0o755)
    (folder / "dashboard-secrets.toml").write_text("stale")
    os.chmod(folder / "dashboard-secrets.toml", 0o644)  # a wider file from before is narrowed

    command = dashboard_command(settings)

    path = folder / "dashboard-secrets.toml"
    assert command[command.index("--secrets.files") + 1] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert tomllib.loads(path.read_text(encoding="utf-8"))["auth"] == {
        "redirect_uri": FULL["FITSCOPE_OIDC_REDIRECT_URI"], "cookie_secret": COOKIE_SECRET,
        "client_id": FULL["FITSCOPE_OIDC_CLIENT_ID"], "client_secret": CLIENT_SECRET,
        "server_metadata_url": FULL["FITSCOPE_OIDC_SERVER_METADATA_URL"]}
    shown = " ".join(command) + repr(settings) + repr(signin.oidc_config(settings))
    assert CLIENT_SECRET not in shown and COOKIE_SECRET not in shown

    for name in FULL:  # sign-in removed: the next start on loopback leaves no secrets behind
        monkeypatch.delenv(name)
    assert "--secrets.files" not in dashboard_command(make_settings(bind_host="127.0.0.1"))
    assert not path.exists()


@pytest.mark.parametrize(("claims", "expected"), [
    ({"sub": "1234", "email": "ada@example.org", "name": "Ada"}, "ada@example.org"),
    ({"sub": "1234", "preferred_username": "ada", "name": "Ada"}, "ada"),
    ({"sub": "1234", "name": "Ada Lovelace"}, "Ada Lovelace"),
    ({"sub": "1234", "email": ""}, "1234"),
    ({}, None),
])
def test_the_identity_recorded_is_the_email_else_the_user_name_name_or_subject(claims, expected):
    assert signin.identity(claims) == expected
