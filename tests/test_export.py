"""`lab export`: real runs (digits, a Fashion-MNIST subset, an image folder) exported to ONNX, read back with ONNX
Runtime, onnx and MLflow's client; int8 and pruned variants measured against the float file; bad input refused
with one sentence and nothing written."""
import csv
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from mlflow.tracking import MlflowClient
from onnx import numpy_helper

from conftest import lab_main
from lab.analysis import models, onnx_model
from lab.config import load
from lab.data.idx import FILES, read_idx
from lab.errors import LabError
from lab.train import job

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (.ci/run installs it)
QUICK = ["trainer.max_epochs=1", "trainer.enable_progress_bar=false", "mlflow.misclassified_per_class=0",
         "measure.enabled=false", "model.optimizer.lr=0.01"]
CNN = ["model=cnn", "model.net.channels=[8,16]", "model.net.hidden=[32]"]


def train(overrides: list[str], out: Path) -> tuple[str, dict, object]:
    """One real run; (its id, its metrics, its set-up datamodule)."""
    cfg = load([*QUICK, *overrides])
    metrics = job.run(cfg, out)
    client = MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])[0]
    datamodule, _ = job.build(cfg)
    return run.info.run_id, metrics, datamodule


lab = lab_main  # `lab ARGS` in this process: (exit status, stdout, stderr)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A working folder with its own MLflow DB for this file's runs."""
    tmp = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        yield tmp


@pytest.fixture(scope="module")
def digits_cnn(store):
    return train(["data=digits", *CNN], store / "cnn")


@pytest.fixture(scope="module")
def digits_mlp(store):
    return train(["data=digits", "model=mlp", "model.net.hidden=[64]"], store / "mlp")


def session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def probabilities(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(["probabilities"], {"image": x})[0]


def torch_probabilities(run_id: str, x: torch.Tensor) -> np.ndarray:
    """The run's logged MLflow model (mlflow.pytorch) on uint8 images, normalised as training normalises."""
    return models.load(run_id).probabilities(x).numpy()


def child_run(run_id: str, name: str):
    client = MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    (run,) = client.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}' and attributes.run_name = '{name}'")
    return run


def weights(path: Path, op_types=("Conv", "Gemm", "MatMul")) -> dict[str, np.ndarray]:
    """The weight initializers of the file's Conv, Gemm and MatMul nodes, by op type and order."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n, node in enumerate(model.graph.node):
        if node.op_type in op_types and node.input[1] in inits:
            out[f"{n}:{node.op_type}"] = inits[node.input[1]]
    return out


@pytest.mark.slow
def test_float_onnx_agrees_with_pytorch_and_is_logged_as_a_child_run(digits_cnn, store, capsys):
    run_id, metrics, datamodule = digits_cnn
    test = datamodule.splits["test"]
    out = store / "float" / "digits.onnx"
    status, stdout, stderr = lab(capsys, "export", run_id, "--format", "onnx", "--out", out)
    assert status == 0, stderr
    sess = session(out)
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(uint8)" and inp.shape[1:] == [1, 8, 8]
    assert isinstance(inp.shape[0], str)  # the batch dimension is symbolic: any batch size
    meta = onnx_model.metadata(sess)
    assert meta["class_names"] == datamodule.class_names and meta["input_type"] == "uint8"
    assert meta["run_id"] == run_id and meta["input_shape"] == [1, 8, 8]
    # ONNX Runtime on raw uint8 test images against PyTorch's logged model on the same, normalised by lab.
    probs = probabilities(sess, test.x.numpy())
    assert np.abs(probs - torch_probabilities(run_id, test.x)).max() <= 1e-4
    acc = float((probs.argmax(1) == test.y.numpy()).mean())
    assert acc == pytest.approx(metrics["test/acc"], abs=1e-6)  # test/acc is a float32
    assert probabilities(sess, test.x[:1].numpy()).shape == (1, 10)  # batch 1 as well as the whole split
    # MLflow: a finished child run of the source run, its metrics the file's, the file its artifact.
    child = child_run(run_id, "export-onnx")
    assert child.info.status == "FINISHED"
    m = child.data.metrics
    assert m["export/acc"] == pytest.approx(acc) and m["export/acc_delta"] == 0
    assert m["export/size_mb"] == pytest.approx(out.stat().st_size / 1e6) and m["export/latency_ms"] > 0
    assert m["export/max_prob_diff"] <= 1e-4
    client = MlflowClient()
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"digits.onnx", "export_comparison.txt"}
    logged = Path(client.download_artifacts(child.info.run_id, "digits.onnx", str(store / "download")))
    assert logged.read_bytes() == out.read_bytes()
    assert "ONNX float" in stdout and "PyTorch (the run's model)" in stdout and f"{acc:.4f}" in stdout
    assert [p.name for p in out.parent.iterdir()] == ["digits.onnx"]  # no temporary file left beside it


@pytest.mark.slow
def test_float_input_takes_zero_to_one_images(digits_cnn, store, capsys):
    run_id, _, datamodule = digits_cnn
    x = datamodule.splits["test"].x
    out = store / "digits-float.onnx"
    status, _, stderr = lab(capsys, "export", run_id, "--input", "float", "--out", out)
    assert status == 0, stderr
    sess = session(out)
    assert sess.get_inputs()[0].type == "tensor(float)"
    probs = probabilities(sess, (x.float() / 255).numpy())
    assert np.abs(probs - torch_probabilities(run_id, x)).max() <= 1e-4


def int8_check(run_id: str, datamodule, store: Path, capsys, name: str) -> tuple[Path, object]:
    """Exports run_id as int8 within a drop of 0.05; the file is smaller and scores what MLflow says."""
    out = store / f"{name}.onnx"
    status, stdout, stderr = lab(capsys, "export", run_id, "--quantize", "int8", "--max-acc-drop", "0.05",
                                 "--out", out)
    assert status == 0, stderr
    child = child_run(run_id, "export-onnx-int8")
    m = child.data.metrics
    test = datamodule.splits["test"]
    acc = float((probabilities(session(out), test.x.numpy()).argmax(1) == test.y.numpy()).mean())
    assert m["export/acc"] == pytest.approx(acc)
    assert m["export/original_acc"] - acc <= 0.05
    assert m["export/size_mb"] == pytest.approx(out.stat().st_size / 1e6)
    assert m["export/size_mb"] < m["export/original_size_mb"]
    assert m["export/size_mb_delta"] < 0 and "int8" in stdout and "change" in stdout
    assert onnx_model.metadata(session(out))["class_names"] == datamodule.class_names
    return out, child


@pytest.mark.slow
def test_int8_of_a_conv_net_is_static_and_of_an_mlp_dynamic(digits_cnn, digits_mlp, store, capsys):
    run_id, _, datamodule = digits_cnn
    out, child = int8_check(run_id, datamodule, store, capsys, "cnn-int8")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and child.data.params["quantization"] == "static"
    assert child.data.params["calibration_images"] == "256"
    run_id, _, datamodule = digits_mlp
    out, child = int8_check(run_id, datamodule, store, capsys, "mlp-int8")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "DynamicQuantizeLinear" in ops and child.data.params["quantization"] == "dynamic"


@pytest.mark.slow
def test_pruning_gives_the_asked_sparsity_and_structured_pruning_removes_channels(digits_cnn, store, capsys):
    run_id, _, _ = digits_cnn
    out = store / "pruned.onnx"
    status, stdout, stderr = lab(capsys, "export", run_id, "--prune", "0.5", "--finetune-epochs", "1", "--out", out)
    assert status == 0, stderr
    arrays = list(weights(out).values())
    zero = sum(int((a == 0).sum()) for a in arrays) / sum(a.size for a in arrays)
    assert zero == pytest.approx(0.5, abs=0.002)  # half of all conv and dense weights, after the fine-tune too
    m = child_run(run_id, "export-onnx-pruned50").data.metrics
    assert m["export/nonzero_params_delta"] < 0 and m["export/params_delta"] == 0
    assert m["export/max_prob_diff"] <= 1e-4 and "ONNX pruned 50%" in stdout

    out = store / "structured.onnx"
    status, _, stderr = lab(capsys, "export", run_id, "--prune", "0.5", "--structured", "--out", out)
    assert status == 0, stderr
    convs = [a.shape for a in weights(out, ("Conv",)).values()]
    assert convs == [(4, 1, 3, 3), (8, 4, 3, 3)]  # channels 8 -> 4 and 16 -> 8, the next layer reads 4
    m = child_run(run_id, "export-onnx-pruned50-structured").data.metrics
    assert m["export/params_delta"] < 0 and m["export/size_mb_delta"] < 0


@pytest.mark.slow
def test_fashion_mnist_cnn_int8(store, write_idx, capsys):
    """A small real Fashion-MNIST subset (600 training, 200 test images of Zalando's files), the CNN, int8."""
    if not FASHION.is_dir():
        pytest.fail(f"{FASHION} is missing: apt-get install dataset-fashion-mnist (.ci/run does)")
    root = store / "fashion"
    for key, stem in FILES.items():
        n = 600 if key.startswith("train") else 200
        write_idx(root / f"{stem}.gz", read_idx(FASHION / f"{stem}.gz")[:n].numpy())
    run_id, metrics, datamodule = train(["data=fashion_mnist", f"data.root={root}", "data.download=false", *CNN],
                                        store / "fashion_run")
    out, child = int8_check(run_id, datamodule, store, capsys, "fashion-int8")
    assert child.data.params["quantization"] == "static"
    assert child.data.metrics["export/original_acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)


@pytest.mark.slow
def test_predict_takes_the_exported_file(store, image_folder, capsys):
    root = image_folder(root=store / "images", per_class=30, side=20)
    run_id, metrics, datamodule = train(["data=image_folder", f"data.root={root}", "data.image_size=16",
                                         "data.test_fraction=0.3", "data.batch_size=8",
                                         f"data.cache_dir={store / 'cache'}", *CNN], store / "folder_run")
    out = store / "folder.onnx"
    status, _, stderr = lab(capsys, "export", run_id, "--out", out)
    assert status == 0, stderr
    test = datamodule.splits["test"]
    csv_out = store / "pred.csv"
    status, stdout, stderr = lab(capsys, "predict", out, *test.paths, "--out", csv_out)
    assert status == 0, stderr
    with open(csv_out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == test.paths
    right = sum(Path(r["file"]).parent.name == r["predicted"] for r in rows) / len(rows)
    assert right == pytest.approx(metrics["test/acc"], abs=1e-6)
    expected = torch_probabilities(run_id, test.x).max(1)
    assert np.abs(np.array([float(r["p1"]) for r in rows]) - expected).max() <= 1e-4
    assert "cpu (onnxruntime)" in stdout and f"model: {out}" in stdout


@pytest.mark.slow
def test_refused_exports_write_nothing(digits_cnn, digits_mlp, store, capsys, tmp_path):
    run_id, _, _ = digits_cnn
    before = {r.info.run_id for r in MlflowClient().search_runs([MlflowClient().get_run(run_id).info.experiment_id])}
    out = tmp_path / "refused" / "x.onnx"
    cases = [
        ((run_id, "--prune", "0.9", "--finetune-epochs", "0", "--max-acc-drop", "0"), "more than --max-acc-drop 0"),
        ((digits_mlp[0], "--prune", "0.5", "--structured"), "--structured prunes the channels of a chain of conv"),
    ]
    for args, words in cases:
        status, stdout, stderr = lab(capsys, "export", *args, "--out", out)
        assert status == 2 and words in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
        assert not out.parent.exists() or not any(out.parent.iterdir())
    after = {r.info.run_id for r in MlflowClient().search_runs([MlflowClient().get_run(run_id).info.experiment_id])}
    assert after == before  # no export run was logged for either


@pytest.mark.slow
def test_a_run_whose_data_is_gone_is_refused(store, image_folder, capsys, tmp_path):
    root = image_folder(root=tmp_path / "gone", per_class=10, side=8)
    run_id, _, _ = train(["data=image_folder", f"data.root={root}", "data.batch_size=4", "model=mlp",
                          "model.net.hidden=[8]", f"data.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    for path in (root, tmp_path / "cache"):
        for f in sorted(path.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        path.rmdir()
    status, _, stderr = lab(capsys, "export", run_id, "--quantize", "int8", "--out", tmp_path / "x.onnx")
    assert status == 2 and f"the data of run {run_id}" in stderr and "cannot be loaded" in stderr, stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("args, words", [
    (("--prune", "1.5"), "--prune=1.5 is not valid"),
    (("--structured",), "--structured is an option of pruning"),
    (("--finetune-epochs", "2"), "--finetune-epochs is an option of pruning"),
    (("--max-acc-drop", "-1"), "--max-acc-drop=-1.0 is not valid"),
    (("--quantize", "int8", "--calibration", "/no/such/folder"), "--calibration /no/such/folder does not exist"),
    (("--calibration-size", "8"), "--calibration-size is an option of --quantize int8"),
    (("--out", "model.pt"), "--out model.pt is not valid: give the file to write, ending in .onnx"),
    (("--format", "tflite"), "invalid choice: 'tflite'"),
])
def test_bad_options_are_one_sentence_before_any_loading(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, stderr = lab(capsys, "export", "0123456789abcdef0123456789abcdef", *args)
    assert status == 2 and words in stderr and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []  # not even an MLflow database


def test_a_net_onnx_cannot_trace_is_refused_and_nothing_written(tmp_path):
    class BranchOnData(torch.nn.Module):  # control flow on the input's values: torch.export cannot follow it
        def forward(self, x):
            return x.flatten(1)[:, :2] if x.sum() > 0 else x.flatten(1)

    deployed = onnx_model.Deployed(torch.nn.Sequential(BranchOnData(), torch.nn.Softmax(1)), [0.5], [0.2], "uint8")
    meta = {"input_shape": [1, 2, 2], "input_type": "uint8", "net": "BranchOnData"}
    with pytest.raises(LabError, match="the net BranchOnData cannot be exported to ONNX .*data-dependent.*not "
                                       "supported by --format onnx"):
        onnx_model.write(deployed, meta, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
