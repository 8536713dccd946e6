"""The classification metrics, built once: a run's validation and test metrics (module.Classifier), an
ensemble's test report (lab ensemble) and the accuracy `lab predict` gives against class folders all come
from these torchmetrics collections, so that they cannot disagree on what a metric means.

Inputs to update(): (N, K) class logits or probabilities (the argmax is what counts) and (N,) int64 labels.
"""
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

SCALARS = ("acc", "precision_macro", "recall_macro", "f1_macro")  # what a test logs as test/<name>


def validation(k: int) -> MetricCollection:
    """val/acc and val/f1_macro, for k classes."""
    return MetricCollection({"acc": MulticlassAccuracy(k, average="micro"),
                             "f1_macro": MulticlassF1Score(k, average="macro")})


def test(k: int) -> MetricCollection:
    """SCALARS, per-class precision, recall and F1 ((k,) each) and the (k, k) confusion matrix (rows: true)."""
    return MetricCollection({
        "acc": MulticlassAccuracy(k, average="micro"),
        "precision_macro": MulticlassPrecision(k, average="macro"),
        "recall_macro": MulticlassRecall(k, average="macro"),
        "f1_macro": MulticlassF1Score(k, average="macro"),
        "precision": MulticlassPrecision(k, average=None),
        "recall": MulticlassRecall(k, average=None),
        "f1": MulticlassF1Score(k, average=None),
        "confusion": MulticlassConfusionMatrix(k),
    })


def report(computed: dict[str, torch.Tensor], class_names: list[str]) -> tuple[dict[str, float], dict]:
    """test(k).compute() -> (SCALARS as floats, the report tracking.log_test_report takes: the confusion matrix
    and per class precision, recall, f1 and support)."""
    m = {key: value.cpu() for key, value in computed.items()}
    confusion = m["confusion"].long()  # rows: true class, columns: predicted class
    classes = {name: {"precision": float(m["precision"][i]), "recall": float(m["recall"][i]),
                      "f1": float(m["f1"][i]), "support": int(confusion[i].sum())}
               for i, name in enumerate(class_names)}
    return {key: float(m[key]) for key in SCALARS}, {"confusion": confusion.tolist(), "classes": classes}


def scores(probs: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> tuple[dict[str, float], dict]:
    """report() of (N, K) probabilities against (N,) labels in one go (an ensemble, a folder of predictions)."""
    collection = test(len(class_names))
    collection.update(probs, labels)
    return report(collection.compute(), class_names)
