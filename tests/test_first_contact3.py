"""What a newcomer hits next (issue 26): LAB_* variables with bad values, a config group set to null, running
out of memory, two launches of one study at once, a model of one's own in the working folder, lab from Python.
Each fault is real (the environment, a memory limit set with setrlimit, two processes racing) and the outcome
is read back through MLflow's and Optuna's clients."""
import json
import re
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from PIL import Image

from lab import settings

SRC = Path(settings.__file__).resolve().parent
LAB = [sys.executable, "-m", "lab.cli"]
TINY = ["data=synthetic", "model=mlp", "data.n_train=128", "data.n_test=32", "data.size=8", "model.net.hidden=[16]",
        "trainer.max_epochs=1", "mlflow.log_model=false", "trainer.enable_progress_bar=false"]
# Virtual memory a `lab` process may map: enough for torch's CUDA build and a digits run (~5 GB of mappings
# here), too little for a 2048x2048 digits set (7.5 GB) or a batch of 1024 192x192 images through a CNN (4.5 GiB).
MEMORY_LIMIT = 7 * 2**30


def one_sentence(done: subprocess.CompletedProcess, starts: str) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    lines = done.stderr.strip().splitlines()
    said = [line for line in lines if line.startswith("lab: error: ")]  # beside libraries' own start-up lines
    assert said == lines[-1:] and said[0].startswith("lab: error: " + starts), out
    return said[0]


def sweep_file(tmp: Path, name: str, body: str, overrides=TINY) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"study: {name}\noverrides: {json.dumps(overrides)}\nmetric: val/acc\n{body}")
    return path


def test_every_lab_variable_read_in_src_is_one_lab_checks():
    read = set()
    for path in SRC.rglob("*.py"):
        read |= set(re.findall(r"\bLAB_[A-Z_]+[A-Z]\b", path.read_text()))
    assert read - set(settings.SETTINGS) == set(), "a LAB_* variable without a check in lab/settings.py"


@pytest.mark.parametrize("variable, value", [
    ("LAB_GRACE_S", "abc"), ("LAB_GRACE_S", "0"), ("LAB_GRACE_S", "-5"), ("LAB_HEARTBEAT_S", "0"),
    ("LAB_TORCH_THREADS", "two"), ("LAB_STORAGE_OUTAGE_S", "-1"), ("LAB_STORAGE_OUTAGE_S", "nan"),
    ("LAB_PARENT_PID", "abc"), ("LAB_BEAT_FILE", "/nonexistent/folder/cpu0.beat"), ("LAB_CONF_DIR", "FILE"),
])
def test_a_bad_environment_value_is_one_sentence_before_anything_is_created(lab, workdir, variable, value):
    tmp, env = workdir
    if value == "FILE":
        value = str(tmp / "not_a_folder")
        Path(value).write_text("")
    path = sweep_file(tmp, "envs", "n_trials: 1\nparams:\n  model.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n")
    for command in (["sweep", path, "--workers", "1", "--no-live"], ["train", *TINY]):
        done = lab(*command, env_extra={variable: value})
        line = one_sentence(done, f"{variable}={value} is not valid: ")
        assert "must be" in line
    assert not (tmp / "runs").exists() and not (tmp / "mlflow.db").exists() and not (tmp / "outputs").exists()


def test_a_grace_period_shorter_than_two_heartbeats_is_refused(lab, workdir):
    done = lab("train", *TINY, env_extra={"LAB_GRACE_S": "10", "LAB_HEARTBEAT_S": "30"})
    assert "at least twice the heartbeat interval" in one_sentence(done, "LAB_GRACE_S=10 is not valid with")
    assert settings.rdb_timing() == {"heartbeat_interval": 30, "grace_period": 120}


@pytest.mark.parametrize("override, says", [
    ("optimizer=null", "every run needs one of the optimizer configs, adam, adamw, rmsprop, sgd"),
    ("model=null", "every run needs one of the model configs, cnn, linear, mlp"),
    ("data=null", "every run needs one of the data configs, digits"),
    ("scheduler=null", "scheduler is off unless one of its options is named"),
])
def test_a_config_group_set_to_null_is_one_sentence(lab, workdir, override, says):
    tmp, _ = workdir
    assert says in one_sentence(lab("train", "data=digits", override), f"{override} is not valid: ")
    assert not (tmp / "outputs").exists() and not (tmp / "mlflow.db").exists()


def test_a_sweep_given_a_group_set_to_null_says_it_in_one_sentence(lab, workdir):
    tmp, _ = workdir
    path = sweep_file(tmp, "nulls", "n_trials: 1\nparams:\n  model.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n")
    line = one_sentence(lab("sweep", path, "--workers", "1", "optimizer=null"), "")
    assert "optimizer=null is not valid: every run needs one of the optimizer configs" in line
    assert not (tmp / "runs").exists() and not (tmp / "mlflow.db").exists()


def limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.mark.slow
def test_out_of_memory_on_the_cpu_is_one_sentence_and_the_run_failed(workdir):
    tmp, env = workdir
    done = subprocess.run([*LAB, "train", "data=digits", "model=cnn", "data.image_size=192", "data.batch_size=1024",
                           "trainer.max_epochs=1", "mlflow.log_model=false", "trainer.enable_progress_bar=false"],
                          cwd=tmp, env={**env, "LAB_TORCH_THREADS": "1"}, capture_output=True, text=True, timeout=600,
                          preexec_fn=limited_memory)
    line = one_sentence(done, "out of memory: an allocation of ")
    assert "GiB of CPU memory failed" in line and "lower data.batch_size (now 1024) or data.image_size (now 192)" in line
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["lab.error"].startswith("OutOfMemory: out of memory")


@pytest.mark.slow
def test_a_trial_out_of_memory_fails_with_the_sentence_and_the_others_run(workdir, journal):
    tmp, env = workdir
    path = sweep_file(tmp, "oom", "n_trials: 2\nsampler: {name: grid}\nmax_failures: 3\nparams:\n"
                      "  data.image_size: {type: categorical, choices: [2048, 8]}\n",
                      overrides=["data=digits", "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=1",
                                 "mlflow.log_model=false"])
    done = subprocess.run([*LAB, "sweep", path, "--workers", "1", "--no-live"], cwd=tmp, capture_output=True,
                          text=True, env={**env, "LAB_TORCH_THREADS": "1"}, timeout=600, preexec_fn=limited_memory)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    trials = {t.params["data.image_size"]: t for t in journal(tmp, "oom").get_trials()}
    assert trials[8].state == TrialState.COMPLETE, done.stdout + done.stderr
    big = trials[2048]
    assert big.state == TrialState.FAIL
    assert big.user_attrs["fail_reason"].startswith("out of memory: an allocation of 7.")  # 1797 x 2048 x 2048 bytes
    assert "lower data.batch_size" in big.user_attrs["fail_reason"]
    assert f"trial {big.number} failed: out of memory" in done.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("oom").experiment_id
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")


def parent_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`lab.sweep` = 'true'") if exp else []


@pytest.mark.slow
def test_one_study_launched_twice_at_once_has_one_parent_run(workdir, journal):
    tmp, env = workdir
    path = sweep_file(tmp, "twice", "n_trials: 2\nsampler: {name: random, seed: 0}\nparams:\n"
                      "  model.optimizer.lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
    procs = [subprocess.Popen([*LAB, "sweep", path, "--workers", "1", "--no-live"], cwd=tmp,
                              env={**env, "LAB_TORCH_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all("Traceback" not in out for out in outs), outs
    study = journal(tmp, "twice")
    assert [t.state for t in study.get_trials() if t.state != TrialState.WAITING].count(TrialState.COMPLETE) == 2
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (parent,) = parent_runs(client, "twice")
    assert parent.info.run_id == study.user_attrs["mlflow_parent_run_id"] and parent.info.status == "FINISHED"


MYNETS = '''import math

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_shape, num_classes, width=16):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), width), nn.ReLU(),
                                    nn.Linear(width, num_classes))

    def forward(self, x):
        return self.layers(x)
'''
MINE = "_target_: lab.train.module.Classifier\nnet:\n  _target_: mynets.TinyNet\n  width: 16\n"


@pytest.mark.slow
def test_a_model_of_ones_own_needs_no_pythonpath(tmp_path, lab_exe, cli_env):
    """The console script, as a user runs it (its sys.path[0] is bin/, not the working folder)."""
    own, elsewhere, third = tmp_path / "own", tmp_path / "elsewhere", tmp_path / "third"
    for folder in (own / "conf" / "model", elsewhere, third):
        folder.mkdir(parents=True)
    (own / "mynets.py").write_text(MYNETS)
    (own / "conf" / "model" / "mine.yaml").write_text(MINE)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L").save(own / "x.png")
    env = {k: v for k, v in cli_env.items() if not k.startswith("LAB_")} | {"LAB_TORCH_THREADS": "1"}
    run = lambda cwd, *args, **extra: subprocess.run([lab_exe, *args], cwd=cwd, env={**env, **extra},  # noqa: E731
                                                     capture_output=True, text=True, timeout=600)
    # Trained from another folder with LAB_CONF_DIR: the folder holding that conf/ is importable too.
    done = run(elsewhere, "train", "data=digits", "model=mine", "trainer.max_epochs=1", "mlflow.log_model=false",
               "trainer.enable_progress_bar=false", LAB_CONF_DIR=str(own / "conf"))
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (trained,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    assert trained.info.status == "FINISHED" and trained.data.tags["model"] == "TinyNet"
    run_id = trained.info.run_id
    done = run(own, "predict", run_id, "x.png")  # the working folder holds mynets.py
    assert done.returncode == 0 and "x.png" in done.stdout, done.stdout + done.stderr
    done = run(third, "predict", run_id, str(own / "x.png"))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "needs the module 'mynets'" in done.stderr and "give a run id" not in done.stderr


def test_import_lab_is_cheap_and_shows_its_api():
    done = subprocess.run([sys.executable, "-c", "import lab, sys; print(dir(lab)); print(sorted(m for m in "
                           "('torch', 'mlflow', 'optuna', 'hydra', 'lightning', 'pytorch_lightning') if m in sys.modules))"],
                          capture_output=True, text=True, check=True)
    names, heavy = done.stdout.splitlines()
    assert "'sweep'" in names and "'train'" in names and heavy == "[]"


@pytest.mark.slow
def test_train_and_sweep_from_python(workdir, monkeypatch, keep_sigint):
    import lab
    from lab.errors import LabError

    tmp, env = workdir
    monkeypatch.chdir(tmp)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LAB_TORCH_THREADS", "1")
    with pytest.raises(LabError, match=r"^optimizer=null is not valid: every run needs one of the optimizer"):
        lab.train(["data=digits", "optimizer=null"])
    with pytest.raises(LabError, match=r"^model.optimizer.lr=-1 is not valid"):
        lab.train("data=digits model.optimizer.lr=-1")
    metrics = lab.train(TINY, quiet=True)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(metrics.run_id)
    assert run.info.status == "FINISHED" and metrics["test/acc"] == run.data.metrics["test/acc"]
    assert run.data.tags["lab.command"] == "lab train " + shlex.join(TINY)  # the command that replays it
    assert list(tmp.glob("outputs/*/*/checkpoints/*.ckpt"))
    assert lab.train.job.run  # the modules keep their names

    before = signal.getsignal(signal.SIGTERM)
    path = sweep_file(tmp, "api", "n_trials: 2\nsampler: {name: random, seed: 0}\nparams:\n"
                      "  model.optimizer.lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
    with pytest.raises(LabError, match="--workers=0 is not valid"):
        lab.sweep(path, workers=0)
    with pytest.raises(LabError, match="unrecognized arguments: --n-trails"):
        lab.sweep(path, n_trails=3)
    result = lab.sweep(path, ["trainer.max_epochs=1"], workers=1)
    assert signal.getsignal(signal.SIGTERM) is before
    assert result.exit_status == 0 and result.status == "FINISHED"
    assert [t.state for t in result.study.get_trials()] == [TrialState.COMPLETE] * 2
    assert result.best.number in (0, 1) and result.best_value == max(t.value for t in result.study.get_trials())
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["best_trial"] == str(result.best.number)
