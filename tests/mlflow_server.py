"""An MLflow tracking server for the tests that need one (what `lab server` starts, driven from a test): waits
for its /health, stops its whole process group on exit."""
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from lab import server

READY_TIMEOUT_S = 120  # a first start migrates the SQLite schema: ~20 s on 2 busy cores


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode} before it was ready.")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s.")


@contextmanager
def running(backend: str, artifacts: Path, host: str = "127.0.0.1", port: int = 5000, auth: bool = False,
            log_path: Path | None = None):
    """Yields the server's URL; stops the server on exit."""
    cmd = server.server_cmd(backend, artifacts, host, port, auth)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed in the finally below
    proc = server.start(cmd, server.auth_env() if auth else {}, log)
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        server.stop(proc)
        if log_path:
            log.close()
