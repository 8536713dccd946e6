"""`lab predict`: a trained run's test images, read back from image files, are classified as its test was scored
(the same test/acc), whichever way the model is named; unreadable files are listed, not fatal."""
import csv
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from lab import cli
from lab.analysis import models
from lab.config import load
from lab.train import job, tracking

TRAIN = ["model=mlp", "model.net.hidden=[32]", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
         "model.optimizer.lr=0.003"]


def train(overrides: list[str], out: Path) -> tuple[MlflowClient, str, dict, object]:
    """One real run; (client, run id, its metrics, its set-up datamodule)."""
    cfg = load([*TRAIN, *overrides])
    metrics = job.run(cfg, out)
    client = MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])[0]
    datamodule, _ = job.build(cfg)
    return client, run.info.run_id, metrics, datamodule


def predict(capsys, *args) -> tuple[int, str, str]:
    """`lab predict ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        cli.main(["predict", *map(str, args)])
        status = 0
    except SystemExit as stop:
        status = stop.code
    out = capsys.readouterr()
    return status, out.out, out.err


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_accuracy(rows: list[dict]) -> float:
    return sum(Path(r["file"]).parent.name == r["predicted"] for r in rows) / len(rows)


@pytest.fixture
def folder_run(mlflow_uri, tmp_path, image_folder):
    """A run on an image folder of 20 px images trained at 16 px, so predict must resize as training did."""
    root = image_folder(per_class=30, side=20)
    return train(["data=image_folder", f"data.root={root}", "data.image_size=16", "data.test_fraction=0.3",
                  "data.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}"], tmp_path / "out")


def test_test_images_of_a_folder_run_give_its_test_accuracy(folder_run, tmp_path, capsys):
    client, run_id, metrics, datamodule = folder_run
    test = datamodule.splits["test"]
    out = tmp_path / "pred.csv"
    status, stdout, _ = predict(capsys, run_id, *test.paths, "--out", out)
    assert status == 0, stdout
    rows = read_csv(out)
    assert [r["file"] for r in rows] == test.paths
    assert csv_accuracy(rows) == pytest.approx(metrics["test/acc"], abs=1e-6)  # test/acc is a float32
    assert f"accuracy against the class folders the files are in: {metrics['test/acc']:.4f}" in stdout
    # The probabilities are the net's on the very tensors its test ran on: the decoding is training's.
    probs = models.load(run_id).probabilities(test.x)
    assert torch.allclose(torch.tensor([float(r["p1"]) for r in rows]), probs.max(1).values, atol=1e-5)
    assert [r["predicted"] for r in rows] == [datamodule.class_names[i] for i in probs.argmax(1).tolist()]
    assert list(rows[0]) == ["file", "predicted", "probability", "top1", "p1", "top2", "p2", "top3", "p3"]
    # A file outside the class folders beside them: the accuracy is still over those that are, and says so.
    loose = tmp_path / "loose.png"
    loose.write_bytes(Path(test.paths[0]).read_bytes())
    status, stdout, _ = predict(capsys, run_id, *test.paths, loose)
    assert status == 0, stdout
    assert (f"accuracy against the class folders the files are in: {metrics['test/acc']:.4f} ({len(test.paths)} "
            "images; 1 not in a class folder, not counted)") in stdout


def test_every_way_of_naming_the_model_gives_the_same_predictions(folder_run, tmp_path, capsys):
    client, run_id, _, datamodule = folder_run
    files = datamodule.splits["test"].paths
    status, by_run, _ = predict(capsys, run_id, *files)
    assert status == 0
    checkpoint = client.get_run(run_id).data.tags["checkpoint"]
    status, by_checkpoint, _ = predict(capsys, checkpoint, *files)
    assert status == 0, by_checkpoint
    table = lambda text: [line for line in text.splitlines() if line.startswith(str(Path(files[0]).parents[1]))]  # noqa: E731
    assert table(by_run) == table(by_checkpoint) and len(table(by_run)) == len(files)
    # A run without a logged model (a sweep that logs only its best trial's): rebuilt from config + checkpoint.
    if client.get_run(run_id).data.tags.get(tracking.MODEL_TAG):
        client.delete_tag(run_id, tracking.MODEL_TAG)
    status, rebuilt, _ = predict(capsys, run_id, *files)
    assert status == 0 and "rebuilt from its checkpoint" in rebuilt
    assert table(rebuilt) == table(by_run)


def test_idx_test_split_written_as_png_gives_the_run_test_accuracy(mlflow_uri, tmp_path, small_data, capsys):
    client, run_id, metrics, datamodule = train(["data=mnist", *small_data("lab.data.idx.MNIST", batch_size=8)],
                                                tmp_path / "out")
    test = datamodule.splits["test"]
    folder = tmp_path / "pngs"
    for i, (x, y) in enumerate(zip(test.x, test.y.tolist())):  # uint8 (1, 28, 28): lossless as PNG
        (folder / datamodule.class_names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[0].numpy(), "L").save(folder / datamodule.class_names[y] / f"{i:04d}.png")
    out = tmp_path / "pred.csv"
    status, stdout, _ = predict(capsys, run_id, folder, "--out", out, "--top", "2")
    assert status == 0, stdout
    rows = read_csv(out)
    assert len(rows) == len(test.y)
    assert csv_accuracy(rows) == pytest.approx(metrics["test/acc"], abs=1e-6)  # test/acc is a float32
    assert list(rows[0])[-2:] == ["top2", "p2"]


def test_unreadable_files_are_listed_and_only_none_is_an_error(folder_run, tmp_path, capsys):
    _, run_id, _, datamodule = folder_run
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(datamodule.splits["test"].paths[0], folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not an image, and not an image extension: not even tried")
    status, stdout, stderr = predict(capsys, run_id, folder)
    assert status == 0
    assert "good.png" in stdout and "broken.jpg" in stderr and "notes.txt" not in stdout + stderr
    status, _, stderr = predict(capsys, run_id, folder / "broken.jpg")
    assert status == 2 and "none of the 1 file(s) given is a readable image" in stderr


@pytest.mark.parametrize("model, words", [
    ("0123456789abcdef0123456789abcdef", "there is no run 0123456789abcdef0123456789abcdef"),
    ("models:/nothing@champion", "cannot be loaded from MLflow"),
    ("no_such_thing", "is not valid: it is not an existing file"),
])
def test_a_bad_model_is_one_sentence_naming_it(mlflow_uri, tmp_path, capsys, model, words):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    status, _, stderr = predict(capsys, model, image)
    assert status == 2
    assert stderr.startswith(f"lab: error: MODEL {model}") and words in stderr and "a run id" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_a_checkpoint_no_run_recorded_is_refused(mlflow_uri, tmp_path, capsys):
    ckpt = tmp_path / "stray.ckpt"
    ckpt.write_bytes(b"")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    status, _, stderr = predict(capsys, ckpt, image)
    assert status == 2 and f"no run in {mlflow_uri} recorded the checkpoint {ckpt}" in stderr
