"""What run-health checks cost: a check's time against health.every training steps.

    python tools/benchmark_health.py --config configs/digits.yaml
    python tools/benchmark_health.py --config configs/fashion_mnist.yaml model.energy_width=16 \
        model.encoder_width=16 model.generator_width=16 model.latent_dim=32 train.batch_size=64 \
        data.num_workers=0 [--features bidvl/evaluation/weights/fashion_mnist_classifier.safetensors]

Builds the config's Trainer in this process (its shards, built on first use as training does),
times --steps training iterations on batches from its data stream (median after --warmup, data
loading included, as training counts it) and --checks health checks (`HealthMonitor.check`, median),
and prints one JSON object: step_ms, check_ms, every (health.every) and overhead =
check_ms / (every x step_ms), the share of training time the checks add. Run it with the thread
count training uses (OMP_NUM_THREADS); the two figures come from the same process and run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from bidvl.benchmarking import device_name
from bidvl.config import load_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/digits.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--checks", type=int, default=5)
    p.add_argument("--features", default=None, help="eval.features for the feature measures (default: the config's)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    import torch

    from bidvl.data import ShardStream
    from bidvl.engine import Trainer
    from bidvl.health import HealthMonitor

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*args.overrides, f"run.dir={tmp}/run", "log.trackers=''"])
        if args.features is not None:
            cfg.eval.features = args.features
        trainer = Trainer(cfg)
        stream = ShardStream(cfg, trainer.accelerator)
        batches = stream.open(0)
        step_times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            batch, _, _ = next(batches)
            trainer.train_step([batch])
            if i >= args.warmup:
                step_times.append(time.perf_counter() - t0)
        monitor = trainer.health = HealthMonitor(trainer.accelerator, cfg, trainer.objective)
        check_times = []
        logs = {"grad_norm/energy_net": 1.0}
        for i in range(args.checks + 1):
            t0 = time.perf_counter()
            monitor.check(cfg.health.every * (i + 1), trainer.unwrapped, logs)
            if i:  # the first one builds nothing more, but warms the caches
                check_times.append(time.perf_counter() - t0)
        trainer.close()
    step_ms = 1e3 * statistics.median(step_times)
    check_ms = 1e3 * statistics.median(check_times)
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "features": cfg.eval.features,
        "device": device_name("cpu"), "threads": torch.get_num_threads(), "batch_size": cfg.train.batch_size,
        "probe_images": cfg.health.num_images, "step_ms": round(step_ms, 2), "check_ms": round(check_ms, 2),
        "every": cfg.health.every, "overhead": round(check_ms / (cfg.health.every * step_ms), 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
