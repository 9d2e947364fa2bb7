"""User text in a real browser: an experiment whose name, tags, note and submitter look like Markdown
(a link, a remote image, a colour directive, HTML) and a `?experiment=` query value of the same kind
are shown as the characters typed; no link to, and no request for, evil.example ever appears.
Screenshots go to test-output/browser/literal-*.png."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from services.broker import free_port
from services.db import make_engine, session_scope
from services.migrate import upgrade
from services.spec import parse_spec
from services.submission import submit
from tests.browser.test_browser import SCREENSHOTS, _wait_for_health, browser_page, sync_api
from tests.servers import REPO, fitscope_env

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

NAME = ("[click me](http://evil.example/login) ![t](http://evil.example/t.png) **bold** :red[red] "
        "<a href='http://evil.example/c'>chart</a>")
NOTE = "<img src=http://evil.example/n.png> <a href='http://evil.example/a'>a</a> $x^2$"
TAG = "[tag](http://evil.example/tag)"
SUBMITTER = "![who](http://evil.example/who.png)"
QUERY = "[query](http://evil.example/q)"


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[str]:
    database_url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    upgrade(database_url)
    engine = make_engine(database_url)
    text = f"name: {json.dumps(NAME)}\nparameters:\n  epochs: {{value: 1}}\n"
    with session_scope(engine) as session:
        submit(session, spec=parse_spec(text), spec_text=text, submitted_by=SUBMITTER, max_trials=10,
               tags=[TAG], note=NOTE)
    engine.dispose()
    env = fitscope_env(database_url=database_url, broker_url=f"redis://127.0.0.1:{free_port()}/0",
                       home=tmp_path / "home")
    port = free_port()
    log_path = tmp_path / "dashboard.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"), "--server.address",
             "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
             "--browser.gatherUsageStats", "false"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_health(port, process, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(20)


def test_markdown_looking_user_text_renders_as_plain_text(dashboard: str):
    expect = sync_api.expect
    expect.set_options(timeout=60_000)  # a loaded machine renders slowly
    requested: list[str] = []
    with browser_page(height=1200) as page:
        page.on("request", lambda request: requested.append(request.url))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)

        page.goto(dashboard)
        card = page.locator(".st-key-experiments_card_1")
        expect(card).to_contain_text("1 queued")
        shown = _as_read(card.inner_text())
        # the progress chart, whose axis names the experiment, drawn before anything is checked
        expect(page.locator("svg text", has_text="#1 [")).to_have_count(1)
        for text in (f"#1 {NAME}", NOTE, TAG, f"by {SUBMITTER}"):
            assert text in shown, (text, shown)  # brackets, stars and tags exactly as typed
        page.screenshot(path=str(SCREENSHOTS / "literal-experiments.png"), full_page=True)
        _assert_nothing_from_evil(page)

        page.goto(f"{dashboard}/experiment?experiment=1")
        expect(page.get_by_role("heading", name="Trials")).to_be_visible()
        assert f"#1 {NAME}" in [_as_read(h) for h in page.get_by_role("heading", level=3).all_inner_texts()]
        page.screenshot(path=str(SCREENSHOTS / "literal-experiment.png"), full_page=True)
        _assert_nothing_from_evil(page)

        page.goto(f"{dashboard}/experiment?experiment={quote(QUERY)}")
        warning = page.locator("[data-testid='stAlertContentWarning']")
        expect(warning).to_be_visible()
        assert _as_read(warning.inner_text()) == f"Experiment '{QUERY}' does not exist; choose one below."
        page.screenshot(path=str(SCREENSHOTS / "literal-query.png"), full_page=True)
        _assert_nothing_from_evil(page)
    assert not [url for url in requested if urlsplit(url).hostname == "evil.example"], requested


def _as_read(text: str) -> str:
    """What a reader sees: the invisible word joiners that keep URLs from becoming links dropped."""
    return text.replace("\u2060", "").strip()


def _assert_nothing_from_evil(page) -> None:
    assert page.locator("a[href*='evil.example']").count() == 0
    assert page.locator("img[src*='evil.example']").count() == 0
    assert "evil.example" not in "".join(page.locator("svg a").evaluate_all(
        "links => links.map(a => a.getAttribute('href') || a.getAttribute('xlink:href') || '')"))
    # A chart shows the name as typed: whole, or its start cut with "…" on the progress chart's axis
    # (a rendered <a> would read "...chart" there instead, which is no start of the name).
    for text in page.locator("svg text", has_text="#1 [").evaluate_all("ts => ts.map(t => t.textContent)"):
        assert f"#1 {NAME}".startswith(_as_read(text).removesuffix("…")), text
    # **bold** stays two stars each side, not a bold word of its own
    assert page.locator("strong", has_text=re.compile(r"^bold$")).count() == 0
