"""Stacked training (lab/train/stack.py, stack_run.py): a member of a stack trains exactly as it would alone."""
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lab.config import load
from lab.errors import StopRun
from lab.train import job, stack, stack_run

EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro")
QUIET = ["trainer.enable_progress_bar=false", "mlflow.log_model=false", "measure.enabled=false",
         "mlflow.misclassified_per_class=0", "threads=1"]
MLP = ["data=digits", "model=mlp", "model.net.hidden=[32]", "data.batch_size=64", "trainer.max_epochs=3", *QUIET]
# A CNN with batch norm on 8x8 digits: two blocks take 8 -> 2.
CNN = ["data=digits", "model=cnn", "model.net.channels=[4,8]", "model.net.hidden=[16]", "model.net.dropout=0",
       "data.batch_size=64", "trainer.max_epochs=2", *QUIET]


def histories(client: MlflowClient, run_id: str) -> dict[str, list[float]]:
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in EPOCH_METRICS}


def members(base: list[str], values: list[list[str]], tmp_path, prefix: str) -> list[stack_run.Member]:
    return [stack_run.Member(load([*base, *v]), tmp_path / f"{prefix}{i}", run_name=f"{prefix}{i}", require="val/acc")
            for i, v in enumerate(values)]


@pytest.mark.parametrize("base", [MLP, CNN], ids=["mlp", "cnn_batchnorm"])
def test_a_member_of_a_stack_trains_as_it_would_alone(base, tmp_path, mlflow_uri):
    """Three members that differ in seed, lr and weight decay: each one's logged epochs equal those of the same
    config trained alone by job.run (same seed, dropout 0, CPU), within 1e-4; so do its test metrics."""
    values = [["seed=0", "model.optimizer.lr=0.01"],
              ["seed=1", "model.optimizer.lr=0.003", "model.optimizer.weight_decay=0.01"],
              ["seed=2", "model.optimizer.lr=0.03", "optimizer=adam"]]
    ms = members(base, values, tmp_path, "stacked")
    assert stack_run.run(ms) is None  # None: they trained as one stack, no line said otherwise
    client = MlflowClient(mlflow_uri)
    for i, (m, v) in enumerate(zip(ms, values)):
        assert isinstance(m.outcome, dict), m.outcome
        cfg = load([*base, *v])
        alone = job.run(cfg, tmp_path / f"alone{i}", run_name=f"alone{i}")
        run = client.search_runs([client.get_experiment_by_name("lab").experiment_id],
                                 f"attributes.run_name = 'alone{i}'")[0]
        want, got = histories(client, run.info.run_id), histories(client, m.run_id)
        for key in EPOCH_METRICS:
            assert len(got[key]) == int(cfg.trainer.max_epochs), key
            assert got[key] == pytest.approx(want[key], abs=1e-4), (i, key)
        for key in ("test/acc", "test/loss", "test/f1_macro"):
            assert m.outcome[key] == pytest.approx(alone[key], abs=1e-4), (i, key)
            # Logged as the alone run logs them: the same value at the same step (the epochs trained).
            (got_test,), (want_test,) = client.get_metric_history(m.run_id, key), client.get_metric_history(
                run.info.run_id, key)
            assert (got_test.step, got_test.value) == (want_test.step, pytest.approx(want_test.value, abs=1e-4)), key
        tags = client.get_run(m.run_id).data.tags
        assert tags["lab.best_epoch"] == run.data.tags["lab.best_epoch"]
        assert client.get_run(m.run_id).info.status == "FINISHED"


def test_a_stacked_checkpoint_loads_as_one_models(tmp_path, mlflow_uri):
    """The best checkpoint a member writes is a Classifier's state dict that a net of its config loads."""
    from lab.train import rebuild

    ms = members([*MLP, "trainer.max_epochs=1"], [["seed=0"], ["seed=1"]], tmp_path, "m")
    stack_run.run(ms)
    client = MlflowClient(mlflow_uri)
    module, _ = rebuild.rebuild(client, ms[1].run_id, mlflow_uri)
    weights = torch.load(client.get_run(ms[1].run_id).data.tags["checkpoint"], weights_only=True)["state_dict"]
    assert set(weights) == set(module.state_dict())


def test_a_member_records_what_a_run_alone_records(tmp_path, mlflow_uri):
    """Tested in one vectorised pass, each member's run still has a lone run's artifacts, metrics and tags."""
    base = ["data=digits", "model=mlp", "model.net.hidden=[16]", "trainer.max_epochs=2", "threads=1",
            "trainer.enable_progress_bar=false", "mlflow.log_model=false"]
    ms = members(base, [["seed=0"], ["seed=1"]], tmp_path, "r")
    assert stack_run.run(ms) is None
    job.run(load([*base, "seed=1"]), tmp_path / "alone", run_name="alone")
    client = MlflowClient(mlflow_uri)
    alone = client.search_runs([client.get_experiment_by_name("lab").experiment_id], "attributes.run_name = 'alone'")[0]

    def record(run_id):
        run = client.get_run(run_id)
        return ({a.path for a in client.list_artifacts(run_id)}, set(run.data.metrics),
                {k for k in run.data.tags if k.startswith("lab.") and k != "lab.stacked"} | {"checkpoint"} & set(run.data.tags))

    assert record(ms[1].run_id) == record(alone.info.run_id)
    artifacts = record(ms[1].run_id)[0]
    assert {"confusion_matrix.png", "misclassified.png", "per_class.json"} <= artifacts
    png = Path(client.download_artifacts(ms[1].run_id, "confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pruned_member_leaves_and_the_others_go_on(tmp_path, mlflow_uri):
    class Pruned(StopRun):
        pass

    def prune(epoch, metrics):
        if epoch == 0:
            raise Pruned("pruned in epoch 0")

    ms = members(MLP, [["seed=0"], ["seed=1"], ["seed=2"]], tmp_path, "p")
    ms[1].on_epoch = prune
    ended = []
    for m in ms:
        m.on_end = ended.append
    stack_run.run(ms)
    assert isinstance(ms[1].outcome, Pruned) and ended[0] is ms[1].outcome  # told as soon as it left
    client = MlflowClient(mlflow_uri)
    assert len(client.get_metric_history(ms[1].run_id, "val/acc")) == 1
    for m in (ms[0], ms[2]):
        assert len(client.get_metric_history(m.run_id, "val/acc")) == 3
        assert client.get_run(m.run_id).info.status == "FINISHED"


def test_members_differ_in_dropout_rate_and_each_draws_its_own_masks(tmp_path, mlflow_uri):
    """Dropout 0 for one member, 0.3 for another: one template with a MemberDropout whose rate is a per-member
    buffer; the rate-0 member still matches its alone run."""
    base = [*MLP, "trainer.max_epochs=2"]
    values = [["seed=0", "model.net.dropout=0.0"], ["seed=1", "model.net.dropout=0.3"]]
    ms = members(base, values, tmp_path, "d")
    assert stack_run.run(ms) is None
    client = MlflowClient(mlflow_uri)
    job.run(load([*base, *values[0]]), tmp_path / "alone", run_name="alone")
    run = client.search_runs([client.get_experiment_by_name("lab").experiment_id], "attributes.run_name = 'alone'")[0]
    assert histories(client, ms[0].run_id)["val/loss"] == pytest.approx(
        histories(client, run.info.run_id)["val/loss"], abs=1e-4)
    assert isinstance(ms[1].outcome, dict)


def test_a_net_that_drops_without_dropout_layers_cannot_stack_different_rates():
    """timm's ResNet drops through F.dropout(p=drop_rate): no layer to give each member its rate, so members
    with different rates do not share one step (they would all train at the first's)."""
    base = ["data=synthetic", "data.size=32", "data.n_train=64", "data.n_test=16", "data.batch_size=16", "model=resnet",
            *QUIET]
    cfgs = [load([*base, "model.net.dropout=0.0"]), load([*base, "model.net.dropout=0.5", "seed=1"])]
    datamodule = job.instantiate(cfgs[0].data)
    datamodule.setup("fit")
    models, generators = stack.build_members(cfgs, datamodule)
    with pytest.raises(stack.CannotStack, match=r"without nn.Dropout layers.*\[0.0, 0.5\]"):
        stack.Stack(cfgs, models, generators, datamodule, torch.device("cpu"))


def test_structural_difference_trains_one_at_a_time_with_one_line(tmp_path, mlflow_uri):
    ms = members([*MLP, "trainer.max_epochs=1"], [["model.net.hidden=[16]"], ["model.net.hidden=[32]"]],
                 tmp_path, "s")
    line = stack_run.run(ms)
    assert "one at a time" in line and "model.net.hidden" in line
    assert all(isinstance(m.outcome, dict) for m in ms)


def test_value_keys_and_structure():
    a, b = load(["data=digits", "model=mlp"]), load(["data=digits", "model=mlp", "model.optimizer.lr=0.5", "seed=3"])
    assert stack.difference([a, b]) is None
    c = load(["data=digits", "model=mlp", "optimizer=sgd"])
    assert "model.optimizer._target_" in stack.difference([a, c])
    assert "data.batch_size" in stack.difference([a, load(["data=digits", "model=mlp", "data.batch_size=32"])])


def test_a_net_vmap_cannot_run_is_said_in_one_line(tmp_path):
    """An in-place op on a parameter inside forward: the probe catches it before anything trains."""
    cfg = load([*MLP, "trainer.max_epochs=1"])
    datamodule = job.instantiate(cfg.data)
    datamodule.setup("fit")
    models, generators = stack.build_members([cfg, cfg], datamodule)
    s = stack.Stack([cfg, cfg], models, generators, datamodule, torch.device("cpu"))

    class Inplace(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    s.template.layers.insert(0, Inplace())
    with pytest.raises(stack.CannotStack, match="vmap cannot run"):
        s.probe()


def test_a_member_cut_off_resumes_from_its_last_ckpt_as_an_uninterrupted_member_goes_on(tmp_path, mlflow_uri):
    """A stack of two is interrupted in its third epoch (Interrupted, as SIGTERM raises it, from member 0's epoch
    hook): member 0's last.ckpt holds 2 finished epochs. A retry from it trains as a stack of one, logs epochs 2
    and 3 only, and its epochs and test metrics equal the same member's in a stack never interrupted, within
    1e-4; a cosine schedule (its lr a function of the epoch) checks that the lr goes on from where it was."""
    from lab.errors import Interrupted
    from lab.train import stack_resume

    base = [*MLP, "trainer.max_epochs=4", "scheduler=cosine", "checkpoint.last_every_s=0"]
    values = [["seed=0", "model.optimizer.lr=0.01"], ["seed=1", "model.optimizer.lr=0.003"]]

    def stacked(prefix):
        ms = members(base, values, tmp_path, prefix)
        for m in ms:
            m.keep_last = True
        return ms

    def cut(epoch, metrics):
        if epoch == 2:
            raise Interrupted("SIGTERM")

    cut_off = stacked("cut")
    cut_off[0].on_epoch = cut
    with pytest.raises(Interrupted):
        stack_run.run(cut_off)
    client = MlflowClient(mlflow_uri)
    assert client.get_run(cut_off[0].run_id).info.status == "KILLED"
    last = cut_off[0].out_dir / "checkpoints" / "last.ckpt"
    assert stack_resume.read(last)["epoch"] == 2

    retry = stack_run.Member(load([*base, *values[0]]), tmp_path / "retry", run_name="retry", require="val/acc",
                             keep_last=True, resume_from=str(last))
    assert stack_run.run([retry]) is None
    assert isinstance(retry.outcome, dict), retry.outcome
    assert client.get_run(retry.run_id).data.tags["lab.resume"] == f"resumed after epoch 2 from {last}"
    assert [m.step for m in client.get_metric_history(retry.run_id, "val/acc")] == [2, 3]  # no step twice
    assert stack_resume.read(retry.out_dir / "checkpoints" / "last.ckpt")["epoch"] == 4

    whole = stacked("whole")
    assert stack_run.run(whole) is None
    got, want = histories(client, retry.run_id), histories(client, whole[0].run_id)
    for key in EPOCH_METRICS:
        assert got[key] == pytest.approx(want[key][2:], abs=1e-4), key
    for key in ("test/acc", "test/loss", "test/f1_macro"):
        assert retry.outcome[key] == pytest.approx(whole[0].outcome[key], abs=1e-4), key
    tags, want_tags = client.get_run(retry.run_id).data.tags, client.get_run(whole[0].run_id).data.tags
    assert tags["lab.best_epoch"] == want_tags["lab.best_epoch"]
    assert Path(tags["checkpoint"]).parent == retry.out_dir / "checkpoints"  # its own copy of the best epoch
