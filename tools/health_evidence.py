"""The evidence behind the run-health thresholds (bidvl/health.py, docs/health.md).

    python launch/study.py --config configs/studies/fashion_mnist_health.yaml      # the runs (~1 h)
    python tools/health_evidence.py --study configs/studies/fashion_mnist_health.yaml --fit-seeds 0,1,2,3

For every run of the study it replays the health check on each kept checkpoint (`health.replay`:
the figures the training run computes at that step, here with the study's feature extractor, so
precision/recall/density/coverage and the small-n FID-style score are there too) and on the export
with 1000 probe images (the run's final AUROC against each kind of noise), and reads how the run
ended (study_result.json: the FID-style score on 10k samples, AUROC against uniform noise and the
OOD sets).

How a run ends, two ways:
- *strict* (the issue's bar): badly when its FID-style score is worse than the VAE runs' mean, or
  its AUROC against any noise kind or OOD set is below 0.9;
- *by failure mode*: `samples worse than the VAE` (FID-style above the VAE runs' mean: the texture
  collapse of docs/study_fashion_mnist_scaling.md) or `prefers noise` (an AUROC below 0.5: the
  energy ranks that noise above data).

A run is *caught* when the trainer's policy would act: `health.patience` unhealthy checks in a
row (`health.judge`, as in training). Thresholds are fitted on the runs of `--fit-seeds` only,
against the failure modes: per unhealthy-level signal, the candidates that catch no run ending
well (in its failure modes) and the most runs ending badly by half their budget; of those, the
middle one (on the candidates' scale), for margin on both sides. The runs of the other seeds are
judged with the fitted thresholds and reported separately; *flagged* (a warning or worse) is
reported beside *caught*. Because the energy's noise preference comes and goes, a section shows
each run's checks over time (which prefer some noise), how often that changes, the final snapshot
against the last three checks (*lasting* preference), and how alternative policy rules (k of the
last n checks) would have caught the lasting preference by half the budget, with their false
alarms. Replays are cached in OUT/NAME/health_replay.jsonl. Writes docs/health_evidence.md and a
figure of the signals.
"""

import argparse
import dataclasses
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from bidvl import health
from bidvl.run_dir import complete_checkpoints, step_of
from bidvl.config import HealthConfig
from bidvl.io import write_text
from bidvl.study import Study, load_study, machine

FINAL_IMAGES = 1000
CANDIDATES = {  # signal -> (figure, direction, candidate thresholds, tight to loose)
    "min_spread": ("spread", "below", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
    "min_nn_ratio": ("nn_ratio", "below", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]),
    "min_auroc": ("min_auroc", "below", [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5]),
    "min_energy_spread": ("energy_spread", "below", [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]),
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
    write_text(cache, "".join(json.dumps(x) + "\n" for x in lines))
    checks = sorted((x for x in lines if x["kind"] == "check"), key=lambda x: x["step"])
    for x in checks:
        x["figures"]["min_auroc"] = min_auroc(x["figures"])
    final = next(x for x in lines if x["kind"] == "final")
    return {"checks": checks, "final": final["figures"], "final_step": final["step"]}


def outcome(run: dict, vae_fid: float) -> dict:
    """Why a run ends badly, strictly and by failure mode ([] = it ends well)."""
    aurocs = {**{k: run["final"][f"auroc_{k}"] for k in health.NOISE_KINDS}, **run["ood"]}
    worse = [f"FID-style {run['fid']:.1f} > VAE {vae_fid:.1f}"] if run["fid"] > vae_fid else []
    below = lambda t: {k: v for k, v in sorted(aurocs.items()) if v < t}  # noqa: E731
    strict = worse + (["AUROC < 0.9: " + ", ".join(f"{k} {v:.2f}" for k, v in below(0.9).items())]
                      if below(0.9) else [])
    modes = (["samples worse than the VAE"] if worse else []) + (
        ["prefers noise: " + ", ".join(f"{k} {v:.2f}" for k, v in below(0.5).items())] if below(0.5) else [])
    return {"strict": strict, "modes": modes}


def crosses(value: float, direction: str, threshold: float) -> bool:
    return value < threshold if direction == "below" else value > threshold


def first_crossing(run: dict, figure: str, direction: str, threshold: float, warmup: int):
    return next((c["step"] for c in run["checks"] if c["step"] >= warmup
                 and crosses(c["figures"][figure], direction, threshold)), None)


def caught_at(run: dict, figure: str, direction: str, threshold: float, warmup: int, patience: int):
    """The step at which `patience` checks in a row (past the warm-up) crossed the threshold."""
    streak = 0
    for c in run["checks"]:
        streak = streak + 1 if c["step"] >= warmup and crosses(c["figures"][figure], direction, threshold) else 0
        if streak >= patience:
            return c["step"]
    return None


def fit_thresholds(runs: list[dict], hc) -> dict:
    """Per signal (see the module docstring): of the candidates that catch no run ending well and
    the most runs ending badly by half their budget, the middle one."""
    fitted = {}
    for key, (figure, direction, candidates) in CANDIDATES.items():
        scored = []
        for t in candidates:
            at = {r["name"]: caught_at(r, figure, direction, t, hc.warmup, hc.patience) for r in runs}
            if any(at[r["name"]] is not None for r in runs if not r["why"]["modes"]):
                continue  # a false alarm
            scored.append((sum(at[r["name"]] is not None and at[r["name"]] <= r["half_step"]
                               for r in runs if r["why"]["modes"]), t))
        if not scored:
            fitted[key] = candidates[0]
            continue
        best = max(caught for caught, _ in scored)
        feasible = [t for caught, t in scored if caught == best]
        fitted[key] = feasible[(len(feasible) - 1) // 2]
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


def policy_step(verdicts: list[dict], patience: int):
    """The step at which `patience` unhealthy verdicts in a row make the policy act, or None."""
    streak = 0
    for v in verdicts:
        streak = streak + 1 if v["verdict"] == "unhealthy" else 0
        if streak >= patience:
            return v["step"]
    return None


def flagged_at(verdicts: list[dict]):
    """The first check whose verdict is not healthy (a warning or worse), or None."""
    return next((v["step"] for v in verdicts if v["verdict"] != "healthy"), None)


def prefers_noise(figures: dict) -> bool:
    """The energy ranks some noise kind above data at this check: an AUROC below 0.5."""
    return min_auroc(figures) < 0.5


def noise_timeline(run: dict, hc) -> list[bool]:
    """Per check past the warm-up (in order, the last kept checkpoint last): does it prefer noise?"""
    return [prefers_noise(c["figures"]) for c in run["checks"] if c["step"] >= hc.warmup]


def lasting_noise(run: dict, hc) -> bool:
    """A lasting preference for noise: most of the last three checks prefer noise (a judgement of
    how the run ends that one snapshot of an oscillating energy does not give)."""
    return sum(noise_timeline(run, hc)[-3:]) >= 2


def k_of_n_at(flags: list[tuple[int, bool]], k: int, n: int, warmup: int):
    """The step at which `k` of the last `n` flagged checks (past the warm-up) first hold, or None."""
    window: list[bool] = []
    for step, flag in flags:
        if step < warmup:
            continue
        window = (window + [flag])[-n:]
        if sum(window) >= k:
            return step
    return None


def intermittency_table(group: list[dict], hc) -> list[str]:
    """Per BiDVL run: its checks' noise preference over time (N: some AUROC below 0.5), how often
    that changes, the final snapshot against the last three checks, and the first half's count."""
    lines = ["| run | checks from step " + str(hc.warmup) + " (N: prefers some noise) | changes | "
             "checks up to half preferring noise | last 3 checks | final export | lasting preference |",
             "|---|---|---|---|---|---|---|"]
    for r in group:
        tl = noise_timeline(r, hc)
        first_half = [prefers_noise(c["figures"]) for c in r["checks"] if hc.warmup <= c["step"] <= r["half_step"]]
        lines.append(f"| {r['name']} | `{''.join('N' if x else '.' for x in tl)}` | "
                     f"{sum(a != b for a, b in zip(tl, tl[1:]))} | {sum(first_half)} of {len(first_half)} | "
                     f"{sum(tl[-3:])} of {len(tl[-3:])} | {'N' if prefers_noise(r['final']) else '.'} | "
                     f"{'yes' if lasting_noise(r, hc) else 'no'} |")
    return lines + [""]


def rules_table(group: list[dict], hc) -> list[str]:
    """Alternative policy rules on every BiDVL run: of the runs ending with a lasting preference for
    noise, how many each rule catches by half their budget; of the others, how many it flags at all
    (before their end, a false alarm against that failure mode)."""
    rules = [
        (f"{hc.patience} unhealthy checks in a row (the policy)", lambda r, v: policy_step(v, hc.patience)),
        ("2 of the last 3 checks unhealthy",
         lambda r, v: k_of_n_at([(x["step"], x["verdict"] == "unhealthy") for x in v], 2, 3, hc.warmup)),
        ("2 of the last 3 checks prefer noise (AUROC < 0.5)",
         lambda r, v: k_of_n_at([(c["step"], prefers_noise(c["figures"])) for c in r["checks"]], 2, 3, hc.warmup)),
        ("a warning or worse (any check)", lambda r, v: flagged_at(v)),
    ]
    lasting = [r for r in group if lasting_noise(r, hc)]
    others = [r for r in group if not lasting_noise(r, hc)]
    lines = [f"Runs ending with a lasting preference for noise: {', '.join(r['name'] for r in lasting) or 'none'}; "
             f"the others: {', '.join(r['name'] for r in others) or 'none'}.", "",
             "| rule | lasting preference caught by half their budget | others flagged (false alarms) |",
             "|---|---|---|"]
    for name, at in rules:
        caught = [r["name"] for r in lasting if (s := at(r, judged(r, hc))) is not None and s <= r["half_step"]]
        false = [r["name"] for r in others if at(r, judged(r, hc)) is not None]
        lines.append(f"| {name} | {len(caught)} of {len(lasting)} ({', '.join(caught) or '—'}) | "
                     f"{len(false)} of {len(others)} ({', '.join(false) or '—'}) |")
    return lines + [""]


def first_signals(run: dict, hc) -> str:
    """Each signal's first crossing of its threshold past the warm-up (one check), in order."""
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
            color = "tab:gray" if r["method"] == "vae" else "tab:red" if r["why"]["modes"] else "tab:green"
            ax.plot(xs, ys, style, color=color, linewidth=1,
                    label=r["name"])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        if name == "energy_spread":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("health figures over training: BiDVL ending badly by failure mode red, well green; VAE grey, dotted", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_runs(study: Study, features: str) -> list[dict]:
    """The study's finished runs: how each ended, and its replayed checks."""
    runs = []
    for entry in study.runs:
        run_dir = Path(study.out) / entry.name
        result_path = run_dir / "study_result.json"
        if not result_path.is_file():
            print(f"{entry.name}: not finished, left out", file=sys.stderr)
            continue
        result = json.loads(result_path.read_text())
        seed = next((int(m.group(1)) for o in entry.overrides if (m := re.fullmatch(r"run\.seed=(\d+)", o))), 0)
        scalars = result["scalars"]
        runs.append({"name": entry.name, "method": entry.method, "seed": seed,
                     "fid": scalars["eval/fid"], "steps": result["steps"], "half_step": result["steps"] // 2,
                     "ood": {k[len("eval/auroc_"):]: v for k, v in scalars.items()
                             if k.startswith("eval/auroc_") and k != "eval/auroc_uniform"},
                     "last": health.verdict_of(run_dir), "restarts": sum(
                         r.get("event") == "restart" for r in health.read_records(run_dir)),
                     **replayed(run_dir, features)})
    return runs


def final_aurocs(run: dict) -> list[float]:
    return [run["final"][f"auroc_{k}"] for k in health.NOISE_KINDS] + list(run["ood"].values())


def ends(why: list[str]) -> str:
    return "well" if not why else "badly: " + "; ".join(why)


def aurocs_cell(run: dict) -> str:
    return " / ".join(f"{run['final'][f'auroc_{k}']:.2f}" for k in health.NOISE_KINDS)


def ood_cell(run: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in run["ood"].items()) or "—"


def runs_table(group: list[dict], hc) -> list[str]:
    """A row per run: how it ended (both ways), when the policy would act, the signals in order."""
    lines = ["| run | steps | FID-style | AUROC uniform / shaped / constant / blurred | OOD | ends (strict) | "
             "ends (failure modes) | first flagged (warning or worse) | first unhealthy check | caught at (patience) | "
             "caught by half | signals in order (one check each) |", "|" + "---|" * 12]
    for r in group:
        verdicts = judged(r, hc)
        first = next((v["step"] for v in verdicts if v["verdict"] == "unhealthy"), None)
        caught = policy_step(verdicts, hc.patience)
        by_half = caught is not None and caught <= r["half_step"]
        lines.append(f"| {r['name']} | {r['steps']} | {r['fid']:.2f} | {aurocs_cell(r)} | {ood_cell(r)} | "
                     f"{ends(r['why']['strict'])} | {ends(r['why']['modes'])} | "
                     f"{flagged_at(verdicts) if flagged_at(verdicts) is not None else '—'} | "
                     f"{first if first is not None else '—'} | {caught if caught is not None else '—'} | "
                     f"{'yes' if by_half else 'no'} (half: {r['half_step']}) | {first_signals(r, hc)} |")
    return lines + [""]


def scorecard(group: list[dict], hc) -> str:
    """One sentence: how many runs ending badly were caught by half, how many ending well were caught."""
    rows = []
    for key in ("strict", "modes"):
        bad = [r for r in group if r["why"][key]]
        good = [r for r in group if not r["why"][key]]
        caught = {r["name"]: policy_step(judged(r, hc), hc.patience) for r in group}
        flagged = {r["name"]: flagged_at(judged(r, hc)) for r in group}
        by_half = lambda at, r: at[r["name"]] is not None and at[r["name"]] <= r["half_step"]  # noqa: E731
        rows.append(f"{'strict' if key == 'strict' else 'by failure mode'}: "
                    f"{sum(by_half(caught, r) for r in bad)} of {len(bad)} ending badly caught by half their "
                    f"budget ({sum(by_half(flagged, r) for r in bad)} flagged, a warning or worse), "
                    f"{sum(caught[r['name']] is not None for r in good)} of {len(good)} ending well caught "
                    f"({sum(flagged[r['name']] is not None for r in good)} flagged)")
    return "; ".join(rows) + "."


def remedies_table(defaults: list[dict], remedies: list[dict], vae_fid: float) -> list[str]:
    """Per method (the default and each remedy) on the remedies' seeds: runs ending well (both
    ways), the FID-style score and the lowest AUROC (mean, sd, range), and a row per run."""
    import statistics

    seeds = sorted({r["seed"] for r in remedies})
    groups = {"default": [r for r in defaults if r["seed"] in seeds]}
    for r in remedies:
        r["why"] = outcome(r, vae_fid)
        groups.setdefault(r["method"], []).append(r)

    def spread(values):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f} ({min(values):.2f}–{max(values):.2f})"

    lines = [f"Seeds {seeds}, the same budget for every run.", "",
             "| method | runs ending well (strict / failure modes) | FID-style | lowest AUROC (noise kinds, OOD) |",
             "|---|---|---|---|"]
    for method, group in groups.items():
        lines.append(f"| {method} | {sum(not r['why']['strict'] for r in group)} / "
                     f"{sum(not r['why']['modes'] for r in group)} of {len(group)} | "
                     f"{spread([r['fid'] for r in group])} | {spread([min(final_aurocs(r)) for r in group])} |")
    lines += ["", "| run | steps | FID-style | AUROC uniform / shaped / constant / blurred | OOD | ends (failure modes) | "
              "restarts | last check |", "|---|---|---|---|---|---|---|---|"]
    for method, group in groups.items():
        for r in sorted(group, key=lambda r: r["seed"]):
            lines.append(f"| {r['name']} | {r['steps']} | {r['fid']:.2f} | {aurocs_cell(r)} | {ood_cell(r)} | "
                         f"{ends(r['why']['modes'])} | {r['restarts']} | {health.summary(r['last'])} |")
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
    features = study.eval.features
    runs = load_runs(study, features)
    vaes = [r for r in runs if r["method"] == "vae"]
    if not vaes:
        print("error: no finished VAE run to compare with", file=sys.stderr)
        return 2
    vae_fid = sum(r["fid"] for r in vaes) / len(vaes)
    for r in runs:
        r["why"] = outcome(r, vae_fid)
    bidvl_runs = [r for r in runs if r["method"] != "vae"]
    fit = [r for r in bidvl_runs if r["seed"] in fit_seeds]
    held = [r for r in bidvl_runs if r["seed"] not in fit_seeds]
    defaults = HealthConfig()
    hc = dataclasses.replace(defaults, **fit_thresholds(fit, defaults))
    image = Path("docs/images/health_evidence/signals.png")
    plot(runs, image)
    lines = [
        "# Run health: the evidence behind the thresholds", "",
        f"Generated by `python tools/health_evidence.py --study {args.study} --fit-seeds {args.fit_seeds}"
        + (f" --remedies {args.remedies}" if args.remedies else "") + "` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; machine: {machine()}. Runs: "
        f"`{study.path}` ({study.budget_minutes:g} {study.budget_clock}-clock minutes each, "
        f"checkpoints every 100 steps, each replayed with `bidvl.health.replay`; final AUROCs on the export "
        f"with {FINAL_IMAGES} probe images). The VAE runs' mean FID-style score: {vae_fid:.2f}.", "",
        "How a run ends: *strict*, badly when its FID-style score is worse than the VAE's or any AUROC "
        "(noise kinds, OOD sets) is below 0.9; *by failure mode*, badly when its samples are worse than "
        "the VAE's or it prefers some noise to data (an AUROC below 0.5). *Caught*: "
        f"`health.patience={hc.patience}` unhealthy checks in a row, when `health.on_unhealthy` acts. "
        f"Thresholds fitted on seeds {sorted(fit_seeds)} against the failure modes, warm-up {hc.warmup} steps: "
        + ", ".join(f"`health.{k}={getattr(hc, k):g}`" for k in CANDIDATES)
        + " (the defaults before: " + ", ".join(f"{getattr(defaults, k):g}" for k in CANDIDATES) + ").", "",
    ]
    for title, group in (("Fitted on", fit), ("Held out (judged with the fitted thresholds)", held)):
        if group:
            lines += [f"## {title}", "", scorecard(group, hc), "", *runs_table(group, hc)]
    if vaes:
        lines += ["## VAE (scored by its ELBO; a low AUROC is a warning only)", "", *runs_table(vaes, hc)]
    lines += [f"![health figures over training]({Path('images/health_evidence/signals.png')})", ""]
    lines += ["## Is a preference for noise lasting?", "",
              "The final AUROCs are one snapshot. Over the checks the energy's ranking of noise against data "
              "changes sign again and again; *lasting* below means that most of the last three checks prefer "
              "some noise kind (an AUROC below 0.5).", "", *intermittency_table(bidvl_runs, hc),
              "Policy rules against the lasting preference (all BiDVL runs; the thresholds above):", "",
              *rules_table(bidvl_runs, hc)]
    if args.remedies:
        remedies = load_runs(load_study(Path(args.remedies)), features)
        lines += ["## Opt-in stabilisers", "", f"`{args.remedies}` against the default runs of the same seeds.", "",
                  *remedies_table(bidvl_runs, remedies, vae_fid)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
