"""The report of a compute-scaling study: `launch/study.py` with `budgets` (see bidvl/study/__init__.py).

Every (run, budget) point in one table; the mean and spread of each method at each budget (runs of
one method are its seeds); against the method named `vae`, the gap per budget and its trend; and
one figure of the FID-style score, the test RMSE and the noise AUROC against training minutes.

The trend: the gap g (how much worse the method is than the VAE: FID or RMSE minus the VAE's,
the VAE's AUROC minus the method's) fitted by least squares as g = a + b ln(minutes). With
b < 0 < a it reaches zero at exp(-a / b) minutes: where the method would catch up if the trend held.
Three budgets make a crude line; the report says so next to it.

Like with like: a method's mean trend is fitted only through the budgets that all its runs reach
(extra seeds often stop at the first budget; a mean of three seeds at 10 minutes and of one at 90 is
a change of runs, not of minutes). When a method has several runs, each also gets its own row: its
value against the VAE's mean at each of its budgets, and its own trend. The figure draws every run
as its own line, and the means with their spread as points.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from bidvl.extras import require
from bidvl.study.config import Study, StudyError
from bidvl.study.report import (fmt, image_cells, metrics_note, ood_names, report_header,
                                write_keeping_findings)

REFERENCE = "vae"
# (scalar, label, lower is better)
METRICS = [("eval/fid", "FID-style score", True), ("eval/rmse", "test RMSE (batch stats)", True),
           ("eval/auroc_uniform", "AUROC vs uniform noise", False)]


def by_method(results: list[dict]) -> dict[str, dict[float, list[dict]]]:
    """{method: {budget: [results]}} in the study's order."""
    groups: dict[str, dict[float, list[dict]]] = {}
    for r in results:
        groups.setdefault(r["method"], {}).setdefault(float(r["budget_min"]), []).append(r)
    return {m: dict(sorted(b.items())) for m, b in groups.items()}


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def values(runs: list[dict], key: str) -> list[float]:
    return [r["scalars"][key] for r in runs if r["scalars"].get(key) is not None]


def run_curves(by_budget: dict[float, list[dict]], key: str) -> dict[str, list[tuple[float, float]]]:
    """{run name: [(minutes used, value), ...]} over the budgets each run reached."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for runs in by_budget.values():
        for r in runs:
            if r["scalars"].get(key) is not None:
                curves.setdefault(r["name"], []).append((r["budget_used_min"], r["scalars"][key]))
    return curves


def common_budgets(by_budget: dict[float, list[dict]]) -> list[float]:
    """The budgets that every run of the method reached."""
    names = {r["name"] for runs in by_budget.values() for r in runs}
    return [b for b, runs in by_budget.items() if {r["name"] for r in runs} == names]


def gap_rows(groups: dict, budgets: list[float], reference: str = REFERENCE) -> list[dict]:
    """The gap table, one dict per row: `method`, `run` ("mean" or a run's name), `label`, `cells`
    ({budget: (gap, n runs)}) and `trend` (the (minutes, gap) points the trend goes through).
    Gap: how much worse than the reference's mean at that budget (see the module docstring)."""
    ref, rows = groups[reference], []
    for method, by_budget in groups.items():
        if method == reference:
            continue
        common = set(common_budgets(by_budget))
        names = list(dict.fromkeys(r["name"] for runs in by_budget.values() for r in runs))
        for key, label, lower in METRICS:
            def gap(ours: float | None, budget: float) -> float | None:
                theirs = mean_sd(values(ref.get(budget, []), key))[0]
                if ours is None or theirs is None:
                    return None
                return ours - theirs if lower else theirs - ours

            cells = {}
            for budget in budgets:
                vals = values(by_budget.get(budget, []), key)
                g = gap(mean_sd(vals)[0], budget)
                if g is not None:
                    cells[budget] = (g, len(vals))
            rows.append({"method": method, "run": "mean", "label": label, "cells": cells,
                         "trend": [(b, g) for b, (g, _) in cells.items() if b in common]})
            if len(names) < 2:
                continue
            for name in names:
                cells = {}
                for budget in budgets:
                    vals = values([r for r in by_budget.get(budget, []) if r["name"] == name], key)
                    g = gap(vals[0] if vals else None, budget)
                    if g is not None:
                        cells[budget] = (g, 1)
                rows.append({"method": method, "run": name, "label": label, "cells": cells,
                             "trend": [(b, g) for b, (g, _) in cells.items()]})
    return rows


def gap_trend(points: list[tuple[float, float]]) -> tuple[float, float, float | None] | None:
    """Least-squares g = a + b ln(t) through (t, g) points; returns (a, b, t where g = 0 or None).
    The gap is positive where the method is behind, so it closes when b < 0; only then is a
    crossing given."""
    if len(points) < 2:
        return None
    xs, gs = [math.log(t) for t, _ in points], [g for _, g in points]
    mx, mg = statistics.fmean(xs), statistics.fmean(gs)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (g - mg) for x, g in zip(xs, gs)) / sxx
    a = mg - b * mx
    cross = math.exp(-a / b) if b < 0 and -a / b < 700 else None
    return a, b, cross


def trend_text(points: list[tuple[float, float]]) -> str:
    fit = gap_trend(points)
    if fit is None:
        return "—"
    a, b, cross = fit
    last = points[-1][1]
    if last < 0:
        return f"the method is ahead at {points[-1][0]:g} min"
    if last == 0:
        return f"level with the VAE at {points[-1][0]:g} min"
    per = f"{b:+.3g} per e-fold of minutes"
    if cross is None:
        return f"not closing ({per})"
    return f"closing ({per}); zero at ~{cross:,.0f} min"


def plot_scaling(groups: dict, budgets: list[float], path: Path) -> None:
    require("matplotlib", StudyError).use("Agg")  # the optional extra; named when missing
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.2 * len(METRICS), 4.2))
    for (key, label, lower), ax in zip(METRICS, axes):
        for i, (method, by_budget) in enumerate(groups.items()):
            color = f"C{i}"
            for run_name, points in run_curves(by_budget, key).items():
                ax.plot(*zip(*points), color=color, alpha=0.45, lw=1, marker=".", ms=5)
            xs, means, sds = [], [], []
            for runs in by_budget.values():
                vals = values(runs, key)
                if vals:
                    mean, sd = mean_sd(vals)
                    xs.append(statistics.fmean(r["budget_used_min"] for r in runs))
                    means.append(mean), sds.append(sd or 0.0)
            if xs:
                ax.errorbar(xs, means, yerr=sds, color=color, marker="o", ms=7, capsize=4, linestyle="none",
                            label=f"{method}: mean ± sd; lines: each run")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training minutes (budget clock)")
        ax.set_title(f"{label} ({'lower' if lower else 'higher'} is better)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_scaling_report(study: Study, results: list[dict]) -> Path:
    report = Path(study.report)
    images = report.parent / "images" / report.stem
    link = images.relative_to(report.parent).as_posix()  # the images as the report links them
    images.mkdir(parents=True, exist_ok=True)
    groups = by_method(results)
    plot_scaling(groups, study.budgets, images / "scaling.png")
    oods = ood_names(results)
    budgets = ", ".join(f"{b:g}" for b in study.budgets)
    lines = report_header(study, f"training budgets of **{budgets} min**")
    lines += ["Each run is evaluated at a budget, then resumed in its folder to the next: its point at a "
              "later budget is the run that budget alone would give (exact resume; the clock decides the "
              "last step).", ""]
    lines += ["## Every run at every budget", ""]
    head = ["method", "run", "budget (min)", "steps", "train min (budget clock / wall)",
            results[0]["fid_label"].split(" (")[0] or "FID", "test RMSE (batch stats)",
            "test RMSE (running stats)"] + [f"AUROC {n}" for n in oods]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_budget in groups.items():
        for budget, runs in by_budget.items():
            for r in runs:
                s = r["scalars"]
                row = [method, r["name"], f"{budget:g}", str(r["steps"]),
                       f"{r['budget_used_min']:.1f} / {r['train_wall_min']:.1f}", fmt(s.get("eval/fid")),
                       fmt(s.get("eval/rmse")), fmt(s.get("eval/rmse_running_stats"))]
                lines.append("| " + " | ".join(row + [fmt(s.get(f"eval/auroc_{n}")) for n in oods]) + " |")
    lines += ["", "## Mean and spread per method and budget", "",
              "Mean ± sample standard deviation over the method's runs (seeds) at that budget; n runs.", "",
              "| method | budget (min) | n | " + " | ".join(label for _, label, _ in METRICS) + " |",
              "|---|---|---|" + "---|" * len(METRICS)]
    for method, by_budget in groups.items():
        for budget, runs in by_budget.items():
            cells = []
            for key, _, _ in METRICS:
                mean, sd = mean_sd(values(runs, key))
                cells.append(fmt(mean) + ("" if sd is None else f" ± {sd:.2g}"))
            lines.append(f"| {method} | {budget:g} | {len(runs)} | " + " | ".join(cells) + " |")
    if REFERENCE in groups and len(groups) > 1:
        lines += ["", "## Against the VAE: the gap per budget and its trend", "",
                  "Gap: how much worse than the VAE's mean at that budget (FID-style and RMSE: the method's "
                  "minus the VAE's; AUROC: the VAE's minus the method's); in brackets, how many of the "
                  "method's runs the figure is the mean of. Trend: least squares gap = a + b ln(minutes); "
                  "where it is closing, the minutes at which the line reaches zero (an extrapolation "
                  "through few points, not a prediction). A method's `mean` trend goes only through the "
                  "budgets that all its runs reach; each run's row is that run alone.", "",
                  "| method | run | figure | " + " | ".join(f"gap at {b:g} min" for b in study.budgets)
                  + " | trend |", "|---|---|---|" + "---|" * len(study.budgets) + "---|"]
        for row in gap_rows(groups, study.budgets):
            cells = [("—" if b not in row["cells"] else f"{row['cells'][b][0]:+.4g}"
                      + (f" ({row['cells'][b][1]})" if row["run"] == "mean" else "")) for b in study.budgets]
            lines.append(f"| {row['method']} | {row['run']} | {row['label']} | " + " | ".join(cells)
                         + f" | {trend_text(row['trend'])} |")
    lines += ["", f"![figures against training minutes]({link}/scaling.png)", "", metrics_note(results), ""]
    lines += ["| run | budget (min) | samples | test images and reconstructions (pairs) |", "|---|---|---|---|"]
    for r in results:
        budget = f"{float(r['budget_min']):g}"
        cells = image_cells(Path(study.out) / r["name"], f"_{budget}min", images, link, f"{r['name']}_{budget}min")
        lines.append("| " + " | ".join([r["name"], budget, *cells]) + " |")
    return write_keeping_findings(report, lines)
