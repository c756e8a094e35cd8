"""The study file (keys: the package docstring, bidvl/study/__init__.py): load_study reads and
checks it; StudyError names the file and key at fault."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from bidvl.errors import BidvlError

KEYS = {"base", "out", "report", "budget_minutes", "budgets", "budget_clock", "threads", "parallel",
        "common", "eval", "runs", "title", "notes"}
RUN_KEYS = {"name", "label", "overrides", "budgets", "method"}
EVAL_KEYS = {"num_samples", "features", "fid_ref", "ood", "batch_size", "auto_build_ood"}


class StudyError(BidvlError, ValueError):
    """A study file is missing, unknown or impossible; the message names the file and key."""


def study_file(name: str | Path) -> Path:
    """A study file path, or the name of a shipped study (`fashion_mnist_health`) when no such file
    exists here."""
    # Here, not at the top: bidvl.config imports torch (the model registry), which the study's own
    # process does not need to read a study file.
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
