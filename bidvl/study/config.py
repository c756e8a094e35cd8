"""The study file, typed: Study, StudyRun and StudyEval declare every key with its type and default
(what each key means: the package docstring, bidvl/study/__init__.py), and load_study reads a file
into them as bidvl.config reads a run's config, through OmegaConf's structured configs, so a value
of the wrong type (`threads: abc`) is refused. Every error is a StudyError naming the file and key.

load_study resolves what the runner and the reports derive from the file once: `scaling` (a study
with `budgets`), the `budgets` every run trains to, `budget_minutes`, each run's `label` and
`method`, and `path` (the file read).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bidvl.config import SHIPPED_CONFIGS, path_or_shipped
from bidvl.errors import BidvlError


class StudyError(BidvlError, ValueError):
    """A study file is missing, unknown or impossible; the message names the file and key."""


@dataclass
class StudyEval:
    """`eval`: how every run's export is evaluated (launch/evaluate.py's options)."""

    num_samples: int = 10000  # generated samples for the FID-style score
    features: str = ""  # FID feature extractor: "" = Inception, or a classifier's .safetensors file
    fid_ref: str = "test"
    ood: List[str] = field(default_factory=list)  # shards folders: OOD AUROC against each
    batch_size: int = 500
    auto_build_ood: Dict[str, List[Any]] = field(default_factory=dict)  # folder -> [dataset, resolution]


@dataclass
class StudyRun:
    """One entry of `runs`. load_study resolves `label` and `method` (default: the name)."""

    name: str = ""  # the run's folder under `out`: letters, digits, _ . -
    label: Optional[str] = None
    overrides: List[str] = field(default_factory=list)
    budgets: Optional[List[float]] = None  # its own budgets (a study with `budgets` only); None: the study's
    method: Optional[str] = None  # runs of one method (its seeds) are one line and one mean +- sd


@dataclass
class Study:
    """A study file. `base`, `out`, `report` and `runs` are required; `scaling` and `path` are not
    keys of the file but what load_study derives."""

    base: str = MISSING  # the config file every run trains (a path or a shipped config's name)
    out: str = MISSING  # the runs' folders: OUT/NAME
    report: str = MISSING  # the Markdown report
    runs: List[StudyRun] = MISSING
    title: str = "Study"
    notes: str = ""
    budget_minutes: float = 10.0  # resolved: the budget of a study without `budgets`
    budgets: Optional[List[float]] = None  # resolved: always the list of budgets (one without `budgets`)
    budget_clock: str = "process"
    threads: int = 1  # per run's process (OMP_NUM_THREADS, MKL_NUM_THREADS)
    parallel: int = 1  # runs side by side
    common: List[str] = field(default_factory=list)  # overrides of every run
    eval: StudyEval = field(default_factory=StudyEval)
    scaling: bool = False  # derived: the study has `budgets` (and no --budget-minutes override)
    path: str = ""  # derived: the study file read

    def result_name(self, budget: float) -> str:
        """The result file of one run at one budget (see the package docstring)."""
        return f"study_result_{budget:g}min.json" if self.scaling else "study_result.json"

    def run_budgets(self, run: StudyRun) -> list[float]:
        """The budgets `run` trains to, one after the other."""
        return run.budgets if run.budgets is not None else self.budgets


DERIVED = {"scaling", "path"}
KEYS = {f.name for f in dataclasses.fields(Study)} - DERIVED
REQUIRED = [f.name for f in dataclasses.fields(Study) if f.default == MISSING]
RUN_KEYS = {f.name for f in dataclasses.fields(StudyRun)}
EVAL_KEYS = {f.name for f in dataclasses.fields(StudyEval)}
# Keys whose `null` in a file means the default (as they did when the study was a dict).
NULL_IS_DEFAULT = {"title", "notes"}
EVAL_NULL_IS_DEFAULT = {"features", "ood", "auto_build_ood"}
RUN_NULL_IS_DEFAULT = {"label", "method"}


def study_file(name: str | Path) -> Path:
    """A study file path, or the name of a shipped study (`fashion_mnist_health`) when no such file
    exists here."""
    # Here, not at the top: bidvl.config imports torch (the model registry), which the study's own
    # process does not need to read a study file.

    shipped = SHIPPED_CONFIGS / "studies"
    found = path_or_shipped(name, shipped)
    if found is None:
        raise StudyError(f"study file {name} does not exist (shipped studies, by name: "
                         f"{', '.join(sorted(p.stem for p in shipped.glob('*.yaml')))})")
    return found


def load_study(path: str | Path, budget_override: float | None = None) -> Study:
    """Reads and checks a study file (a path or a shipped study's name); `budget_override`
    (--budget-minutes) replaces budget_minutes. Raises StudyError naming the file and key."""
    path = study_file(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"{path}: not readable as YAML ({_first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping of study keys, not {type(raw).__name__}")
    unknown = set(raw) - KEYS
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                         f"expected {', '.join(sorted(KEYS))}")
    for key in REQUIRED:
        if key not in raw:
            raise StudyError(f"{path}: key {key!r} is missing")
    eval_raw = raw.get("eval", {})
    if not isinstance(eval_raw, dict):
        raise StudyError(f"{path}: eval={eval_raw!r}: expected a mapping of {', '.join(sorted(EVAL_KEYS))}")
    unknown = set(eval_raw) - EVAL_KEYS
    if unknown:
        raise StudyError(f"{path}: eval: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    runs_raw = raw["runs"]
    if not isinstance(runs_raw, list):
        raise StudyError(f"{path}: runs={runs_raw!r}: expected a list of runs ({{name, overrides, ...}})")
    for i, entry in enumerate(runs_raw):
        if not isinstance(entry, dict):
            raise StudyError(f"{path}: runs[{i}]={entry!r}: expected a mapping of "
                             f"{', '.join(sorted(RUN_KEYS))}")
        unknown = set(entry) - RUN_KEYS
        if unknown:
            raise StudyError(f"{path}: runs[{i}]: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                             f"expected {', '.join(sorted(RUN_KEYS))}")
    names = [r.get("name", "") for r in runs_raw]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise StudyError(f"{path}: runs[{i}].name={name!r}: expected letters, digits, _ . -")
    if len(set(names)) != len(names):
        raise StudyError(f"{path}: run names repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    # The budgets are checked on the file's values, so that the messages show them as written.
    if "budgets" in raw and "budget_minutes" in raw:
        raise StudyError(f"{path}: budget_minutes and budgets both given: expected one")
    scaling = "budgets" in raw and budget_override is None
    budget_minutes = budget_override if budget_override is not None else raw.get("budget_minutes", 10.0)
    budgets = _budgets(raw.get("budgets", [budget_minutes]), f"{path}: budgets")
    if not scaling:
        # With --budget-minutes on a study with `budgets`, its runs train to its first budget.
        budget_minutes = budgets[0]
    run_budgets = []
    for i, entry in enumerate(runs_raw):
        if "budgets" in entry:
            if not scaling:
                raise StudyError(f"{path}: runs[{i}].budgets: only in a study with `budgets`")
            run_budgets.append(_budgets(entry["budgets"], f"{path}: runs[{i}].budgets"))
        else:
            run_budgets.append(None)
    # The types, section by section, so that each error names its key from the top (runs[2].label).
    top = {k: v for k, v in raw.items() if not (v is None and k in NULL_IS_DEFAULT)}
    study = _typed(Study, {**top, "budget_minutes": budget_minutes, "budgets": budgets, "runs": [], "eval": {}},
                   path, "")
    study.eval = _typed(StudyEval, {k: v for k, v in eval_raw.items()
                                    if not (v is None and k in EVAL_NULL_IS_DEFAULT)}, path, "eval.")
    for i, (entry, own) in enumerate(zip(runs_raw, run_budgets)):
        run = _typed(StudyRun, {**{k: v for k, v in entry.items() if not (v is None and k in RUN_NULL_IS_DEFAULT)},
                                "budgets": own}, path, f"runs[{i}].")
        run.label = run.name if run.label is None else run.label
        run.method = run.name if run.method is None else run.method
        study.runs.append(run)
    study.scaling = scaling
    study.path = str(path)
    return study


def _typed(schema: type, values: dict, path: Path, prefix: str):
    """`values` as a `schema` dataclass, converted and type-checked by OmegaConf key by key, so that
    a StudyError names the file and the key (`prefix` + the key) of a value of the wrong type."""
    merged = OmegaConf.structured(schema)
    types = {f.name: f.type for f in dataclasses.fields(schema)}
    for key, value in values.items():
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create({key: _literal(value)}))
        except (OmegaConfBaseException, TypeError, ValueError):
            words = TYPE_WORDS.get(str(types[key]), f"a value of type {types[key]}")
            raise StudyError(f"{path}: {prefix}{key}={value!r}: expected {words}") from None
    try:
        return OmegaConf.to_object(merged)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise StudyError(f"{path}: {prefix}{key}: {_first_line(exc)}") from None


# How a type-check error says what a key takes (the dataclasses' annotations, as strings).
TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "Optional[str]": "a string",
              "List[str]": "a list of strings", "Optional[List[float]]": "a list of numbers (minutes)",
              "Dict[str, List[Any]]": "a mapping of folders to [dataset, resolution]"}


def _literal(value):
    """`value` with OmegaConf's interpolation `${...}` escaped: a study file's strings are read as
    written (overrides are passed on as they are), as yaml.safe_load reads them."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, list):
        return [_literal(v) for v in value]
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    return value


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


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
