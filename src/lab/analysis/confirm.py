"""`lab confirm`: rerun the best K trials of a study with S seeds each, to tell a better configuration from a
lucky seed. Every rerun is an MLflow run nested under the sweep's parent run; mean +- std per configuration
goes to stdout and to the parent run (confirm.csv, confirm/<rank>/mean|std, tag confirm_winner)."""
import csv
import io
import json
import logging
import math
import shlex
import time

import numpy as np
import optuna
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from lab import config
from lab.analysis import results
from lab.errors import LabError
from lab.sweep import ranking

TEST_METRIC = "test/acc"


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The best k feasible trials (several objectives: the Pareto front first, by the first objective)."""
    return [t for t in ranking.ranked(study) if ranking.feasible(t)][:k]


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def finished_before(client: MlflowClient, parent: str) -> dict[tuple[int, int, str], tuple[str, dict]]:
    """(trial, seed, command) -> (run id, metrics) of the confirm runs an earlier `lab confirm` finished under the
    sweep's run. Run again (or after a Ctrl-C), confirm reuses them rather than train and log them twice."""
    exp_id = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'",
                              max_results=50000)
    return {(int(r.data.tags["confirm.trial"]), int(r.data.tags["confirm.seed"]), r.data.tags.get("lab.command", "")):
            (r.info.run_id, dict(r.data.metrics)) for r in runs if "confirm.seed" in r.data.tags}


def rerun(sweep, trial, seed: int, out_dir, parent: str, before: dict) -> dict[str, float] | None:
    # The trial's own overrides (base + params), minus pruning; seed= replaces the cfg.seed the trial ran with.
    from lab.sweep import objective  # Lightning's imports (~7 s) only when something trains
    from lab.train import job

    overrides = [*objective.trial_overrides(sweep, trial), f"seed={seed}"]  # FrozenTrial has .params too
    tags = {"confirm.trial": str(trial.number), "confirm.seed": str(seed), "study": sweep.spec.study,
            "lab.command": "lab train " + shlex.join(overrides)}
    found = before.get((trial.number, seed, tags["lab.command"]))
    if found is not None:
        run_id, metrics = found
        print(f"trial {trial.number} seed {seed}: {sweep.spec.metric}={metrics.get(sweep.spec.metric, math.nan):.6g} "
              f"{TEST_METRIC}={metrics.get(TEST_METRIC, math.nan):.6g} (run {run_id}, finished before)")
        return metrics
    try:
        metrics = job.run(config.load(overrides), out_dir / "confirm" / f"trial_{trial.number}_seed_{seed}",
                            parent_run_id=parent, run_name=f"confirm-{trial.number}-seed-{seed}", tags=tags)
    except Exception as err:  # noqa: BLE001 - one failed seed is a result (its run is FAILED), not the end
        print(f"trial {trial.number} seed {seed}: failed: {type(err).__name__}: {err}")
        return None
    print(f"trial {trial.number} seed {seed}: {sweep.spec.metric}={metrics.get(sweep.spec.metric, math.nan):.6g} "
          f"{TEST_METRIC}={metrics.get(TEST_METRIC, math.nan):.6g}")
    return metrics


def table(sweep, rows: list[dict]) -> str:
    metric = sweep.spec.metric
    lines = [f"{'rank':>4} {'trial':>5} {'seeds':>5} {'sweep ' + metric:>16} {metric + ' mean +- std':>26} "
             f"{TEST_METRIC + ' mean +- std':>26}  params"]
    for r in rows:
        lines.append(f"{r['rank']:>4} {r['trial']:>5} {r['seeds']:>5} {r['sweep_value']:>16.6g} "
                     f"{r['mean']:>14.6g} +- {r['std']:<8.4g} {r['test_acc_mean']:>14.6g} +- {r['test_acc_std']:<8.4g}"
                     f"  {r['params']}")
    return "\n".join(lines)


def winner(study: optuna.Study, rows: list[dict]) -> dict | None:
    ranked = [r for r in rows if math.isfinite(r["mean"])]
    if not ranked:
        return None
    pick = max if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else min  # the first objective
    return pick(ranked, key=lambda r: r["mean"])


def log_parent(client: MlflowClient, parent: str, rows: list[dict], best: dict | None) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    client.log_text(parent, buf.getvalue(), "confirm.csv")
    now = int(time.time() * 1000)
    metrics = [Metric(f"confirm/{r['rank']}/{stat}", r[stat], now, 0)
               for r in rows for stat in ("mean", "std") if math.isfinite(r[stat])]
    if metrics:
        client.log_batch(parent, metrics=metrics, synchronous=True)
    if best is not None:
        client.set_tag(parent, "confirm_winner", str(best["trial"]))


def command(args) -> None:
    sweep, out_dir, study, _ = results.open_study(args)
    parent = results.parent_run_id(study)
    trials = top_trials(study, args.top)
    if not trials:
        raise LabError(f"study {sweep.spec.study!r} has no completed trial to confirm"
                       + (" that meets its constraints." if study.get_trials(states=(TrialState.COMPLETE,)) else "."))
    # Fresh seeds: each trial trained seeds cfg.seed .. cfg.seed+K-1 (K = the file's seeds, 1 by default).
    first = int(config.load(sweep.base_overrides).seed) + sweep.spec.seeds
    seeds = range(first, first + args.seeds)
    print(f"confirming the best {len(trials)} trial(s) of {sweep.spec.study!r} with seeds {first}..{seeds[-1]}: "
          f"{len(trials) * args.seeds} runs under parent run {parent}")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # K*S runs: one line each, not Lightning's banner
    rows = []
    before = finished_before(MlflowClient(results.mlflow_uri()), parent)
    for rank, trial in enumerate(trials, 1):
        runs = [rerun(sweep, trial, seed, out_dir, parent, before) for seed in seeds]
        done = [m for m in runs if m is not None]
        mean, std = mean_std([m.get(sweep.spec.metric) for m in done])
        test_mean, test_std = mean_std([m.get(TEST_METRIC) for m in done])
        rows.append({"rank": rank, "trial": trial.number, "seeds": len(done), "sweep_value": trial.values[0],
                     "mean": mean, "std": std, "test_acc_mean": test_mean, "test_acc_std": test_std,
                     "params": json.dumps(trial.params)})
    best = winner(study, rows)
    print(table(sweep, rows))
    log_parent(MlflowClient(results.mlflow_uri()), parent, rows, best)
    if best is not None:
        print(f"confirmed winner: trial {best['trial']} ({sweep.spec.metric} {best['mean']:.6g} +- {best['std']:.4g} "
              f"over {best['seeds']} seeds)")
