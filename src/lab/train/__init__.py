"""One training run and what it is made of: the LightningModule, the nets, checkpoints, its MLflow record.
Imports nothing from lab.sweep or lab.analysis (tests/test_layers.py).

The package is also callable, `lab.train(["data=digits", "model=mlp"])` (lab.train.api.train): a module that is
a function too, so that `lab.train.job` and the other modules keep their names."""
import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, overrides=(), **options):
        from lab.train import api

        return api.train(overrides, **options)


sys.modules[__name__].__class__ = _Callable
