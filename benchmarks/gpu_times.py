"""The GPU check's table of times (scripts/gpu-check.sh, issue 27), on one device, with the device's name.

    python benchmarks/gpu_times.py --device cuda        # on a GPU: the sizes below
    python benchmarks/gpu_times.py --device cpu --tiny  # the CPU smoke path: tiny sizes, seconds

Rows, each with its protocol in the row:

* training images/s of the paper's C1 (keskar-c1's model: BN on batch statistics, Adam, lr 1e-3) through
  ``batchgap.train`` at SB (batch 256) and LB (batch 5000, the paper's 10% of CIFAR-10), on N synthetic
  CIFAR-shaped images (uniform noise: the arithmetic of CIFAR-10, not its accuracy) held on the device.
  Four epochs; the rate is over epochs 2 and 3 (``time_s`` of the history: the first epoch carries the
  warm-up, the fourth the final evaluation).
* one full-data HVP of that SB-trained C1 (``FullDataLoss.hvp``, one vector, gradient graphs kept between
  calls as in Lanczos), median of 5 after one warm-up call.
* one eps-sharpness solve (``eps_sharpness``, eps 1e-3, max_iter 10, full space: the paper's C1 setting) of
  the same model on the same data, one call after one warm-up call, with its loss+gradient passes.

On CUDA every timing ends with ``torch.cuda.synchronize()``. Sizes: N = 20000 training images, 5000 for the
HVP and the solve, evaluation batch 500; ``--tiny``: 32 images, SB 8, LB 16, 8 for the HVP (one call) and
the solve (max_iter 1), no warm-up calls, batch 8.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import synthetic_cifar  # noqa: E402

FULL = {"n": 20000, "sb": 256, "lb": 5000, "measure_n": 5000, "batch": 500, "max_iter": 10, "repeats": 5}
TINY = {"n": 32, "sb": 8, "lb": 16, "measure_n": 8, "batch": 8, "max_iter": 1, "repeats": 1}


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    """``NVIDIA H100 80GB HBM3 (cuda:0, 79.1 GiB, CUDA 12.8)``, or the CPU's description."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({device}, {props.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"


def c1(device):
    """The paper's C1 as keskar-c1 builds it, seed 0, on ``device``."""
    from batchgap.models import init_model

    return init_model("C1", (3, 32, 32), 10, 0, bn="batch").to(device)


def training_rate(device, data, batch: int) -> tuple[float, object]:
    """Images/s of ``batchgap.train`` over epochs 2 and 3 of four, and the trained model."""
    from batchgap.config import TrainConfig
    from batchgap.train import train

    model = c1(device)
    cfg = TrainConfig(epochs=4, eval_every=4, eval_batch_size=500)
    result = train(model, data, None, cfg, batch, seed=0, progress=False)
    h = result.history
    seconds = h[2]["time_s"] - h[0]["time_s"]
    return 2 * (len(data) // batch) * batch / seconds, model


def hvp_seconds(model, data, batch: int, repeats: int = 5, warm_up: bool = True) -> float:
    """Median seconds of one full-data HVP (one vector) over ``repeats`` calls (after a warm-up call)."""
    import torch
    from batchgap.landscape.functional import FullDataLoss, session

    device = next(model.parameters()).device
    with session(model, "eval"):
        f = FullDataLoss(model, data, batch_size=batch)
        v = torch.randn(f.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        times = []
        for _ in range(int(warm_up) + repeats):
            sync(device)
            t = time.perf_counter()
            f.hvp(v)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times[int(warm_up):])


def sharpness_solve(model, data, batch: int, max_iter: int = 10, warm_up: bool = True):
    """Seconds of one eps-sharpness solve (eps 1e-3, ``max_iter``) (after a warm-up call), and its result."""
    from batchgap.landscape import eps_sharpness

    device = next(model.parameters()).device
    if warm_up:
        eps_sharpness(model, data, eps=1e-3, max_iter=1, batch_size=batch)
    sync(device)
    t = time.perf_counter()
    res = eps_sharpness(model, data, eps=1e-3, max_iter=max_iter, batch_size=batch)
    sync(device)
    return time.perf_counter() - t, res


def table(device_spec: str, tiny: bool) -> list[str]:
    """The table's lines (markdown), the device's name first."""
    import torch
    from batchgap.devices import resolve

    device = resolve(device_spec)
    size = TINY if tiny else FULL
    data = synthetic_cifar(size["n"]).to(device)
    measure = synthetic_cifar(size["measure_n"]).to(device)
    torch.manual_seed(0)
    sb, model = training_rate(device, data, size["sb"])
    lb, _ = training_rate(device, data, size["lb"])
    hvp = hvp_seconds(model, measure, size["batch"], size["repeats"], warm_up=not tiny)
    solve, res = sharpness_solve(model, measure, size["batch"], size["max_iter"], warm_up=not tiny)
    params = sum(p.numel() for p in model.parameters())
    n, m = size["n"], size["measure_n"]
    return [
        f"# {device_name(device)}; torch {torch.__version__}; {'tiny sizes (smoke path)' if tiny else 'full sizes'}",
        "| what | time | protocol |",
        "|---|---|---|",
        f"| training C1, SB (batch {size['sb']}) | {sb:.0f} images/s | {n} synthetic 3x32x32 images on the "
        f"device, Adam lr 1e-3, epochs 2-3 of 4 |",
        f"| training C1, LB (batch {size['lb']}) | {lb:.0f} images/s | the same, {n // size['lb']} steps/epoch |",
        f"| one HVP, C1 after the SB run ({params} parameters) | {hvp * 1e3:.1f} ms | {m} images, eval batch "
        f"{size['batch']}, BN 'eval' (batch statistics), one vector, median of {size['repeats']}"
        f"{'' if tiny else ' after a warm-up'} |",
        f"| one eps-sharpness solve, same model | {solve:.2f} s | eps 1e-3, max_iter {size['max_iter']}, full space, "
        f"{m} images: "
        f"{res.nit} iterations, {res.nfev} loss+grad passes, phi {res.value:.4g} |",
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_times.py", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="auto, cpu, cuda or cuda:N (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU smoke path of scripts/gpu-check.sh")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from batchgap.errors import UserError

    try:
        lines = table(args.device, args.tiny)
    except UserError as e:
        print(f"gpu_times: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
