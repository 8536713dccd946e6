"""`lab server`: an MLflow tracking server that sweep workers on this or other hosts log to over HTTP.

Bound to 127.0.0.1 unless a host is named; a non-loopback host needs --auth (MLflow's basic-auth app),
so no tracking data is served to the network without a password. The server runs in its own process group
(`mlflow server`, its uvicorn supervisor and workers): stopping `lab server` (Ctrl-C, SIGTERM, SIGHUP) stops
that whole group, so nothing keeps the port.
"""
import importlib.util
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

from lab import interrupts, processes, uris
from lab.errors import LabError
from lab.train import tracking

STOP_GRACE_S = 15  # SIGTERM to the server's process group, SIGKILL after this
SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # signs the auth app's CSRF tokens
PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # the admin user's, read when the auth app creates it
MIN_PASSWORD = 12  # characters: MLflow's own rule for passwords


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


def secret_key_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "lab" / "mlflow-flask-secret-key"


def secret_key() -> str:
    """The Flask secret key of the auth app: generated on first use and kept, readable by its owner only, so
    that a restarted server (and every server of this user) accepts the same sessions."""
    path = secret_key_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    if path.stat().st_mode & 0o077:
        raise LabError(f"{path} (lab server's Flask secret key) can be read by other users: chmod 600 {path}, or "
                       f"delete it for a new one, or set {SECRET_ENV}.")
    return path.read_text().strip()


def admin_exists() -> bool:
    """Whether the auth app's user store exists already (then it holds the admin user, and needs no password)."""
    from mlflow.server.auth.config import read_auth_config  # configparser and MLflow's settings only

    db = uris.sqlite_path(read_auth_config().database_uri)
    return db is None or db.is_file()  # another database: MLflow itself says whether it lacks the admin


def auth_env() -> dict[str, str]:
    """What MLflow's basic-auth app needs to start, checked first: Flask-WTF, a secret key, the admin password."""
    if importlib.util.find_spec("flask_wtf") is None:
        raise LabError("lab server --auth needs MLflow's auth extra, which is not installed: pip install 'mlflow[auth]'.")
    password = os.environ.get(PASSWORD_ENV, "")
    if not password and not admin_exists():
        raise LabError(f"lab server --auth creates MLflow's admin user on its first start and needs its password: "
                       f"set {PASSWORD_ENV} ({MIN_PASSWORD} characters or more); clients then log in with "
                       "MLFLOW_TRACKING_USERNAME=admin and MLFLOW_TRACKING_PASSWORD.")
    if password and len(password) < MIN_PASSWORD:
        raise LabError(f"{PASSWORD_ENV} has {len(password)} characters: MLflow wants {MIN_PASSWORD} or more.")
    return {SECRET_ENV: os.environ.get(SECRET_ENV) or secret_key()}


def start(cmd: list[str], env: dict[str, str], log) -> subprocess.Popen:
    """The server in a process group of its own: a Ctrl-C in the terminal reaches `lab server`, which stops it."""
    return subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the whole group (the uvicorn workers too, which outlive a killed `mlflow server`), SIGKILL to
    what is left after grace_s."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    end = time.time() + grace_s
    while time.time() < end and (proc.poll() is None or processes.alive(proc.pid, group=True)):
        time.sleep(0.1)
    if processes.alive(proc.pid, group=True):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def command(args) -> None:
    backend = args.backend_store_uri or tracking.tracking_uri()
    if backend.startswith("http"):
        backend = tracking.DEFAULT_URI
    cmd = server_cmd(backend, Path(args.artifacts), args.host, args.port, args.auth)
    env = auth_env() if args.auth else {}  # before anything is created
    with tracking.creation_lock(backend):  # the schema made here, safe from a Ctrl-C in the server's migration
        tracking.create_sqlite_store(backend)
    print(f"MLflow server: http://{args.host}:{args.port}  backend {tracking.mask_password(backend)}, "
          f"artifacts {Path(args.artifacts).resolve()}")
    print(f"workers: export MLFLOW_TRACKING_URI=http://{args.host}:{args.port}"
          + ("  (and MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)" if args.auth else ""))
    print(f"open: http://{args.host}:{args.port}/#/experiments?{uris.TRAINING_VIEW}  (the model-training view; MLflow "
          "opens its GenAI view otherwise)", flush=True)
    interrupts.install((signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
    proc = start(cmd, env, None)
    try:
        code = proc.wait()
    finally:
        stop(proc)  # on a signal (Interrupted, said by the CLI) and after the server exited on its own alike
    sys.exit(code)
