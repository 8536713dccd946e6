"""The MLflow model a run logs loads without lab: MLflow's own `mlflow models serve` builds an environment from the
model's requirements alone (uv, a fresh virtualenv in which lab is not installed) and answers on 127.0.0.1 with
the probabilities lab's own loading gives."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cloudpickle
import mlflow
import numpy as np
import pytest
import torch
import torchvision
from mlflow.tracking import MlflowClient

from lab.analysis import models
from lab.config import load
from lab.data.normalise import Normalise
from lab.train import exported, job
from lab.train.module import probabilities
from lab.train.nets import CNN, MLP
from lab.train.resnet import ResNet

QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "mlflow.misclassified_per_class=0",
         "measure.enabled=false"]
SERVE_TIMEOUT_S = 600  # building the environment: torch and mlflow installed by uv (about a minute here)


def pip_setting(key: str) -> str | None:
    """pip's own setting (PIP_* variable, else pip.conf's global.KEY), None when unset."""
    value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
    if value:
        return value
    done = subprocess.run([sys.executable, "-m", "pip", "config", "get", f"global.{key}"], capture_output=True,
                          text=True)
    return done.stdout.strip() or None


def uv_settings() -> dict[str, str]:
    """The package sources pip is configured with, as uv's settings: MLflow's uv environment manager runs
    `uv pip install`, which does not read pip.conf (this machine's pip.conf names the local index torch is on)."""
    out = {"UV_INDEX_STRATEGY": "unsafe-best-match"}  # as pip: the best version found on any index
    for key, uv_key in (("index-url", "UV_INDEX_URL"), ("extra-index-url", "UV_EXTRA_INDEX_URL"),
                        ("find-links", "UV_FIND_LINKS")):
        value = pip_setting(key)
        if value:
            out[uv_key] = value
    return out


def get(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_serves_the_logged_model_from_an_environment_without_lab(mlflow_uri, tmp_path, free_port):
    cfg = load(["data=digits", "model=mlp", "model.net.hidden=[16]", *QUICK])
    metrics = job.run(cfg, tmp_path / "out")
    client = MlflowClient(mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("lab").experiment_id])[0]
    uri = run.data.tags["lab.model_uri"]
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert [r.split("==")[0] for r in requirements] == ["mlflow", "torch", "cloudpickle"]
    assert mlflow.models.get_model_info(uri).flavors["pytorch"].get("code") is None  # nothing of lab shipped

    envs, port = tmp_path / "envs", free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "MLFLOW_ENV_ROOT": str(envs),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **uv_settings()}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri,
                                   "--env-manager", "uv", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while get(f"http://127.0.0.1:{port}/ping") != 200:
            assert server.poll() is None, f"mlflow models serve exited {server.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after {SERVE_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            time.sleep(2)
        (built,) = envs.glob("*/bin/python")
        # The environment MLflow built has torch and not lab: what loaded the model is torch's classes alone.
        code = "import torch\ntry:\n import lab\nexcept ImportError: print('no lab')"
        probe = subprocess.run([str(built), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               env={"PATH": os.environ["PATH"]})
        assert probe.stdout.strip() == "no lab", probe.stdout + probe.stderr
        datamodule, _ = job.build(cfg)
        test = datamodule.splits["test"]
        x = test.x.numpy()  # what the model takes: uint8 images as decoded (it normalises as training did)
        served = np.array(post(f"http://127.0.0.1:{port}/invocations", {"inputs": x.tolist()})["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(envs, ignore_errors=True)  # gigabytes (torch with its CUDA libraries)
    expected = models.load(run.info.run_id).probabilities(test.x).numpy()
    assert served.shape == expected.shape and np.abs(served - expected).max() <= 1e-5
    assert float((served.argmax(1) == test.y.numpy()).mean()) == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "bce"])
def test_portable_model_computes_what_the_predictor_does(loss):
    torch.manual_seed(0)
    classes = 2 if loss == "bce" else 5
    for net in (CNN([3, 8, 8], classes, channels=[4], hidden=[8]), MLP([3, 8, 8], classes, hidden=[8])):
        if loss == "bce":
            net.reset_classifier(1)
        net.eval()
        x = torch.randn(6, 3, 8, 8)
        portable = exported.portable(net, loss).eval()
        assert {type(m).__module__.split(".")[0] for m in portable.modules()} == {"torch"}
        with torch.no_grad():
            assert torch.equal(portable(x), probabilities(net(x), loss))
        assert exported.logits_net(portable)(x).shape == (6, 1 if loss == "bce" else classes)
        images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
        normalise = Normalise([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
        with torch.no_grad():
            served = exported.portable(net, loss, normalise).eval()(images)
            assert torch.equal(served, portable(normalise(images)))
            assert torch.equal(exported.logits_net(exported.portable(net, loss, normalise))(x), net(x))


def test_a_logged_model_normalises_as_training_does_and_unpickles_without_lab(tmp_path):
    """The Normalise a logged model starts with is prepare_batch's, and its code travels in the pickle (by
    value): a Python in which lab cannot be imported loads the model and gives the same probabilities."""
    cfg = load(["data=digits", "model=mlp", "model.net.hidden=[8]", "data.batch_size=16"])
    datamodule, module = job.build(cfg)
    x = datamodule.splits["test"].x[:16]
    meta = exported.metadata(datamodule, module.loss)
    model = exported.portable(module.net.eval(), module.loss, exported.normaliser(meta)).eval()
    with torch.no_grad():
        assert torch.equal(model[0](x), datamodule.prepare_batch(x, training=False))
        expected = model(x)
    (tmp_path / "model.pkl").write_bytes(cloudpickle.dumps(model))
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, pickle, torch\nsys.modules['lab'] = None  # import lab fails\n"
            "model = pickle.loads(open('model.pkl', 'rb').read())\n"
            "torch.save(model(torch.load('x.pt')), 'out.pt')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_requirements_name_torchvision_for_its_modules_and_ship_a_users_own_code(tmp_path, monkeypatch):
    pins, code = exported.requirements(exported.portable(torchvision.models.resnet18(num_classes=3)))
    assert [p.split("==")[0] for p in pins] == ["torch", "cloudpickle", "torchvision"] and code == []
    pins, code = exported.requirements(exported.portable(ResNet([1, 32, 32], 3)))  # lab's ResNet is timm's
    assert [p.split("==")[0] for p in pins] == ["torch", "cloudpickle", "timm"] and code == []
    (tmp_path / "mynets_for_serving.py").write_text(
        "import torch\nclass Tiny(torch.nn.Module):\n    def forward(self, x):\n        return x.flatten(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from mynets_for_serving import Tiny

    pins, code = exported.requirements(exported.portable(Tiny()))
    assert [p.split("==")[0] for p in pins] == ["torch", "cloudpickle"]
    assert code == [str(tmp_path / "mynets_for_serving.py")]
