"""trainer.precision=auto by GPU capability (lab/train/precision.py), and fp16 loss scaling per stacked member
(lab/train/stack_scaler.py). No GPU here: the capability torch reports is what the tests set."""
import pytest
import torch
from mlflow.tracking import MlflowClient

from lab import config_schema
from lab.config import load
from lab.errors import LabError
from lab.train import job, precision, stack
from lab.train.stack_scaler import MemberScaler


def gpu(monkeypatch, capability: tuple[int, int], rocm: bool = False) -> None:
    """This process sees one CUDA GPU of that compute capability; torch.cuda.is_bf16_supported() answers True
    as it does on such a GPU (emulated below 8.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "hip", "6.2" if rocm else None)


@pytest.mark.parametrize(("name", "capability", "want"), [
    ("H100", (9, 0), "bf16-mixed"), ("A100", (8, 0), "bf16-mixed"), ("RTX 3090", (8, 6), "bf16-mixed"),
    ("T4", (7, 5), "16-mixed"), ("V100", (7, 0), "16-mixed"), ("P100", (6, 0), "32-true"), ("K80", (3, 7), "32-true")])
def test_auto_is_what_the_gpu_computes_natively_not_what_it_emulates(monkeypatch, name, capability, want):
    gpu(monkeypatch, capability)
    assert precision.resolve("auto") == want, name
    assert job.trainer_kwargs(load(["data=digits", "model=mlp"]))["precision"] == want, name


def test_rocm_gets_bf16(monkeypatch):
    gpu(monkeypatch, (7, 5), rocm=True)  # what the capability alone would make 16-mixed
    assert precision.resolve("auto") == "bf16-mixed"


def test_auto_is_fp32_on_cpus_and_on_a_gpu_machine_training_on_its_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision.resolve("auto") == "32-true"
    gpu(monkeypatch, (9, 0))
    assert precision.resolve("auto", "cpu") == "32-true"
    assert job.trainer_kwargs(load(["data=digits", "model=mlp", "trainer.accelerator=cpu"]))["precision"] == "32-true"


def test_a_precision_the_user_names_is_kept(monkeypatch):
    gpu(monkeypatch, (7, 5))
    for named in ("bf16-mixed", "32-true", "16-mixed", "64-true"):
        assert precision.resolve(named) == named
        assert job.trainer_kwargs(load(["data=digits", "model=mlp", f"trainer.precision={named}"]))["precision"] == named


def test_the_autocast_dtype_the_loops_apply_themselves(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert precision.autocast_dtype("bf16-mixed", cpu) is None  # autocast is applied on CUDA only
    assert precision.autocast_dtype("bf16-mixed", cuda) is torch.bfloat16
    assert precision.autocast_dtype("16-mixed", cuda) is torch.float16
    assert precision.autocast_dtype("32-true", cuda) is None
    gpu(monkeypatch, (7, 5))
    assert precision.autocast_dtype("auto", cuda) is torch.float16
    gpu(monkeypatch, (8, 0))
    assert precision.autocast_dtype("auto", cuda) is torch.bfloat16


def test_a_stack_autocasting_to_fp16_gets_a_scale_per_member(monkeypatch):
    """What Stack builds where its members' precision means fp16 autocast (a 7.x GPU); built on the CPU."""
    cfgs, models, generators, datamodule = members(2)
    assert stack.Stack(cfgs, models, generators, datamodule, torch.device("cpu")).scaler is None
    monkeypatch.setattr(precision, "autocast_dtype", lambda named, device: torch.float16)
    s = stack.Stack(cfgs, models, generators, datamodule, torch.device("cpu"))
    assert s.autocast_dtype is torch.float16 and isinstance(s.scaler, MemberScaler)
    assert s.scaler.scale.tolist() == [2.0 ** 16] * 2


MLP = ["data=digits", "model=mlp", "model.net.hidden=[16]", "model.net.dropout=0", "data.batch_size=32", "trainer.enable_progress_bar=false",
       "measure.enabled=false", "threads=1"]


def members(k: int):
    cfgs = [load([*MLP, f"seed={i}", f"model.optimizer.lr={0.01 * (i + 1)}"]) for i in range(k)]
    datamodule = job.instantiate(cfgs[0].data)
    datamodule.setup("fit")
    models, generators = stack.build_members(cfgs, datamodule)
    return cfgs, models, generators, datamodule


def trained(scale: list[float] | None, steps: int = 3) -> tuple[stack.Stack, list[list[torch.Tensor]]]:
    cfgs, models, generators, datamodule = members(3)
    s = stack.Stack(cfgs, models, generators, datamodule, torch.device("cpu"))
    if scale is not None:
        s.scaler = MemberScaler(3, torch.device("cpu"))
        s.scaler.scale = torch.tensor(scale)
    for x, y in s.epoch_batches(limit=steps):
        s.train_step(x, y)
    return s, [[p.detach().clone() for p in ps] for ps in s.params]


def test_power_of_two_loss_scales_train_a_stack_exactly_as_unscaled():
    """Scaling by 2**k and unscaling after backward is exact in floating point: the same weights, bit for bit."""
    _, plain = trained(None)
    s, scaled = trained([2.0 ** 16, 2.0 ** 10, 2.0 ** 20])
    for a, b in zip(plain, scaled):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert s.scaler.scale.tolist() == [2.0 ** 16, 2.0 ** 10, 2.0 ** 20] and s.scaler.good == [3, 3, 3]


def test_a_member_whose_gradients_overflow_skips_its_step_alone():
    """Member 1's gradients are not finite on every step (as an fp16 gradient overflows): each of its 3 steps is
    skipped; members 0 and 2 train as they do without it, bit for bit."""
    _, plain = trained(None)
    _, initial = trained(None, steps=0)
    s, got = trained([2.0 ** 16, float("inf"), 2.0 ** 16])
    assert all(torch.equal(p, q) for p, q in zip(got[0], plain[0]))
    assert all(torch.equal(p, q) for p, q in zip(got[2], plain[2]))
    assert all(torch.equal(p, q) for p, q in zip(got[1], initial[1]))  # never stepped
    assert s.scaler.good == [3, 0, 3]


def test_a_scale_halves_on_an_overflow_and_grows_after_its_growth_interval_of_good_steps():
    scaler = MemberScaler(2, torch.device("cpu"), init_scale=4.0, growth_interval=2)
    w = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))]
    for _ in range(2):
        for p in w:
            p.grad = None
        scaler.scaled(torch.stack([w[0].sum(), w[1].sum() * float("inf")]), torch.tensor([0, 1])).backward()
        assert scaler.unscale({0: [w[0]], 1: [w[1]]}) == [1]
        assert torch.equal(w[0].grad, torch.ones(3)) and w[1].grad is None
    assert scaler.scale.tolist() == [8.0, 1.0]


def test_a_precision_lightning_does_not_know_is_one_sentence_before_anything_trains():
    with pytest.raises(LabError, match=r"^trainer.precision='bf17' is not valid: it must be auto .*16-mixed"):
        config_schema.check_rules(load(["data=digits", "model=mlp", "trainer.precision=bf17"]))
    for named in sorted(config_schema.PRECISIONS - {"auto", "transformer-engine", "transformer-engine-float16"}):
        config_schema.check_rules(load(["data=digits", "model=mlp", f"trainer.precision={named}"]))


def test_a_run_records_the_precision_it_trained_in(tmp_path, mlflow_uri):
    job.run(load([*MLP, "trainer.max_epochs=1", "mlflow.log_model=false"]), tmp_path / "run", run_name="p")
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lab").experiment_id], "attributes.run_name = 'p'")
    assert run.data.tags["lab.precision"] == "32-true"
    assert run.data.params["trainer.precision"] == "auto"  # what was asked, beside what it became


@pytest.mark.parametrize("named", ["16-true", "bf16-true", "64-true"])
def test_a_precision_that_casts_the_whole_model_trains_members_alone(named):
    cfgs = [load([*MLP, f"seed={i}", f"trainer.precision={named}"]) for i in range(2)]
    datamodule = job.instantiate(cfgs[0].data)
    datamodule.setup("fit")
    models, generators = stack.build_members(cfgs, datamodule)
    with pytest.raises(stack.CannotStack, match=f"trainer.precision={named} casts the whole model"):
        stack.Stack(cfgs, models, generators, datamodule, torch.device("cpu"))
