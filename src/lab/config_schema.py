"""The training config's schema, declared once: RULES (the values lab knows more about than a signature says:
lr >= 0, dropout in [0, 1), ...) and, for every other key, the signature of what its node builds.

Who uses it: `lab train` and lab.train() call check_rules (RULES only, imports nothing heavy, so
`lab train model.optimizer.lr=-1` answers before torch, Lightning and MLflow load, ~5 s of imports); job.run,
a stack and `lab sweep`'s up-front checks call check_config (RULES, signatures, the optimizer built once);
Classifier and TensorDataModule call check_arguments on their own arguments, so a bad value given from Python
gets the sentence the config gets. It sits beside config.py, below data/ and train/, so that both may use it.
A bad value used to surface as a torch or Lightning traceback mid-fit, with a FAILED run left behind.
"""
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from lab.errors import LabError, must_be_set, unknown_key


def number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def widths(v) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and all(whole(w) and w >= 1 for w in v)


@dataclass(frozen=True)
class Rule:
    test: Callable[[Any], bool]
    valid: str  # what is valid, as it finishes "KEY=VALUE is not valid: it must be ..."


def at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: number(v) and low <= v < math.inf


def fraction(v) -> bool:
    return number(v) and 0 < v < 1


def share(v) -> bool:
    return number(v) and 0 <= v < 1


PRECISIONS = {"auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16", "32", "16", "bf16", "64"}
# key -> Rule. Keys absent from the composed config (momentum with Adam) are not checked.
RULES: dict[str, Rule] = {
    "seed": Rule(lambda v: whole(v) and 0 <= v < 2**32, "a whole number in [0, 2**32) (what numpy's seeding takes)"),
    "threads": Rule(lambda v: v is None or (whole(v) and v >= 0), "a whole number >= 0 (0: $LAB_TORCH_THREADS)"),
    # data: TensorDataModule's arguments
    "data.batch_size": Rule(lambda v: whole(v) and v >= 1, "a whole number >= 1, e.g. 64"),
    "data.image_size": Rule(lambda v: v is None or (whole(v) and v >= 1),
                            "a whole number of pixels >= 1, e.g. 64, or null (as stored)"),
    "data.channels": Rule(lambda v: v is None or (whole(v) and v in (1, 3)), "1 (grayscale), 3 (RGB) or null (as stored)"),
    "data.val_fraction": Rule(fraction, "a number strictly between 0 and 1, e.g. 0.15"),
    "data.test_fraction": Rule(fraction, "a number strictly between 0 and 1, e.g. 0.15"),
    "data.resident_max_gb": Rule(lambda v: v is None or (number(v) and v > 0),
                                 "a positive number of GB, or null to measure the device's free memory"),
    # ImageFolder's (and ImageCsv's) own
    "data.cache_max_gb": Rule(lambda v: v is None or (number(v) and v > 0), "a positive number of GB, or null for no cap"),
    "data.max_pixels": Rule(lambda v: whole(v) and v >= 1, "a whole number of pixels >= 1 per image, e.g. 64000000"),
    # model: Classifier's arguments, its optimizer's and its net's
    "model.label_smoothing": Rule(share, "a number in [0, 1), e.g. 0.1 (the share of each target spread over the classes)"),
    "model.l1": Rule(at_least(0), "a number >= 0 (the L1 penalty's weight; 0: none)"),
    "model.backbone_lr_scale": Rule(at_least(0), "the backbone's learning rate as a fraction of the head's, >= 0 "
                                                 "(0: frozen, 0.1: a tenth, 1: the same)"),
    "model.optimizer.lr": Rule(at_least(0), "a number >= 0, e.g. 1e-3 (0 trains nothing)"),
    "model.optimizer.weight_decay": Rule(at_least(0), "a number >= 0 (0: no L2 penalty)"),
    "model.optimizer.momentum": Rule(share, "a number in [0, 1), e.g. 0.9"),
    # torch refuses p > 1 only when the net is built (a traceback), and trains nothing at p = 1.
    "model.net.dropout": Rule(share, "a number in [0, 1), e.g. 0.2 (the share of units dropped)"),
    "model.net.hidden": Rule(widths, "a list of layer widths >= 1, e.g. [128, 64] ([] for no hidden layer)"),
    "model.net.channels": Rule(lambda v: widths(v) and len(v) > 0, "a list of channel counts >= 1, e.g. [32, 64]"),
    "trainer.max_epochs": Rule(lambda v: v is None or (whole(v) and (v >= 1 or v == -1)),
                               "a whole number of epochs >= 1 (-1: no limit)"),
    # Lightning's names (its own check is a traceback when the trainer is built) and lab's "auto" (precision.py).
    "trainer.precision": Rule(lambda v: str(v) in PRECISIONS,
                              "auto (bf16 or fp16 autocast as the GPU computes natively, fp32 on a CPU), 32-true, "
                              "bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true or transformer-engine"),
    "mlflow.misclassified_per_class": Rule(lambda v: whole(v) and v >= 0,
                                           "a whole number of images >= 0 per true class (0: none logged)"),
    "mlflow.log_model": Rule(lambda v: isinstance(v, bool), "true or false"),
    "measure.enabled": Rule(lambda v: isinstance(v, bool), "true or false"),
    "measure.batch_size": Rule(lambda v: v is None or (whole(v) and v >= 1),
                               "a whole number >= 1, or null for data.batch_size"),
    "measure.budget_s": Rule(lambda v: number(v) and 0 < v < math.inf, "seconds > 0, e.g. 0.3"),
}


def check(key: str, value) -> None:
    """RULES[key] on one value (a key without a rule passes)."""
    rule = RULES.get(key)
    if rule is not None and not rule.test(value):
        raise LabError(f"{key}={value!r} is not valid: it must be {rule.valid}.")


def check_arguments(group: str, **values) -> None:
    """A constructor's own arguments by the rules of the keys the config gives them (group.name): the same
    sentence whether the object is built from a config or from Python."""
    for name, value in values.items():
        check(f"{group}.{name}", value)


def check_rules(cfg: DictConfig) -> None:
    """Every ??? given a value, then RULES over a composed config (a key that does not resolve is left to
    check_config, which says which)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise must_be_set(missing[0])
    for key in RULES:
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=RULES)
        except Exception:  # noqa: BLE001 - a broken interpolation: check_config says which
            continue
        if value is not RULES:
            check(key, value)


# -- what a signature says: every key of a _target_ node is an argument of what it builds, of its type ---------

TRAINER_SET_BY_LAB = ("logger", "callbacks", "default_root_dir")


def target_params(target) -> dict[str, inspect.Parameter] | None:
    """The keyword arguments a class or function accepts, following **kwargs up a class's bases;
    None when it takes any keyword (or its signature cannot be read)."""
    chain = [c for c in target.__mro__ if "__init__" in vars(c)] if isinstance(target, type) else [target]
    params: dict[str, inspect.Parameter] = {}
    for obj in chain:
        if obj is object:
            return None
        fn = obj.__init__ if isinstance(target, type) else obj
        try:
            sig = inspect.signature(fn, eval_str=True)
        except Exception:  # noqa: BLE001 - an annotation that does not evaluate: keep the names only
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                return None
        takes_any = False
        for name, p in sig.parameters.items():
            if p.kind is p.VAR_KEYWORD:
                takes_any = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self":
                params.setdefault(name, p)
        if not takes_any:
            return params
    return None


def _numbers(p: inspect.Parameter) -> set[type] | None:
    """The types a parameter admits when they are all numbers ({int}, {int, float}, {int, bool}...), else None.
    No annotation: a number default admits any number."""
    ann = p.annotation
    if ann is inspect.Parameter.empty:
        return {int, float} if number(p.default) else None
    members = set(typing.get_args(ann)) if typing.get_origin(ann) in (typing.Union, types.UnionType) else {ann}
    members.discard(type(None))
    return members if members and members <= {int, float, bool} else None


def _check_type(key: str, value, p: inspect.Parameter) -> None:
    kinds = _numbers(p)
    if kinds is None or value is None or type(value) in kinds or (float in kinds and whole(value)):
        return
    what = "a whole number" if kinds == {int} else "a number"
    raise LabError(f"{key}={value!r} is not valid: it must be {what}.")


def accepted_keys(cfg: DictConfig, path: str) -> tuple[dict[str, inspect.Parameter] | None, str]:
    """What the object built from the config node at path accepts, and its name for messages:
    Lightning's Trainer for `trainer`, the _target_ of a node that has one; (None, '') otherwise."""
    if path == "trainer":
        import pytorch_lightning as pl  # ~4 s: only once a whole config is checked

        params = {k: v for k, v in target_params(pl.Trainer).items() if k not in TRAINER_SET_BY_LAB}
        return params, "Lightning's Trainer"
    node = OmegaConf.select(cfg, path) if path else cfg
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None, ""
    target_path = str(node._target_)
    return target_params(locate(f"{path}._target_", target_path)), target_path


def locate(key: str, dotted: str):
    """The class or function a _target_ names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is not None and not module.startswith(err.name):
                raise  # the module exists but one of its own imports is missing: not the user's typo
            continue
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                raise LabError(f"{key}={dotted} is not valid: {'.'.join(parts[:j])} has no {attr!r}.")
            obj = getattr(obj, attr)
        return obj
    raise LabError(f"{key}={dotted} is not valid: there is no module {parts[0]!r}.")


def _check_leaf(key: str, value, param: inspect.Parameter | None) -> None:
    """RULES for the keys that have one, else the type the argument it feeds admits."""
    if key in RULES:
        check(key, value)
    elif param is not None:
        _check_type(key, value, param)


def _check_node(cfg: DictConfig, node: DictConfig, path: str) -> None:
    params, name = accepted_keys(cfg, path)
    if params is not None:  # lab passes the required ones it does not take from the config (params, in_shape...)
        params = {k: p for k, p in params.items() if p.default is not p.empty or k in node}
    for key in node.keys():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key.startswith("_") and key.endswith("_") or OmegaConf.is_missing(node, key):
            continue
        if path == "trainer" and key in TRAINER_SET_BY_LAB:
            raise LabError(f"{full} is not valid: lab sets the Trainer's {key} itself; remove the override.")
        if params is not None and key not in params:
            raise unknown_key(full, params, name)
        value = node[key]
        _check_leaf(full, value, params[key] if params is not None else None)
        if isinstance(value, DictConfig):
            _check_node(cfg, value, full)


def target_name(factory) -> str:
    """torch.optim.Adam for a functools.partial of it (what Hydra's _partial_: true makes)."""
    func = getattr(factory, "func", factory)
    module = getattr(func, "__module__", "") or ""
    if module.startswith("torch.optim"):  # torch.optim.adam.Adam -> torch.optim.Adam, as conf/ names it
        module = "torch.optim.lr_scheduler" if "lr_scheduler" in module else "torch.optim"
    return f"{module}.{getattr(func, '__qualname__', func)}".lstrip(".")


def call_factory(factory, arg, key: str):
    """factory(arg), with the ValueError/TypeError a torch optimizer or scheduler raises for a bad setting
    ("Invalid learning rate: -0.01", "'<=' not supported between 'float' and 'str'") turned into a
    LabError naming the config key: check_config on a dummy parameter, Classifier when it trains."""
    try:
        return factory(arg)
    except (TypeError, ValueError) as err:
        raise LabError(f"{key} is not valid: {target_name(factory)} rejected its settings ({err}); "
                       f"`lab train --cfg job` prints them.") from err


def check_config(cfg: DictConfig) -> None:
    """Every key of trainer and of each _target_ node is an argument of what it builds, numbers are numbers,
    RULES hold, and the optimizer and scheduler accept their settings: all before any MLflow run exists."""
    for key in ("seed", "trainer"):
        if key not in cfg:
            raise LabError(f"{key} is missing from the config: conf/train.yaml sets it.")
    _check_node(cfg, cfg, "")
    optimizer_cfg = cfg.get("model", {}).get("optimizer")
    if optimizer_cfg is not None:  # torch checks the rest (betas, eps, ...) when it builds one
        import torch
        from hydra.utils import instantiate

        dummy = [torch.nn.Parameter(torch.zeros(1))]
        optimizer = call_factory(instantiate(optimizer_cfg), dummy, "model.optimizer")
        if cfg.model.get("scheduler") is not None:
            call_factory(instantiate(cfg.model.scheduler), optimizer, "model.scheduler")


def check_values(cfg: DictConfig, key: str, values) -> None:
    """Each key=value checked as check_config would check it inside cfg, without composing cfg again for each:
    a sweep's categorical may list thousands of values."""
    parent, _, leaf = key.rpartition(".")
    params, _ = accepted_keys(cfg, parent)
    current = OmegaConf.select(cfg, key, default=None)
    for value in values:
        _check_leaf(key, value, (params or {}).get(leaf))
        if number(current) and not number(value) and value is not None:
            raise LabError(f"{key}={value!r} is not valid: it is a number in the config ({current!r}).")
