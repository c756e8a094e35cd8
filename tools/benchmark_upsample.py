"""Time the ResNet generator's x2 bilinear upsampling, F.interpolate against the slice formulation.

    python tools/benchmark_upsample.py [--config configs/celeba128.yaml] [--device cuda|cpu]
        [--dtypes fp32,bf16] [--repeats 20] [--batch-size B]

For each up-block of the config's generator (`bidvl.models.resnet.GENERATOR_BLOCKS`: the input
of each block is upsampled twice, residual and shortcut, at (batch, c_in, s, s)) and each dtype,
the median time of forward and of forward + backward of
  interpolate     F.interpolate(bilinear, align_corners=False) on an NCHW tensor,
  slices          bidvl.models.resnet.upsample2x_by_slices on the same tensor,
  interpolate_cl  F.interpolate on a channels_last tensor (what train.channels_last=true runs),
  via_cl          NCHW in and out, F.interpolate in channels_last in between (two layout copies),
and the per-iteration totals (x2 per block for residual and shortcut). Prints one JSON object.
`bidvl.models.resnet.upsample2x` picks `slices` for NCHW tensors on CUDA; this script is how to
check that choice on a given GPU and PyTorch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def shapes(cfg, batch: int) -> list[tuple[int, int, int, int]]:
    """(batch, channels, size, size) of each up-block's input in the config's ResNet generator."""
    from bidvl.models.resnet import GENERATOR_BLOCKS

    top, multipliers = GENERATOR_BLOCKS[cfg.data.resolution]
    c, size, out = cfg.model.generator_width * top, 4, []
    for multiplier in multipliers:
        out.append((batch, c, size, size))
        c, size = cfg.model.generator_width * multiplier, size * 2
    return out


def time_ms(fn, sync, repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/celeba128.yaml"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    args = parser.parse_args(argv)

    import torch

    from bidvl.benchmarking import device_name
    from bidvl.config import load_config
    from bidvl.models.resnet import interpolate2x, upsample2x_by_slices

    cfg = load_config(args.config)
    if cfg.model.arch != "resnet":
        parser.error(f"{args.config}: model.arch={cfg.model.arch!r}; only the resnet generator upsamples bilinearly")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    unknown = [d for d in args.dtypes.split(",") if d not in dtypes]
    if unknown:
        parser.error(f"--dtypes: {unknown} not in {list(dtypes)}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    methods = {  # name: (function, input in channels_last)
        "interpolate": (interpolate2x, False),
        "slices": (upsample2x_by_slices, False),
        "interpolate_cl": (interpolate2x, True),
        "via_cl": (lambda x: interpolate2x(x.contiguous(memory_format=torch.channels_last)).contiguous(), False),
    }
    batch = args.batch_size or cfg.train.batch_size
    rows, totals = [], {}
    for name in args.dtypes.split(","):
        for shape in shapes(cfg, batch):
            row = {"dtype": name, "shape": list(shape)}
            for method, (fn, channels_last) in methods.items():
                x = torch.randn(shape, device=device, dtype=dtypes[name])
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                leaf = x.clone().requires_grad_()

                def forward_backward():
                    y = fn(leaf)
                    y.backward(torch.ones_like(y))

                with torch.no_grad():
                    forward = time_ms(lambda: fn(x), sync, args.repeats)
                both = time_ms(forward_backward, sync, args.repeats)
                row[method] = {"forward_ms": round(forward, 3), "forward_backward_ms": round(both, 3)}
                key = f"{name}/{method}"
                totals[key] = round(totals.get(key, 0.0) + 2 * both, 3)  # residual + shortcut
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "upsample", "config": args.config, "device": device,
                      "device_name": device_name(device),
                      "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": batch,
                      "repeats": args.repeats, "blocks": rows,
                      "forward_backward_ms_per_generator_pass": totals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
