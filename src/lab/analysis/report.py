"""`lab report`: one self-contained HTML page for a study, to mail or archive and open without a network.

Images are data URIs; Optuna's study plots are plotly figures whose plotly.js is inlined once, in the first
figure, so the page is interactive offline (zoom, hover for a trial's number and params). Sections: summary,
trials, the Pareto front (several objectives), study plots, the best trial (test accuracy, per-class table,
curves, confusion matrix, misclassified images), the `lab confirm` results, and links to MLflow when its
tracking URI is a server."""
import base64
import csv
import html
import json
import os
import tempfile
import warnings
from pathlib import Path

import mlflow
import optuna
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from lab import figures, uris
from lab.analysis import results
from lab.sweep import budget, ranking, records, trial_record
from lab.sweep.objectives import MODEL_METRICS
from lab.sweep.objectives import objectives as objectives_of  # summary() has a local named objectives

STUDY_PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "slice")
CURVES = {"loss": ("train/loss", "val/loss"), "accuracy": ("train/acc", "val/acc")}
MIN_TRIALS_FOR_IMPORTANCE = 10  # below this, importances rank noise (Optuna draws them from 2 trials)
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:90%}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}td.l{text-align:left}
img{max-width:100%;display:block;margin:1em 0}.note{color:#a60}"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}">'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


class Link(str):
    """A table cell that is a link: text shown, href kept (a plain str cell is escaped text)."""

    def __new__(cls, text: str, href: str | None):
        self = super().__new__(cls, text)
        self.href = href
        return self


def table(header: list[str] | None, rows: list[list], left: int = 0) -> str:
    """left: how many trailing columns hold text (left-aligned)."""
    def cell(i, v, n):
        text = f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v))
        body = html.escape(text)
        if isinstance(v, Link) and v.href:
            body = f'<a href="{html.escape(v.href)}">{body}</a>'
        return f'<td class="l">{body}</td>' if i >= n - left else f"<td>{body}</td>"
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(i, v, len(r)) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


class Runs:
    """MLflow run links: the run's page when the tracking URI is a server (http/https), else none."""

    def __init__(self, uri: str, experiment_id: str | None):
        server = uri.startswith(("http://", "https://")) and experiment_id is not None
        self.uri, self.experiment_id = uri, experiment_id
        self.base = uris.experiment_url(uri, experiment_id) if server else None

    def url(self, run_id: str | None) -> str | None:
        return uris.run_url(self.uri, self.experiment_id, run_id) if self.base and run_id else None

    def cells(self, run_id: str | None) -> list:
        """The MLflow column of a table: a link to the run, or no column at all without a server."""
        url = self.url(run_id)
        return [Link("run", url) if url else None] if self.base else []

    @property
    def header(self) -> list[str]:
        return ["MLflow"] if self.base else []

    def link(self, run_id: str | None) -> str:
        url = self.url(run_id)
        text = html.escape(str(run_id))
        return f'<a href="{html.escape(url)}">{text}</a>' if url else text


def names_of(sweep) -> list[str]:
    return [o.metric for o in objectives_of(sweep.spec)]


def summary(sweep, study: optuna.Study, runs: Runs) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {k: v for k, v in budget.counts(trials).items() if v}  # a retried trial counts once, as its retry
    objectives = ", ".join(f"{o.metric} ({o.direction})" for o in objectives_of(sweep.spec))
    rows = [["study", study.study_name], ["objectives" if len(study.directions) > 1 else "metric", objectives],
            ["direction", ", ".join(d.name.lower() for d in study.directions)]]
    if sweep.spec.constraints:
        rows.append(["constraints", ", ".join(f"{k} {op} {v:g}" for k, b in sweep.spec.constraints.items()
                                              for op, v in ((">=", b.min), ("<=", b.max)) if v is not None)])
    rows += [["trials", len(trials)], *([k, v] for k, v in counts.items())]
    parent = study.user_attrs.get(records.PARENT_ATTR)
    if runs.url(parent):
        rows.append(["MLflow", Link(f"sweep run {parent}", runs.url(parent))])
    best = ranking.best(study)
    if len(study.directions) > 1:
        rows.append(["Pareto front", f"{len(ranking.front(study))} trial(s)"])
    elif best is not None:
        rows += [["best trial", best.number], ["best value", best.value],
                 *([f"best {k}", v] for k, v in best.params.items())]
    return table(None, rows, left=1)


def trials_table(sweep, study: optuna.Study, runs: Runs) -> str:
    trials = study.get_trials(deepcopy=False)
    names = sorted({n for t in trials for n in t.params})
    objectives = names_of(sweep) if len(study.directions) > 1 else ["value"]
    constrained = bool(sweep.spec.constraints)
    rows = []
    for t in trials:
        values = list(t.values) if t.values else [None] * len(objectives)
        feasible = (["yes" if ranking.feasible(t) else "no"] if t.constraints else [None]) if constrained else []
        rows.append([t.number, t.state.name, *values, *feasible,
                     round(t.duration.total_seconds(), 1) if t.duration else None, *(t.params.get(n) for n in names),
                     *runs.cells(trial_record.run_id(t)), t.user_attrs.get("fail_reason")])
    header = ["trial", "state", *objectives, *(["feasible"] if constrained else []), "seconds", *names,
              *runs.header, "reason"]
    return table(header, rows, left=1 + len(runs.header))


class Plots:
    """Plotly figures as HTML fragments: the first carries plotly.js inline, the others only their data."""

    def __init__(self):
        self.count = 0

    def html(self, fig, name: str) -> str:
        import plotly.io  # ~0.5 s; only the report needs it

        first = self.count == 0
        self.count += 1
        return plotly.io.to_html(fig, full_html=False, include_plotlyjs=first, div_id=f"plot-{name}",
                                 default_height="500px", config={"displaylogo": False, "responsive": True})


def study_plot(plots: Plots, name: str, study: optuna.Study, n_complete: int) -> list[str]:
    parts = [f"<h3>{name.replace('_', ' ')}</h3>"]
    if n_complete == 0 or (name == "param_importances" and n_complete < 2):
        return parts + [note(f"not drawn: {n_complete} completed trial(s); {name} needs "
                             f"{2 if name == 'param_importances' else 1} or more.")]
    if name == "param_importances" and n_complete < MIN_TRIALS_FOR_IMPORTANCE:
        parts.append(note(f"Computed from {n_complete} finished trials (fewer than {MIN_TRIALS_FOR_IMPORTANCE}): "
                          "treat these importances as a rough hint, not a ranking."))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fig = figures.interactive(name, study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            return parts + [note(f"not drawn: {err}")]
    parts.append(plots.html(fig, name))
    # Optuna says so when it drew from too little (importances "will be equal"): keep that next to the plot.
    return parts + [note(f"Optuna: {w.message}") for w in caught
                    if issubclass(w.category, UserWarning) and not issubclass(w.category, ExperimentalWarning)]


def study_plots(study: optuna.Study, plots: Plots | None = None) -> str:
    plots = plots or Plots()
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return "\n".join(part for name in figures.plots_for(study, STUDY_PLOTS)
                     for part in study_plot(plots, name, study, n_complete))


def pareto_section(sweep, study: optuna.Study, plots: Plots, runs: Runs) -> str:
    """The front as `lab best` prints it, and Optuna's plot of it (infeasible trials greyed)."""
    names = names_of(sweep)
    rows = [[t.number, *t.values, "yes" if ranking.feasible(t) else "no",
             *runs.cells(trial_record.run_id(t)), json.dumps(t.params)]
            for t in ranking.front_table(study)]
    parts = [table(["trial", *names, "feasible", *runs.header, "params"], rows, left=1 + len(runs.header)) if rows
             else note("no completed trial on the front yet.")]
    parts.append(note("Rows marked feasible=no break a constraint; they would be on the front without it.")
                 if any(r[len(names) + 1] == "no" for r in rows) else "")
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    parts += study_plot(plots, "pareto_front", study, n_complete)[1:]
    return "\n".join(p for p in parts if p)


def learning_curves(client: MlflowClient, run_id: str) -> bytes:
    fig, axes = figures.figure(10, 4, ncols=len(CURVES))
    for ax, (title, names) in zip(axes, CURVES.items()):
        for name in names:
            history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
            ax.plot([m.step for m in history], [m.value for m in history], marker="o", label=name)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    return figures.png(fig)


def f1_bars(f1: dict[str, float]) -> bytes:
    fig, ax = figures.figure(8, max(2.5, 0.35 * len(f1) + 1))
    ax.barh(list(f1), list(f1.values()))
    ax.set(xlim=(0, 1), xlabel="test F1", title="per-class F1")
    ax.invert_yaxis()
    return figures.png(fig)


def artifact(uri: str, run_id: str, path: str, tmp: str) -> Path | None:
    """A run's artifact downloaded into tmp, or None when the run has none by that name."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                        tracking_uri=uri))
    except Exception:  # noqa: BLE001 - a missing artifact leaves a hole in the page, not no page
        return None


def per_class(client: MlflowClient, uri: str, run_id: str, tmp: str) -> str:
    """Precision, recall, F1 and support per class (classification_report.json), with the F1 bars."""
    path = artifact(uri, run_id, "classification_report.json", tmp)
    report = json.loads(path.read_text()) if path else {}
    if report:
        rows = [[name, *(v.get(k) for k in ("precision", "recall", "f1", "support"))] for name, v in report.items()]
        f1 = {name: v["f1"] for name, v in report.items()}
        parts = [table(["class", "precision", "recall", "F1", "support"], rows)]
    else:  # runs from before the report was logged: the per-class metrics
        f1 = {k.removeprefix("test/f1/"): v for k, v in sorted(client.get_run(run_id).data.metrics.items())
              if k.startswith("test/f1/")}
        parts = [table(["class", "F1"], [[k, v] for k, v in f1.items()])] if f1 else []
    if not f1:
        return note("no per-class results (classification_report.json or test/f1/<class>) on the run.")
    return "\n".join([*parts, img(f1_bars(f1), "per-class F1")])


def best_section(client: MlflowClient, uri: str, sweep, study: optuna.Study, runs: Runs) -> str:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return note("no completed trial yet.")
    best = ranking.best(study)
    if best is None:
        return note(f"none of the {len(complete)} completed trials meets the constraints.")
    run_id, model_run = trial_record.run_id(best), ranking.model_run_id(best)
    which = f" (on the Pareto front, best in {names_of(sweep)[0]})" if len(study.directions) > 1 else ""
    parts = [f"<p>Best trial {best.number}{html.escape(which)}: {html.escape(ranking.values_text(names_of(sweep), best))}"
             f", MLflow run {runs.link(run_id)}</p>"]
    if not model_run:
        return parts[0] + note("the trial has no MLflow run recorded.")
    if model_run != run_id:
        parts.append(f"<p>Model, curves and images from run {runs.link(model_run)} (the trial's best seed).</p>")
    metrics = client.get_run(model_run).data.metrics
    tested = [[k, metrics[k]] for k in ("test/acc", "test/f1_macro", "test/loss", *MODEL_METRICS) if k in metrics]
    if model_run != run_id:  # the best seed's test results would flatter the trial: its mean over the seeds too
        means = client.get_run(run_id).data.metrics
        tested = [[f"{k} (mean over {best.user_attrs.get('seed_values') and len(best.user_attrs['seed_values'])} seeds)",
                   means[k]] for k in ("test/acc", "test/f1_macro") if k in means] + \
                 [[f"{k} (best seed)" if k.startswith("test/") else k, v] for k, v in tested]
    parts += ["<h3>test results</h3>", table(None, tested, left=0) if tested else note("no test metrics on the run.")]
    parts += ["<h3>learning curves</h3>", img(learning_curves(client, model_run), "learning curves")]
    with tempfile.TemporaryDirectory() as tmp:
        parts += ["<h3>per-class results</h3>", per_class(client, uri, model_run, tmp)]
        for title, name, alt in (("confusion matrix", "confusion_matrix.png", "confusion matrix"),
                                 ("misclassified test images", "misclassified.png", "misclassified test images")):
            path = artifact(uri, model_run, name, tmp)
            parts += [f"<h3>{title}</h3>", img(path.read_bytes(), alt) if path else note(f"{name} not on the run.")]
    return "\n".join(parts)


def confirm_section(client: MlflowClient, uri: str, sweep, study: optuna.Study) -> str:
    """`lab confirm`'s results (confirm.csv on the parent run): mean +- std per configuration."""
    parent = study.user_attrs.get(records.PARENT_ATTR)
    how = f"`lab confirm {sweep.typed or sweep.path} --top 3 --seeds 3` reruns the best trials with fresh seeds."
    if not parent:
        return note(f"no MLflow parent run: {how}")
    with tempfile.TemporaryDirectory() as tmp:
        path = artifact(uri, parent, "confirm.csv", tmp)
        rows = list(csv.DictReader(path.open())) if path else []
    if not rows:
        return note(f"lab confirm has not run on this study: {how}")
    metric = sweep.spec.metric

    def pm(mean, std) -> str:
        return f"{float(mean):.6g} +- {float(std):.3g}" if mean not in (None, "", "nan") else ""

    body = [[r.get("rank"), r.get("trial"), r.get("seeds"), float(r["sweep_value"]) if r.get("sweep_value") else None,
             pm(r.get("mean"), r.get("std")), pm(r.get("test_acc_mean"), r.get("test_acc_std")), r.get("params")]
            for r in rows]
    winner = client.get_run(parent).data.tags.get("confirm_winner")
    parts = [table(["rank", "trial", "seeds", f"sweep {metric}", f"{metric} mean +- std", "test/acc mean +- std",
                    "params"], body, left=1)]
    if winner:
        parts.append(f"<p>Confirmed winner: trial {html.escape(winner)}.</p>")
    return "\n".join(parts)


def page(sweep, study: optuna.Study, client: MlflowClient, uri: str) -> str:
    title = f"Study {study.study_name}"
    parent = study.user_attrs.get(records.PARENT_ATTR)
    try:
        runs = Runs(uri, client.get_run(parent).info.experiment_id if parent else None)
    except Exception:  # noqa: BLE001 - the parent run lives in another tracking store: no links
        runs = Runs(uri, None)
    plots = Plots()
    pareto = (f"<h2>Pareto front</h2>{pareto_section(sweep, study, plots, runs)}"
              if len(study.directions) > 1 else "")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Summary</h2>{summary(sweep, study, runs)}<h2>Trials</h2>{trials_table(sweep, study, runs)}"
            f"{pareto}<h2>Study plots</h2>{study_plots(study, plots)}"
            f"<h2>Best trial</h2>{best_section(client, uri, sweep, study, runs)}"
            f"<h2>Confirmation</h2>{confirm_section(client, uri, sweep, study)}"
            "</body></html>\n")


def command(args) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a progress bar for one PNG is noise
    sweep, out_dir, study, _ = results.open_study(args)
    uri = results.mlflow_uri()
    client = MlflowClient(uri)
    path = out_dir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(sweep, study, client, uri))
    print(f"report: {path}")
    parent = study.user_attrs.get(records.PARENT_ATTR)
    if parent:
        client.log_artifact(parent, str(path))
        print(f"logged as report.html on parent run {parent}")
