"""K members of one network trained in one vectorised step: torch.func.functional_call under vmap.

Each member is a real Classifier (its own net, built from its own seed) whose parameters stay its own leaf
tensors: a step stacks them (torch.stack, (K, ...) per parameter), runs the K forwards as one vmap, and
backward hands each member's leaves their own gradients. One torch.optim optimizer holds one param group per
member, so lr, weight_decay, momentum, betas are each member's exactly. A member that leaves (pruned,
diverged, stopped early) is no longer stacked: its leaves get no gradient and the optimizer skips them.

Per member: initial weights from its seed, its own shuffling order (a generator holding the RNG state its
seed left after the net was built, as `lab train` draws its permutations from then on), its own dropout masks
(vmap's randomness="different") and dropout rate (MemberDropout reads p from a per-member buffer), its own
batch-norm running statistics (stacked buffers, updated in place under vmap).
"""
import math
from contextlib import nullcontext

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.func import functional_call, vmap

from lab.config_schema import call_factory
from lab.train import precision
from lab.train.module import Classifier, Diverged
from lab.train.stack_scaler import MemberScaler

# Settings that change no tensor's shape nor the number of steps: members may differ in these (and only these).
VALUE_KEYS = ("seed", "model.net.dropout", "model.label_smoothing", "model.l1", "mlflow.run_name")
VALUE_PREFIXES = ("model.optimizer.",)  # every optimizer setting but its class
STRUCTURAL_UNDER_VALUES = ("model.optimizer._target_", "model.optimizer._partial_")
# What a stack's autocast implements of trainer.precision (the "-true" halves and 64 cast the whole model).
STACKED_PRECISIONS = {"auto", "32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16"}
# Trainer settings the stacked loop implements; any other set to a non-default value trains members alone.
TRAINER_KEYS = {"max_epochs", "accelerator", "devices", "precision", "deterministic", "num_sanity_val_steps",
                "log_every_n_steps", "enable_progress_bar", "enable_model_summary", "gradient_clip_val",
                "limit_train_batches", "plugins"}


class CannotStack(Exception):
    """Why these members cannot train as one stack (one line): they train one at a time instead."""


def is_value_key(key: str) -> bool:
    if key in STRUCTURAL_UNDER_VALUES:
        return False
    return key in VALUE_KEYS or key.startswith(VALUE_PREFIXES)


def flat(cfg: DictConfig) -> dict:
    out: dict = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def structure(cfg: DictConfig) -> dict:
    """The config less its value settings: two configs that can share a stack have equal structures."""
    return {k: v for k, v in flat(cfg).items() if not is_value_key(k)}


def difference(cfgs: list[DictConfig]) -> str | None:
    """The first structural setting in which the configs differ, said as `key: a vs b`; None when none does."""
    first = structure(cfgs[0])
    for cfg in cfgs[1:]:
        other = structure(cfg)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                return f"{key} differs ({first.get(key)!r} vs {other.get(key)!r})"
    return None


def static_reason(cfgs: list[DictConfig]) -> str | None:
    """What the stacked loop does not implement, read from the configs alone."""
    why = difference(cfgs)
    if why:
        return why
    cfg = cfgs[0]
    extra = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
             if k not in TRAINER_KEYS and v is not None}
    if extra:
        return f"trainer.{sorted(extra)[0]} is set, which the stacked loop does not implement"
    if cfg.get("callbacks"):
        return f"callbacks ({', '.join(cfg.callbacks)}) act on one model"
    scheduler = cfg.model.get("scheduler")
    if scheduler is not None and "Plateau" in str(scheduler.get("_target_", "")):
        return "a ReduceLROnPlateau scheduler reads one model's metric"
    if any(float(c.model.get("backbone_lr_scale", 1.0)) != 1.0 for c in cfgs):
        return "model.backbone_lr_scale splits each net into two parameter groups, which the stack does not do"
    return None


class MemberDropout(nn.Module):
    """nn.Dropout whose p is a buffer, so that under vmap each member drops at its own rate (p=0: the input
    exactly, whatever the mask)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rate", torch.zeros(()))

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand_like(x) >= self.rate).to(x.dtype)
        return x * keep / (1 - self.rate)


def dropout_rates(net: nn.Module) -> list[float]:
    return [float(m.p) for m in net.modules() if type(m) is nn.Dropout]


def swap_dropouts(module: nn.Module) -> int:
    """Every nn.Dropout of module replaced by a MemberDropout, in place; returns how many."""
    n = 0
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, MemberDropout())
            n += 1
        else:
            n += swap_dropouts(child)
    return n


def build_members(cfgs: list[DictConfig], datamodule) -> tuple[list[Classifier], list[torch.Generator]]:
    """Each member's Classifier from its seed, as job.run builds one, and the generator its batches are drawn
    from: the global RNG state its seed left after its net was built, where `lab train` draws the first
    permutation from."""
    models, generators = [], []
    shape = {"in_shape": list(datamodule.shape), "num_classes": datamodule.num_classes}
    for cfg in cfgs:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        models.append(instantiate(cfg.model, net=shape, class_names=datamodule.class_names))
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        # Lightning's fit calls iter() on the train loader once to check it is iterable (data_connector's
        # _check_dataloader_iterable), and an IndexBatches draws its permutation on iter(): a run alone trains
        # its first epoch on the second permutation, so a member skips one too.
        torch.randperm(len(datamodule.splits["train"]), generator=generator)
        generators.append(generator)
    return models, generators


def build_template(cfg: DictConfig, datamodule, rates: list[list[float]]) -> nn.Module:
    """The module functional_call runs: the first member's net, with dropout layers wherever any member has
    them (a rate of 0 builds none), each a MemberDropout. Built under a forked RNG: members' streams stay put."""
    net_cfg = cfg.model.net.copy()
    if any(any(r) for r in rates) and "dropout" in net_cfg and not net_cfg.dropout:
        net_cfg.dropout = 0.5  # any rate > 0 builds the layers; each member's own rate is its buffer's
    with torch.random.fork_rng(devices=[]):
        net = instantiate(net_cfg, in_shape=list(datamodule.shape), num_classes=datamodule.num_classes)
    if cfg.model.get("loss") == "bce":
        net.reset_classifier(1)
    swap_dropouts(net)
    return net


class Stack:
    """The vectorised state of K members: stacked buffers, one optimizer, per-member sums and generators."""

    def __init__(self, cfgs: list[DictConfig], models: list[Classifier], generators: list[torch.Generator],
                 datamodule, device: torch.device):
        self.cfgs, self.models, self.generators = cfgs, models, generators
        self.datamodule, self.device = datamodule, device
        self.k = len(models)
        rates = [dropout_rates(m.net) for m in models]
        asked = {c.model.net.get("dropout") for c in cfgs}
        if len(asked) > 1 and not any(rates):
            # timm's nets (model=resnet, model=timm) drop through F.dropout(p=drop_rate), not nn.Dropout layers:
            # one template would train every member at the first member's rate.
            raise CannotStack(f"{type(models[0].net).__name__} applies dropout without nn.Dropout layers, so members "
                              f"with different model.net.dropout ({sorted(asked, key=str)}) cannot share one step")
        self.template = build_template(cfgs[0], datamodule, rates).to(device)
        n_drop = sum(isinstance(m, MemberDropout) for m in self.template.modules())
        for i, r in enumerate(rates):
            if len(r) not in (0, n_drop):
                raise CannotStack(f"member {i}'s net has {len(r)} dropout layers where the others have {n_drop}")
        self.names = [n for n, _ in self.template.named_parameters()]
        template_params = [p.shape for _, p in self.template.named_parameters()]
        self.params: list[list[nn.Parameter]] = []
        for i, m in enumerate(models):
            m.to(device)
            ps = list(m.net.parameters())
            if [p.shape for p in ps] != template_params:
                raise CannotStack(f"member {i}'s net has other parameter shapes than member 0's")
            if not all(p.requires_grad for p in ps):
                raise CannotStack("a net with frozen parameters")
            self.params.append(ps)
        # Buffers: batch norm's running statistics per member (K, ...), and each dropout layer's rate (K,).
        own = [n for n, _ in self.template.named_buffers() if not n.endswith(".rate") and n != "rate"]
        self.buffer_names = own
        self.buffers: dict[str, torch.Tensor] = {}
        member_buffers = [list(m.net.buffers()) for m in models]
        for j, name in enumerate(own):
            self.buffers[name] = torch.stack([b[j] for b in member_buffers]).to(device)
        rate_names = [n for n, _ in self.template.named_buffers() if n not in own]
        for j, name in enumerate(rate_names):
            self.buffers[name] = torch.tensor([r[j] if r else 0.0 for r in rates], device=device)
        self.active = list(range(self.k))
        self.optimizer = self._optimizer()
        self.scheduler = None
        if models[0].scheduler_factory is not None:
            self.scheduler = call_factory(models[0].scheduler_factory, self.optimizer, "model.scheduler")
        self.train_sums = torch.zeros(self.k, 2, device=device)  # (member, [sum of losses * n, correct])
        self.train_n = 0
        self.l1 = torch.tensor([m.l1 for m in models], device=device)
        smoothing = {m.label_smoothing for m in models}
        self.same_loss = len(smoothing) == 1
        clip = cfgs[0].trainer.get("gradient_clip_val")
        self.clip = float(clip) if clip else None
        # The autocast Lightning would train each member under (precision.py); fp16 with a scale per member.
        named = str(cfgs[0].trainer.get("precision", "auto"))
        if named not in STACKED_PRECISIONS:  # Lightning casts the whole model for these; the stack only autocasts
            raise CannotStack(f"trainer.precision={named} casts the whole model; a stack trains in "
                              f"{', '.join(sorted(STACKED_PRECISIONS))}")
        dtype = precision.autocast_dtype(named, device)
        self.autocast_dtype = dtype
        self.autocast = (lambda: torch.autocast("cuda", dtype)) if dtype is not None else nullcontext
        self.scaler = MemberScaler(self.k, device) if dtype is torch.float16 else None

        def one(params, buffers, x):
            return functional_call(self.template, (params, buffers), (x,))

        self._train_forward = vmap(one, randomness="different")  # x: (K, B, ...)
        self._eval_forward = vmap(one, in_dims=(0, 0, None), randomness="different")  # x: (B, ...) for every member

    def _optimizer(self) -> torch.optim.Optimizer:
        """One param group per member with its own settings: each member's optimizer is built from its own
        factory (torch checks its values), and its group's settings are taken over into one optimizer."""
        built = [call_factory(m.optimizer_factory, ps, "model.optimizer") for m, ps in zip(self.models, self.params)]
        kinds = {type(o) for o in built}
        if len(kinds) > 1:
            raise CannotStack(f"members use different optimizers ({', '.join(sorted(k.__name__ for k in kinds))})")
        groups = [{**o.param_groups[0], "member": i} for i, o in enumerate(built)]
        return type(built[0])(groups, **built[0].defaults)

    # -- the stacked parameters ----------------------------------------------------------------------------
    def stacked(self, members: list[int] | None = None) -> dict[str, torch.Tensor]:
        members = self.active if members is None else members
        return {n: torch.stack([self.params[i][j] for i in members]) for j, n in enumerate(self.names)}

    def active_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers of the active members. All active: the stacked tensors themselves (updated in place);
        else a gathered copy, written back after the step by keep_buffers."""
        if len(self.active) == self.k:
            return self.buffers
        rows = torch.tensor(self.active, device=self.device)
        return {n: b.index_select(0, rows) for n, b in self.buffers.items()}

    def keep_buffers(self, used: dict[str, torch.Tensor]) -> None:
        if used is self.buffers:
            return
        rows = torch.tensor(self.active, device=self.device)
        for n in self.buffer_names:
            self.buffers[n].index_copy_(0, rows, used[n])

    def sync(self) -> None:
        """Each member's net gets its running statistics back (its checkpoint and test read them)."""
        with torch.no_grad():
            for i, m in enumerate(self.models):
                for j, b in enumerate(m.net.buffers()):
                    b.copy_(self.buffers[self.buffer_names[j]][i])

    def leave(self, i: int) -> None:
        """Member i is no longer trained (pruned, diverged, stopped): its tensors are not stacked from now on."""
        self.sync()
        if i in self.active:
            self.active.remove(i)
        for p in self.params[i]:
            p.grad = None

    # -- one step, one validation ----------------------------------------------------------------------------
    def losses(self, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """out (A, B, outputs), y (A, B) -> (A,) mean losses (reduction="none": (A, B)), with each member's own
        label smoothing, by the Classifier's own loss."""
        a, b = y.shape
        if self.same_loss:
            per = self.models[self.active[0]]._loss(out.flatten(0, 1), y.flatten(), reduction="none").view(a, b)  # noqa: SLF001 - the Classifier's own loss
            return per.mean(1) if reduction == "mean" else per
        return torch.stack([self.models[i]._loss(out[k], y[k], reduction=reduction) for k, i in enumerate(self.active)])  # noqa: SLF001

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.models[0].class_logits(out.flatten(0, 1))
        return (logits.argmax(1).view(y.shape) == y).sum(1).float()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x (A, B, C, H, W) and y (A, B): one batch per active member, in self.active's order."""
        self.template.train()
        params = self.stacked()
        buffers = self.active_buffers()
        with self.autocast():
            out = self._train_forward(params, buffers, x)
        self.keep_buffers(buffers)
        losses = self.losses(out.float(), y)  # in fp32, as Lightning's autocast computes a cross-entropy
        rows = torch.tensor(self.active, device=self.device)
        l1 = self.l1.index_select(0, rows)
        objective = losses  # (A,): each active member's own loss
        if bool((l1 > 0).any()):
            objective = losses + l1 * sum(p.abs().flatten(1).sum(1) for p in params.values())
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scaled(objective, rows) if self.scaler else objective.sum()).backward()
        if self.scaler:
            self.scaler.unscale({i: self.params[i] for i in self.active})
        if self.clip:
            for i in self.active:
                torch.nn.utils.clip_grad_norm_(self.params[i], self.clip)
        self.optimizer.step()
        with torch.no_grad():
            self.train_sums.index_add_(0, rows, torch.stack([losses.float() * y.shape[1], self.correct(out, y)], 1))
        self.train_n += y.shape[1]

    def train_means(self) -> dict[int, dict[str, float]]:
        """{member: {train/loss, train/acc}} over the epoch's samples; starts the next epoch's sums."""
        sums = self.train_sums.tolist()  # one host sync per epoch
        out = {i: {"train/loss": sums[i][0] / self.train_n, "train/acc": sums[i][1] / self.train_n} for i in self.active}
        self.train_sums.zero_()
        self.train_n = 0
        return out

    @torch.no_grad()
    def validate(self, batches) -> dict[int, dict[str, float]]:
        """{member: {val/loss, val/acc, val/f1_macro}} over batches of (x (B, ...), y (B,)), by each member's own
        torchmetrics, as Classifier.on_validation_epoch_end computes them."""
        self.template.eval()
        params, buffers = self.stacked(), self.active_buffers()
        for x, y in batches:
            with self.autocast():
                out = self._eval_forward(params, buffers, x)
            for k, i in enumerate(self.active):
                m = self.models[i]
                m.val_loss.update(m._loss(out[k].float(), y, reduction="none"))  # noqa: SLF001 - the Classifier's own loss
                m.val_metrics.update(m.class_logits(out[k]), y)
        metrics = {}
        for i in self.active:
            m = self.models[i]
            values = {f"val/{k}": float(v) for k, v in m.val_metrics.compute().items()}
            metrics[i] = {"val/loss": float(m.val_loss.compute()), **values}
            m.val_loss.reset()
            m.val_metrics.reset()
        return metrics

    @torch.no_grad()
    def test(self, members: list[int], pulse=lambda: None) -> dict[int, dict[str, float]]:
        """{member: test/* scalars} of the members' weights as their nets hold them now (each loaded its best
        checkpoint), by one vmap forward per test batch for all of them; each member's outputs go to its own
        Classifier.test_outputs, so its metrics, test_report and test_samples are those a Lightning test of it
        alone computes."""
        self.template.eval()
        params = self.stacked(members)
        # The nets' own buffers (the tested epoch's running statistics), not the stack's (the last epoch's).
        own = [list(self.models[i].net.buffers()) for i in members]
        buffers = {n: torch.stack([b[j] for b in own]) for j, n in enumerate(self.buffer_names)}
        rows = torch.tensor(members, device=self.device)
        buffers.update({n: b.index_select(0, rows) for n, b in self.buffers.items() if n not in buffers})
        for model in (self.models[i] for i in members):
            model.on_test_epoch_start()
        for x, y in self.split_batches("test"):
            with self.autocast():
                out = self._eval_forward(params, buffers, x)  # (members, B, outputs)
            for k, i in enumerate(members):
                self.models[i].test_outputs(out[k].float(), y)
            pulse()
        return {i: self.models[i].test_results() for i in members}

    # -- batches ---------------------------------------------------------------------------------------
    def epoch_batches(self, limit: int | None = None):
        """(x (A, B, C, H, W) float, y (A, B)) per step: each active member's rows in its own shuffled order,
        gathered from the training split and prepared (augmented, normalised) as the datamodule prepares one."""
        split = self.datamodule.splits["train"]
        n, bs = len(split), self.datamodule.batch_size
        orders = torch.stack([torch.randperm(n, generator=self.generators[i]) for i in self.active])  # (A, n)
        store = self.store()
        index, labels = split.index.to(store.device), split.y.to(store.device)
        orders = orders.to(store.device)
        for step, start in enumerate(range(0, n, bs)):
            if limit is not None and step >= limit:
                return
            pick = orders[:, start:start + bs]  # (A, b)
            a, b = pick.shape
            x = store.index_select(0, index[pick.flatten()]).to(self.device, non_blocking=True)
            x = self.datamodule.prepare_batch(x, training=True)
            yield x.reshape(a, b, *x.shape[1:]), labels[pick].to(self.device, non_blocking=True)

    def store(self) -> torch.Tensor:
        split = self.datamodule.splits["train"]
        placed = self.datamodule.decide_placement(self.device)
        if not placed.resident:
            return split.store
        key = id(split.store)
        store = self.datamodule._placed.get(key)  # noqa: SLF001 - the datamodule's own cache of the placed store
        if store is None or store.device != self.device:
            store = self.datamodule._placed[key] = split.store.to(self.device)  # noqa: SLF001
        return store

    def val_batches(self):
        return self.split_batches("val")

    def split_batches(self, name: str):
        """(x (B, ...) prepared, y (B,)) over the split in its order, as its (unshuffled) Lightning loader gives them."""
        split = self.datamodule.splits[name]
        bs = self.datamodule.batch_size
        for start in range(0, len(split), bs):
            x = split.rows(slice(start, start + bs)).to(self.device, non_blocking=True)
            yield self.datamodule.prepare_batch(x, training=False), split.y[start:start + bs].to(self.device)

    def steps_per_epoch(self) -> int:
        n = -(-len(self.datamodule.splits["train"]) // self.datamodule.batch_size)
        limit = self.cfgs[0].trainer.get("limit_train_batches")
        if limit is None:
            return n
        return min(n, int(limit)) if isinstance(limit, int) else int(n * float(limit))

    # -- up front: does vmap run this net? ------------------------------------------------------------------
    def probe(self) -> None:
        """One forward and backward in training mode and one forward in eval mode on a first batch, on copies
        of the buffers, gradients cleared after: nothing of the members changes. Raises CannotStack with
        vmap's (or the net's) own first line when it cannot run."""
        split = self.datamodule.splits["train"]
        x = split.rows(slice(0, min(len(split), self.datamodule.batch_size))).to(self.device)
        x = self.datamodule.prepare_batch(x, training=False)
        buffers = {n: b.clone() for n, b in self.buffers.items()}
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                self.template.train()
                with self.autocast():
                    out = self._train_forward(self.stacked(), buffers, x.expand(self.k, *x.shape))
                out.float().sum().backward()
                self.template.eval()
                with torch.no_grad(), self.autocast():
                    self._eval_forward(self.stacked(), buffers, x)
        except Exception as err:  # any failure under vmap means: train them one at a time
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CannotStack(f"vmap cannot run {type(self.template).__name__}: {first[:300]}") from err
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def check_finite(self, i: int, means: dict[str, float], epoch: int) -> None:
        if not math.isfinite(means["train/loss"]):
            raise Diverged(f"training loss is {means['train/loss']} in epoch {epoch}")
