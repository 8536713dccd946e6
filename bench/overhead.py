"""Where lab's training path spends time beyond the plain loop, and what proposed src changes save.
   .venv/bin/python bench/overhead.py

Per step: CPU seconds of the main thread with 1 torch thread (steady even on a shared machine), paired
rounds of a plain loop and of lab's Classifier + datamodule under a Trainer (no logger, no checkpoint, no
validation), as-is and with the proposed changes patched in at runtime (src/ is not touched):
  sums:  training loss/accuracy as running sums on the device instead of torchmetrics objects (module.py)
  affine: prepare_batch as one cached scale/shift instead of /255, -mean, /std with .to(device) per step (base.py)
Per epoch: seconds ModelCheckpoint spends per improving epoch, save_last=True (as-is) vs save_last="link".
On a CUDA machine it also counts host-device synchronizations per training step (torch's sync debug mode).
"""
import shutil
import tempfile
import time
import types
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

import through_lab
from lab import config, train
from lab.module import Classifier


class SumsClassifier(Classifier):
    """The proposed module.py training metrics: [loss * n, correct] summed on the device, n on the host."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        with torch.no_grad():
            self.train_sums += torch.stack([loss.detach() * y.numel(), (logits.argmax(1) == y).sum().float()])
        self.train_n += y.numel()
        return loss

    def on_train_epoch_end(self):
        loss_sum, correct = self.train_sums.tolist()  # one host sync per epoch
        self.log_dict({"train/loss": loss_sum / self.train_n, "train/acc": correct / self.train_n})
        self.train_sums.zero_()
        self.train_n = 0


def affine_prepare(self, x, training):
    """The proposed base.py prepare_batch: (x/255 - mean)/std == x*scale + shift, constants cached per device."""
    if training and self.augment.active:
        x = self.augment(x.float().div_(255))
        return (x - self.mean.to(x.device).view(1, -1, 1, 1)) / self.std.to(x.device).view(1, -1, 1, 1)
    cache = self.__dict__.setdefault("_affine", {})
    if x.device not in cache:
        std = self.std.to(x.device).view(1, -1, 1, 1)
        cache[x.device] = (1 / (255 * std), -self.mean.to(x.device).view(1, -1, 1, 1) / std)
    scale, shift = cache[x.device]
    x = torch.addcmul(shift, x.float(), scale)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


class StepTimer(pl.Callback):
    def __init__(self):
        self.epochs = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.thread_time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(time.thread_time() - self.start)


def plain_epochs(cfg, dm, steps: int, epochs: int = 4) -> list[float]:
    """The plain loop on lab's own uint8 tensors, normalized per batch as lab does."""
    net = train.build(cfg)[1].net.train()
    x, y, batch = dm.splits["train"].x, dm.splits["train"].y, dm.batch_size
    mean, std = dm.mean.view(1, -1, 1, 1), dm.std.view(1, -1, 1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    out = []
    for _ in range(epochs):
        start, order = time.thread_time(), torch.randperm(len(y))
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(net((x[idx].float().div_(255) - mean) / std), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out.append(time.thread_time() - start)
    return out[1:]


def lab_epochs(cfg, dm, steps: int, variant: str, epochs: int = 4) -> list[float]:
    model = train.build(cfg)[1]
    if "sums" in variant:
        model.__class__ = SumsClassifier
        model.register_buffer("train_sums", torch.zeros(2), persistent=False)
        model.train_n = 0
    if "affine" in variant:
        dm.prepare_batch = types.MethodType(affine_prepare, dm)
    timer = StepTimer()
    kwargs = {**train.trainer_kwargs(cfg), "max_epochs": epochs, "limit_train_batches": steps, "limit_val_batches": 0,
              "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
              "enable_checkpointing": False}
    try:
        pl.Trainer(**kwargs, callbacks=[timer]).fit(model, datamodule=dm)
    finally:
        dm.__dict__.pop("prepare_batch", None)
    return timer.epochs[1:]


def per_step(name: str, overrides: list[str], steps: int, rounds: int) -> None:
    cfg = config.load(overrides)
    dm, _ = train.build(cfg)
    variants = ["plain", "lab as-is", "lab + sums", "lab + affine", "lab + sums + affine"]
    seen = {v: [] for v in variants}
    for r in range(rounds):  # paired rounds, order reversed every other round, so drift hits all variants alike
        for v in variants if r % 2 == 0 else variants[::-1]:
            seen[v] += plain_epochs(cfg, dm, steps) if v == "plain" else lab_epochs(cfg, dm, steps, v)
    # Other processes only ever add CPU time (cache and memory-bandwidth contention): take the fastest epoch.
    us = {v: min(t) / steps * 1e6 for v, t in seen.items()}
    print(f"\n{name}: CPU us per step (1 thread, fastest of {len(seen['plain'])} epochs of {steps} steps)")
    for v in variants:
        print(f"  {v:22} {us[v]:9.0f}   +{us[v] - us['plain']:6.0f} over plain   plain/this {us['plain'] / us[v]:.3f}")


def checkpoint_cost(overrides: list[str]) -> None:
    """Seconds and bytes ModelCheckpoint writes per improving epoch, as-is vs save_last='link'."""
    print("\nModelCheckpoint per improving epoch (lecture-4 MLP, 19.3M parameters + Adam state):")
    real_save, real_link = ModelCheckpoint.__dict__["_save_checkpoint"], ModelCheckpoint.__dict__["_link_checkpoint"]
    for name, extra in (("save_last=True (as-is)", {}), ('save_last="link"', {"save_last": "link"})):
        log = {"s": 0.0, "bytes": 0, "saves": 0}

        def save(self, trainer, filepath):
            start = time.perf_counter()
            real_save(self, trainer, filepath)
            log["s"] += time.perf_counter() - start
            log["bytes"] += Path(filepath).stat().st_size
            log["saves"] += 1

        def link(trainer, filepath, linkpath):
            start = time.perf_counter()
            real_link.__func__(trainer, filepath, linkpath)
            log["s"] += time.perf_counter() - start

        ModelCheckpoint._save_checkpoint, ModelCheckpoint._link_checkpoint = save, staticmethod(link)
        train.ModelCheckpoint = lambda *a, **k: ModelCheckpoint(*a, **{**k, **extra})  # noqa: B023
        best = []
        cb = type("Best", (pl.Callback,), {"on_validation_end": lambda s, t, m: best.append(
            float(t.callback_metrics["val/loss"]))})()
        tmp = Path(tempfile.mkdtemp(prefix="lab-overhead-"))
        try:
            through_lab.run(overrides, tmp, "ckpt", extra_callbacks=(cb,))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            ModelCheckpoint._save_checkpoint, ModelCheckpoint._link_checkpoint = real_save, real_link
            train.ModelCheckpoint = ModelCheckpoint
        improving = sum(1 for i, v in enumerate(best) if v < min(best[:i], default=float("inf")))
        print(f"  {name:24} {log['s'] / improving:6.2f} s and {log['bytes'] / improving / 1e6:5.0f} MB per improving "
              f"epoch ({improving} of {len(best)} improved, {log['saves']} files written)")


def cuda_syncs(steps: int = 50) -> None:
    """Synchronizing CUDA calls per training step: each one stalls the host until the GPU queue drains."""
    if not torch.cuda.is_available():
        print("\nno CUDA device: host-device sync count skipped")
        return
    cfg = config.load(["data=synthetic", "model=cnn", "data.size=28", "data.n_train=20000", "data.batch_size=512"])
    dm, _ = train.build(cfg)
    print(f"\nsynchronizing CUDA calls per training step ({steps} steps, epoch boundaries included):")
    for variant in ("lab as-is", "lab + sums + affine"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                lab_epochs(cfg, dm, steps, variant, epochs=1)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        print(f"  {variant:22} {len(syncs) / steps:5.2f}")


def main() -> None:
    torch.set_num_threads(1)
    through_lab.quiet()
    per_step("tiny linear net (overhead only), batch 64",
             ["data=synthetic", "model=linear", "data.size=16", "data.n_train=30000", "data.batch_size=64"], 200, 4)
    # lab finds Debian's /usr/share/datasets/fashion-mnist by itself
    per_step("lecture CNN on Fashion-MNIST, batch 64",
             ["data=fashion_mnist", "model=cnn", "data.download=false", "data.batch_size=64", "data.val_fraction=0.02"],
             25, 2)
    checkpoint_cost(["data=synthetic", "model=mlp", "model.net.hidden=[128]", "data.size=224", "data.in_channels=3",
                     "data.classes=5", "data.n_train=120", "data.batch_size=16", "trainer.max_epochs=4",
                     "trainer.limit_train_batches=2", "model.optimizer.lr=1e-4", "monitor.metric=val/loss",
                     "monitor.mode=min"])
    cuda_syncs()


if __name__ == "__main__":
    main()
