"""`lab report`: one self-contained HTML page for a study (images as data URIs, no external JS/CSS), to mail or
archive: summary, trials table, Optuna's plots, and the best trial's curves, confusion matrix and per-class F1."""
import base64
import html
import os
import tempfile
import warnings
from pathlib import Path

import mlflow  # noqa: E402
import optuna  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from optuna.exceptions import ExperimentalWarning  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from lab import figures
from lab.analysis import results
from lab.sweep import records
from lab.sweep import study as studies

STUDY_PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")
CURVES = {"loss": ("train/loss", "val/loss"), "accuracy": ("train/acc", "val/acc")}
STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:90%}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}td.l{text-align:left}
img{max-width:100%;display:block;margin:1em 0}.note{color:#a60}"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def img(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}">'


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def table(header: list[str] | None, rows: list[list], left: int = 0) -> str:
    """left: how many trailing columns hold text (left-aligned)."""
    def cell(i, v, n):
        text = f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v))
        return f'<td class="l">{html.escape(text)}</td>' if i >= n - left else f"<td>{html.escape(text)}</td>"
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(cell(i, v, len(r)) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def summary(sweep, study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {k: v for k, v in studies.counts(trials).items() if v}  # a retried trial counts once, as its retry
    rows = [["study", study.study_name], ["metric", sweep.spec.metric], ["direction", sweep.spec.direction],
            ["trials", len(trials)], *([k, v] for k, v in counts.items())]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        rows += [["best trial", best.number], ["best value", best.value],
                 *([f"best {k}", v] for k, v in best.params.items())]
    return table(None, rows, left=1)


def trials_table(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    names = sorted({n for t in trials for n in t.params})
    rows = [[t.number, t.state.name, t.value, round(t.duration.total_seconds(), 1) if t.duration else None,
             *(t.params.get(n) for n in names), t.user_attrs.get("fail_reason")] for t in trials]
    return table(["trial", "state", "value", "seconds", *names, "reason"], rows, left=1)


def study_plots(study: optuna.Study) -> str:
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    parts = []
    for name in STUDY_PLOTS:
        parts.append(f"<h3>{name.replace('_', ' ')}</h3>")
        if n_complete == 0 or (name == "param_importances" and n_complete < 2):
            parts.append(note(f"not drawn: {n_complete} completed trial(s); {name} needs "
                              f"{2 if name == 'param_importances' else 1} or more."))
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                fig = figures.study_figure(name, study, width=9)
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                parts.append(note(f"not drawn: {err}"))
                continue
        parts.append(img(figures.png(fig), name))
        # Optuna says so when it drew from too little (importances "will be equal"): keep that next to the plot.
        parts += [note(f"Optuna: {w.message}") for w in caught
                  if issubclass(w.category, UserWarning) and not issubclass(w.category, ExperimentalWarning)]
    return "\n".join(parts)


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


def best_section(client: MlflowClient, uri: str, study: optuna.Study) -> str:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return note("no completed trial yet.")
    best = study.best_trial
    run_id = best.user_attrs.get("mlflow_run_id")
    parts = [f"<p>Best trial {best.number}: value {best.value:.6g}, MLflow run {html.escape(str(run_id))}</p>"]
    if not run_id:
        return parts[0] + note("the trial has no MLflow run recorded.")
    parts += ["<h3>learning curves</h3>", img(learning_curves(client, run_id), "learning curves")]
    parts.append("<h3>confusion matrix</h3>")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="confusion_matrix.png",
                                                       dst_path=tmp, tracking_uri=uri)
            parts.append(img(Path(path).read_bytes(), "confusion matrix"))
        except Exception as err:  # noqa: BLE001 - a missing artifact leaves a hole in the page, not no page
            parts.append(note(f"confusion_matrix.png not available: {err}"))
    f1 = {k.removeprefix("test/f1/"): v for k, v in sorted(client.get_run(run_id).data.metrics.items())
          if k.startswith("test/f1/")}
    parts += ["<h3>per-class F1</h3>", img(f1_bars(f1), "per-class F1") if f1 else note("no test/f1/<class> metrics.")]
    return "\n".join(parts)


def page(sweep, study: optuna.Study, client: MlflowClient, uri: str) -> str:
    title = f"Study {study.study_name}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Summary</h2>{summary(sweep, study)}<h2>Trials</h2>{trials_table(study)}"
            f"<h2>Study plots</h2>{study_plots(study)}<h2>Best trial</h2>{best_section(client, uri, study)}"
            "</body></html>\n")


def command(args) -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a progress bar for one PNG is noise
    sweep, out_dir, study = results.open_study(args)
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


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("report", help="write the study as one self-contained HTML page")
    results.add_study_arguments(parser)
