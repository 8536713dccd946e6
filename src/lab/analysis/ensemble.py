"""`lab ensemble SWEEP.yaml --top K`: the average of the best K trials' class probabilities on the test set.

Each member is scored on the test set its own run's config builds (members may differ in image size or
channels); the test sets must hold the same images in the same order, which equal labels and class names
check. The ensemble is an MLflow run `ensemble-top-K` nested under the sweep's parent run, with the same
test report a trial has (test/acc, test/f1_macro, per-class F1, confusion matrix) and its members as tags.
"""
import time
from dataclasses import dataclass

import torch
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from lab.analysis import models, results
from lab.errors import LabError
from lab.sweep import ranking
from lab.train import metrics, precision, rebuild, tracking


@dataclass
class Member:
    trial: int
    run_id: str
    probs: torch.Tensor  # (N, K) on the CPU
    labels: torch.Tensor  # (N,)
    class_names: list[str]


def member(client: MlflowClient, trial: int, run_id: str, test_sets: dict) -> Member:
    """test_sets: set-up datamodules by their data config, shared by members whose data config is the same
    (reading Fashion-MNIST and splitting it takes seconds; most sweeps do not vary the data)."""
    model = models.from_run(client, run_id, f"trial {trial} (run {run_id})")
    cfg = rebuild.run_config(run_id, results.mlflow_uri())
    data_cfg = cfg.data
    key = OmegaConf.to_yaml(data_cfg)
    if key not in test_sets:
        test_sets[key] = instantiate(data_cfg)
        test_sets[key].setup("test")
    data = test_sets[key]
    test = data.splits["test"]
    # The run's own batch size: the same sums in the same order as its test, so one member alone gives its test/acc.
    # On a GPU, the autocast its test ran under (bf16 or fp16 by its trainer.precision), as Lightning applies it.
    # lab.precision: what "auto" became where it trained (a V100's 16-mixed, even when ensembled on an A100).
    trained_in = client.get_run(run_id).data.tags.get("lab.precision") or OmegaConf.select(
        cfg, "trainer.precision", default="32-true")
    dtype = precision.autocast_dtype(trained_in, models.device())
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        probs = model.probabilities(test.x, batch_size=data.batch_size)
    return Member(trial, run_id, probs, test.y.cpu(), model.class_names)


def report(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> tuple[dict[str, float], dict]:
    """(scalar test metrics test/*, the report tracking.log_test_report takes), by the builder a run's test uses."""
    values, test_report = metrics.scores(probs, labels, class_names)
    return {f"test/{key}": value for key, value in values.items()}, test_report


def check_same_test_set(members: list[Member]) -> None:
    first = members[0]
    for m in members[1:]:
        if m.class_names != first.class_names:
            raise LabError(f"trial {m.trial} has classes {m.class_names}, trial {first.trial} {first.class_names}: "
                           "an ensemble needs members trained on the same classes.")
        if not torch.equal(m.labels, first.labels):
            raise LabError(f"the test sets of trial {m.trial} and trial {first.trial} differ ({len(m.labels)} and "
                           f"{len(first.labels)} images, other labels): their configs split or read the data "
                           "differently (data.root, split_seed, test_fraction), so their predictions cannot be averaged.")


def evaluate(client: MlflowClient, chosen: list[tuple[int, str]]) -> tuple[list[Member], dict[str, float], dict]:
    """chosen: (trial number, run id) per member. Returns the members, the ensemble's metrics and report."""
    test_sets: dict = {}
    members = [member(client, trial, run_id, test_sets) for trial, run_id in chosen]
    check_same_test_set(members)
    mean = torch.stack([m.probs for m in members]).mean(0)
    scalars, test_report = report(mean, members[0].labels, members[0].class_names)
    return members, scalars, test_report


def log(client: MlflowClient, parent: str, name: str, members: list[Member], scalars: dict, test_report: dict) -> str:
    """The ensemble's run, nested under the sweep's parent run; returns its id."""
    experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
    tags = {"ensemble.trials": ",".join(str(m.trial) for m in members),
            "ensemble.run_ids": ",".join(m.run_id for m in members),
            "ensemble.size": str(len(members)), "lab.command": f"lab ensemble ({name})"}
    with tracking.run(results.mlflow_uri(), experiment, name, parent, tags) as (_, run_id):
        for key, value in scalars.items():
            client.log_metric(run_id, key, value)
        tracking.log_test_report(client, run_id, test_report, step=0)
        client.log_dict(run_id, [{"trial": m.trial, "run_id": m.run_id} for m in members], "members.json")
    return run_id


def parse_trials(text: str) -> list[int]:
    try:
        numbers = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 0:
        raise LabError(f"--trials={text!r} is not valid: give trial numbers separated by commas, e.g. --trials 3,7,12.")
    return numbers


def chosen_trials(study, top: int, trials: str | None) -> list:
    ranked = ranking.ranked(study)
    if trials is None:
        ranked = [t for t in ranked if ranking.feasible(t)]  # a trial breaking a constraint is no candidate
        if top < 1:
            raise LabError(f"--top={top} is not valid: give how many of the best trials to average, 1 or more.")
        if not ranked:
            raise LabError(f"study {study.study_name!r} has no completed trial to build an ensemble from.")
        return ranked[:top]
    by_number = {t.number: t for t in ranked}
    numbers = parse_trials(trials)
    missing = [n for n in numbers if n not in by_number]
    if missing:
        count = len(study.get_trials(deepcopy=False))
        absent = [n for n in missing if not 0 <= n < count]
        why = (f"there is no trial {absent[0]} (the study has trials 0-{count - 1})" if absent and count else
               f"study {study.study_name!r} has no trial {absent[0]}" if absent else
               f"trial(s) {missing} of study {study.study_name!r} are not completed")
        raise LabError(f"--trials: {why}; the completed ones are {sorted(by_number)}.")
    return [by_number[n] for n in numbers]


def command(args) -> None:
    _, _, study, _ = results.open_study(args)
    parent = results.parent_run_id(study)
    trials = chosen_trials(study, args.top, args.trials)
    chosen = []
    for t in trials:
        run_id = ranking.model_run_id(t)
        if not run_id:
            raise LabError(f"trial {t.number} of study {study.study_name!r} has no MLflow run to take its model from.")
        chosen.append((t.number, run_id))
    if len(trials) < args.top and args.trials is None:
        print(f"the study has {len(trials)} completed trial(s): averaging those")
    client = results.client()
    started = time.perf_counter()
    members, scalars, test_report = evaluate(client, chosen)
    scored = time.perf_counter() - started
    name = f"ensemble-top-{len(members)}" if args.trials is None else f"ensemble-trials-{'-'.join(map(str, (m.trial for m in members)))}"
    run_id = log(client, parent, name, members, scalars, test_report)
    print(f"{'member':>6} {'trial':>5} {'test/acc':>9} {'test/f1_macro':>13}  run")
    for i, m in enumerate(members, 1):
        alone, _ = report(m.probs, m.labels, m.class_names)
        print(f"{i:>6} {m.trial:>5} {alone['test/acc']:>9.4f} {alone['test/f1_macro']:>13.4f}  {m.run_id}")
    rank = {t.number: i for i, t in enumerate(ranking.ranked(study))}
    best = min(members, key=lambda m: rank[m.trial])  # the sweep's best among them, whatever order --trials gave
    alone, _ = report(best.probs, best.labels, best.class_names)
    gain = scalars["test/acc"] - alone["test/acc"]
    print(f"ensemble of {len(members)} ({len(best.labels)} test images, scored in {scored:.1f} s): test/acc {scalars['test/acc']:.4f}, "
          f"test/f1_macro {scalars['test/f1_macro']:.4f}")
    # "best by <metric>", not "best single model": another member may score as well on the test set.
    metric = study.user_attrs.get("lab.metric") or "the sweep's metric"
    print(f"best by {metric} (trial {best.trial}): test/acc {alone['test/acc']:.4f}, "
          f"test/f1_macro {alone['test/f1_macro']:.4f}; the ensemble is {gain:+.4f} "
          f"{'better' if gain > 0 else 'worse' if gain < 0 else 'the same'}")
    print(f"logged: run {run_id} ({name}) under the sweep's run {parent}")
