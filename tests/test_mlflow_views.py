"""What one run shows in MLflow beside its metrics, read back through MlflowClient: the experiment's kind,
run names, the per-class table, misclassified images, the dataset input, the logged model, cost metrics,
and `lab train`'s closing summary and Ctrl-C."""
import csv
import io
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from lab.config import load
from lab.sweep import records
from lab.train import exported, job, measure, tracking

CLASSES = ("blue", "green", "red")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
PER_CLASS = 2  # mlflow.misclassified_per_class in the shared run
QUICK = ["trainer.enable_progress_bar=false", "mlflow.misclassified_per_class=0", "mlflow.log_model=false",
         "measure.enabled=false"]


def write_folder(root: Path, train_per_class: int = 30, test_per_class: int = 6, swapped: int = 3) -> Path:
    """ROOT/train|test/<class>/i.png of one colour per class plus noise. In each test class folder the first
    `swapped` images have the next class's colour: a model that learnt the colours gets exactly those wrong."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = CLASSES[(k + 1) % len(CLASSES)] if split == "test" and i < swapped else name
                pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / name / f"{i:02d}.png")
    return root


@dataclass
class Trained:
    tmp: Path
    uri: str
    cfg: object
    results: dict
    client: MlflowClient
    run: object


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """One image-folder run (3 colour classes, an MLP, 3 epochs) with every view on."""
    tmp = tmp_path_factory.mktemp("views")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    root = write_folder(tmp / "colours")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        cfg = load(["data=image_folder", f"data.root={root}", "data.image_size=8", f"data.cache_dir={tmp / 'cache'}",
                    "data.batch_size=8", "model=mlp", "model.net.hidden=[16]", "model.optimizer.lr=0.01",
                    "trainer.max_epochs=3", "trainer.enable_progress_bar=false", f"mlflow.tracking_uri={uri}",
                    f"mlflow.misclassified_per_class={PER_CLASS}", "measure.budget_s=0.1"])
        results = job.run(cfg, tmp / "out")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    return Trained(tmp, uri, cfg, results, client, run)


def test_experiment_opens_in_the_model_training_view(trained, tmp_path):
    assert trained.client.get_experiment_by_name("lab").tags[tracking.KIND_TAG] == "custom_model_development"
    # An experiment made before (or by MLflow itself) gets the tag when lab first uses it; another kind stays.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old")
    mine = client.create_experiment("mine", tags={tracking.KIND_TAG: "genai_development"})
    assert tracking.experiment_id(uri, "old") == old and tracking.experiment_id(uri, "mine") == mine
    assert client.get_experiment(old).tags[tracking.KIND_TAG] == "custom_model_development"
    assert client.get_experiment(mine).tags[tracking.KIND_TAG] == "genai_development"


def test_run_names_are_numbered_per_experiment_and_a_given_name_wins(mlflow_uri, tmp_path):
    base = ["data=digits", "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=1", *QUICK]
    for i, extra in enumerate(([], [], ["mlflow.run_name=mine"], ["mlflow.experiment=other"])):
        cfg = load([*base, *extra])
        job.run(cfg, tmp_path / f"out{i}", run_name=cfg.mlflow.run_name)
    client = MlflowClient(mlflow_uri)
    names = {e.name: sorted(r.info.run_name for r in client.search_runs([e.experiment_id]))
             for e in client.search_experiments()}
    assert names["lab"] == ["digits-mlp-1", "digits-mlp-2", "mine"]
    assert names["other"] == ["digits-mlp-1"]  # counted within its own experiment


def test_image_folder_run_is_named_after_its_folder(trained):
    assert trained.run.info.run_name == "colours-mlp-1"


def test_per_class_table(trained, tmp_path):
    run_id = trained.run.info.run_id
    # An MLflow table: listed as one on the run (what the UI and MlflowClient.load_table look for), in the
    # split-orient JSON they read.
    assert {"path": "per_class.json", "type": "table"} in json.loads(trained.run.data.tags["mlflow.loggedArtifacts"])
    table = pd.read_json(trained.client.download_artifacts(run_id, "per_class.json", str(tmp_path)), orient="split")
    report = json.loads(Path(trained.client.download_artifacts(run_id, "classification_report.json",
                                                               str(tmp_path))).read_text())
    assert list(table["class"]) == list(CLASSES) == list(report)
    for _, row in table.iterrows():
        for key in ("precision", "recall", "f1", "support"):
            assert row[key] == pytest.approx(report[row["class"]][key])
    assert table["support"].sum() == 6 * len(CLASSES)


def load_model(model_uri: str, uri: str) -> torch.nn.Module:
    """mlflow.pytorch.load_model from the store at uri (a models:/ URI resolves through MLflow's global URI)."""
    import mlflow.pytorch

    with exported.tracking_at(uri):
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")


def model_info(model_uri: str, uri: str):
    """mlflow.models.get_model_info (metadata, signature) from the store at uri."""
    import mlflow.models

    with exported.tracking_at(uri):
        return mlflow.models.get_model_info(model_uri)


def read_misclassified(text: str) -> list[dict]:
    """misclassified.csv back as dicts with typed values."""
    return [{**r, "rank": int(r["rank"]), "index": int(r["index"]), "probability": float(r["probability"]),
             "loss": float(r["loss"])} for r in csv.DictReader(io.StringIO(text))]


def logged_model_predictions(trained) -> tuple[np.ndarray, object]:
    """The logged model's class probabilities for the whole test split, given as decoded (uint8): the model
    normalises as training does."""
    model = load_model(trained.run.data.tags["lab.model_uri"], trained.uri)
    datamodule, _ = job.build(trained.cfg)
    x = datamodule.splits["test"].x
    with torch.no_grad():
        return model(x).numpy(), datamodule


def test_misclassified_images_really_are_and_come_by_loss(trained, tmp_path):
    run_id = trained.run.info.run_id
    names = {a.path for a in trained.client.list_artifacts(run_id)}
    assert {"misclassified.png", "misclassified.csv"} <= names
    png = Path(trained.client.download_artifacts(run_id, "misclassified.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_misclassified(Path(trained.client.download_artifacts(run_id, "misclassified.csv",
                                                                   str(tmp_path))).read_text())
    probs, datamodule = logged_model_predictions(trained)
    test = datamodule.splits["test"]
    wrong = {c: sorted((i for i in range(len(test.y)) if probs[i].argmax() != test.y[i] and test.y[i] == c),
                       key=lambda i: math.log(probs[i][test.y[i]]))  # highest loss (-log p) first
             for c in range(len(CLASSES))}
    assert rows, "the swapped test images should be misclassified"
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["loss"] for r in rows] == sorted((r["loss"] for r in rows), reverse=True)
    for r in rows:
        i = r["index"]
        assert CLASSES[int(test.y[i])] == r["true"] != r["predicted"] == CLASSES[int(probs[i].argmax())]
        assert r["probability"] == pytest.approx(float(probs[i].max()), abs=1e-4)
        assert r["loss"] == pytest.approx(-math.log(float(probs[i][test.y[i]])), rel=1e-3, abs=1e-4)  # cross-entropy
        # The image file itself: in its true class's test folder, with the pixels the model was shown.
        path = Path(r["path"])
        assert path.parent.name == r["true"] and path.parent.parent.name == "test"
        assert path == Path(test.paths[i])
    # At most PER_CLASS per true class, and the highest-loss ones of each class.
    for c, name in enumerate(CLASSES):
        listed = [r["index"] for r in rows if r["true"] == name]
        assert sorted(listed) == sorted(wrong[c][:PER_CLASS])


def test_test_image_paths_follow_the_split(tmp_path):
    """A folder without train/test: the carved-out test split keeps each image's own file path."""
    root = tmp_path / "flat"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(10):
            value = np.full((6, 6, 3), COLOURS[name], np.uint8)
            value[0, 0, 0] = i  # one pixel tells the images apart
            Image.fromarray(value, "RGB").save(root / name / f"{i}.png")
    datamodule, _ = job.build(load(["data=image_folder", f"data.root={root}", "data.image_size=6",
                                    f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=2", "model=mlp"]))
    for split in ("train", "val", "test"):
        images = datamodule.splits[split]
        assert len(images.paths) == len(images.y)
        for x, y, path in zip(images.x, images.y, images.paths):
            assert Path(path).parent.name == CLASSES[int(y)]
            assert int(x[0, 0, 0]) == int(Path(path).stem)


def test_dataset_is_the_runs_input(trained, mlflow_uri, tmp_path):
    (inp,) = trained.run.inputs.dataset_inputs
    ds = inp.dataset
    assert ds.name == "colours"
    assert str(trained.cfg.data.root) in ds.source and ds.source_type == "local"
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "train"}
    profile = json.loads(ds.profile)
    assert profile["test_images"] == 18 and profile["classes"] == 3 and profile["shape"] == [3, 8, 8]
    assert profile["train_images"] + profile["val_images"] == 90
    # Other data (another split of digits here): another digest.
    cfg = load(["data=digits", "model=mlp", "trainer.max_epochs=1", "data.split_seed=1", *QUICK])
    job.run(cfg, tmp_path / "out")
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    other = run.inputs.dataset_inputs[0].dataset
    assert other.name == "digits" and other.source_type == "code" and other.digest != ds.digest


def test_logged_model_predicts_as_the_checkpoint(trained):
    tags = trained.run.data.tags
    uri = tags["lab.model_uri"]
    info = model_info(uri, trained.uri)
    assert info.metadata["class_names"] == list(CLASSES) and info.metadata["input_shape"] == [3, 8, 8]
    assert info.metadata["loss"] == "cross_entropy" and len(info.metadata["mean"]) == 3
    assert info.metadata["input_type"] == "uint8"
    assert info.signature is not None
    assert [o.model_id for o in trained.run.outputs.model_outputs] == [uri.removeprefix("models:/")]
    probs, datamodule = logged_model_predictions(trained)
    _, model = job.build(trained.cfg)
    state = torch.load(tags["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        expected = model.probabilities(model(datamodule.prepare_batch(datamodule.splits["test"].x, False)))
    assert np.array_equal(probs.argmax(1), expected.argmax(1).numpy())
    assert np.allclose(probs, expected.numpy(), atol=1e-5)
    # The run's test accuracy is the logged model's.
    acc = float((probs.argmax(1) == datamodule.splits["test"].y.numpy()).mean())
    assert acc == pytest.approx(trained.run.data.metrics["test/acc"], abs=1e-6)


def test_a_model_is_logged_for_a_run_afterwards_from_metadata(trained):
    """exported.log for a run that did not log one (`lab best` does this), from a net and metadata alone."""
    _, model = job.build(trained.cfg)
    meta = model_info(trained.run.data.tags["lab.model_uri"], trained.uri).metadata
    with tracking.run(trained.uri, "later") as (client, run_id):
        uri = exported.log(run_id, model.net, meta, trained.uri)
    assert client.get_run(run_id).data.tags["lab.model_uri"] == uri
    loaded = load_model(uri, trained.uri)
    out = loaded(torch.zeros(5, 3, 8, 8, dtype=torch.uint8))
    assert out.shape == (5, 3) and torch.allclose(out.sum(1), torch.ones(5))


def test_a_model_logged_before_it_carried_its_normalisation_predicts_as_before(trained):
    """Such a model takes normalised floats and its metadata has no input_type: lab puts Normalise in front."""
    import mlflow.pytorch

    from lab.analysis import models

    uri = trained.run.data.tags["lab.model_uri"]
    new = load_model(uri, trained.uri)
    meta = {k: v for k, v in model_info(uri, trained.uri).metadata.items() if k != "input_type"}
    with tracking.run(trained.uri, "old") as (_, run_id), exported.tracking_at(trained.uri):
        old = mlflow.pytorch.log_model(torch.nn.Sequential(*list(new)[1:]), name="model", run_id=run_id,
                                       metadata=meta, serialization_format="pickle").model_uri
    with exported.tracking_at(trained.uri):
        loaded = models.from_uri(old, old)
    x = job.build(trained.cfg)[0].splits["test"].x
    with torch.no_grad():
        assert torch.equal(loaded.probabilities(x), new(x))


def test_bce_predictor_gives_both_classes():
    net = torch.nn.Linear(4, 1)
    x = torch.randn(6, 4)
    out = exported.portable(net, "bce")(x)
    assert out.shape == (6, 2)
    assert torch.allclose(out[:, 1], torch.sigmoid(net(x))[:, 0]) and torch.allclose(out.sum(1), torch.ones(6))


def test_cost_metrics(trained):
    metrics, results = trained.run.data.metrics, trained.results
    # hidden [16] on 3x8x8: two Linear layers, 2 FLOPs per multiply-add.
    assert metrics["model/flops"] == 2 * (3 * 8 * 8 * 16 + 16 * 3)
    assert metrics["model/params"] == (3 * 8 * 8 + 1) * 16 + (16 + 1) * 3
    for key in ("model/params", "model/flops", "model/latency_ms", "model/throughput"):
        assert results[key] == pytest.approx(metrics[key]) and metrics[key] > 0, key


def test_measuring_time_is_bounded():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    start = time.perf_counter()
    cost = measure.cost(net, (1, 8, 8), batch_size=32, budget_s=0.2)
    assert time.perf_counter() - start < 5.0  # bounded by budget_s (0.2 s), with room for a busy CI machine
    assert cost["model/flops"] == 2 * 64 * 10 and cost["model/throughput"] > 0 and net.training


def test_pruned_trial_is_renamed(mlflow_uri):
    with tracking.run(mlflow_uri, "sweep", run_name="trial-3") as (client, run_id):
        pass
    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"mlflow_run_id": run_id})
    for _ in range(2):  # tagged again (a resumed sweep): one suffix
        records.tag_run(mlflow_uri, trial, "PRUNED", None)
    run = client.get_run(run_id)
    assert run.info.run_name == "trial-3 (pruned)" and run.data.tags["trial.state"] == "PRUNED"


def test_summary_links_a_server_run(trained):
    text = tracking.summary(trained.client, "http://u:secret@127.0.0.1:5000/", trained.run.info.run_id)
    exp = trained.run.info.experiment_id
    assert f"http://u:***@127.0.0.1:5000/#/experiments/{exp}/runs/{trained.run.info.run_id}?workflowType=machine_learning" in text


@pytest.mark.slow
def test_lab_train_ends_with_a_summary(lab, workdir):
    tmp, env = workdir
    done = lab("train", "data=digits", "model=mlp", "trainer.max_epochs=2", "model.net.hidden=[16]",
               env_extra={"LAB_TORCH_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    m = run.data.metrics
    out = done.stdout
    assert f"run digits-mlp-1 ({run.info.run_id}) FINISHED" in out
    assert f"test accuracy {m['test/acc']:.4f}, macro F1 {m['test/f1_macro']:.4f}" in out
    assert f"epoch {run.data.tags['lab.best_epoch']} " in out and "by val/acc" in out
    assert f"mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']}" in out
    assert run.data.tags["lab.model_uri"] in out


@pytest.mark.slow
def test_ctrl_c_ends_lab_train_killed_in_labs_words(start_lab, workdir):
    tmp, env = workdir
    proc = start_lab("train", "data=digits", "model=mlp", "trainer.max_epochs=1000", "checkpoint.last_every_s=0",
                     "trainer.enable_progress_bar=false", env_extra={"LAB_TORCH_THREADS": "1"})
    deadline = time.time() + 120
    while not list(tmp.glob("outputs/*/*/checkpoints/last.ckpt")):  # training has started: the run exists
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id])
    assert proc.returncode == 130, out
    assert f"lab: interrupted by Ctrl-C (SIGINT); the MLflow run {run.info.run_id} was marked KILLED" in out
    assert "Traceback" not in out
    assert run.info.status == "KILLED"
