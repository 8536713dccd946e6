"""`lab confirm` and `lab report` on a real tiny sweep (conftest's session-wide `swept`, shared with
test_browser.py), read back through Optuna's and MLflow's clients; the helpers they use, on their own."""
import base64
import csv
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from lab.analysis import confirm, report
from lab.sweep import spec

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_confirm_reruns_the_top_trials_with_seeds_and_reports_mean_std(swept, lab, children):
    done = lab("confirm", swept.sweep_file, "--top", "2", "--seeds", "3", cwd=swept.tmp, env=swept.env, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-5000:]

    complete = swept.study.get_trials(states=(TrialState.COMPLETE,))
    top = sorted(complete, key=lambda t: (-t.value, t.number))[:2]
    runs = [r for r in children(swept.client, swept.parent_id) if "confirm.trial" in r.data.tags]
    assert len(runs) == 6
    by_key = {(int(r.data.tags["confirm.trial"]), int(r.data.tags["confirm.seed"])): r for r in runs}
    assert set(by_key) == {(t.number, s) for t in top for s in range(1, 4)}  # fresh: the sweep trained seed 0

    parent = swept.client.get_run(swept.parent_id)
    csv_path = swept.client.download_artifacts(swept.parent_id, "confirm.csv", str(swept.tmp))
    logged = {int(row["trial"]): row for row in csv.DictReader(Path(csv_path).read_text().splitlines())}
    lines = {tuple(line.split()[:2]): line.split() for line in done.stdout.splitlines()}
    means = {}
    for rank, trial in enumerate(top, 1):
        trial_runs = [by_key[trial.number, s] for s in range(1, 4)]
        for seed, r in enumerate(trial_runs, 1):
            assert r.info.status == "FINISHED" and r.data.params["seed"] == str(seed)
            assert float(r.data.params["model.optimizer.lr"]) == trial.params["model.optimizer.lr"]
            assert float(r.data.params["model.net.dropout"]) == trial.params["model.net.dropout"]
        values = np.array([r.data.metrics["val/acc"] for r in trial_runs])
        test_acc = np.array([r.data.metrics["test/acc"] for r in trial_runs])
        means[trial.number] = values.mean()
        # logged on the parent run: metrics and confirm.csv
        assert parent.data.metrics[f"confirm/{rank}/mean"] == pytest.approx(values.mean(), abs=1e-9)
        assert parent.data.metrics[f"confirm/{rank}/std"] == pytest.approx(values.std(ddof=1), abs=1e-9)
        row = logged[trial.number]
        assert int(row["rank"]) == rank and int(row["seeds"]) == 3
        assert float(row["mean"]) == pytest.approx(values.mean(), abs=1e-9)
        assert float(row["std"]) == pytest.approx(values.std(ddof=1), abs=1e-9)
        assert float(row["test_acc_mean"]) == pytest.approx(test_acc.mean(), abs=1e-9)
        assert float(row["test_acc_std"]) == pytest.approx(test_acc.std(ddof=1), abs=1e-9)
        # printed: rank trial seeds sweep_value mean +- std test_mean +- test_std params
        printed = lines[(str(rank), str(trial.number))]
        assert float(printed[4]) == pytest.approx(values.mean(), rel=1e-5)
        assert float(printed[7]) == pytest.approx(test_acc.mean(), rel=1e-5)
        if values.std(ddof=1) > 0:
            assert float(printed[6]) == pytest.approx(values.std(ddof=1), rel=1e-3)
    best_mean = max(means.values())
    assert means[int(parent.data.tags["confirm_winner"])] == best_mean

    # Run again with one more seed: the 6 finished runs are reused, only seed 4 of each trial trains.
    again = lab("confirm", swept.sweep_file, "--top", "2", "--seeds", "4", cwd=swept.tmp, env=swept.env, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr[-5000:]
    assert again.stdout.count("finished before") == 6
    runs = [r for r in children(swept.client, swept.parent_id) if "confirm.trial" in r.data.tags]
    assert sorted((int(r.data.tags["confirm.trial"]), int(r.data.tags["confirm.seed"])) for r in runs) == sorted(
        (t.number, s) for t in top for s in range(1, 5))


@pytest.mark.slow
def test_report_is_one_self_contained_page_logged_on_the_parent(swept, reported):
    path = reported.path
    page = path.read_text()
    images = dict((alt, data) for data, alt in re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">',
                                                           page))
    assert set(images) == reported.plots, page[:2000]
    assert all(base64.b64decode(data).startswith(PNG) for data in images.values())
    # Nothing fetched when opened: no script, style sheet or image from elsewhere (plotly.js's own source holds
    # URLs as strings, so the test looks at tags, not at the text).
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=[\"']?(https?:)?//", page) and "<link" not in page
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1 and page.count("window.PlotlyConfig") == 1
    assert set(re.findall(r'<div id="plot-(\w+)" class="plotly-graph-div"', page)) == reported.interactive
    assert page.count("Plotly.newPlot(") == len(reported.interactive)
    n = len(swept.study.get_trials(states=(TrialState.COMPLETE,)))
    importances = page[page.index("<h3>param importances</h3>"):page.index('<div id="plot-param_importances"')]
    assert f"Computed from {n} finished trials (fewer than 10)" in importances

    best = swept.study.best_trial
    assert f"Best trial {best.number}:" in page and best.user_attrs["mlflow_run_id"] in page
    run = swept.client.get_run(best.user_attrs["mlflow_run_id"])
    tested = re.search(r"<tr><td>test/acc</td><td>([^<]+)</td></tr>", page)
    assert tested and float(tested.group(1)) == pytest.approx(run.data.metrics["test/acc"], rel=1e-5)
    for key, value in run.data.metrics.items():  # the per-class table: one row per class, its F1 as logged
        if key.startswith("test/f1/"):
            row = re.search(rf"<tr><td>{re.escape(key.removeprefix('test/f1/'))}</td>((?:<td>[^<]*</td>){{4}})</tr>",
                            page)
            assert row and float(re.findall(r"<td>([^<]*)</td>", row.group(1))[2]) == pytest.approx(value, rel=1e-5)
    # The page may be written before or after this module's `lab confirm` (the browser test asks for it first):
    # either the note that says how to run it, or its results with the winner.
    section = page.split("<h2>Confirmation</h2>", 1)[1].split("<h2>", 1)[0]
    assert (section.lstrip().startswith('<p class="note">lab confirm has not run on this study')
            or "<p>Confirmed winner: trial " in section), section[:500]
    assert {"COMPLETE", "val/acc", "maximize", "model.optimizer.lr"} <= set(re.findall(r"[\w./]+", page))
    logged = swept.client.download_artifacts(swept.parent_id, "report.html", str(path.parent.parent))
    assert Path(logged).read_text() == page


def test_report_shows_confirm_results_and_links_to_a_tracking_server(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("c")).info.run_id
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("mlflow_parent_run_id", parent)
    sweep = SimpleNamespace(spec=spec.SweepSpec(study="c"), typed="c.yaml", path="c.yaml")
    uri = client.tracking_uri
    assert "lab confirm has not run on this study" in report.confirm_section(client, uri, sweep, study)
    rows = [{"rank": 1, "trial": 4, "seeds": 3, "sweep_value": 0.9, "mean": 0.875, "std": 0.0125,
             "test_acc_mean": 0.86, "test_acc_std": 0.02, "params": '{"lr": 0.01}'}]
    confirm.log_parent(client, parent, rows, rows[0])  # what `lab confirm` logs
    section = report.confirm_section(client, uri, sweep, study)
    assert "<td>0.875 +- 0.0125</td>" in section and "<td>0.86 +- 0.02</td>" in section
    assert "Confirmed winner: trial 4." in section
    # links only where the tracking URI is a server the reader can open
    exp = client.get_run(parent).info.experiment_id
    assert report.Runs(uri, exp).url(parent) is None
    assert report.Runs("http://u:secret@host:5000/", exp).url(parent) == f"http://u:***@host:5000/#/experiments/{exp}/runs/{parent}?workflowType=machine_learning"


def test_top_trials_respects_direction_and_skips_unfinished():
    study = optuna.create_study(direction="minimize")
    for value in (3.0, 1.0, 2.0, 1.0):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    assert [t.number for t in confirm.top_trials(study, 3)] == [1, 3, 2]
    assert confirm.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std
    assert math.isnan(confirm.mean_std([1.0])[1]) and math.isnan(confirm.mean_std([None])[0])


def test_report_says_when_importances_cannot_be_drawn():
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    section = report.study_plots(study)
    assert section.count('class="plotly-graph-div"') == 3  # history, parallel coordinates, slice
    assert section.count("window.PlotlyConfig") == 1  # plotly.js with the first figure only
    assert "not drawn: 1 completed trial(s); param_importances needs 2 or more." in section


@pytest.mark.slow
def test_a_resume_logging_to_another_mlflow_store_is_refused_in_a_sentence(swept, lab):
    other = swept.tmp / "other.db"
    env = {**swept.env, "MLFLOW_TRACKING_URI": f"sqlite:///{other}"}
    done = lab("sweep", swept.sweep_file, "--workers", "1", "--no-live", cwd=swept.tmp, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"It was started with MLFLOW_TRACKING_URI={swept.env['MLFLOW_TRACKING_URI']}" in done.stderr
    assert not other.exists()  # nothing created in the wrong store
