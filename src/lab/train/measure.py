"""What a trained net costs to run: parameters, forward FLOPs, latency and throughput on the trial's device.

Measured the same way for every run so that sweeps can trade accuracy against cost: eval mode, no_grad, the
training run's autocast on a CUDA GPU (bf16 or fp16, as it trains), channels_last on CUDA as in training, random
normal input of the data's shape, warm-up excluded, CUDA synchronised around every timed call. Each timing
loop stops after about budget_s / 2 seconds (at least one timed call), so a small net costs ~budget_s in all.
"""
import contextlib
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call, device: torch.device, budget_s: float, max_calls: int) -> list[float]:
    """Seconds per call of call(), after one untimed warm-up call, until budget_s or max_calls."""
    call()
    _sync(device)
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while not times or (time.perf_counter() < end and len(times) < max_calls):
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def latency_ms(call, budget_s: float = 0.3, max_calls: int = 200) -> float:
    """Median milliseconds of call() on the CPU, timed as cost() times its batch-1 calls (one untimed warm-up,
    then up to max_calls calls or budget_s seconds): what `lab export` compares exported files by."""
    return statistics.median(_timed(call, torch.device("cpu"), budget_s, max_calls)) * 1000


def forward_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (torch counts a multiply-add as 2), as torch's FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        net(x)
    return int(counter.get_total_flops())


def cost(net: torch.nn.Module, in_shape: tuple[int, ...], batch_size: int = 64, budget_s: float = 0.3,
         autocast: torch.dtype | None = None) -> dict[str, float]:
    """{model/params, model/flops (per image), model/latency_ms (batch 1, median), model/throughput (images/s
    at batch_size)} of net on the device its parameters are on. The net is left in the mode it was in."""
    params = next(net.parameters(), None)
    device = params.device if params is not None else torch.device("cpu")
    was_training = net.training
    net.eval()
    autocasting = (torch.autocast(device.type, dtype=autocast) if autocast is not None and device.type == "cuda"
                   else contextlib.nullcontext())
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    one = torch.randn(1, *in_shape, generator=g).to(device).contiguous(memory_format=memory_format)
    batch = torch.randn(batch_size, *in_shape, generator=g).to(device).contiguous(memory_format=memory_format)
    try:
        with torch.no_grad(), autocasting:
            flops = forward_flops(net, one)
            latency = _timed(lambda: net(one), device, budget_s / 2, max_calls=200)
            per_batch = _timed(lambda: net(batch), device, budget_s / 2, max_calls=50)
    finally:
        net.train(was_training)
    return {
        "model/params": float(sum(p.numel() for p in net.parameters())),
        "model/flops": float(flops),
        "model/latency_ms": statistics.median(latency) * 1000,
        "model/throughput": batch_size * len(per_batch) / sum(per_batch),
    }
