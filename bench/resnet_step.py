"""Seconds per training step of ResNet-18 as torchvision builds it and as timm does (lab's model=resnet since
issue 28 item 6): the same architecture and the same outputs from one state_dict, so the ratio should be 1.
   OMP_NUM_THREADS=1 .venv/bin/python bench/resnet_step.py [STEPS] [REPEATS]

A 64x3x64x64 batch, 5 classes, SGD; two warm-up steps, then STEPS timed; the two builders alternate for
REPEATS rounds and each keeps its fastest round (the least disturbed by other load).
"""
import sys
import time

import timm
import torch
import torchvision

BUILD = {"torchvision": lambda: torchvision.models.resnet18(num_classes=5),
         "timm": lambda: timm.create_model("resnet18", num_classes=5, zero_init_last=False)}


def seconds_per_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step(), step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 5, (64,))
    best = {name: seconds_per_step(build(), x, y, steps) for name, build in BUILD.items()}
    for _ in range(repeats - 1):
        for name, build in BUILD.items():
            best[name] = min(best[name], seconds_per_step(build(), x, y, steps))
    for name, s in best.items():
        print(f"{name}: {s:.3f} s/step")
    print(f"timm_over_torchvision {best['timm'] / best['torchvision']:.3f}")


if __name__ == "__main__":
    main()
