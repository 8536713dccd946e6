"""The README's two screenshots, made with the real tools: a short quickstart sweep, `lab report` on it, a real
`mlflow server` on its database opened in headless Chromium (Debian's /usr/bin/chromium driven by Playwright, as
tests/test_browser.py does), and the report page opened from disk.

    .venv/bin/python docs/img/screenshots.py [DIR]   # writes docs/img/mlflow-trials.png and docs/img/report.png

About 3 minutes on 2 busy cores (6 trials of 4 epochs instead of the demo's 12 of 8). DIR (default: a new
temporary folder, removed at the end) is kept, and a DIR that already holds the sweep and report is reused.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_TIMEOUT_MS = 120_000  # a cold React app on 2 busy cores


def lab(tmp: Path, env: dict, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "lab.cli", *args], cwd=tmp, env=env, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    keep = len(sys.argv) > 1
    tmp = Path(sys.argv[1]) if keep else Path(tempfile.mkdtemp(prefix="lab-screens-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LAB_"))},
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "LAB_TORCH_THREADS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    if not (tmp / "runs" / "quickstart" / "report.html").is_file():
        shutil.copytree(ROOT / "sweeps", tmp / "sweeps", dirs_exist_ok=True)
        lab(tmp, env, "sweep", "sweeps/quickstart.yaml", "--workers", "2", "--no-live", "--n-trials", "6",
            "trainer.max_epochs=4")
        lab(tmp, env, "report", "sweeps/quickstart.yaml")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", env["MLFLOW_TRACKING_URI"]],
                              cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
                    if r.read().strip() == b"OK":
                        break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart") as r:
            experiment_id = json.loads(r.read())["experiment"]["experiment_id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.set_default_timeout(UI_TIMEOUT_MS)
            # MLflow 3's UI picks its view from the URL's workflowType (src/lab/uris.py): the training runs table.
            page.goto(f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning")
            parent = page.locator("[role=gridcell]", has_text="sweep-quickstart")
            parent.wait_for()
            parent.get_by_role("button").first.click()  # unfold the trials under their sweep's run
            page.get_by_role("link", name="trial-0", exact=True).wait_for()
            for close in page.get_by_role("button", name="Close").all():  # MLflow 3.17's assistant side panel
                if close.is_visible():
                    close.click()
            page.locator("label", has=page.locator("input[value=CHART]")).click()  # the view switch: chart view
            page.get_by_placeholder("Search metric charts").fill("val/")  # the per-epoch validation curves
            page.wait_for_timeout(8000)  # the charts draw after the switch
            page.screenshot(path=OUT / "mlflow-trials.png")

            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.goto((tmp / "runs" / "quickstart" / "report.html").as_uri())
            page.wait_for_function("typeof Plotly !== 'undefined' && "
                                   "document.querySelectorAll('.js-plotly-plot').length > 0", timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=OUT / "report.png")
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the uvicorn process it starts
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print("wrote", OUT / "mlflow-trials.png", OUT / "report.png")


if __name__ == "__main__":
    main()
