"""lab's cost timing (train/measure.cost) against torch.utils.benchmark.Timer.blocked_autorange given the
same budget: the batch-1 latency and batch-64 time each reports, their spread over repeats, and the wall
seconds each takes.
   OMP_NUM_THREADS=1 .venv/bin/python bench/measure_timer.py [REPEATS]

cost(budget_s=0.3) gives each of its two loops 0.15 s (and stops them at 200 and 50 calls); Timer gets
min_run_time=0.15 s per loop. Latency: the median of calls (lab) or of blocks' means (Timer); batch 64:
the mean. The wall time of cost includes its one FLOP-counting forward.
"""
import statistics
import sys
import time

import torch
import torchvision
from torch.utils import benchmark

from lab.train import measure

BUDGET_S = 0.3
BATCH = 64


def lab_way(net, shape) -> tuple[float, float]:
    c = measure.cost(net, shape, batch_size=BATCH, budget_s=BUDGET_S)
    return c["model/latency_ms"], BATCH / c["model/throughput"] * 1000


def timer_way(net, shape) -> tuple[float, float]:
    out = []
    with torch.no_grad():
        for batch in (1, BATCH):
            x = torch.randn(batch, *shape)
            timer = benchmark.Timer("net(x)", globals={"net": net, "x": x}, num_threads=torch.get_num_threads())
            m = timer.blocked_autorange(min_run_time=BUDGET_S / 2)
            out.append((m.median if batch == 1 else m.mean) * 1000)
    return out[0], out[1]


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.set_num_threads(1)
    nets = {"mlp 28px": (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(),
                                             torch.nn.Linear(128, 10)), (1, 28, 28)),
            "resnet18 64px": (torchvision.models.resnet18(num_classes=5), (3, 64, 64))}
    print("net | way | latency ms (max/min over repeats) | batch-64 ms (max/min) | wall s")
    for name, (net, shape) in nets.items():
        net.eval()
        for way in (lab_way, timer_way):
            runs, walls = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                runs.append(way(net, shape))
                walls.append(time.perf_counter() - start)
            lat, big = [r[0] for r in runs], [r[1] for r in runs]
            print(f"{name} | {way.__name__} | {statistics.median(lat):.3f} ({max(lat) / min(lat):.2f}) | "
                  f"{statistics.median(big):.2f} ({max(big) / min(big):.2f}) | {statistics.median(walls):.2f}")


if __name__ == "__main__":
    main()
