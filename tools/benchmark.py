"""Time the engine's bi-level iteration against a plain PyTorch loop of the same nets.

    python tools/benchmark.py --config configs/cifar10.yaml [--steps 20] [--warmup 3]
        [--batch-size B] [--variants fp32,bf16,channels_last,compile,bf16+compile]
        [--device cpu|cuda] [--peak-tflops 989] [--data-batches 50] [--profile STEPS]
        [--stand-in-data IMAGES]

Prints one JSON object (on one line). For each variant it times, on random tensors of the
config's shape (median over --steps after --warmup):
  engine  `Trainer(cfg).train_step([v])`: one upper and N lower steps under
          Accelerate, with the engine's grad-norm and non-finite checks and metrics;
  plain   the same work written as a single-process loop over `bidvl.models.build_nets` and
          `bidvl.objectives` (below), with the same optimizers, batch and precision.
ratio_engine_to_plain is the engine's overhead. `device_reads_per_iter`: the Tensor reads
(`.item()`, `.tolist()`, `bool()`, ...) of one iteration, counted over 2 more steps after the
timing; on a GPU each waits for the queued kernels (the engine's train_step makes none: its counts
are read at sync steps, see bidvl.nonfinite). `step_ms` synchronises the device after every step;
`pipelined_step_ms` times --steps steps back to back with one synchronisation at the end, as
training runs them between log steps (on a GPU the gain of a step without reads shows there).
Each side runs in a fresh process, so peak memory (CUDA max_memory_allocated, or the process's max
RSS on the CPU) is its own.

A variant is `+`-joined tokens: fp32 | bf16 (autocast), channels_last, compile (torch.compile),
cudnn_benchmark (torch.backends.cudnn.benchmark=True in the measuring process, both sides),
interpolate (the ResNet generator upsamples with F.interpolate on every device instead of
`bidvl.models.resnet.upsample2x`'s slices for NCHW tensors on CUDA: the whole-step effect of that
choice, both sides alike).
The engine gets them as train.mixed_precision / train.channels_last / train.compile; the plain loop
applies `net.to(memory_format=torch.channels_last)` and `torch.compile(net)` to its three nets
(all their calls compiled, the frozen ones included).

`data` times pulling batches from `bidvl.data.train_stream` over the config's shards (no compute)
with its data.num_workers; null when data.train has no shards, unless --stand-in-data N builds
stand-in shards of N photo crops at the config's resolution and channels. `data_fraction` = loader ms per batch / step ms: below 1 the
loader keeps up when it runs beside the step (num_workers > 0); with num_workers = 0 it adds to
the step. On CUDA, `flops_per_iter` (torch.utils.flop_counter over one plain iteration, forward
and backward) gives MFU = FLOPs/s / --peak-tflops (default: H100 SXM bf16 dense).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from bidvl.benchmarking import DeviceReads, device_name

REPO = Path(__file__).resolve().parent.parent
READ_STEPS = 2  # steps whose device->host reads are counted (bidvl.benchmarking.DeviceReads)
TOKENS = ("fp32", "bf16", "channels_last", "compile", "cudnn_benchmark", "interpolate")


def parse_variant(name: str) -> dict:
    tokens = name.split("+")
    unknown = [t for t in tokens if t not in TOKENS]
    if unknown or ("fp32" in tokens and "bf16" in tokens):
        raise ValueError(f"variant {name!r}: expected '+'-joined tokens from {', '.join(TOKENS)}")
    return {"precision": "bf16" if "bf16" in tokens else "fp32",
            "channels_last": "channels_last" in tokens, "compile": "compile" in tokens,
            "cudnn_benchmark": "cudnn_benchmark" in tokens, "interpolate": "interpolate" in tokens}


# ---------------------------------------------------------------- the plain loop


def plain_step(nets, opts, v, cfg, autocast):
    """One bi-level iteration as a single-process PyTorch loop over the engine's objective object
    (`bidvl.objectives.build`), so both sides run the same maths for every objective.name."""
    import torch

    from bidvl import objectives

    energy_net, encoder, generator = nets
    energy_opt, latent_opt = opts
    objective = objectives.build(cfg)
    frozen = {"energy_net": objectives.Frozen(energy_net), "frozen_encoder": objectives.Frozen(encoder)}
    h_p = torch.randn(len(v), cfg.model.latent_dim, device=v.device)

    def upper():
        with autocast():
            with torch.no_grad():
                v_hat = generator(h_p)
            terms = objective.upper_level(v, v_hat, energy_net=energy_net, encoder=encoder)
        terms.loss.backward()
        energy_opt.step()
        energy_opt.zero_grad(set_to_none=True)
        if "encoder" in objective.upper_level_trains:
            latent_opt.step()
            latent_opt.zero_grad(set_to_none=True)

    def lower():
        lower_nets = {"encoder": encoder, "generator": generator}
        for phase in objective.lower_level_phases:  # one backward and one step per phase
            called = {name: net if name in phase else objectives.Frozen(net) for name, net in lower_nets.items()}
            with autocast():
                terms = objective.lower_level(v, h_p, phase=phase, **called, **frozen)
            terms.loss.backward()
            latent_opt.step()
            latent_opt.zero_grad(set_to_none=True)

    o = cfg.objective
    if objective.has_upper_level and o.order == "upper_first":
        upper()
    for _ in range(o.lower_steps):
        lower()
    if objective.has_upper_level and o.order == "lower_first":
        upper()


def build_plain(cfg, device):
    from bidvl.distributed import build_optimizers
    from bidvl.models import build_nets

    nets = [net.to(device).train() for net in build_nets(cfg.model, cfg.data.channels, cfg.data.resolution)]
    return nets, build_optimizers(cfg, *nets)


def apply_variant(nets, variant):
    import torch

    if variant["channels_last"]:
        nets = [net.to(memory_format=torch.channels_last) for net in nets]
    if variant["compile"]:
        nets = [torch.compile(net) for net in nets]
    return nets


# ---------------------------------------------------------------- one measurement (own process)


def load(config: str, batch_size: int, variant: dict, run_dir: str):
    from bidvl.config import load_config

    return load_config(config, [
        f"run.dir={run_dir}", f"train.batch_size={batch_size}", "data.auto_build=''",
        f"train.mixed_precision={'bf16' if variant['precision'] == 'bf16' else 'no'}",
        f"train.channels_last={str(variant['channels_last']).lower()}",
        f"train.compile={str(variant['compile']).lower()}",
    ])


def measure(side: str, config: str, variant: dict, device: str, batch_size: int, steps: int,
            warmup: int, profile_steps: int = 0) -> dict:
    """Median step time of `side` (engine | plain) in this (fresh) process; on CUDA the plain side
    also counts the FLOPs of one eager iteration first."""
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # Accelerator on the CPU even where CUDA exists
    import torch

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = variant["cudnn_benchmark"]  # process-wide, both sides alike
    if variant["interpolate"]:  # this process only (each side runs in a fresh one)
        from bidvl.models import resnet

        resnet.upsample2x = resnet.interpolate2x
    cuda = device == "cuda"
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load(config, batch_size, variant, tmp)
        shape = (batch_size, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        v = torch.rand(shape, device=device) * 2 - 1
        if variant["channels_last"]:
            v = v.contiguous(memory_format=torch.channels_last)
        trainer = None
        if side == "engine":
            from bidvl.engine import Trainer

            trainer = Trainer(cfg)
            step = partial(trainer.train_step, [v])
        else:
            nets, opts = build_plain(cfg, device)
            autocast = (partial(torch.autocast, device_type=device, dtype=torch.bfloat16)
                        if variant["precision"] == "bf16" else nullcontext)
            if cuda:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    plain_step(nets, opts, v, cfg, autocast)
                result["flops_per_iter"] = counter.get_total_flops()
            step = partial(plain_step, apply_variant(nets, variant), opts, v, cfg, autocast)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        progress(f"{side}: set up on {device}, {warmup} + {steps} steps")
        times = []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # back to back, one sync at the end: a step that reads nothing
        for _ in range(steps):   # lets the host queue the next step while the GPU runs this one
            step()
        sync()
        result["pipelined_step_ms"] = round(1e3 * (time.perf_counter() - t0) / steps, 3)
        with DeviceReads() as reads:  # after the timing: the counter's own cost is not timed
            for _ in range(READ_STEPS):
                step()
        sync()
        result["device_reads_per_iter"] = reads.count / READ_STEPS
        if profile_steps:
            result["profile"] = top_ops(step, sync, profile_steps, cuda)
        if trainer is not None:
            trainer.close()
    step_ms = 1e3 * statistics.median(times[warmup:])
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    return {"step_ms": round(step_ms, 3), "images_per_s": round(batch_size / step_ms * 1e3, 1),
            "first_step_ms": round(1e3 * times[0], 1), "peak_memory_mb": round(peak, 1), **result}


def top_ops(step, sync, steps: int, cuda: bool, count: int = 12) -> list[dict]:
    """The `count` operators with the most self time over `steps` steps (device time on CUDA, else
    CPU time), in ms per step: where a step's time goes, for the next optimisation."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()

    def self_us(e):
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    events = sorted(prof.key_averages(), key=self_us, reverse=True)[:count]
    return [{"op": e.key, "self_ms_per_step": round(self_us(e) / 1e3 / steps, 3),
             "calls_per_step": round(e.count / steps, 1),
             "cpu_ms_per_step": round(e.cpu_time_total / 1e3 / steps, 3)} for e in events]


def progress(message: str) -> None:
    """A timestamped line on stderr: a run cut short by a time limit still shows what it measured."""
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def in_fresh_process(pool, *args) -> dict:
    try:
        return pool.submit(measure, *args).result()
    except Exception as exc:  # noqa: BLE001 -- one failing variant (e.g. compile) must not lose the others
        return {"error": f"{type(exc).__name__}: {exc}"}


# ---------------------------------------------------------------- data


def data_wait(cfg, batch_size: int, batches: int, shards: str | None = None) -> dict | None:
    """Loader throughput over `shards` (default: the config's; None when there are none), with the
    config's data.num_workers, in this process."""
    from bidvl.data import ShardError, train_stream

    shards = shards or cfg.data.train
    if not (Path(shards) / "meta.json").is_file():
        return None
    try:
        stream = train_stream(shards, cfg.data.train_split, batch_size, seed=cfg.run.seed,
                              num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer)
        it = iter(stream)
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        per_batch = (time.perf_counter() - t0) / batches
        del it  # stops the loader workers
    except ShardError as exc:
        return {"shards": str(shards), "error": str(exc)}
    return {"shards": str(shards), "num_workers": cfg.data.num_workers, "batches": batches,
            "first_batch_ms": round(1e3 * first, 1), "ms_per_batch": round(1e3 * per_batch, 3)}


def stand_in_data_wait(cfg, batch_size: int, batches: int, images: int) -> dict:
    """data_wait over stand-in shards of the config's resolution and channels: `images` 160 px
    crops of scikit-learn's sample photos (photographic content, so PNG sizes and decode costs are
    realistic), written by the imagefolder writer; the stream loops over them."""
    from bidvl.benchmarking import photo_folder

    from bidvl.data import build_shards

    with tempfile.TemporaryDirectory() as tmp:
        photos = photo_folder(Path(tmp) / "photos", images, 160)
        shards = Path(tmp) / "shards"
        build_shards("imagefolder", out=str(shards), src=str(photos), resolution=cfg.data.resolution,
                     channels=cfg.data.channels)
        data = data_wait(cfg, batch_size, batches, shards=str(shards))
    data["shards"] = f"stand-in: {images} crops of scikit-learn's sample photos"
    return data


@contextlib.contextmanager
def stdout_to_stderr():
    """File descriptor 1 -> 2 while measuring, in this process and the spawned ones: libraries
    that log to stdout (DeepSpeed's accelerator detection, when it is installed) must not break
    the one-JSON-object output."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/digits.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="timed iterations (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (compile happens here)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's train.batch_size")
    parser.add_argument("--variants", default="fp32,bf16", help="comma list, e.g. fp32,bf16,bf16+compile")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak of the device for MFU (default: H100 SXM bf16 dense)")
    parser.add_argument("--data-batches", type=int, default=50, help="batches pulled for the data measurement")
    parser.add_argument("--stand-in-data", type=int, default=0, metavar="IMAGES",
                        help="when the config's shards are not there, time the loader on IMAGES photo "
                             "crops written as shards of the config's resolution and channels")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile STEPS more steps (torch.profiler) and report each "
                             "side's top operators by self time (device time on CUDA) per step")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    with stdout_to_stderr():
        result = benchmark(parser, args)
    if result is None:
        return 2
    print(json.dumps(result))
    return 0


def benchmark(parser, args) -> dict | None:
    """The whole measurement (see the module docstring); None after a config error."""

    import accelerate
    import torch

    from bidvl.config import ConfigError, load_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    try:
        variants = {name: parse_variant(name) for name in args.variants.split(",") if name}
    except ValueError as exc:
        parser.error(str(exc))
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    batch = args.batch_size or cfg.train.batch_size

    result = {
        "benchmark": "engine_vs_plain", "config": args.config, "device": device,
        "device_name": device_name(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "accelerate": accelerate.__version__,
        "arch": cfg.model.arch, "resolution": cfg.data.resolution, "channels": cfg.data.channels,
        "batch_size": batch, "steps": args.steps, "warmup": args.warmup,
        "memory": "cuda_max_allocated_mb" if device == "cuda" else "cpu_max_rss_mb (whole process)",
        "peak_tflops": args.peak_tflops if device == "cuda" else None,
        "flops_per_iter": None,
        "data": data_wait(cfg, batch, args.data_batches),
        "variants": {},
    }
    if result["data"] is None and args.stand_in_data:
        result["data"] = stand_in_data_wait(cfg, batch, args.data_batches, args.stand_in_data)
    data = result["data"]
    progress(f"{args.config} on {result['device_name']}: data {json.dumps(data)}")
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1) as pool:
        def run(side, variant):
            return in_fresh_process(pool, side, args.config, variant, device, batch, args.steps, args.warmup,
                                    args.profile)

        for name, variant in variants.items():
            engine = run("engine", variant)
            progress(f"{name} engine: {json.dumps(engine)}")
            plain = run("plain", variant)
            progress(f"{name} plain: {json.dumps(plain)}")
            flops = result["flops_per_iter"] = plain.pop("flops_per_iter", None) or result["flops_per_iter"]
            row = {**variant, "engine": engine, "plain": plain, "ratio_engine_to_plain": None,
                   "data_fraction": None, "mfu": None}
            ok = {k: s for k, s in (("engine", engine), ("plain", plain)) if s and "step_ms" in s}
            if len(ok) == 2:
                row["ratio_engine_to_plain"] = round(engine["step_ms"] / plain["step_ms"], 3)
            reference = ok.get("engine") or ok.get("plain")
            if data and "ms_per_batch" in data and reference:
                row["data_fraction"] = round(data["ms_per_batch"] / reference["step_ms"], 3)
            if flops and ok:
                row["mfu"] = {k: round(flops / (s["step_ms"] / 1e3) / (args.peak_tflops * 1e12), 4)
                              for k, s in ok.items()}
            result["variants"][name] = row
    return result


if __name__ == "__main__":
    sys.exit(main())
