"""`lab server` as a user runs it: --auth starts on a fresh install (401 without credentials, a run logged with
them), and stopping `lab server` with SIGTERM or SIGINT stops everything it started, so the port is free again."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lab import server
from lab.errors import LabError

PASSWORD = "a-long-admin-password"


def descendants(pid: int) -> set[int]:
    """Every process below pid, from /proc (the server's uvicorn workers and job runners included)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # a busy 2-core CI box: seconds
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def start_server(tmp: Path, env: dict, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lab.cli", "server", "--port", str(port), *extra], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_up(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            status(f"{url}/health")
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("lab server did not answer")


def stop_and_check(proc: subprocess.Popen, sig: int, port: int) -> str:
    """Sends sig to `lab server` only (not its group), and checks that it and all it started are gone."""
    started = descendants(proc.pid)
    assert started, "lab server started no process"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    end = time.time() + 20
    while time.time() < end and (any(alive(p) for p in started) or not port_free(port)):
        time.sleep(0.2)
    left = [p for p in started if alive(p)]
    for pid in left:  # the test leaves nothing behind even when it fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after lab server stopped: {left}\n{out}"
    assert port_free(port)
    return out


@pytest.fixture
def server_env(tmp_path, cli_env):
    """No credentials or secret key inherited; the key file lab generates lands in TMP/config."""
    env = {k: v for k, v in cli_env.items() if not k.startswith("MLFLOW_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    return env


@pytest.mark.slow
def test_auth_server_starts_on_a_fresh_install_and_sigterm_stops_all_of_it(tmp_path, server_env, free_port):
    from mlflow.tracking import MlflowClient

    port = free_port()
    refused = subprocess.run([sys.executable, "-m", "lab.cli", "server", "--auth", "--port", str(port)], cwd=tmp_path,
                             env=server_env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" in refused.stderr and port_free(port)

    proc = start_server(tmp_path, {**server_env, "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD}, port, "--auth")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(proc, url)
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert status(search) == 401
        assert status(search, ("admin", "wrong-password-123")) == 401
        assert status(search, ("admin", PASSWORD)) == 200
        key = tmp_path / "config" / "lab" / "mlflow-flask-secret-key"
        assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_text().strip()) == 64
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=PASSWORD)
        try:
            client = MlflowClient(url)
            run = client.create_run(client.create_experiment("auth")).info.run_id
            client.log_metric(run, "val/acc", 0.5)
            client.set_terminated(run)
            assert client.get_run(run).data.metrics["val/acc"] == 0.5
        finally:
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(name, None)
    except BaseException:
        proc.kill()
        raise
    out = stop_and_check(proc, signal.SIGTERM, port)
    assert proc.returncode == 130 and "interrupted by SIGTERM" in out and "Traceback" not in out, out


@pytest.mark.slow
def test_sigint_to_lab_server_alone_stops_mlflow_and_frees_the_port(tmp_path, server_env, free_port):
    port = free_port()
    proc = start_server(tmp_path, server_env, port)
    try:
        wait_up(proc, f"http://127.0.0.1:{port}")
    except BaseException:
        proc.kill()
        raise
    out = stop_and_check(proc, signal.SIGINT, port)
    assert proc.returncode == 130 and "Traceback" not in out, out


def test_auth_needs_the_admin_password_said_in_one_sentence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's auth store (basic_auth.db) would be here: a fresh install has none
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_CONFIG_PATH", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(LabError, match="set MLFLOW_AUTH_ADMIN_PASSWORD"):
        server.auth_env()
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "short")
    with pytest.raises(LabError, match="5 characters"):
        server.auth_env()
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", PASSWORD)
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    first = server.auth_env()["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    assert server.auth_env()["MLFLOW_FLASK_SERVER_SECRET_KEY"] == first  # generated once, then kept
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "the-users-own")
    assert server.auth_env()["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "the-users-own"
    server.secret_key_file().chmod(0o644)
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY")
    with pytest.raises(LabError, match="can be read by other users: chmod 600"):
        server.auth_env()
