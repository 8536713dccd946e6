"""The real `lab train` console script in a scratch directory: a run, bad inputs, --cfg job."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # every test starts the real `lab train`: ~10 s of CPU each, 20 of them

QUIET = ["trainer.enable_progress_bar=false"]


def one_class_folder(tmp):
    from PIL import Image

    (tmp / "one" / "lonely").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp / "one" / "lonely" / f"{i}.png")
    return tmp / "one"


# name: (arguments, text the error must name); each starts Python, torch and Lightning: ~10 s of CPU.
BAD = {
    "unknown_override": (["foo=1"], "foo"),
    "missing_folder": (["data=image_folder", "data.root=/nonexistent"], "/nonexistent"),
    "root_not_set": (["data=image_folder"], "data.root must be set"),
    "one_class": (["data=image_folder", "data.root={one}", "data.cache_dir=null"], "lonely"),
    "cnn_too_small": (["data=synthetic", "data.size=2", "model=cnn"], "2x2"),
    "batch_too_large": (["data=synthetic", "data.batch_size=100000"], "100000"),
    "bce_ten_classes": (["data=synthetic", "data.classes=10", "model.loss=bce"], "model.loss=bce is for two classes"),
    "timm_unknown_name": (["data=synthetic", "model=timm", "model.net.name=mobilenetv3_smal_100"],
                          "did you mean mobilenetv3_small_100"),
    "timm_weights_missing": (["data=synthetic", "model=timm", "model.net.weights=/no/such.pth"],
                             "model.net.weights=/no/such.pth is not a file"),
}
MODEL_ERRORS = ("bce_ten_classes", "timm_unknown_name", "timm_weights_missing")
GOOD = {
    "train": ["data=synthetic", "trainer.max_epochs=1", "data.n_train=256", "data.n_test=64"],
    "cfg_job": ["--cfg", "job", "data=digits"],
}


def collect(procs: dict, start: float, budget_s: float = 600) -> dict:
    """{name: (returncode, stdout, stderr, cwd)} of processes started in parallel, within budget_s in all."""
    results = {}
    for name, (proc, cwd) in procs.items():
        try:
            out, err = proc.communicate(timeout=max(1, budget_s - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[name] = (proc.returncode, out, err, cwd)
    return results


@pytest.fixture(scope="module")
def cli(tmp_path_factory, lab_exe):
    """Runs every command of this module at once (they are mostly import time) and collects the results."""
    procs = {}
    for name, args in {**{k: v[0] for k, v in BAD.items()}, **GOOD}.items():
        cwd = tmp_path_factory.mktemp(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MLFLOW_"))}
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
        args = [a.format(one=one_class_folder(cwd)) if "{one}" in a else a for a in args]
        extra = QUIET if "--cfg" not in args else []
        procs[name] = (subprocess.Popen([lab_exe, "train", *args, *extra], cwd=cwd, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE), cwd)
    return collect(procs, start=time.monotonic())


def test_train_one_epoch(cli):
    rc, out, err, cwd = cli["train"]
    assert rc == 0, err[-3000:]
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["lab.command"].startswith("lab train data=synthetic trainer.max_epochs=1")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [0]
    assert "test/f1_macro" in run.data.metrics
    assert (cwd / "mlruns").is_dir() and (cwd / "outputs").is_dir()  # everything stays in the working dir


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_short_message(cli, name):
    rc, out, err, cwd = cli[name]
    assert rc != 0
    assert "Traceback" not in err, err[-3000:]
    assert BAD[name][1] in err, err[-3000:]
    assert len(err.strip().splitlines()) <= 10, err[-3000:]
    assert not (cwd / "mlflow.db").exists()  # rejected before any run was created
    assert not (cwd / "outputs").exists()  # nor an outputs/<date>/<time> folder holding the refused config


@pytest.mark.parametrize("name", MODEL_ERRORS)
def test_model_errors_exit_2_with_one_paragraph(cli, name):
    rc, out, err, cwd = cli[name]
    assert rc == 2, err[-3000:]
    assert err.startswith("lab: error: ") and "\n\n" not in err.strip(), err


def test_cfg_job_prints_config(cli):
    rc, out, err, cwd = cli["cfg_job"]
    assert rc == 0, err[-3000:]
    cfg = yaml.safe_load(out)
    assert cfg["data"]["_target_"] == "lab.data.digits.Digits"
    assert cfg["model"]["net"]["_target_"] == "lab.train.nets.CNN"
    assert not (cwd / "mlflow.db").exists()


# Issue #10, "first contact": name -> (arguments, texts the one-line message must hold). Each is `python -m
# lab.cli train ...` in its own scratch dir and $HOME. SMALL makes the code before the fix reach the
# optimizer (and fail mid-fit, or train) quickly, without a download.
SMALL = ["data=synthetic", "data.n_train=64", "data.n_test=16", "trainer.max_epochs=1", *QUIET]
FIRST_CONTACT = {
    "lr_negative": ([*SMALL, "model.optimizer.lr=-0.01"], ["model.optimizer.lr=-0.01", "a number >= 0"]),
    "lr_not_a_number": ([*SMALL, "model.optimizer.lr=abc"], ["model.optimizer.lr='abc'", "a number >= 0"]),
    "weight_decay_negative": ([*SMALL, "model.optimizer.weight_decay=-1"],
                              ["model.optimizer.weight_decay=-1", ">= 0"]),
    "momentum_too_large": ([*SMALL, "optimizer=sgd", "model.optimizer.momentum=1.5"],
                           ["model.optimizer.momentum=1.5", "[0, 1)"]),
    "batch_size_not_a_number": ([*SMALL, "data.batch_size=abc"], ["data.batch_size='abc'", "whole number >= 1"]),
    "max_epochs_not_a_number": ([*SMALL, "trainer.max_epochs=abc"], ["trainer.max_epochs='abc'", "whole number"]),
    "typo": ([*SMALL, "trainer.max_epoch=2"], ["trainer.max_epoch ", "did you mean trainer.max_epochs?"]),
    "typo_added_with_plus": ([*SMALL, "+trainer.max_epoch=2"],
                             ["trainer.max_epoch ", "did you mean trainer.max_epochs?"]),
    "unknown_group_option": (["optimizer=sgdd"], ["optimizer=sgdd", "did you mean optimizer=sgd?",
                                                  "adam, adamw, rmsprop, sgd"]),
    "unreadable_override": (["data.root=a&b"], ["'data.root=a&b'", "'&'", "quotes", "\"data.root='"]),
}
README_FOLDER = ["data=image_folder", "data.root=~/flower_photos", "data.image_size=64", "model=cnn"]


def mlflow_runs(cwd):
    """Every run in the scratch dir's tracking DB; none when the DB was never created."""
    if not (cwd / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def first_contact(tmp_path_factory):
    """Runs FIRST_CONTACT and the README's image-folder command (--cfg job) at once; name -> (rc, out, err, cwd)."""
    commands = {name: ["train", *args] for name, (args, _) in FIRST_CONTACT.items()}
    commands["readme_tilde"] = ["train", "--cfg", "job", *README_FOLDER]
    procs, start = {}, time.monotonic()
    for name, args in commands.items():
        cwd = tmp_path_factory.mktemp(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "MLFLOW_"))}
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{cwd / 'mlflow.db'}", HOME=str(cwd))
        procs[name] = (subprocess.Popen([sys.executable, "-m", "lab.cli", *args], cwd=cwd, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE), cwd)
    return collect(procs, start)


@pytest.mark.parametrize("name", FIRST_CONTACT)
def test_first_contact_mistake_is_one_line_exit_2_and_no_run(first_contact, name):
    rc, out, err, cwd = first_contact[name]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lab: error: "), err[-3000:]
    for text in FIRST_CONTACT[name][1]:
        assert text in lines[0]
    assert mlflow_runs(cwd) == []  # checked before the MLflow run is created, not logged as FAILED
    assert not (cwd / "outputs").exists()


def test_readme_image_folder_command_expands_tilde(first_contact):
    rc, out, err, cwd = first_contact["readme_tilde"]
    assert rc == 0, err[-3000:]
    assert yaml.safe_load(out)["data"]["root"] == str(cwd / "flower_photos")  # $HOME is cwd here


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"{FASHION} is absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_cnn_one_epoch(tmp_path, lab_exe, cli_env):
    start = time.monotonic()
    proc = subprocess.run([lab_exe, "train", "data=fashion_mnist", "model=cnn", "trainer.max_epochs=1", *QUIET,
                           f"data.root={tmp_path / 'no_copy_here'}", "data.download=false"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    print(f"fashion_mnist cnn, 1 epoch: {seconds:.0f} s, test/acc {run.data.metrics['test/acc']:.4f}")
    assert run.data.metrics["test/acc"] >= 0.85
    assert run.data.metrics["test/f1/T-shirt/top"] > 0.5
    report = client.download_artifacts(run.info.run_id, "confusion_matrix.csv", str(tmp_path))
    assert sum(int(v) for line in Path(report).read_text().splitlines()[1:] for v in line.split(",")[1:]) == 10000


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"{FASHION} is absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_mlp_experiment_beats_zalandos_mlp_floor(tmp_path, lab_exe, cli_env):
    # The experiment as shipped (15 epochs): Zalando's 256-128-100 MLP scored 0.883; the issue asks >= 0.87.
    proc = subprocess.run([lab_exe, "train", "experiment=fashion_mnist_mlp", *QUIET,
                           f"data.root={tmp_path / 'no_copy_here'}", "data.download=false"],
                          cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("fashion_mnist_mlp").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 15
    assert run.data.metrics["test/acc"] >= 0.87
