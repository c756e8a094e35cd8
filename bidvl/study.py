"""Run a study: several training runs of one engine at an equal time budget, evaluated alike.

    python launch/study.py --config configs/studies/fashion_mnist.yaml
    python launch/study.py --config configs/studies/fashion_mnist.yaml --only vae,bidvl_offset
    python launch/study.py --config configs/studies/fashion_mnist.yaml --report-only

For every entry of `runs` it trains BASE with COMMON... OVERRIDES... (as `launch/train.py --config
BASE ...` would) in OUT/NAME until `budget_minutes` of training time (train.time_budget_min, clock
`budget_clock`) are used, then evaluates the export as `launch/evaluate.py` would (FID-style score
on `eval.num_samples` samples against `eval.fid_ref`, test RMSE, OOD AUROC against uniform noise
and the `eval.ood` shards folders) and draws sample and reconstruction grids as `launch/sample.py`
would. A finished run leaves OUT/NAME/study_result.json and is skipped by later invocations; an
interrupted one resumes from its last checkpoint with the budget it had used
(checkpoint.resume=auto). Changing a run's settings needs a new name or deleting its folder.

Each of a run's three stages (train, evaluate, grids) runs the library (bidvl.engine,
bidvl.evaluation) in a fresh Python process, `python -m bidvl.study STAGE ...`, with its output
in OUT/NAME/study.log:
- training must: the `process` budget clock is the CPU time of the whole process, runs go side by
  side (`parallel`), and each run starts from a clean state (RNG, Accelerate, thread pools);
- evaluation and grids could run in this process, but there they would share its thread pools
  and device with the other runs (`threads` is set per process, through OMP_NUM_THREADS, before
  torch starts), and their output would mix with the other runs' instead of going to the run's
  log. In their own process they get the run's thread count and the device launch/evaluate.py
  and launch/sample.py would pick, so their figures and images are those of the commands.
The processes run in the folder the study was started from (the repository root in a clone),
from where the relative paths of the study files (base, shards folders, out) are read; `base` may
also name a shipped config (`fashion_mnist`).

At the end it writes the report (`report`, Markdown) with the table, the grids, loss and
evaluation curves (PNG, matplotlib, from the runs' TensorBoard logs), steps and time per run, and
the machine. Text after the line `<!-- end of generated part -->` of an existing report is kept.

Compute scaling (`budgets: [10, 30, 90]` instead of budget_minutes): each run trains to the
first budget, is evaluated, then resumes in the same folder to the next budget (checkpoint.resume
exact: the data order, RNG and optimizer state carry on), and so on. Its point at 30 min is thus
the run a 30-minute budget would give, and the three cost 90 minutes, not 130. Each budget leaves
OUT/NAME/study_result_<B>min.json and samples_<B>min.png / reconstructions_<B>min.png. A run may
list its own `budgets` (e.g. extra seeds at the first budget only) and a `method` (runs of one
method, e.g. several seeds, are one line in the plot and one mean +- sd in the table). The report
plots the FID-style score, RMSE and noise AUROC against training minutes, and for each method
against `vae` (when there is one), the gap per budget and where a straight line in log-minutes
through the gaps would reach zero.

Fair budgets on a shared machine: with budget_clock `process` and one thread per run (`threads`,
data.num_workers=0 in `common`), each run gets the same CPU time whatever else the machine does,
and `parallel` runs can go side by side. Wall-clock time is reported too.

Study file keys: base (config file), out, report, budget_minutes or budgets, budget_clock, threads,
parallel, common (list of overrides), eval {num_samples, features, fid_ref, ood (list of shards
folders), batch_size, auto_build_ood (map folder -> [dataset, resolution])}, runs (list of {name,
label, overrides, budgets, method}).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .errors import BidvlError
from .io import write_text
from .run_dir import TRAIN_STATE_FILE, RunDir

MARKER = "<!-- end of generated part -->"
KEYS = {"base", "out", "report", "budget_minutes", "budgets", "budget_clock", "threads", "parallel",
        "common", "eval", "runs", "title", "notes"}
RUN_KEYS = {"name", "label", "overrides", "budgets", "method"}
EVAL_KEYS = {"num_samples", "features", "fid_ref", "ood", "batch_size", "auto_build_ood"}
CURVES = [("loss/recon", "reconstruction error (summed over pixels)"),
          ("energy/gap", "E(samples) - E(data)"),
          ("energy/data", "E(data): the energy level (softplus floor: 0)"),
          ("eval/rmse", "test RMSE during training (first test images; BatchNorm batch statistics)"),
          ("eval/auroc_uniform", "AUROC vs uniform noise during training")]


class StudyError(BidvlError, ValueError):
    """A study file is missing, unknown or impossible; the message names the file and key."""


def study_file(name: str | Path) -> Path:
    """A study file path, or the name of a shipped study (`fashion_mnist_health`) when no such file
    exists here."""
    from bidvl.config import SHIPPED_CONFIGS, path_or_shipped

    shipped = SHIPPED_CONFIGS / "studies"
    found = path_or_shipped(name, shipped)
    if found is None:
        raise StudyError(f"study file {name} does not exist (shipped studies, by name: "
                         f"{', '.join(sorted(p.stem for p in shipped.glob('*.yaml')))})")
    return found


def load_study(path: Path, budget_override: float | None = None) -> dict:
    path = study_file(path)
    study = yaml.safe_load(path.read_text()) or {}
    unknown = set(study) - KEYS
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(KEYS))}")
    for key in ("base", "out", "report", "runs"):
        if key not in study:
            raise StudyError(f"{path}: key {key!r} is missing")
    unknown = set(study.get("eval", {})) - EVAL_KEYS
    if unknown:
        raise StudyError(f"{path}: eval: unknown key(s) {', '.join(sorted(unknown))}")
    for i, entry in enumerate(study["runs"]):
        unknown = set(entry) - RUN_KEYS
        if unknown:
            raise StudyError(f"{path}: runs[{i}]: unknown key(s) {', '.join(sorted(unknown))}; "
                             f"expected {', '.join(sorted(RUN_KEYS))}")
    names = [r.get("name", "") for r in study["runs"]]
    for i, name in enumerate(names):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            raise StudyError(f"{path}: runs[{i}].name={name!r}: expected letters, digits, _ . -")
    if len(set(names)) != len(names):
        raise StudyError(f"{path}: run names repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    if "budgets" in study and "budget_minutes" in study:
        raise StudyError(f"{path}: budget_minutes and budgets both given: expected one")
    study["scaling"] = "budgets" in study and budget_override is None
    if budget_override is not None:
        study["budget_minutes"] = budget_override
    study.setdefault("budget_minutes", 10.0)
    study["budgets"] = _budgets(study.get("budgets", [study["budget_minutes"]]), f"{path}: budgets")
    if not study["scaling"]:
        study["budget_minutes"] = study["budgets"][0]
    for i, entry in enumerate(study["runs"]):
        if "budgets" in entry:
            if not study["scaling"]:
                raise StudyError(f"{path}: runs[{i}].budgets: only in a study with `budgets`")
            entry["budgets"] = _budgets(entry["budgets"], f"{path}: runs[{i}].budgets")
    study.setdefault("budget_clock", "process")
    study.setdefault("threads", 1)
    study.setdefault("parallel", 1)
    study.setdefault("common", [])
    study.setdefault("eval", {})
    study["path"] = str(path)
    return study


def _budgets(value, where: str) -> list[float]:
    """A list of training budgets in minutes: numbers > 0, strictly increasing."""
    if not isinstance(value, list) or not value:
        raise StudyError(f"{where}={value!r}: expected a list of minutes, e.g. [10, 30, 90]")
    try:
        budgets = [float(b) for b in value]
    except (TypeError, ValueError):
        raise StudyError(f"{where}={value!r}: expected numbers (minutes)") from None
    if not all(b > 0 for b in budgets) or any(a >= b for a, b in zip(budgets, budgets[1:])):
        raise StudyError(f"{where}={value!r}: expected minutes > 0 in increasing order")
    return budgets


def result_name(study: dict, budget: float) -> str:
    """The result file of one run at one budget (see the module docstring)."""
    return f"study_result_{budget:g}min.json" if study["scaling"] else "study_result.json"


def run_budgets(study: dict, entry: dict) -> list[float]:
    return entry.get("budgets", study["budgets"])


def _run_stage(stage: str, args: list[str], log: Path, env: dict) -> None:
    """`python -m bidvl.study STAGE ARGS...` (see `stage_main`), its output appended to `log`."""
    cmd = [sys.executable, "-m", "bidvl.study", stage, *args]
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)  # in our folder
    if p.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise StudyError(f"{stage} failed (exit {p.returncode}); log {log}:\n" + "\n".join(tail))


def ensure_ood_shards(study: dict) -> None:
    from bidvl.data.build import build_once

    for folder, (dataset, resolution) in (study["eval"].get("auto_build_ood") or {}).items():
        if not (Path(folder) / "meta.json").is_file():
            print(f"building {dataset} shards at {resolution} px in {folder} (OOD set)", flush=True)
            build_once(dataset, folder, int(resolution))


def run_one(study: dict, entry: dict) -> list[dict]:
    """Trains, evaluates and draws one run at each of its budgets (resuming from one to the next)."""
    return [run_budget(study, entry, budget) for budget in run_budgets(study, entry)]


def run_budget(study: dict, entry: dict, budget: float) -> dict:
    from bidvl.checkpoint import TrainState

    out = Path(study["out"]) / entry["name"]
    result_path = out / result_name(study, budget)
    tag = f"{entry['name']} {budget:g} min" if study["scaling"] else entry["name"]
    if result_path.is_file():
        print(f"[{tag}] finished earlier: skipped", flush=True)
        return json.loads(result_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(study["threads"]), "MKL_NUM_THREADS": str(study["threads"])}
    overrides = [*study["common"], *entry.get("overrides", []), f"run.dir={out}",
                 f"train.time_budget_min={budget}", f"train.budget_clock={study['budget_clock']}"]
    print(f"[{tag}] training ({budget:g} min, {study['budget_clock']} clock)", flush=True)
    t0 = time.time()
    _run_stage("train", [study["base"], *overrides], log, env)
    train_wall = time.time() - t0
    ev = study["eval"]
    options = {"metrics": ["fid", "rmse", "ood"], "num_samples": int(ev.get("num_samples", 10000)),
               "fid_ref": ev.get("fid_ref", "test"), "batch_size": int(ev.get("batch_size", 500)),
               "features": ev.get("features") or "", "ood": [str(f) for f in ev.get("ood") or ()],
               "cache_dir": str(RunDir(out).eval_cache)}
    print(f"[{tag}] evaluating", flush=True)
    t1 = time.time()
    _run_stage("evaluate", [str(out), json.dumps(options)], log, env)
    eval_wall = time.time() - t1
    _run_stage("grids", [str(out)], log, env)
    if study["scaling"]:
        for kind in ("samples", "reconstructions"):
            (out / f"{kind}_{budget:g}min.png").write_bytes((out / f"{kind}.png").read_bytes())
    state = dataclasses.asdict(TrainState.read(RunDir(out).complete_checkpoints()[-1] / TRAIN_STATE_FILE))
    report = json.loads(RunDir(out).eval_reports()[-1].read_text())
    result = {
        "name": entry["name"], "label": entry.get("label", entry["name"]), "overrides": entry.get("overrides", []),
        "method": entry.get("method", entry["name"]), "budget_min": budget,
        "steps": state["step"], "budget_used_min": state["budget_used_s"] / 60.0,
        "train_wall_min": train_wall / 60.0, "eval_wall_min": eval_wall / 60.0,
        "scalars": report["scalars"], "fid_label": report.get("fid", {}).get("label", ""),
        "ood_score": report.get("ood", {}).get("score", ""),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_text(result_path, json.dumps(result, indent=2) + "\n")
    print(f"[{tag}] done: {result['steps']} steps, " +
          ", ".join(f"{k}={v:.4g}" for k, v in result["scalars"].items()), flush=True)
    return result


# ---------------------------------------------------------------- the stages (own processes)


def train_stage(config: str, overrides: list[str]) -> None:
    """Trains `config` with `overrides` to the end (max_steps, time budget or a signal), as
    launch/train.py does."""
    from bidvl.config import load_config
    from bidvl.engine import train

    train(load_config(config, overrides))


def evaluate_stage(run_dir: str, options: dict) -> None:
    """launch/evaluate.py --run RUN_DIR with `options` (EvalOptions fields): the report files."""
    from accelerate import Accelerator

    from bidvl.evaluation import EvalOptions, load_run
    from bidvl.evaluation.evaluator import evaluate_run

    accelerator = Accelerator()
    run = load_run(run_dir, device=accelerator.device)
    opts = EvalOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    report, path = evaluate_run(accelerator, run_dir, run, opts)
    print(json.dumps(report["scalars"], indent=2))
    print(f"wrote {path} and {path.with_suffix('.md')}")
    accelerator.end_training()


def grids_stage(run_dir: str) -> None:
    """RUN_DIR/samples.png (64 samples) and RUN_DIR/reconstructions.png (32 test images and their
    reconstructions), as launch/sample.py draws them."""
    import torch
    from torchvision.utils import save_image

    from bidvl.evaluation import load_run
    from bidvl.evaluation.sampling import reconstruction_grid, sample_grid

    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = load_run(run_dir, device=device)
    for kind, (images, grid) in (("samples", sample_grid(run, 64, device=device)),
                                 ("reconstructions", reconstruction_grid(run, 32, device=device))):
        save_image(grid, str(Path(run_dir) / f"{kind}.png"))
        print(f"wrote {len(images)} {kind} of step {run.step} ({run.kind}) to {Path(run_dir) / kind}.png")


def stage_main(argv: list[str]) -> int:
    """`python -m bidvl.study train CONFIG [OVERRIDE...] | evaluate RUN_DIR OPTIONS_JSON | grids
    RUN_DIR`: one stage of one run, in the fresh process `run_one` starts for it."""
    stages = {"train": lambda config, *overrides: train_stage(config, list(overrides)),
              "evaluate": lambda run_dir, options: evaluate_stage(run_dir, json.loads(options)),
              "grids": grids_stage}
    if not argv or argv[0] not in stages:
        print(f"usage: python -m bidvl.study {{{','.join(stages)}}} ARGS... (the stages of "
              "launch/study.py; see bidvl/study.py)", file=sys.stderr)
        return 2
    try:
        stages[argv[0]](*argv[1:])
    except BidvlError as exc:
        print(f"error: {exc}", file=sys.stderr)  # bad input or a diverged run: one line
        return 2
    return 0


# ---------------------------------------------------------------- report


def read_curves(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict = {}
    for events in sorted(RunDir(run_dir).tensorboard.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            points = curves.setdefault(tag, {})
            for e in acc.Scalars(tag):
                points[e.step] = e.value
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def plot_curves(study: dict, results: list[dict], path: Path) -> None:
    from bidvl.extras import require

    require("matplotlib", StudyError).use("Agg")
    import matplotlib.pyplot as plt

    curves = {r["name"]: read_curves(Path(study["out"]) / r["name"]) for r in results}  # one read per run
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for (tag, title), ax in zip(CURVES, axes.flat):
        for r in results:
            points = curves[r["name"]].get(tag, [])
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=r["name"], linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if tag == "loss/recon":
            ax.set_yscale("log")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(handles, labels, loc="center", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine() -> str:
    import torch

    from bidvl.benchmarking import device_name

    return (f"{device_name('cpu')}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def fmt(x, digits=4) -> str:
    return "—" if x is None else f"{x:.{digits}g}"


def report_header(study: dict, budget_text: str) -> list[str]:
    """The report's title, how it was made (command, date, machine, settings of every run with
    `budget_text`), the feature extractor and the study's notes: Markdown lines."""
    lines = [f"# {study.get('title', 'Study')}", "",
             f"Generated by `python launch/study.py --config {study['path']}` on "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine()}.", "",
             f"Every run: `{study['base']}` with {' '.join(f'`{c}`' for c in study['common'])}, its own "
             f"overrides below, and {budget_text} ({study['budget_clock']} clock, {study['threads']} "
             f"thread(s) per run, {study['parallel']} run(s) side by side).", ""]
    features = study["eval"].get("features")
    if features and Path(features).suffix == ".safetensors" and Path(features).is_file():
        from bidvl.evaluation.fid import read_safetensors

        meta = read_safetensors(Path(features), tensors=False)[0]
        if "bidvl.test_accuracy" in meta:
            lines += [f"Feature extractor for the FID-style score: `{features}`, a classifier trained on "
                      f"{meta.get('bidvl.train_images', '?')} {meta.get('bidvl.source', '')} train images "
                      f"({meta.get('bidvl.epochs', '?')} epochs); test accuracy "
                      f"**{float(meta['bidvl.test_accuracy']):.4f}** on {meta.get('bidvl.test_images', '?')} "
                      f"test images.", ""]
    if study.get("notes"):
        lines += [study["notes"].strip(), ""]
    return lines


def write_keeping_findings(report: Path, lines: list[str]) -> Path:
    """Writes `lines` to `report`, keeping what an existing report holds after MARKER."""
    kept = ""
    if report.is_file() and MARKER in report.read_text():
        kept = report.read_text().split(MARKER, 1)[1]
    text = "\n".join(lines) + f"\n\n{MARKER}\n" + ("\n" + kept.lstrip("\n") if kept.strip() else "")
    return write_text(report, text)


def metrics_note(results: list[dict]) -> str:
    """What the report's figures are (Markdown paragraph)."""
    return (f"FID-style score: {results[0]['fid_label'] if results else ''}. RMSE: per pixel value on "
            "the [-1, 1] scale, G(mu(v)) on the whole test split; `batch stats`: encoder and generator in "
            "train mode, BatchNorm with each test batch's statistics (the authors' metric, the headline), "
            "`running stats`: nets in eval mode (docs/fidelity.md). AUROC: in-distribution test images "
            "against each OOD set, score -E(v) (the VAE: its ELBO at h = mu(v)).")


def ood_names(results: list[dict]) -> list[str]:
    """The OOD sets the results have an AUROC for, `uniform` (noise) first."""
    return sorted({k[len("eval/auroc_"):] for r in results for k in r["scalars"] if k.startswith("eval/auroc_")},
                  key=lambda n: (n != "uniform", n))


def write_report(study: dict, results: list[dict]) -> Path:
    report = Path(study["report"])
    images = report.parent / "images" / report.stem
    link = images.relative_to(report.parent).as_posix()  # the images as the report links them
    images.mkdir(parents=True, exist_ok=True)
    plot_curves(study, results, images / "curves.png")
    vae = next((r for r in results if r["name"] == "vae"), None)
    vae_fid = vae["scalars"].get("eval/fid") if vae else None
    vae_rmse = vae["scalars"].get("eval/rmse") if vae else None
    oods = ood_names(results)
    lines = report_header(study, f"a training budget of **{study['budget_minutes']:g} min**")
    head = ["run", "overrides", "steps", "train min (budget clock / wall)", results[0]["fid_label"].split(" (")[0]
            if results else "FID", "x VAE", "test RMSE (batch stats)", "x VAE",
            "test RMSE (running stats)"] + [f"AUROC {n}" for n in oods] + ["run health (last check)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["scalars"]
        fid, rmse = s.get("eval/fid"), s.get("eval/rmse")
        row = [r["name"], " ".join(f"`{o}`" for o in r["overrides"]) or "—", str(r["steps"]),
               f"{r['budget_used_min']:.1f} / {r['train_wall_min']:.1f}", fmt(fid),
               fmt(fid / vae_fid if fid is not None and vae_fid else None, 3), fmt(rmse),
               fmt(rmse / vae_rmse if rmse is not None and vae_rmse else None, 3),
               fmt(s.get("eval/rmse_running_stats"))]
        row += [fmt(s.get(f"eval/auroc_{n}")) for n in oods]
        row.append(health_cell(Path(study["out"]) / r["name"]))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", metrics_note(results), "",
              f"![loss and evaluation curves]({link}/curves.png)", "",
              "| run | samples | test images and reconstructions (pairs) |", "|---|---|---|"]
    for r in results:
        cells = image_cells(Path(study["out"]) / r["name"], "", images, link, r["name"])
        lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    return write_keeping_findings(report, lines)


def health_cell(run_dir: Path) -> str:
    """The run's last health check (bidvl.health) as a table cell: the verdict and its reasons."""
    from bidvl.health import verdict_of

    record = verdict_of(run_dir)
    if record is None:
        return "—"
    return record["verdict"] + (": " + "; ".join(record["reasons"]) if record["reasons"] else "")


def image_cells(run_dir: Path, suffix: str, images: Path, link: str, name: str) -> list[str]:
    """Copies RUN_DIR/{samples,reconstructions}SUFFIX.png into the report's image folder as
    NAME_{samples,reconstructions}.png; returns the two table cells that show them."""
    cells = []
    for kind in ("samples", "reconstructions"):
        src = run_dir / f"{kind}{suffix}.png"
        if src.is_file():
            (images / f"{name}_{kind}.png").write_bytes(src.read_bytes())
        cells.append(f"![]({link}/{name}_{kind}.png)")
    return cells


def run_study(study: dict, only: list[str] | None = None, report_only: bool = False) -> Path:
    """Runs the study's (or `only` those) runs that have not finished, then writes the report."""
    entries = study["runs"]
    if only:
        missing = set(only) - {e["name"] for e in entries}
        if missing:
            raise StudyError(f"--only: no run(s) named {', '.join(sorted(missing))} in {study['path']}")
        entries = [e for e in entries if e["name"] in only]
    if not report_only:
        ensure_ood_shards(study)
        with ThreadPoolExecutor(max_workers=int(study["parallel"])) as pool:
            list(pool.map(lambda e: run_one(study, e), entries))
    results = []
    for e in study["runs"]:
        for budget in run_budgets(study, e):
            path = Path(study["out"]) / e["name"] / result_name(study, budget)
            if path.is_file():
                result = json.loads(path.read_text())
                result.setdefault("method", e.get("method", e["name"]))
                result.setdefault("budget_min", budget)
                results.append(result)
    if not results:
        raise StudyError(f"no finished runs under {study['out']}: nothing to report")
    if study["scaling"]:
        from bidvl.study_scaling import write_scaling_report

        return write_scaling_report(study, results)
    return write_report(study, results)


if __name__ == "__main__":
    sys.exit(stage_main(sys.argv[1:]))
