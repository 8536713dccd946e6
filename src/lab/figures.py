"""Every figure lab draws: matplotlib Figures, never pyplot's global state, and no backend switch (a
Figure renders to PNG with the Agg canvas whatever the display)."""
import io
import warnings

import optuna
from matplotlib.figure import Figure

# Optuna's own matplotlib plots of a study; param_importances needs two completed trials that differ.
STUDY_PLOTS = {
    "optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
    "param_importances": optuna.visualization.matplotlib.plot_param_importances,
    "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate,
    "slice": optuna.visualization.matplotlib.plot_slice,
}


def figure(width: float, height: float, ncols: int = 1):
    """(Figure, axes) of width x height inches: one Axes, or an array of ncols."""
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols)


def study_figure(name: str, study: optuna.Study, width: float = 8, height: float = 5) -> Figure:
    """Optuna's plot `name` of the study, at least width x height inches. Raises ValueError/RuntimeError/
    ZeroDivisionError when Optuna cannot draw it from the trials there are."""
    import matplotlib.pyplot as plt  # Optuna draws through pyplot; the figure is taken out of it below

    axes = STUDY_PLOTS[name](study)
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
