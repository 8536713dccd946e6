"""lab: hyperparameter experiments for image classification. The layers, top to bottom: cli -> analysis ->
sweep -> train -> data (docs/design.md).

In Python: lab.train(overrides) -> metrics, lab.sweep(sweep_file, overrides, workers=N) -> the study's result
(lab/train/api.py, lab/sweep/api.py). `import lab` loads nothing else: each is imported when first used."""
import importlib

__all__ = ["sweep", "train"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"lab.{name}")  # the package, callable (lab/train/__init__.py)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
