"""Sweep-file validation and worker placement: logic tests, no training."""
import re
import textwrap
from pathlib import Path

import optuna
import pytest

from lab import private
from lab.errors import LabError
from lab.sweep import pool, spec

BASE = """
study: t
overrides: [data=synthetic, model=mlp]
metric: val/acc
direction: maximize
n_trials: 4
sampler: {name: tpe, seed: 0}
params:
"""


def write(tmp_path, params: str, base: str = BASE):
    path = tmp_path / "s.yaml"
    path.write_text(base + textwrap.indent(textwrap.dedent(params), "  "))
    return path


def test_valid_sweep_builds_optuna_distributions(tmp_path):
    sweep = spec.load(write(tmp_path, """
        model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
        data.batch_size: {type: categorical, choices: [16, 32]}
        model.net.hidden: {type: categorical, choices: [[64], [128, 64]]}
        trainer.max_epochs: {type: int, low: 1, high: 3}
    """))
    assert isinstance(sweep.space["model.optimizer.lr"], optuna.distributions.FloatDistribution)
    assert sweep.space["model.optimizer.lr"].log
    assert sweep.space["trainer.max_epochs"].high == 3
    # A list choice travels through Optuna as its override text and comes back as a Hydra list.
    assert sweep.trial_overrides({"model.net.hidden": "[128, 64]"}) == ["model.net.hidden=[128, 64]"]
    assert sweep.base_overrides == ["data=synthetic", "model=mlp"]


@pytest.mark.parametrize("params, named", [
    ("model.optimizer.lr: {type: float, low: 0.1, high: 0.01}", "model.optimizer.lr"),
    ("model.optimizer.lr: {type: float, low: 0.0, high: 0.1, log: true}", "model.optimizer.lr"),
    ("data.batch_size: {type: categorical, choices: []}", "data.batch_size"),
    ("model.no_such_key: {type: float, low: 0.1, high: 0.2}", "model.no_such_key"),
    ("model.net.dropout: {type: gaussian, low: 0.1, high: 0.2}", "model.net.dropout"),
    ("trainer.max_epochs: {type: int, low: 1.5, high: 3}", "trainer.max_epochs"),
    ("model.net.dropout: {type: float, low: 0.1}", "model.net.dropout"),
    # Values every trial would fail on, refused before the first one starts:
    ("model.optimizer.lr: {type: float, low: .nan, high: .inf}", "low=nan, high=inf is not valid"),
    ("data.batch_size: {type: float, low: 0.5, high: 64}", "data.batch_size=0.5 is not valid"),
    ("model.net.dropout: {type: categorical, choices: [0.1, lots]}", "model.net.dropout='lots' is not valid"),
    ("seed: {type: int, low: 0, high: 1.0e11}", "seed=100000000000 is not valid"),
])
def test_invalid_params_are_rejected_with_their_name(tmp_path, params, named):
    with pytest.raises(LabError, match=named.replace(".", r"\.")):
        spec.load(write(tmp_path, params))


@pytest.mark.parametrize("field, value, named", [
    ("sampler", "{name: annealing}", "sampler.name"),
    ("pruner", "{name: sometimes}", "pruner.name"),
    ("direction", "upwards", "direction"),
    ("metric", "val/accuracy", "metric"),
    ("n_trials", "0", "n_trials"),
])
def test_invalid_top_level_fields_are_rejected(tmp_path, field, value, named):
    base = BASE.replace(f"\n{field}:", "\nreplaced_").replace("params:", f"{field}: {value}\nparams:")
    base = "\n".join(line for line in base.splitlines() if not line.startswith("replaced_")) + "\n"
    with pytest.raises(LabError, match=named):
        spec.load(write(tmp_path, "model.net.dropout: {type: float, low: 0.0, high: 0.5}", base))


def test_broken_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("study: [unclosed\n")
    with pytest.raises(LabError, match="not valid YAML"):
        spec.load(path)


def test_unknown_key_in_sweep_file_is_named(tmp_path):
    path = write(tmp_path, "model.net.dropout: {type: float, low: 0.0, high: 0.5}", BASE + "")
    path.write_text(path.read_text() + "\nn_trails: 5\n")
    with pytest.raises(LabError, match="n_trails"):
        spec.load(path)


def test_enqueued_values_outside_the_space_are_rejected(tmp_path):
    base = BASE.replace("params:", "enqueue: [{model.net.dropout: 0.9}]\nparams:")
    with pytest.raises(LabError, match=r"enqueue\[0\]\.model\.net\.dropout=0\.9"):
        spec.load(write(tmp_path, "model.net.dropout: {type: float, low: 0.0, high: 0.5}", base))


def test_grid_sampler_caps_trials_at_grid_size(tmp_path):
    base = BASE.replace("{name: tpe, seed: 0}", "{name: grid}").replace("n_trials: 4", "n_trials: 100")
    sweep = spec.load(write(tmp_path, """
        data.batch_size: {type: categorical, choices: [16, 32, 64]}
        trainer.max_epochs: {type: int, low: 1, high: 2}
    """, base))
    assert sweep.spec.n_trials == 6


SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def test_the_shipped_sweeps_are_found():
    from lab.config import conf_dir

    assert SWEEPS and SWEEPS[0].parent == conf_dir().parent / "sweeps", "no shipped sweeps found"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_shipped_sweep_is_valid(path, tmp_path, monkeypatch):
    from lab.data import fetch

    monkeypatch.chdir(tmp_path)  # where `lab data fetch NAME` would have put the lecture datasets (data/...)
    for dataset in fetch.DATASETS.values():
        (tmp_path / "data" / dataset.target).mkdir(parents=True)
    sweep = spec.load(path)
    assert sweep.space, path


def test_gpu_parsing_and_placement():
    assert pool.parse_gpus(None, 2) == [0, 1]
    assert pool.parse_gpus("none", 2) == []
    assert pool.parse_gpus("1,0,1", 2) == [0, 1]
    with pytest.raises(LabError, match="2"):
        pool.parse_gpus("0,2", 2)
    with pytest.raises(LabError, match="'x'"):
        pool.parse_gpus("x", 2)
    slots = pool.placement([0, 3], per_gpu=3, cpu_workers=1, cpu_count=12)
    assert [s.name for s in slots] == ["gpu0.0", "gpu0.1", "gpu0.2", "gpu3.0", "gpu3.1", "gpu3.2"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "0", "3", "3", "3"]
    assert {s.env["LAB_TORCH_THREADS"] for s in slots} == {"2"}
    cpu = pool.placement([], per_gpu=1, cpu_workers=2, cpu_count=2)
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"], s.env["LAB_TORCH_THREADS"]) for s in cpu] == [
        ("cpu0", "", "1"), ("cpu1", "", "1")]
    # $LAB_TORCH_THREADS set by the user is what every worker gets, not the share of the cores.
    assert {s.env["LAB_TORCH_THREADS"] for s in pool.placement([], 1, cpu_workers=1, cpu_count=8, threads=1)} == {"1"}
    assert {s.env["LAB_TORCH_THREADS"] for s in pool.placement([0], 2, cpu_workers=1, cpu_count=8, threads=3)} == {"3"}
    with pytest.raises(LabError, match="--workers-per-gpu=0"):
        pool.placement([0], per_gpu=0, cpu_workers=1, cpu_count=2)


def test_auto_packing_rule():
    gib = 1 << 30
    assert pool.auto_per_gpu(400_000, 80 * gib) == 8  # the lecture CNN: pack the card
    assert pool.auto_per_gpu(11_000_000, 80 * gib) == 8  # ResNet-18: 704 MB estimate, still 1 GiB floor
    assert pool.auto_per_gpu(200_000_000, 80 * gib) == 3
    assert pool.auto_per_gpu(2_000_000_000, 80 * gib) == 1


def test_grid_workers_agree_on_what_each_grid_id_is(tmp_path):
    """Two workers with their own samplers on one journal: every combination once, params = grid id's cell."""
    from lab.sweep import budget
    from lab.sweep import study as studies
    path = write(tmp_path, """
        data.batch_size: {type: categorical, choices: [4, 8]}
        model.optimizer.lr: {type: categorical, choices: [0.001, 0.01]}
    """, BASE.replace("{name: tpe, seed: 0}", "{name: grid, seed: 3}"))
    sweep = spec.load(path, check=False)
    storage = str(tmp_path / "study.journal")
    a = studies.create_or_resume(sweep, storage, "cpu0")
    b = studies.create_or_resume(sweep, storage, "cpu1")
    for study in (a, b, a, b):
        assert not budget.done(sweep, study, study.sampler)
        study.ask(sweep.space)
    assert budget.done(sweep, a, a.sampler) and budget.done(sweep, b, b.sampler)
    trials = a.get_trials()
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4
    for t in trials:
        cells, names = private.grid_cells(a.sampler), private.grid_names(a.sampler)
        assert cells[t.system_attrs[private.GRID_ID]] == tuple(t.params[n] for n in names)


def test_merged_overrides_keep_the_last_value_and_a_plus_that_added_the_key():
    assert spec.merge_overrides(["trainer.max_epochs=10", "a=1"], ["trainer.max_epochs=1"]) == ["a=1",
                                                                                                "trainer.max_epochs=1"]
    assert spec.merge_overrides(["+mlflow.note=a"], ["mlflow.note=b"]) == ["+mlflow.note=b"]


def test_failures_count_towards_the_budget_only_without_a_failure_limit(tmp_path):
    from optuna.trial import TrialState

    from lab.sweep import budget
    from lab.sweep import study as studies

    sweep = spec.load(write(tmp_path, "model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n"), check=False)
    study = studies.create_or_resume(sweep, str(tmp_path / "study.journal"))
    studies.begin_launch(sweep, study)
    for _ in range(4):
        study.tell(study.ask(sweep.space), state=TrialState.FAIL)
    assert budget.used_budget(study) == 0 and not budget.done(sweep, study)
    assert len(budget.failure_streak(sweep, study)) == 0  # 4 < max_failures=5
    sweep.spec.max_failures = 0  # never stop on failures: then they use the budget, or the sweep never ends
    assert budget.done(sweep, study)


def test_a_worker_joins_only_a_study_that_exists_and_adopts_its_settings(tmp_path):
    from lab.sweep import study as studies

    path = write(tmp_path, "model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n")
    storage = str(tmp_path / "study.journal")
    with pytest.raises(LabError, match="--prepare"):
        studies.create_or_resume(spec.load(path, check=False), storage, join=True)
    assert not (tmp_path / "study.journal").exists()  # refused, and nothing was created
    parent = spec.load(path, ["trainer.max_epochs=3"], n_trials=9, check=False)
    studies.begin_launch(parent, studies.create_or_resume(parent, storage))
    joined = spec.load(path, check=False)  # `lab worker FILE` with nothing else on its command line
    studies.create_or_resume(joined, storage, join=True, given=set())
    assert joined.spec.n_trials == 9 and "trainer.max_epochs=3" in joined.base_overrides


def test_the_budget_lock_is_not_optunas_own_lock_file(tmp_path):
    from lab.sweep import budget

    storage = str(tmp_path / "study.journal")
    with budget.budget_lock(storage, "s"):
        assert (tmp_path / "study.journal.budget.lock").exists() and not (tmp_path / "study.journal.lock").exists()


def test_a_categorical_of_many_choices_is_checked_without_composing_each(tmp_path):
    choices = ", ".join(str(i / 10_000) for i in range(10_000))
    spec.load(write(tmp_path, f"model.net.dropout: {{type: categorical, choices: [{choices}]}}"))  # seconds
    with pytest.raises(LabError, match="'lots' is not valid"):
        spec.load(write(tmp_path, f"model.net.dropout: {{type: categorical, choices: [{choices}, lots]}}"))


@pytest.mark.parametrize("overrides, named", [
    ("[data=image_folder, data.root=/nowhere/flower_photos]", "lab data fetch flowers --root /nowhere"),
    ("[data=image_folder, data.root=/nowhere/pets]", "data.root=/nowhere/pets does not exist"),
    ("[data=mnist, data.root=/nowhere, data.download=false]", "were not found in /nowhere"),
])
def test_data_that_is_not_there_is_refused_before_any_trial(tmp_path, overrides, named):
    """Every trial would fail on it: one sentence (and how to fetch a lecture dataset), not max_failures runs."""
    base = BASE.replace("[data=synthetic, model=mlp]", overrides)
    with pytest.raises(LabError, match=named):
        spec.load(write(tmp_path, "model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1}", base=base))


def test_a_searched_data_root_is_left_to_each_trial(tmp_path):
    base = BASE.replace("[data=synthetic, model=mlp]", "[data=image_folder]")
    sweep = spec.load(write(tmp_path, "data.root: {type: categorical, choices: [/a, /b]}", base=base))
    assert "data.root" in sweep.space


def test_a_resumed_worker_does_not_draw_the_first_launchs_configurations_again(tmp_path):
    """Workers keep their ids (cpu0, ...) across launches; TPE's random start-up, seeded from the same seed,
    repeated trial 0 after every resume."""
    from lab.sweep import study as studies

    base = BASE.replace("sampler: {name: tpe, seed: 0}", "sampler: {name: tpe, seed: 0, n_startup_trials: 10}")
    sweep = spec.load(write(tmp_path, "model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1}", base=base),
                      check=False)
    storage = str(tmp_path / "study.journal")
    studies.create_or_resume(sweep, storage)  # what `lab sweep` does before its workers join
    drawn = []
    for _launch in range(3):
        study = studies.create_or_resume(sweep, storage, worker_id="cpu0", join=True)
        for _ in range(2):
            trial = study.ask(sweep.space)
            drawn.append(trial.params["model.optimizer.lr"])
            study.tell(trial, 0.5)
    assert len(set(drawn)) == 6, drawn
    # A fresh study draws what it always drew: the first launch is unchanged.
    again = tmp_path / "again.journal"
    studies.create_or_resume(sweep, str(again))
    first = studies.create_or_resume(sweep, str(again), worker_id="cpu0", join=True).ask(sweep.space)
    assert first.params["model.optimizer.lr"] == drawn[0]


def test_an_override_of_a_searched_parameter_is_refused(tmp_path):
    path = write(tmp_path, "model.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-1}")
    with pytest.raises(LabError, match=r"model\.optimizer\.lr=0\.1 sets model\.optimizer\.lr, which this sweep searches"):
        spec.load(path, ["model.optimizer.lr=0.1"])


def test_a_resume_with_the_same_overrides_in_another_order_or_notation_resumes(tmp_path):
    from lab.sweep import study as studies

    path = write(tmp_path, "model.optimizer.lr: {type: float, low: 1.0e-3, high: 1.0e-1}\n")
    storage = str(tmp_path / "study.journal")
    first = spec.load(path, ["trainer.max_epochs=3", "model.net.dropout=1e-1"], check=False)
    studies.create_or_resume(first, storage)
    again = spec.load(path, ["model.net.dropout=0.1", "trainer.max_epochs=3"], check=False)
    studies.create_or_resume(again, storage)
    assert again.base_overrides == first.base_overrides  # the stored text, which trials and `lab best` show
    with pytest.raises(LabError, match="was created with the overrides"):
        studies.create_or_resume(spec.load(path, ["model.net.dropout=0.2", "trainer.max_epochs=3"], check=False),
                                 storage)


@pytest.mark.parametrize("text, said", [
    (BASE.replace("n_trials", "n_trial") + "  model.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n",
     "n_trial is not a key of a sweep file. Did you mean n_trials?"),
    (BASE + "  model.optimizer.lr: {type: float, low: 0.001, hgih: 0.1}\n",
     "hgih is not a param's setting (in params.model.optimizer.lr). Did you mean high?"),
    ("", "sets no study: a sweep file names its study (study: NAME)"),
    ("- a\n- b\n", "is not a sweep file: it holds a list, and a sweep file is a mapping"),
    (BASE.replace("n_trials: 4", "n_trials: abc") + "  model.optimizer.lr: {type: float, low: 0.001, high: 0.1}\n",
     "n_trials is not valid: Value 'abc' of type 'str' could not be converted to Integer."),
    (BASE + "  model.optimizer.lr: 0.1\n", "params.model.optimizer.lr must be a mapping such as {type: float"),
])
def test_a_mistyped_or_empty_sweep_file_is_one_sentence_that_says_what_was_meant(tmp_path, text, said):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(LabError, match=re.escape(said)):
        spec.load(path, check=False)
