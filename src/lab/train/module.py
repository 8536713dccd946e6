"""The one LightningModule: any net, one of LOSSES, metrics accumulated on the device, logged per epoch.

Logging per step costs 0.63-0.68x of a plain loop's speed on an H100 (docs/design.md section 2), so
training_step only updates torchmetrics states; values are computed and logged once an epoch.
"""
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from lab.config_schema import call_factory, check_arguments
from lab.errors import LabError
from lab.train import metrics

# cross_entropy: softmax over K logits. bce: one logit z, P(class 1) = sigmoid(z), as the Keras cats-vs-dogs
# lesson's single sigmoid unit. mse: mean over the K classes of (softmax p - one-hot)^2, as the slides define it.
# label_smoothing moves every target to (1 - e) * one-hot + e / K for all three.
LOSSES = ("cross_entropy", "bce", "mse")


def class_logits(outputs: torch.Tensor, loss: str) -> torch.Tensor:
    """The net's outputs as (N, K) logits whose softmax is the class probabilities: for bce's one logit z,
    [0, z] (softmax of it: 1 - sigmoid(z), sigmoid(z)); its argmax is class 1 exactly when z > 0."""
    if loss == "bce":
        return torch.cat([torch.zeros_like(outputs), outputs], 1)
    return outputs


def probabilities(outputs: torch.Tensor, loss: str) -> torch.Tensor:
    """(N, K) float32 class probabilities from the net's outputs, for every loss."""
    return class_logits(outputs, loss).float().softmax(1)


class Diverged(RuntimeError):
    """Loss became NaN or infinite: the run failed, whatever Lightning would make of it."""


class Classifier(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, optimizer, scheduler=None, class_names: list[str] = (),
                 label_smoothing: float = 0.0, l1: float = 0.0, scheduler_monitor: str = "val/loss",
                 loss: str = "cross_entropy", backbone_lr_scale: float = 1.0):
        super().__init__()
        check_arguments("model", label_smoothing=label_smoothing, l1=l1, backbone_lr_scale=backbone_lr_scale)
        self.net, self.optimizer_factory, self.scheduler_factory = net, optimizer, scheduler
        self.class_names = list(class_names)
        self.label_smoothing, self.l1, self.scheduler_monitor = label_smoothing, l1, scheduler_monitor
        k = len(self.class_names)
        self.loss = loss
        if loss not in LOSSES:
            raise LabError(f"model.loss={loss!r} is not known: choose one of {list(LOSSES)}.")
        if loss == "bce":
            if k != 2:
                raise LabError(f"model.loss=bce is for two classes (one sigmoid output), but the data has {k}: "
                               f"{', '.join(self.class_names)}. Use model.loss=cross_entropy or mse for {k} classes.")
            if not hasattr(net, "reset_classifier"):
                raise LabError(f"model.loss=bce needs a net with one output, but {type(net).__name__} has no "
                               "reset_classifier(n) to give it one; use model.loss=cross_entropy.")
            net.reset_classifier(1)
        self.backbone_lr_scale = backbone_lr_scale
        if backbone_lr_scale != 1 and not hasattr(net, "backbone"):
            raise LabError(f"model.backbone_lr_scale={backbone_lr_scale} needs a pretrained backbone (model=timm, "
                           f"model=resnet); {type(net).__name__} has none: leave it at 1.")
        if backbone_lr_scale == 0:
            for p in net.backbone.parameters():
                p.requires_grad_(False)
        # nan_strategy="disable": a NaN loss must poison the mean (and fail the run), not be dropped from it.
        self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(2))
        # Training: (sum of per-sample losses, correct predictions) added up on the device, sample count on
        # the host. MeanMetric + MulticlassAccuracy updates cost ~240 us of Python per step against ~50 us
        # for this (bench on 1 CPU thread, batch 512), ~6% of an H100 step of the lecture CNN (~3 ms).
        self.register_buffer("train_sums", torch.zeros(2), persistent=False)
        self.train_n = 0
        self.val_metrics, self.test_metrics = metrics.validation(k), metrics.test(k)
        self.test_report: dict | None = None  # filled at the end of testing, read by tracking
        # Per test image, in test-set order (the test batches are not shuffled): loss, true, predicted,
        # probability of the predicted class, each (N,) on the CPU; for the misclassified-examples view.
        self.test_samples: dict[str, torch.Tensor] | None = None
        self._test_parts: list[torch.Tensor] = []

    @property
    def backbone(self) -> torch.nn.Module:
        """The net's feature extractor, for Lightning's BackboneFinetuning; nets without one have none."""
        if not hasattr(self.net, "backbone"):
            raise AttributeError(f"{type(self.net).__name__} has no backbone to freeze; use model=timm or model=resnet")
        return self.net.backbone

    def forward(self, x):
        return self.net(x)

    def class_logits(self, outputs):
        return class_logits(outputs, self.loss)

    def probabilities(self, outputs):
        """(N, K) class probabilities (predictions; metrics take class_logits, whose argmax is the same)."""
        return probabilities(outputs, self.loss)

    def on_fit_start(self):
        if self.device.type == "cuda":  # NHWC weights to match the channels_last batches: cuDNN's fast convs
            self.net.to(memory_format=torch.channels_last)
        # For size/accuracy trade-offs: logged once, exactly (MLflow stores a double), whatever is frozen.
        n_params = sum(p.numel() for p in self.net.parameters())
        for logger in self.loggers:
            logger.log_metrics({"model/params": float(n_params)}, step=0)

    def on_train_epoch_start(self):
        self.net.train()  # PretrainedNet: batch norm frozen (or unfrozen) since the last epoch follows its weights

    def _loss(self, outputs, y, reduction="mean"):
        if self.loss == "cross_entropy":
            return F.cross_entropy(outputs, y, label_smoothing=self.label_smoothing, reduction=reduction)
        e = self.label_smoothing
        if self.loss == "bce":  # outputs: (N, 1) logits
            target = y.float() * (1 - e) + e / 2
            return F.binary_cross_entropy_with_logits(outputs[:, 0].float(), target, reduction=reduction)
        k = outputs.shape[1]
        target = F.one_hot(y, k).float() * (1 - e) + e / k
        per_sample = (outputs.float().softmax(1) - target).pow(2).mean(1)  # (N,)
        return per_sample.mean() if reduction == "mean" else per_sample

    def training_step(self, batch, batch_idx):
        x, y = batch
        outputs = self(x)
        loss = self._loss(outputs, y)
        with torch.no_grad():  # a short last batch counts by its size
            right = (self.class_logits(outputs).argmax(1) == y).sum().float()
            self.train_sums.add_(torch.stack([loss.float() * y.numel(), right]))
        self.train_n += y.numel()
        if self.l1:
            loss = loss + self.l1 * sum(p.abs().sum() for p in self.net.parameters() if p.requires_grad)
        return loss

    def train_epoch_means(self) -> tuple[float, float]:
        """(mean loss, accuracy) over the samples trained on since the last call; starts the next epoch."""
        loss_sum, correct = self.train_sums.tolist()  # one host sync per epoch
        means = loss_sum / self.train_n, correct / self.train_n
        self.train_sums.zero_()
        self.train_n = 0
        return means

    def _log_train_epoch(self):
        loss, acc = self.train_epoch_means()
        self.log_dict({"train/loss": loss, "train/acc": acc}, prog_bar=True)  # the bar shows the last epoch's
        if not math.isfinite(loss):
            raise Diverged(f"training loss is {loss} in epoch {self.current_epoch}")

    def on_train_epoch_end(self):
        if self.train_n:  # no validation ran at the end of this epoch
            self._log_train_epoch()

    def validation_step(self, batch, batch_idx):
        x, y = batch
        outputs = self(x)
        self.val_loss.update(self._loss(outputs, y, reduction="none"))  # (batch,) per-sample losses
        self.val_metrics.update(self.class_logits(outputs), y)

    def on_validation_epoch_end(self):
        values = {f"val/{k}": v for k, v in self.val_metrics.compute().items()}
        self.log_dict({"val/loss": self.val_loss.compute(), "val/acc": values.pop("val/acc")}, prog_bar=True)
        self.log_dict(values)
        self.val_loss.reset()
        self.val_metrics.reset()
        # Train metrics are logged here too, so that callbacks that run at validation end (pruning,
        # checkpointing) see this epoch's complete set of metrics.
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and self.train_n:
            self._log_train_epoch()

    def on_test_epoch_start(self):
        self._test_parts = []

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_outputs(self(x), y)

    def test_outputs(self, outputs, y):
        """A test batch's net outputs (B, outputs) against its labels (B,) into the test metrics (a stack's
        members are tested by one vectorised forward and hand each member its own outputs here)."""
        losses = self._loss(outputs, y, reduction="none")  # (batch,)
        self.test_loss.update(losses)
        self.test_metrics.update(self.class_logits(outputs), y)
        probability, predicted = self.probabilities(outputs).max(1)
        # (batch, 4) on the device, read back once at the end: no host sync per batch.
        self._test_parts.append(torch.stack([losses.float(), y.float(), predicted.float(), probability], 1))

    def on_test_epoch_end(self):
        self.log_dict(self.test_results())

    def test_results(self) -> dict[str, float]:
        """test/<scalar> and test/loss over the batches given to test_outputs; fills test_report and
        test_samples, and starts the next test."""
        values, self.test_report = metrics.report(self.test_metrics.compute(), self.class_names)
        scalars = {f"test/{k}": v for k, v in values.items()}
        scalars["test/loss"] = float(self.test_loss.compute())
        parts = torch.cat(self._test_parts).cpu() if self._test_parts else torch.zeros(0, 4)
        self._test_parts = []
        self.test_samples = {"loss": parts[:, 0], "true": parts[:, 1].long(), "predicted": parts[:, 2].long(),
                             "probability": parts[:, 3]}
        self.test_loss.reset()
        self.test_metrics.reset()
        return scalars

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = params
        if self.backbone_lr_scale not in (0, 1):  # the backbone's group: its lr set below, after the optimizer's
            in_backbone = {id(p) for p in self.net.backbone.parameters()}
            backbone = [p for p in params if id(p) in in_backbone]
            groups = [{"params": [p for p in params if id(p) not in in_backbone]}]
            groups += [{"params": backbone, "backbone": True}] if backbone else []  # frozen by a callback: none
        optimizer = call_factory(self.optimizer_factory, groups, "model.optimizer")
        for group in optimizer.param_groups:
            if group.get("backbone"):
                group["lr"] = group["lr"] * self.backbone_lr_scale
        if self.scheduler_factory is None:
            return optimizer
        scheduler = call_factory(self.scheduler_factory, optimizer, "model.scheduler")
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "monitor": self.scheduler_monitor}}
