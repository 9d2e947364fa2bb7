"""The dashboard's sign-in gate (dashboard/signin.py) run with AppTest on a migrated SQLite file: with
FITSCOPE_OIDC_* set, a visitor who has not signed in gets the sign-in page and no page, no sidebar;
without the secrets file Streamlit needs, one sentence says how to start it; beyond loopback without
sign-in, the app refuses. (The signed-in flow itself runs in tests/browser/test_sign_in.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from services.migrate import upgrade

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
OIDC = {
    "FITSCOPE_OIDC_SERVER_METADATA_URL": "https://idp.example.org/.well-known/openid-configuration",
    "FITSCOPE_OIDC_CLIENT_ID": "fitscope",
    "FITSCOPE_OIDC_CLIENT_SECRET": "client-secret",
    "FITSCOPE_OIDC_REDIRECT_URI": "http://127.0.0.1:8501/oauth2callback",
    "FITSCOPE_OIDC_COOKIE_SECRET": "c" * 40,
}


@pytest.fixture
def database(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    upgrade(url)
    monkeypatch.setenv("FITSCOPE_DATABASE_URL", url)
    for name in OIDC:
        monkeypatch.delenv(name, raising=False)


def _texts(app: AppTest) -> str:
    return " ".join(str(element.value) for kind in ("title", "subheader", "markdown", "error", "caption")
                    for element in getattr(app, kind))


def test_a_visitor_who_has_not_signed_in_sees_only_the_sign_in_page(database, monkeypatch):
    for name, value in OIDC.items():
        monkeypatch.setenv(name, value)
    app = AppTest.from_file(APP, default_timeout=60)
    app.secrets["auth"] = {key.removeprefix("FITSCOPE_OIDC_").lower(): value for key, value in OIDC.items()}
    app.run()
    assert not app.exception, app.exception
    assert [button.label for button in app.button] == ["Sign in"]
    assert "Sign in to see and run this team's experiments" in _texts(app)
    assert "idp.example.org" in _texts(app).replace("\\", "")  # shown literally: Markdown escaped
    assert len(app.sidebar) == 0 and "Database:" not in _texts(app)
    assert not app.dataframe and not app.text_input  # no page ran


def test_sign_in_configured_but_not_handed_to_streamlit_is_one_sentence(database, monkeypatch):
    for name, value in OIDC.items():
        monkeypatch.setenv(name, value)
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert [error.value for error in app.error] == [
        "sign-in is configured (FITSCOPE_OIDC_*) but Streamlit was started without it; start the dashboard with "
        "`fitscope dashboard`, which hands Streamlit its private secrets file"]
    assert not app.button


def test_beyond_loopback_without_sign_in_the_app_refuses(database):
    config.set_option("server.address", "0.0.0.0")  # the conftest puts 127.0.0.1 back after the test
    app = AppTest.from_file(APP, default_timeout=60).run()
    [error] = app.error
    assert error.value.startswith("this dashboard listens beyond this machine without sign-in: set "
                                  "FITSCOPE_OIDC_SERVER_METADATA_URL")
    assert not app.button and len(app.sidebar) == 0
