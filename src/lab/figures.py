"""Every figure lab draws with matplotlib: Figures, never pyplot's global state, and no backend switch (a
Figure renders to PNG with the Agg canvas whatever the display). A run's own two pictures, its confusion
matrix and misclassified grid, are Pillow images (train/confusion.py, misclassified.py): every run draws them."""
import io
import json
import warnings

import optuna
from matplotlib.figure import Figure

# Optuna's own matplotlib plots of a study; param_importances needs two completed trials that differ.
STUDY_PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "slice": optuna.visualization.matplotlib.plot_slice,
    "pareto_front": optuna.visualization.matplotlib.plot_pareto_front,  # several objectives only
}
# The same plots in plotly (lab report: zoom, hover shows each trial's number and params).
INTERACTIVE = {
    "optimization_history": optuna.visualization.plot_optimization_history,
    "param_importances": optuna.visualization.plot_param_importances,
    "parallel_coordinate": optuna.visualization.plot_parallel_coordinate,
    "slice": optuna.visualization.plot_slice,
    "pareto_front": optuna.visualization.plot_pareto_front,
}


def objective_names(study: optuna.Study) -> list[str]:
    """The metric of each objective, as the sweep stored them on the study (sweep/study.py identity)."""
    stored = study.user_attrs.get("lab.objectives")
    if stored:
        return [metric for metric, _ in json.loads(stored)]
    return [study.user_attrs.get("lab.metric", "Objective Value")] * len(study.directions)


def plots_for(study: optuna.Study, names=tuple(STUDY_PLOTS)) -> list[str]:
    """The plots that apply to the study: the Pareto front only with several objectives."""
    return [n for n in names if n != "pareto_front" or len(study.directions) > 1]


def plot_options(name: str, study: optuna.Study) -> dict:
    """With several objectives every plot but the front draws the first (Optuna needs a target there)."""
    names = objective_names(study)
    if name == "pareto_front":
        return {"target_names": names}
    if len(study.directions) > 1:
        return {"target": lambda t: t.values[0], "target_name": names[0]}
    return {"target_name": names[0]}


def interactive(name: str, study: optuna.Study):
    """Optuna's plotly figure `name` of the study. Raises ValueError/RuntimeError/ZeroDivisionError when it
    cannot be drawn from the trials there are."""
    return INTERACTIVE[name](study, **plot_options(name, study))


def figure(width: float, height: float, ncols: int = 1):
    """(Figure, axes) of width x height inches: one Axes, or an array of ncols."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols)


def study_figure(name: str, study: optuna.Study, width: float = 8, height: float = 5) -> Figure:
    """Optuna's plot `name` of the study, at least width x height inches. Raises ValueError/RuntimeError/
    ZeroDivisionError when Optuna cannot draw it from the trials there are."""
    import matplotlib.pyplot as plt  # Optuna draws through pyplot; the figure is taken out of it below

    axes = STUDY_PLOTS[name](study, **plot_options(name, study))
    fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    plt.close(fig)  # pyplot forgets it; the Figure itself still renders
    w, h = fig.get_size_inches()
    fig.set_size_inches(max(width, w), max(height, h))
    tidy(fig)
    return fig


def tidy(fig: Figure) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parallel coordinates' colorbar axes are not tight_layout-able
        fig.tight_layout()


def png(fig: Figure, dpi: int = 90) -> bytes:
    tidy(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
