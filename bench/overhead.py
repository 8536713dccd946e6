"""Where lab's training path spends time beyond the plain loop, and what proposed src changes save.
   .venv/bin/python bench/overhead.py

Per step: CPU seconds of the main thread with 1 torch thread (steady even on a shared machine), paired
rounds of a plain loop and of lab's Classifier + datamodule under a Trainer (no logger, no checkpoint, no
validation), as-is and with proposed changes patched in at runtime (src/ is not touched):
  affine: prepare_batch as one cached scale/shift (x * scale + shift) instead of /255, -mean, /std (base.py)
  manual: manual optimization instead of Lightning's automatic closure (module.py)
Per epoch: seconds spent writing checkpoints (the best on improving epochs; last.ckpt every epoch or once a minute).
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

import through_lab
from lab import config
from lab.train import job
from lab.train.module import Classifier


class ManualClassifier(Classifier):
    """A proposal: manual optimization, i.e. Lightning's optimizer closure and its hooks skipped per step.

    (Not in src: gradient clipping, accumulation and scheduler stepping would then be lab's to do.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()


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
    net = job.build(cfg)[1].net.train()
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
    model = job.build(cfg)[1]
    if "manual" in variant:
        model.__class__ = ManualClassifier
        model.automatic_optimization = False
    if "affine" in variant:
        dm.prepare_batch = types.MethodType(affine_prepare, dm)
    timer = StepTimer()
    kwargs = {**job.trainer_kwargs(cfg), "max_epochs": epochs, "limit_train_batches": steps, "limit_val_batches": 0,
              "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
              "enable_checkpointing": False}
    try:
        pl.Trainer(**kwargs, callbacks=[timer]).fit(model, datamodule=dm)
    finally:
        dm.__dict__.pop("prepare_batch", None)
    return timer.epochs[1:]


def per_step(name: str, overrides: list[str], steps: int, rounds: int) -> None:
    cfg = config.load(overrides)
    dm, _ = job.build(cfg)
    variants = ["plain", "lab as-is", "lab + affine", "lab + manual", "lab + affine + manual"]
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
    """Seconds and bytes of checkpoints written per epoch: the best when it improves, last.ckpt as configured."""
    print("\nCheckpoint writes per epoch (lecture-4 MLP, 19.3M parameters + Adam state):")
    real_save = pl.Trainer.save_checkpoint
    for every_s in (0, 60):
        log = {"s": 0.0, "bytes": 0, "saves": 0}

        def save(self, filepath, *args, _log=log, **kwargs):  # this iteration's log, bound now
            start = time.perf_counter()
            real_save(self, filepath, *args, **kwargs)
            _log["s"] += time.perf_counter() - start
            _log["bytes"] += Path(filepath).stat().st_size
            _log["saves"] += 1

        epochs = []
        cb = type("Epochs", (pl.Callback,), {"on_validation_end": lambda s, t, m, seen=epochs: seen.append(t.current_epoch)})()
        tmp = Path(tempfile.mkdtemp(prefix="lab-overhead-"))
        pl.Trainer.save_checkpoint = save
        try:
            through_lab.run([*overrides, f"checkpoint.last_every_s={every_s}"], tmp, "ckpt", extra_callbacks=(cb,))
        finally:
            pl.Trainer.save_checkpoint = real_save
            shutil.rmtree(tmp, ignore_errors=True)
        n = len(epochs)
        print(f"  last_every_s={every_s:<3} {log['s'] / n:6.2f} s and {log['bytes'] / n / 1e6:5.0f} MB per epoch "
              f"({log['saves']} files in {n} epochs)")


def cuda_syncs(steps: int = 50) -> None:
    """Synchronizing CUDA calls per training step: each one stalls the host until the GPU queue drains."""
    if not torch.cuda.is_available():
        print("\nno CUDA device: host-device sync count skipped")
        return
    cfg = config.load(["data=synthetic", "model=cnn", "data.size=28", "data.n_train=20000", "data.batch_size=512"])
    dm, _ = job.build(cfg)
    print(f"\nsynchronizing CUDA calls per training step ({steps} steps, epoch boundaries included):")
    for variant in ("lab as-is", "lab + affine + manual"):
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
