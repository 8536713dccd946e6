"""A sweep: the sweep file, the Optuna study, one trial, the worker loop, the pool, the live view, the sweep's
MLflow records and the `lab sweep/worker/best` commands. Builds on lab.train; nothing below imports it.

The package is also callable, `lab.sweep("quickstart", workers=2)` (lab.sweep.api.sweep), and keeps its modules'
names (lab.sweep.study ...)."""
import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, sweep_file, overrides=(), **options):
        from lab.sweep import api

        return api.sweep(sweep_file, overrides, **options)


sys.modules[__name__].__class__ = _Callable
