"""The dashboard in a real browser, against the real stack: an embedded Valkey broker, a migrated
SQLite file, one `fitscope worker` and `streamlit run dashboard/app.py`, all on free ports. Debian's
chromium, driven by Playwright, submits an example grid on the New experiment page, watches the
Experiments page until the worker has trained every trial, and finds the capacity chart on the Fit
analysis page, then opens the Experiment, Optimizers and schedules and Trial pages. A screenshot of
each page goes to test-output/browser/.

Skipped, saying why, when /usr/bin/chromium or the playwright package is missing (`make test`
installs both where it can: playwright from PyPI, chromium with apt-get when run as root)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services.broker import free_port, start_embedded_broker
from services.migrate import upgrade
from tests.servers import REPO, WorkerProcess, fitscope, fitscope_env

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "test-output" / "browser"
EXAMPLE = "Capacity vs data size"  # examples/capacity_vs_data.yaml: 16 trials, seconds of training
TRIALS = 16

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing; install Debian's chromium (apt-get install chromium) to run the "
                "browser test (`make test` does so when run as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing; "
                               "pip install -e '.[test]' installs it")


@pytest.fixture
def stack(_stack: tuple[str, dict[str, str]]) -> str:
    """The real stack on free ports: the dashboard's URL."""
    return _stack[0]


@pytest.fixture(scope="module")
def _stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """The real stack on free ports, one for the module (each test reads only the experiments it
    submitted, by the ids the submit gave it); yields the dashboard's URL and the environment of its
    CLI, and stops everything after."""
    tmp_path = tmp_path_factory.mktemp("browser-stack")
    broker = start_embedded_broker(data_dir=tmp_path / "valkey", port=free_port())
    database_url = f"sqlite:///{tmp_path / 'fitscope.db'}"
    upgrade(database_url)
    env = fitscope_env(database_url=database_url, broker_url=broker.url, home=tmp_path / "home",
                       FITSCOPE_SUBMITTED_BY="browser-test")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    port = free_port()
    dashboard_log = open(tmp_path / "dashboard.log", "wb")  # noqa: SIM115 - closed below
    dashboard = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboard" / "app.py"), "--server.address",
         "127.0.0.1", "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=dashboard_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        worker.wait_ready(timeout=120)
        _wait_for_health(port, dashboard, tmp_path / "dashboard.log")
        yield f"http://127.0.0.1:{port}", env
    finally:
        dashboard.terminate()
        try:
            dashboard.wait(20)
        except subprocess.TimeoutExpired:
            dashboard.kill()
            dashboard.wait()
        dashboard_log.close()
        worker.stop()
        broker.stop()


def _wait_for_health(port: int, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the dashboard exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                if response.read().decode() == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"the dashboard did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@contextmanager
def browser_page(*, height: int) -> Iterator:
    """A page in Debian's headless chromium, 1400 px wide and ``height`` tall (Streamlit scrolls inside
    its own container, so a screenshot shows only the viewport), patient with a loaded machine."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.set_default_timeout(60_000)
            sync_api.expect.set_options(timeout=60_000)  # a first page load on a loaded machine takes seconds
            yield page
        finally:
            browser.close()


@pytest.fixture
def page(stack: str):
    with browser_page(height=2200) as page:
        yield page


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def test_submit_an_example_grid_watch_it_finish_and_find_the_capacity_chart(_stack, stack: str, page):
    expect = sync_api.expect

    # New experiment: pick the example grid, see its trial count, submit it with one click.
    page.goto(f"{stack}/new_experiment")
    expect(page.get_by_role("heading", name="New experiment")).to_be_visible()
    page.locator(".st-key-new_example").get_by_role("button", name="Open").click()
    page.get_by_role("option", name=EXAMPLE).click()
    expect(page.get_by_text(f"capacity-vs-data-size: {TRIALS} trials (grid, 2 seed(s))")).to_be_visible()
    screenshot(page, "1-new-experiment")
    page.get_by_role("button", name=f"Submit {TRIALS} trials").click()
    expect(page.get_by_text(f"submitted: {TRIALS} trials queued")).to_be_visible()
    screenshot(page, "2-submitted")

    # Experiments: the live panel refreshes until the worker has trained every trial.
    link = page.get_by_role("link", name=re.compile(r"^Open experiment #\d+$"))
    link.wait_for()
    experiment = int(link.inner_text().rpartition("#")[2])
    page.goto(stack)
    card = page.locator(f".st-key-experiments_card_{experiment}")
    expect(card.get_by_text("capacity-vs-data-size")).to_be_visible()
    expect(card.get_by_text(f"{TRIALS} succeeded")).to_be_visible(timeout=300_000)
    expect(page.get_by_text("No worker online")).to_have_count(0)  # the worker is listed online
    screenshot(page, "3-experiments")

    # Fit analysis, from the card's link: the capacity chart (dashboard/app_pages/fit_analysis.py draws it
    # under "Capacity: ..." with the title "<Final|Best> loss against parameter count").
    card.get_by_role("link", name="Fit analysis").click()
    expect(page.get_by_role("heading", name="Capacity: train and validation against model size")).to_be_visible()
    chart = page.locator(".st-key-fit_capacity_chart")
    expect(chart.locator(".gtitle")).to_contain_text("against parameter count")
    expect(chart.locator(".scatterlayer .trace").first).to_be_attached()  # the curves are drawn
    chart.scroll_into_view_if_needed()
    screenshot(page, "4-fit-analysis")

    # The other pages, opened by the links the pages use, each with its main chart drawn.
    page.goto(f"{stack}/experiment?experiment={experiment}")
    expect(page.get_by_role("heading", name=f"#{experiment} capacity-vs-data-size")).to_be_visible()
    expect(page.locator(f".st-key-experiment_curves_{experiment} .scatterlayer .trace").first).to_be_attached()
    screenshot(page, "5-experiment")
    page.goto(f"{stack}/optimizers?experiment={experiment}")
    expect(page.get_by_role("heading", name="Loss per epoch")).to_be_visible()
    expect(page.locator(".st-key-optimizers_curves_chart .scatterlayer .trace").first).to_be_attached()
    screenshot(page, "6-optimizers-and-schedules")
    page.goto(f"{stack}/trial?trial={_first_trial(_stack[1], experiment)}")
    expect(page.get_by_role("heading", name="Fit diagnosis")).to_be_visible()
    expect(page.locator(".st-key-trial_norms_chart .scatterlayer .trace").first).to_be_attached()
    # Watch it fit: the picture with its epoch slider and play button (plotly draws them when in view).
    animation = page.locator(".st-key-trial_fit_animation")
    animation.scroll_into_view_if_needed()
    expect(animation.locator(".slider-container")).to_be_attached()
    expect(animation.locator(".updatemenu-button").first).to_be_attached()  # play
    screenshot(page, "7-trial")


def _first_trial(env: dict[str, str], experiment: int) -> int:
    import sqlite3

    with sqlite3.connect(env["FITSCOPE_DATABASE_URL"].removeprefix("sqlite:///")) as connection:
        return connection.execute("SELECT min(id) FROM trials WHERE experiment_id = ?", (experiment,)).fetchone()[0]


def _submit(env: dict[str, str], path: Path) -> tuple[int, list[int]]:
    """`fitscope submit --json`: the experiment's id and its trials' ids (the module's stack holds
    the other tests' experiments too)."""
    submitted = fitscope("submit", str(path), "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    payload = json.loads(submitted.stdout)
    return payload["experiment_id"], payload["trial_ids"]


def _wait_until_trained(database_url: str, timeout: float = 600) -> None:
    import sqlite3

    path = database_url.removeprefix("sqlite:///")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(path) as connection:
            left = connection.execute("SELECT count(*) FROM trials WHERE status IN ('queued', 'running')").fetchone()[0]
        if left == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"{left} trials still queued or running after {timeout} s")


@pytest.mark.parametrize("example", ["capacity_vs_data", "optimizers_and_schedules", "regularizers"])
def test_every_page_of_an_example_grid_as_a_first_time_viewer_sees_it(_stack, page, example: str):
    """Submit one of the project's example grids with the CLI, let the worker train it, then save a
    screenshot of every page (test-output/browser/<example>-*.png) with each main chart drawn."""
    expect = sync_api.expect
    url, env = _stack
    experiment, trial_ids = _submit(env, REPO / "examples" / f"{example}.yaml")
    _wait_until_trained(env["FITSCOPE_DATABASE_URL"])
    page.set_viewport_size({"width": 1400, "height": 7000})  # every section of a long page in one picture

    page.goto(url)
    expect(page.get_by_text("succeeded").first).to_be_visible(timeout=90_000)
    screenshot(page, f"{example}-1-experiments")
    page.goto(f"{url}/experiment?experiment={experiment}")
    expect(page.locator(f".st-key-experiment_curves_{experiment} .scatterlayer .trace").first).to_be_attached(
        timeout=90_000)
    screenshot(page, f"{example}-2-experiment")
    page.goto(f"{url}/fit_analysis?experiment={experiment}")
    expect(page.locator(".st-key-fit_curves_chart .scatterlayer .trace").first).to_be_attached(timeout=90_000)
    expect(page.locator(".st-key-fit_verdict_chart .heatmaplayer, .st-key-fit_verdict_chart .cartesianlayer")
           .first).to_be_attached(timeout=90_000)
    page.wait_for_timeout(1500)  # the last charts below the fold finish drawing
    screenshot(page, f"{example}-3-fit-analysis")
    page.goto(f"{url}/optimizers?experiment={experiment}")
    expect(page.locator(".st-key-optimizers_curves_chart .scatterlayer .trace").first).to_be_attached(timeout=90_000)
    expect(page.locator(".st-key-optimizers_divergence_chart .barlayer").first).to_be_attached(timeout=90_000)
    page.wait_for_timeout(1500)
    screenshot(page, f"{example}-4-optimizers-and-schedules")
    page.goto(f"{url}/trial?trial={trial_ids[1]}")
    expect(page.get_by_role("heading", name="Fit diagnosis")).to_be_visible(timeout=90_000)
    expect(page.locator(".scatterlayer .trace").first).to_be_attached(timeout=90_000)  # its curves drawn
    page.wait_for_timeout(1500)
    screenshot(page, f"{example}-5-trial")


def test_the_optimization_views_draw_on_their_example_grids(_stack, page, tmp_path: Path):
    """One stack for the optimization examples, trained by the worker in seconds:
    examples/vanishing_gradients.yaml (depths 2 and 8 only, one seed) and examples/lr_range_test.yaml
    (two epochs): a deep sigmoid trial's layers against depth, Fit analysis's first-over-last layer
    against depth per activation, and the Optimizers page's range test (gradients-*.png); then
    examples/loss_surfaces.yaml (168 trials, one job): the Loss surfaces page draws the paths on
    himmelblau's contour, one panel per learning rate, and the network pages say in one sentence that
    they do not apply (loss_surfaces-*.png)."""
    import yaml

    expect = sync_api.expect
    url, env = _stack
    trimmed = {"vanishing_gradients": {"depth": {"values": [2, 8]}}, "lr_range_test": {"epochs": {"value": 2}}}
    submitted = {}
    for example, parameters in trimmed.items():
        spec = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
        spec["parameters"].update(parameters)
        spec["seeds"] = [0]
        path = tmp_path / f"{example}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))  # the grid in the example's order
        submitted[example] = _submit(env, path)
    surfaces, _ = _submit(env, REPO / "examples" / "loss_surfaces.yaml")
    _wait_until_trained(env["FITSCOPE_DATABASE_URL"])
    page.set_viewport_size({"width": 1400, "height": 7000})  # every chart of the page drawn at once
    vanishing, vanishing_trials = submitted["vanishing_gradients"]
    # its fourth trial: depth 8, sigmoid (the grid's last parameter varies fastest)
    for name, address, key in (("1-trial-layers", f"trial?trial={vanishing_trials[3]}", "trial_layers_chart"),
                               ("2-fit-analysis-depth", f"fit_analysis?experiment={vanishing}", "fit_layers_chart"),
                               ("3-optimizers-range-test", f"optimizers?experiment={submitted['lr_range_test'][0]}",
                                "optimizers_range_chart")):
        page.goto(f"{url}/{address}")
        chart = page.locator(f".st-key-{key}")
        # Fit analysis draws a dozen charts before this one: minutes on a machine loaded 10x over.
        expect(chart.locator(".scatterlayer .trace").first).to_be_attached(timeout=240_000)
        page.wait_for_timeout(1000)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        chart.screenshot(path=str(SCREENSHOTS / f"gradients-{name}.png"))

    page.set_viewport_size({"width": 1400, "height": 1900})
    page.goto(f"{url}/loss_surfaces?experiment={surfaces}")
    chart = page.locator(".st-key-surfaces_chart")
    expect(chart.locator(".gtitle")).to_contain_text("himmelblau", timeout=90_000)
    expect(chart.locator(".scatterlayer .trace").first).to_be_attached()
    expect(page.get_by_text("ended at a known minimum")).to_be_visible()
    page.wait_for_timeout(1500)
    screenshot(page, "loss_surfaces-1-himmelblau")
    page.goto(f"{url}/fit_analysis?experiment={surfaces}")
    expect(page.get_by_text("so the fit analysis does not apply")).to_be_visible(timeout=90_000)
