"""The evidence behind the run-health thresholds (bidvl/health.py, docs/health.md).

    python launch/study.py --config configs/studies/fashion_mnist_health.yaml      # the runs (~1 h)
    python launch/health_evidence.py --study configs/studies/fashion_mnist_health.yaml --fit-seeds 0,1,2,3

For every run of the study it replays the health check on each kept checkpoint (`health.replay`:
the figures the training run computes at that step, here with the study's feature extractor, so
precision/recall/density/coverage and the small-n FID-style score are there too) and on the export
with 1000 probe images (the run's final AUROC against each kind of noise), and reads how the run
ended (study_result.json: the FID-style score on 10k samples, AUROC against uniform noise and the
OOD sets). A BiDVL run *ends badly* when its FID-style score is worse than the VAE runs' mean or
any AUROC is below 0.9; otherwise it *ends well*.

Thresholds are fitted on the runs of `--fit-seeds` only: for each unhealthy-level signal
(spread, nearest-neighbour ratio, lowest noise AUROC) the loosest candidate that flags no run
that ends well at any check past the warm-up, and flags the most runs that end badly by half
their budget. The runs of the other seeds are then judged with those thresholds, through
`health.judge` as the trainer judges them, and reported separately. Replays are cached in
OUT/NAME/health_replay.jsonl. Writes docs/health_evidence.md and a figure of the signals.
"""

import argparse
import dataclasses
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from bidvl import health
from bidvl.checkpoint import complete_checkpoints, step_of
from bidvl.config import HealthConfig
from bidvl.study import load_study, machine

FINAL_IMAGES = 1000
CANDIDATES = {  # signal -> (figure, direction, candidate thresholds)
    "min_spread": ("spread", "below", [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
    "min_nn_ratio": ("nn_ratio", "below", [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
    "min_auroc": ("min_auroc", "below", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
    "min_energy_spread": ("energy_spread", "below", [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]),
}
WATCHED = ["spread", "nn_ratio", "hf_ratio", "min_auroc", "energy_spread", "recall", "coverage", "fid_small"]


def min_auroc(figures: dict) -> float:
    return min(figures[f"auroc_{k}"] for k in health.NOISE_KINDS)


def replayed(run_dir: Path, features: str) -> dict:
    """{"checks": [{step, figures}], "final": figures with FINAL_IMAGES probe images}, cached."""
    cache = run_dir / "health_replay.jsonl"
    steps = [step_of(p) for p in complete_checkpoints(run_dir)]
    lines = [json.loads(x) for x in cache.read_text().splitlines()] if cache.is_file() else []
    lines = [x for x in lines if "energy_spread" in x["figures"]]  # replayed before that figure existed
    done = {x["step"] for x in lines if x["kind"] == "check"}
    for step in steps:
        if step not in done:
            _, figures = health.replay(run_dir, step, features=features)
            lines.append({"kind": "check", "step": step, "figures": figures})
            print(f"{run_dir.name} step {step}: spread {figures['spread']:.2f} min AUROC "
                  f"{min_auroc(figures):.2f}", flush=True)
    if not any(x["kind"] == "final" for x in lines):
        step, figures = health.replay(run_dir, "final", features=features, num_images=FINAL_IMAGES)
        lines.append({"kind": "final", "step": step, "figures": figures})
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(cache)
    checks = sorted((x for x in lines if x["kind"] == "check"), key=lambda x: x["step"])
    for x in checks:
        x["figures"]["min_auroc"] = min_auroc(x["figures"])
    final = next(x for x in lines if x["kind"] == "final")
    return {"checks": checks, "final": final["figures"], "final_step": final["step"]}


def outcome(run: dict, vae_fid: float) -> list[str]:
    """Why a run ends badly ([] = it ends well)."""
    why = []
    if run["fid"] > vae_fid:
        why.append(f"FID-style {run['fid']:.1f} > VAE {vae_fid:.1f}")
    aurocs = {**{k: run["final"][f"auroc_{k}"] for k in health.NOISE_KINDS}, **run["ood"]}
    low = {k: v for k, v in aurocs.items() if v < 0.9}
    if low:
        why.append("AUROC < 0.9: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(low.items())))
    return why


def crosses(value: float, direction: str, threshold: float) -> bool:
    return value < threshold if direction == "below" else value > threshold


def first_crossing(run: dict, figure: str, direction: str, threshold: float, warmup: int):
    return next((c["step"] for c in run["checks"] if c["step"] >= warmup
                 and crosses(c["figures"][figure], direction, threshold)), None)


def fit_thresholds(runs: list[dict], warmup: int) -> dict:
    """Per signal: the loosest candidate that flags no good run past the warm-up and the most bad
    runs by half their budget (none flagged: the tightest candidate, i.e. the signal stays quiet)."""
    fitted = {}
    for key, (figure, direction, candidates) in CANDIDATES.items():
        best = None
        for t in candidates:  # ordered from tight to loose for "below"
            false_alarms = sum(first_crossing(r, figure, direction, t, warmup) is not None for r in runs if r["good"])
            if false_alarms:
                continue
            caught = sum((s := first_crossing(r, figure, direction, t, warmup)) is not None and s <= r["half_step"]
                         for r in runs if not r["good"])
            if best is None or caught >= best[1]:
                best = (t, caught)
        fitted[key] = best[0] if best else candidates[0]
    return fitted


def judged(run: dict, hc) -> list[dict]:
    """The verdicts the trainer gives this run's checks, in order (health.judge)."""
    history: list[dict] = []
    for check in run["checks"]:
        figures = {k: v for k, v in check["figures"].items() if k != "min_auroc"}
        verdict, reasons, keys = health.judge(figures, {}, history, check["step"], hc,
                                              energy_trained=run["method"] != "vae")
        history.append({"step": check["step"], "verdict": verdict, "reasons": reasons, "keys": keys,
                        "figures": figures})
    return history


def first_signal(run: dict, hc) -> str:
    """Which signal crosses its threshold first (past the warm-up), and at which step."""
    firsts = []
    for key, (figure, direction, _) in CANDIDATES.items():
        step = first_crossing(run, figure, direction, getattr(hc, key), hc.warmup)
        if step is not None:
            firsts.append((step, figure))
    step = first_crossing(run, "hf_ratio", "above", hc.max_hf_ratio, hc.warmup)
    if step is not None:
        firsts.append((step, "hf_ratio (warning)"))
    return ", ".join(f"{name} at {step}" for step, name in sorted(firsts)) or "—"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [w for w in WATCHED if any(w in c["figures"] for r in runs for c in r["checks"])]
    fig, axes = plt.subplots(2, (len(shown) + 1) // 2, figsize=(4 * ((len(shown) + 1) // 2), 7))
    for ax, name in zip(axes.flat, shown):
        for r in runs:
            xs = [c["step"] for c in r["checks"] if name in c["figures"]]
            ys = [c["figures"][name] for c in r["checks"] if name in c["figures"]]
            style = "-" if r["method"] != "vae" else ":"
            ax.plot(xs, ys, style, color="tab:green" if r["good"] else "tab:red", linewidth=1,
                    label=r["name"])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if name == "energy_spread":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("health figures over training: green ends well, red ends badly (dotted: VAE)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_runs(study: dict, features: str) -> list[dict]:
    """The study's finished runs: how each ended, and its replayed checks."""
    runs = []
    for entry in study["runs"]:
        run_dir = Path(study["out"]) / entry["name"]
        result_path = run_dir / "study_result.json"
        if not result_path.is_file():
            print(f"{entry['name']}: not finished, left out", file=sys.stderr)
            continue
        result = json.loads(result_path.read_text())
        seed = next((int(m.group(1)) for o in entry.get("overrides", []) if (m := re.fullmatch(r"run\.seed=(\d+)", o))), 0)
        scalars = result["scalars"]
        runs.append({"name": entry["name"], "method": entry.get("method", entry["name"]), "seed": seed,
                     "fid": scalars["eval/fid"], "steps": result["steps"], "half_step": result["steps"] // 2,
                     "ood": {k[len("eval/auroc_"):]: v for k, v in scalars.items()
                             if k.startswith("eval/auroc_") and k != "eval/auroc_uniform"},
                     "last": health.verdict_of(run_dir), "restarts": sum(
                         r.get("event") == "restart" for r in health.read_records(run_dir)),
                     **replayed(run_dir, features)})
    return runs


def final_aurocs(run: dict) -> list[float]:
    return [run["final"][f"auroc_{k}"] for k in health.NOISE_KINDS] + list(run["ood"].values())


def remedies_table(defaults: list[dict], remedies: list[dict], vae_fid: float) -> list[str]:
    """Per method (the default and each remedy) on the remedies' seeds: runs ending well, the
    FID-style score and the lowest AUROC (mean, sd, range), and a row per run."""
    import statistics

    seeds = sorted({r["seed"] for r in remedies})
    groups = {"default": [r for r in defaults if r["seed"] in seeds]}
    for r in remedies:
        r["why"] = outcome(r, vae_fid)
        r["good"] = not r["why"]
        groups.setdefault(r["method"], []).append(r)

    def spread(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = [f"Seeds {seeds}, the same budget for every run.", "",
             "| method | runs ending well | FID-style | lowest AUROC (noise kinds, OOD) | restarts |",
             "|---|---|---|---|---|"]
    for method, group in groups.items():
        lines.append(f"| {method} | {sum(r['good'] for r in group)} / {len(group)} | "
                     f"{spread([r['fid'] for r in group])} | {spread([min(final_aurocs(r)) for r in group])} | "
                     f"{sum(r.get('restarts', 0) for r in group)} |")
    lines += ["", "| run | steps | FID-style | AUROC uniform / shaped / constant / blurred | OOD | ends | "
              "last check |", "|---|---|---|---|---|---|---|"]
    for method, group in groups.items():
        for r in sorted(group, key=lambda r: r["seed"]):
            aur = " / ".join(f"{r['final'][f'auroc_{k}']:.2f}" for k in health.NOISE_KINDS)
            ood = ", ".join(f"{k} {v:.2f}" for k, v in r["ood"].items()) or "—"
            ends = "well" if r["good"] else "badly: " + "; ".join(r["why"])
            lines.append(f"| {r['name']} | {r['steps']} | {r['fid']:.2f} | {aur} | {ood} | {ends} | "
                         f"{health.summary(r['last'])} |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="the study YAML file whose runs to replay")
    p.add_argument("--fit-seeds", default="0,1,2,3", help="seeds whose runs set the thresholds")
    p.add_argument("--out", default="docs/health_evidence.md")
    p.add_argument("--remedies", default="", help="a study of remedies on some of the same seeds to compare")
    args = p.parse_args(argv)
    study = load_study(Path(args.study))
    fit_seeds = {int(s) for s in args.fit_seeds.split(",") if s.strip()}
    features = study["eval"].get("features") or ""
    runs = load_runs(study, features)
    vaes = [r for r in runs if r["method"] == "vae"]
    if not vaes:
        print("error: no finished VAE run to compare with", file=sys.stderr)
        return 2
    vae_fid = sum(r["fid"] for r in vaes) / len(vaes)
    for r in runs:
        r["why"] = outcome(r, vae_fid)
        r["good"] = not r["why"]
    bidvl_runs = [r for r in runs if r["method"] != "vae"]
    fit = [r for r in bidvl_runs if r["seed"] in fit_seeds]
    held = [r for r in bidvl_runs if r["seed"] not in fit_seeds]
    defaults = HealthConfig()
    hc = dataclasses.replace(defaults, **fit_thresholds(fit, defaults.warmup))
    image = Path("docs/images/health_evidence/signals.png")
    plot(runs, image)
    lines = [
        "# Run health: the evidence behind the thresholds", "",
        f"Generated by `python launch/health_evidence.py --study {args.study} --fit-seeds {args.fit_seeds}` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine()}. Runs: "
        f"`{study['path']}` ({study['budget_minutes']:g} {study['budget_clock']}-clock minutes each, "
        f"checkpoints every 100 steps, each replayed with `bidvl.health.replay`).", "",
        f"A BiDVL run ends badly when its FID-style score (10k samples) is worse than the VAE runs' mean "
        f"({vae_fid:.2f}) or its AUROC against any noise kind (final export, {FINAL_IMAGES} probe images) "
        f"or OOD set is below 0.9. Thresholds fitted on seeds {sorted(fit_seeds)} at warm-up "
        f"{hc.warmup} steps: " + ", ".join(f"`health.{k}={getattr(hc, k):g}`" for k in CANDIDATES)
        + " (was: " + ", ".join(f"{getattr(defaults, k):g}" for k in CANDIDATES) + "). "
        "Flagged = an `unhealthy` verdict from `health.judge` with these thresholds; by half = at a check "
        "at or before half the run's steps.", "",
    ]
    for title, group in (("Fitted on", fit), ("Held out (judged with the fitted thresholds)", held), ("VAE", vaes)):
        if not group:
            continue
        lines += [f"## {title}", "",
                  "| run | steps | FID-style | AUROC uniform / shaped / constant / blurred | OOD | ends | "
                  "first unhealthy check | flagged by half | signals in order |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            verdicts = judged(r, hc)
            first = next((v["step"] for v in verdicts if v["verdict"] == "unhealthy"), None)
            by_half = first is not None and first <= r["half_step"]
            aur = " / ".join(f"{r['final'][f'auroc_{k}']:.2f}" for k in health.NOISE_KINDS)
            ood = ", ".join(f"{k} {v:.2f}" for k, v in r["ood"].items()) or "—"
            ends = "well" if r["good"] else "badly: " + "; ".join(r["why"])
            lines.append(f"| {r['name']} | {r['steps']} | {r['fid']:.2f} | {aur} | {ood} | {ends} | "
                         f"{first if first is not None else '—'} | {'yes' if by_half else 'no'} | "
                         f"{first_signal(r, hc)} |")
        lines.append("")
    lines += [f"![health figures over training]({Path('images/health_evidence/signals.png')})", ""]
    if args.remedies:
        remedies = load_runs(load_study(Path(args.remedies)), features)
        lines += ["## Opt-in stabilisers", "", f"`{args.remedies}` against the default runs of the same seeds.", "",
                  *remedies_table(bidvl_runs, remedies, vae_fid)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
