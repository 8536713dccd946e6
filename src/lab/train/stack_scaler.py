"""fp16 loss scaling for a stack of trials, one scale per member.

torch.amp.GradScaler keeps one scale per optimizer and skips the whole step when any gradient overflows. A
stack's members share one optimizer, so one member's overflow (a high learning rate about to diverge) would
skip every member's step and halve every member's scale: the members would no longer train as they do alone,
where Lightning's 16-mixed gives each run its own GradScaler. This keeps GradScaler's rule per member: scale
starts at 2**16, halves on a step with a non-finite gradient (that member's step is skipped: its gradients are
set to None, which torch's optimizers skip), doubles after 2000 good steps in a row.
"""
import torch


class MemberScaler:
    def __init__(self, k: int, device: torch.device, init_scale: float = 2.0 ** 16, growth_interval: int = 2000):
        self.scale = torch.full((k,), init_scale, device=device)  # (K,)
        self.good = [0] * k  # steps in a row without an overflow, per member
        self.growth_interval = growth_interval

    def scaled(self, losses: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """sum over the active members of scale * loss: losses (A,), rows (A,) their member indices."""
        return (losses.float() * self.scale.index_select(0, rows)).sum()

    def unscale(self, grads_of: dict[int, list[torch.nn.Parameter]]) -> list[int]:
        """Divide each member's gradients by its scale, drop those of members whose gradients are not all
        finite, and update the scales; returns the members whose step was skipped. One host sync per step."""
        members = list(grads_of)
        finite = []
        for i in members:
            grads = [p.grad for p in grads_of[i] if p.grad is not None]
            inverse = 1.0 / self.scale[i]  # a 0-d tensor on the device: no host sync here
            for g in grads:
                g.mul_(inverse)
            finite.append(torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.ones((), dtype=torch.bool, device=self.scale.device))
        skipped = []
        for i, ok in zip(members, torch.stack(finite).tolist()):
            if ok:
                self.good[i] += 1
                if self.good[i] == self.growth_interval:
                    self.scale[i] *= 2.0
                    self.good[i] = 0
                continue
            skipped.append(i)
            self.good[i] = 0
            self.scale[i] *= 0.5
            for p in grads_of[i]:
                p.grad = None
        return skipped
