"""The study's runs: each run's stages in their own processes (`python -m bidvl.study STAGE`,
stages.py), run side by side, skipped when finished, resumed from budget to budget; then the report
(report.py, or scaling.py for a study with `budgets`). What a study does: bidvl/study/__init__.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from bidvl.checkpoint import TrainState
from bidvl.data.build import build_once
from bidvl.io import write_text
from bidvl.run_dir import TRAIN_STATE_FILE, RunDir
from bidvl.study.config import Study, StudyError, StudyRun
from bidvl.study.report import write_report
from bidvl.study.scaling import write_scaling_report

# bidvl.data.build and bidvl.checkpoint import torch: imported where a run needs them, so that the
# study's own process (it only starts the stages' processes) does not load it to read a study file.


def _run_stage(stage: str, args: list[str], log: Path, env: dict) -> None:
    """`python -m bidvl.study STAGE ARGS...` (see stages.stage_main), its output appended to `log`."""
    cmd = [sys.executable, "-m", "bidvl.study", stage, *args]
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)  # in our folder
    if p.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise StudyError(f"{stage} failed (exit {p.returncode}); log {log}:\n" + "\n".join(tail))


def ensure_ood_shards(study: Study) -> None:

    for folder, (dataset, resolution) in study.eval.auto_build_ood.items():
        if not (Path(folder) / "meta.json").is_file():
            print(f"building {dataset} shards at {resolution} px in {folder} (OOD set)", flush=True)
            build_once(dataset, folder, int(resolution))


def run_one(study: Study, run: StudyRun) -> list[dict]:
    """Trains, evaluates and draws one run at each of its budgets (resuming from one to the next)."""
    return [run_budget(study, run, budget) for budget in study.run_budgets(run)]


def run_budget(study: Study, run: StudyRun, budget: float) -> dict:

    out = Path(study.out) / run.name
    result_path = out / study.result_name(budget)
    tag = f"{run.name} {budget:g} min" if study.scaling else run.name
    if result_path.is_file():
        print(f"[{tag}] finished earlier: skipped", flush=True)
        return json.loads(result_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(study.threads), "MKL_NUM_THREADS": str(study.threads)}
    overrides = [*study.common, *run.overrides, f"run.dir={out}",
                 f"train.time_budget_min={budget}", f"train.budget_clock={study.budget_clock}"]
    print(f"[{tag}] training ({budget:g} min, {study.budget_clock} clock)", flush=True)
    t0 = time.time()
    _run_stage("train", [study.base, *overrides], log, env)
    train_wall = time.time() - t0
    ev = study.eval
    options = {"metrics": ["fid", "rmse", "ood"], "num_samples": ev.num_samples, "fid_ref": ev.fid_ref,
               "batch_size": ev.batch_size, "features": ev.features, "ood": list(ev.ood),
               "cache_dir": str(RunDir(out).eval_cache)}
    print(f"[{tag}] evaluating", flush=True)
    t1 = time.time()
    _run_stage("evaluate", [str(out), json.dumps(options)], log, env)
    eval_wall = time.time() - t1
    _run_stage("grids", [str(out)], log, env)
    if study.scaling:
        for kind in ("samples", "reconstructions"):
            (out / f"{kind}_{budget:g}min.png").write_bytes((out / f"{kind}.png").read_bytes())
    state = dataclasses.asdict(TrainState.read(RunDir(out).complete_checkpoints()[-1] / TRAIN_STATE_FILE))
    report = json.loads(RunDir(out).eval_reports()[-1].read_text())
    result = {
        "name": run.name, "label": run.label, "overrides": list(run.overrides), "method": run.method,
        "budget_min": budget,
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


def run_study(study: Study, only: list[str] | None = None, report_only: bool = False) -> Path:
    """Runs the study's (or `only` those) runs that have not finished, then writes the report."""
    runs = study.runs
    if only:
        missing = set(only) - {r.name for r in runs}
        if missing:
            raise StudyError(f"--only: no run(s) named {', '.join(sorted(missing))} in {study.path}")
        runs = [r for r in runs if r.name in only]
    if not report_only:
        ensure_ood_shards(study)
        with ThreadPoolExecutor(max_workers=study.parallel) as pool:
            list(pool.map(lambda r: run_one(study, r), runs))
    results = []
    for run in study.runs:
        for budget in study.run_budgets(run):
            path = Path(study.out) / run.name / study.result_name(budget)
            if path.is_file():
                result = json.loads(path.read_text())
                result.setdefault("method", run.method)
                result.setdefault("budget_min", budget)
                results.append(result)
    if not results:
        raise StudyError(f"no finished runs under {study.out}: nothing to report")
    if study.scaling:
        return write_scaling_report(study, results)
    return write_report(study, results)
