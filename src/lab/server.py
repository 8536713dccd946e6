"""`lab server`: an MLflow tracking server that sweep workers on this or other hosts log to over HTTP.

Bound to 127.0.0.1 unless a host is named; a non-loopback host needs --auth (MLflow's basic-auth app),
so no tracking data is served to the network without a password.
"""
import ipaddress
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from lab import uris
from lab.errors import LabError
from lab.train import tracking

READY_TIMEOUT_S = 120


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_cmd(backend: str, artifacts: Path, host: str, port: int, auth: bool) -> list[str]:
    if not is_loopback(host) and not auth:
        raise LabError(f"--host {host} would serve tracking data beyond this machine without a password: add "
                       "--auth (MLflow basic auth; set MLFLOW_TRACKING_USERNAME/PASSWORD on clients), or use "
                       "--host 127.0.0.1 and an SSH tunnel.")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend, "--artifacts-destination", str(artifacts.resolve()), "--serve-artifacts",
           "--workers", "2"]
    return cmd + (["--app-name", "basic-auth"] if auth else [])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise LabError(f"mlflow server exited with status {proc.returncode} before it was ready.")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise LabError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s.")


@contextmanager
def running(backend: str, artifacts: Path, host: str = "127.0.0.1", port: int = 5000, auth: bool = False,
            log_path: Path | None = None):
    """Yields the server's URL; stops the server on exit."""
    cmd = server_cmd(backend, artifacts, host, port, auth)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log_path:
            log.close()


def command(args) -> None:
    backend = args.backend_store_uri or tracking.tracking_uri()
    if backend.startswith("http"):
        backend = tracking.DEFAULT_URI
    cmd = server_cmd(backend, Path(args.artifacts), args.host, args.port, args.auth)
    with tracking.creation_lock(backend):  # the schema made here, safe from a Ctrl-C in the server's migration
        tracking.create_sqlite_store(backend)
    print(f"MLflow server: http://{args.host}:{args.port}  backend {tracking.mask_password(backend)}, "
          f"artifacts {Path(args.artifacts).resolve()}")
    print(f"workers: export MLFLOW_TRACKING_URI=http://{args.host}:{args.port}")
    print(f"open: http://{args.host}:{args.port}/#/experiments?{uris.TRAINING_VIEW}  (the model-training view; MLflow "
          "opens its GenAI view otherwise)")
    sys.exit(subprocess.call(cmd))
