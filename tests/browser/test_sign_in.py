"""Sign-in, end to end in a real browser: a local OpenID provider (oidc-provider-mock, on a free
127.0.0.1 port, started here), an embedded Valkey broker, a migrated SQLite file and the dashboard
started as users start it (`fitscope dashboard`, with the FITSCOPE_OIDC_* settings in its environment).

A visitor who has not signed in sees the sign-in page and nothing else, whatever page they ask for;
after signing in as the provider's user "ada", the sidebar says who is signed in, a submit from the
New experiment page is recorded with ada's e-mail address as submitted_by, a cancel from the
Experiments page as cancelled_by, and the Experiment page shows both; after signing out, the sign-in
page is back. Screenshots go to
test-output/browser/sign-in-*.png."""

from __future__ import annotations

import os
import re
import secrets
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.broker import free_port, start_embedded_broker
from services.db import make_engine, session_scope
from services.migrate import upgrade
from services.models import Experiment
from tests.browser.test_browser import EXAMPLE, TRIALS, _wait_for_health, browser_page, screenshot, sync_api
from tests.servers import REPO, fitscope_env

oidc_provider_mock = pytest.importorskip("oidc_provider_mock", reason="the oidc-provider-mock package is missing; "
                                         "pip install -e '.[test]' installs it")
werkzeug_serving = pytest.importorskip("werkzeug.serving")

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

EMAIL = "ada@example.org"


def _shown(text: str) -> re.Pattern:
    """``text`` as the dashboard shows user text: literally, with an invisible word joiner (U+2060)
    before an e-mail address's @ so Streamlit does not turn it into a link."""
    return re.compile(re.escape(text).replace("@", "\u2060?@"))


@dataclass
class SignedInStack:
    url: str
    database_url: str
    home: Path
    secrets: tuple[str, str]  # the client secret and the cookie secret
    log: Path


@pytest.fixture
def provider() -> Iterator[str]:
    """A local OpenID provider with one predefined user; yields its discovery document's URL."""
    app = oidc_provider_mock.app(user_claims=[
        oidc_provider_mock.User(sub="ada", claims={"email": EMAIL, "name": "Ada Lovelace"})])
    port = free_port()
    server = werkzeug_serving.make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/.well-known/openid-configuration"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@pytest.fixture
def stack(tmp_path: Path, provider: str) -> Iterator[SignedInStack]:
    broker = start_embedded_broker(data_dir=tmp_path / "valkey", port=free_port())
    database_url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    upgrade(database_url)
    port = free_port()
    client_secret, cookie_secret = secrets.token_hex(24), secrets.token_hex(32)
    env = fitscope_env(
        database_url=database_url, broker_url=broker.url, home=tmp_path / "home",
        FITSCOPE_BIND_HOST="127.0.0.1", FITSCOPE_DASHBOARD_PORT=str(port),
        FITSCOPE_OIDC_SERVER_METADATA_URL=provider, FITSCOPE_OIDC_CLIENT_ID="fitscope-dashboard",
        FITSCOPE_OIDC_CLIENT_SECRET=client_secret, FITSCOPE_OIDC_COOKIE_SECRET=cookie_secret,
        FITSCOPE_OIDC_REDIRECT_URI=f"http://127.0.0.1:{port}/oauth2callback",
        FITSCOPE_SUBMITTED_BY="not-the-signed-in-user")  # sign-in wins over the CLI's default
    log = tmp_path / "dashboard.log"
    with open(log, "wb") as log_file:
        dashboard = subprocess.Popen([sys.executable, "-m", "services.cli", "dashboard"], cwd=REPO, env=env,
                                     stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_health(port, dashboard, log)
        yield SignedInStack(url=f"http://127.0.0.1:{port}", database_url=database_url, home=tmp_path / "home",
                            secrets=(client_secret, cookie_secret), log=log)
    finally:
        dashboard.terminate()
        try:
            dashboard.wait(20)
        except subprocess.TimeoutExpired:
            dashboard.kill()
            dashboard.wait()
        broker.stop()


@pytest.fixture
def page(stack: SignedInStack):
    with browser_page(height=1400) as page:
        yield page


def _experiment(database_url: str, experiment_id: int) -> Experiment:
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            experiment = session.get(Experiment, experiment_id)
            session.expunge(experiment)
            return experiment
    finally:
        engine.dispose()


def test_only_a_signed_in_user_sees_the_dashboard_and_their_submit_and_cancel_are_recorded(stack, page):
    expect = sync_api.expect

    # The secrets file Streamlit reads is this user's alone; no secret reached the log.
    secrets_file = stack.home / "private" / "dashboard-secrets.toml"
    assert stat.S_IMODE(os.stat(secrets_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(secrets_file.parent).st_mode) == 0o700
    assert all(secret in secrets_file.read_text() for secret in stack.secrets)

    # Not signed in: the sign-in page and nothing else, whichever page is asked for.
    for path in ("", "/new_experiment", "/experiment?experiment=1"):
        page.goto(f"{stack.url}{path}")
        expect(page.get_by_role("heading", name="Sign in to see and run this team's experiments")).to_be_visible()
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        for page_name in ("Experiments", "New experiment", "Experiment", "Fit analysis"):
            expect(page.get_by_role("link", name=page_name, exact=True)).to_have_count(0)
        expect(page.get_by_role("button", name="Submit")).to_have_count(0)
        for hidden in ("Database:", "Broker:", "capacity-vs-data-size"):
            expect(page.get_by_text(hidden)).to_have_count(0)
    screenshot(page, "sign-in-1-signed-out")

    # Sign in at the provider as its predefined user.
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("button", name="ada").click()  # the provider's "Authenticate predefined users" form
    expect(page.get_by_text(_shown(f"Signed in as {EMAIL}"))).to_be_visible()
    expect(page.get_by_role("link", name="New experiment")).to_be_visible()
    expect(page.get_by_role("heading", name="Experiments", level=1)).to_be_visible()  # and an h3 "Experiments"
    screenshot(page, "sign-in-2-signed-in")

    # Submit from the page: the submitter is the signed-in user, shown and not editable.
    page.get_by_role("link", name="New experiment").click()
    expect(page.get_by_role("heading", name="New experiment")).to_be_visible()
    page.locator(".st-key-new_example").get_by_role("button", name="Open").click()
    page.get_by_role("option", name=EXAMPLE).click()
    submitter = page.get_by_role("textbox", name="Submitted by")
    expect(submitter).to_have_value(EMAIL)
    expect(submitter).to_be_disabled()
    page.get_by_role("button", name=f"Submit {TRIALS} trials").click()
    expect(page.get_by_text(f"submitted: {TRIALS} trials queued")).to_be_visible()
    screenshot(page, "sign-in-3-submitted")
    assert _experiment(stack.database_url, 1).submitted_by == EMAIL

    # Cancel from the Experiments page (no worker runs, so every trial is still queued).
    page.get_by_role("link", name="Experiments").first.click()
    card = page.locator(".st-key-experiments_card_1")
    expect(card.get_by_text(f"{TRIALS} queued")).to_be_visible()
    for attempt in range(3):
        # A click that lands while the card's live panel redraws itself (every 2 s) is sometimes lost,
        # nothing reaching the server: click again, as a user would.
        card.get_by_role("button", name="Cancel", exact=True).click()
        try:
            expect(card.get_by_text(f"{TRIALS} cancelled")).to_be_visible(timeout=10_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    assert _experiment(stack.database_url, 1).cancelled_by == EMAIL

    # The Experiment page says who.
    page.goto(f"{stack.url}/experiment?experiment=1")
    expect(page.get_by_text(_shown(f"Submitted by {EMAIL} · last cancelled by {EMAIL}"))).to_be_visible()
    screenshot(page, "sign-in-4-experiment")

    # Sign out: the provider ends its session, and the dashboard shows its sign-in page again.
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="End session").click()  # the provider's end-session form
    page.goto(stack.url)
    expect(page.get_by_role("heading", name="Sign in to see and run this team's experiments")).to_be_visible()
    expect(page.get_by_text(_shown(f"Signed in as {EMAIL}"))).to_have_count(0)

    log = stack.log.read_text(errors="replace")
    assert not any(secret in log for secret in stack.secrets)
