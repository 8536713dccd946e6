"""Values lab knows more about than a signature says (lr >= 0, dropout in [0, 1), ...), checked from the composed
config alone: `lab train model.optimizer.lr=-1` answers before torch, Lightning and MLflow load (~5 s of imports),
and job.check_config applies the same rules to every config, a sweep trial's included."""
import math

from omegaconf import DictConfig, ListConfig, OmegaConf

from lab.errors import LabError, must_be_set


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def widths(v) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and all(whole(w) and w >= 1 for w in v)


# key: (test, what is valid). Keys absent from the composed config (momentum with Adam) are not checked.
RULES = {
    "seed": (lambda v: whole(v) and 0 <= v < 2**32, "a whole number in [0, 2**32) (what numpy's seeding takes)"),
    "threads": (lambda v: v is None or (whole(v) and v >= 0), "a whole number >= 0 (0: $LAB_TORCH_THREADS)"),
    "model.optimizer.lr": (lambda v: number(v) and 0 <= v < math.inf, "a number >= 0, e.g. 1e-3 (0 trains nothing)"),
    "model.optimizer.weight_decay": (lambda v: number(v) and 0 <= v < math.inf, "a number >= 0 (0: no L2 penalty)"),
    "model.optimizer.momentum": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1), e.g. 0.9"),
    # torch refuses p > 1 only when the net is built (a traceback), and trains nothing at p = 1.
    "model.net.dropout": (lambda v: number(v) and 0 <= v < 1, "a number in [0, 1), e.g. 0.2 (the share of units dropped)"),
    "model.net.hidden": (lambda v: widths(v), "a list of layer widths >= 1, e.g. [128, 64] ([] for no hidden layer)"),
    "model.net.channels": (lambda v: widths(v) and len(v) > 0, "a list of channel counts >= 1, e.g. [32, 64]"),
    "data.batch_size": (lambda v: whole(v) and v >= 1, "a whole number >= 1, e.g. 64"),
    "trainer.max_epochs": (lambda v: v is None or (whole(v) and (v >= 1 or v == -1)),
                           "a whole number of epochs >= 1 (-1: no limit)"),
    "mlflow.misclassified_per_class": (lambda v: whole(v) and v >= 0,
                                       "a whole number of images >= 0 per true class (0: none logged)"),
    "mlflow.log_model": (lambda v: isinstance(v, bool), "true or false"),
    "measure.enabled": (lambda v: isinstance(v, bool), "true or false"),
    "measure.batch_size": (lambda v: v is None or (whole(v) and v >= 1),
                           "a whole number >= 1, or null for data.batch_size"),
    "measure.budget_s": (lambda v: number(v) and 0 < v < math.inf, "seconds > 0, e.g. 0.3"),
}


def check_leaf(key: str, value) -> None:
    test, valid = RULES[key]
    if not test(value):
        raise LabError(f"{key}={value!r} is not valid: it must be {valid}.")


def check(cfg: DictConfig) -> None:
    """Every ??? given a value, then RULES over a composed config (a key that does not resolve is left to
    check_config)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise must_be_set(missing[0])
    for key in RULES:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=RULES)
        except Exception:  # noqa: BLE001 - a broken interpolation: check_config says which
            continue
        if value is not RULES:
            check_leaf(key, value)
