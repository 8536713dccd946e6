"""The sweep as a person sees it: a real `mlflow server` on the sweep's DB, opened in headless Chromium
(Debian's /usr/bin/chromium driven by Playwright), and the `lab report` page opened from disk."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real mlflow server and a real browser

CHROMIUM = Path("/usr/bin/chromium")
# Nothing outside 127.0.0.1 is reachable in CI: no GPU, no QUIC, no update or sync traffic to wait on.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 90_000  # a cold React app on 2 busy cores


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip "
                                   "install playwright; the browser is Debian's chromium, not `playwright install`)")
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def get(url: str, body: dict | None = None) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


@pytest.fixture(scope="module")
def server(browser, swept, free_port):
    port = free_port()
    log = open(swept.tmp / "mlflow_server.log", "w")  # noqa: SIM115 - the server's for the module; closed at its end
    # Default artifact settings: the runs' artifact URIs are local paths the server reads as they are.
    env = {**swept.env, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", swept.env["MLFLOW_TRACKING_URI"]],
                            cwd=swept.tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if get(f"{base}/health").strip() == b"OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None, (swept.tmp / "mlflow_server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not answer /health in 180 s"
            time.sleep(1)
        yield swept, base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and the uvicorn process it starts
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_mlflow_ui_shows_the_sweep_and_serves_its_artifacts(server, browser, tmp_path):
    swept, base = server
    study = swept.name
    found = json.loads(get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [swept.experiment_id],
                                                                    "max_results": 1000}))
    runs = {r["info"]["run_name"]: r["info"]["run_id"] for r in found["runs"]}
    assert {f"sweep-{study}", "trial-0", "trial-1", "trial-2", "trial-3"} <= set(runs)
    child = runs["trial-0"]
    listed = json.loads(get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={child}"))
    assert "confusion_matrix.png" in {f["path"] for f in listed["files"]}
    assert get(f"{base}/get-artifact?path=confusion_matrix.png&run_uuid={child}").startswith(b"\x89PNG\r\n\x1a\n")

    experiment = json.loads(get(f"{base}/api/2.0/mlflow/experiments/get?experiment_id={swept.experiment_id}"))
    tags = {t["key"]: t["value"] for t in experiment["experiment"].get("tags", [])}
    assert tags.get("mlflow.experimentKind") == "custom_model_development"

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(UI_TIMEOUT_MS)
    # MLflow 3.17's UI picks its view from its GenAI / Model training switch (the URL's workflowType, remembered
    # in the browser), not from the tag; the bare URL opens the GenAI overview. The switch's own URL:
    page.goto(f"{base}/#/experiments/{swept.experiment_id}?workflowType=machine_learning")
    parent_cell = page.locator("[role=gridcell]", has_text=f"sweep-{study}")
    parent_cell.wait_for()
    parent_cell.get_by_role("button").first.click()  # child runs are folded under their parent
    page.get_by_role("link", name="trial-0", exact=True).wait_for()
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url  # the training runs table
    page.screenshot(path=tmp_path / "experiment.png")

    page.goto(f"{base}/#/experiments/{swept.experiment_id}/runs/{swept.parent_id}")
    page.get_by_text(f"sweep-{study}").first.wait_for()
    page.get_by_text("best_trial").first.wait_for()  # its tags rendered, not only the title
    page.screenshot(path=tmp_path / "parent_run.png")

    page.goto(f"{base}/#/experiments/{swept.experiment_id}/runs/{child}")
    page.get_by_text("trial-0").first.wait_for()
    page.get_by_role("link", name=f"sweep-{study}").wait_for()  # the parent run link
    page.screenshot(path=tmp_path / "child_run.png")
    page.close()


def test_report_images_and_interactive_plots_render_in_the_browser(browser, reported, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(reported.path.as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("[...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, done: i.complete}))")
    assert {i["alt"] for i in images} == reported.plots
    assert all(i["done"] and i["width"] > 0 for i in images), images
    # Plotly drew every study plot from the inlined plotly.js: .js-plotly-plot is what Plotly.newPlot adds.
    page.wait_for_function("typeof Plotly !== 'undefined' && document.querySelectorAll('.js-plotly-plot').length >= "
                           f"{len(reported.interactive)}", timeout=60_000)
    drawn = page.evaluate("[...document.querySelectorAll('.js-plotly-plot')].map(d => ({id: d.id, "
                          "traces: d.data.length, height: d.getBoundingClientRect().height}))")
    assert {d["id"] for d in drawn} == {f"plot-{n}" for n in reported.interactive}
    assert all(d["traces"] >= 1 and d["height"] > 100 for d in drawn), drawn
    # It responds: a zoom (what a drag does) changes the axis range, and hovering a point shows its label.
    history = "document.getElementById('plot-optimization_history')"
    page.evaluate(f"Plotly.relayout({history}, {{'xaxis.range': [0.5, 1.5]}})")
    assert page.evaluate(f"{history}.layout.xaxis.range") == [0.5, 1.5]
    page.locator("#plot-optimization_history").scroll_into_view_if_needed()
    page.screenshot(path=tmp_path / "report_plot.png")
    page.evaluate(f"Plotly.Fx.hover({history}, [{{curveNumber: 0, pointNumber: 0}}])")
    page.wait_for_function(f"{history}.querySelectorAll('.hoverlayer .hovertext').length > 0", timeout=10_000)
    assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests  # nothing from the network
    page.screenshot(path=tmp_path / "report.png", full_page=True)
    page.close()
