"""The study runner (launch/study.py) and the feature classifier script, on tiny digits runs."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ENV, REPO, TINY
from bidvl.health import verdict_of
from bidvl.study import Study, StudyError, load_study
from bidvl.study.config import StudyEval, StudyRun
from bidvl.study.report import health_cell


def run(args, timeout=600):
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def features(tmp_path_factory, digits16):
    out = tmp_path_factory.mktemp("features") / "digits_classifier.safetensors"
    p = run(["launch/train_feature_classifier.py", "--shards", str(digits16), "--out", str(out),
             "--epochs", "3", "--widths", "8,16,16", "--batch-size", "64"])
    assert p.returncode == 0, p.stderr[-3000:]
    figures = json.loads(p.stdout.strip().splitlines()[-1])
    assert figures["test_images"] == 360 and figures["train_images"] == 1437
    assert figures["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    return out


def test_classifier_features_load_and_refuse_other_shapes(features):
    import torch

    from bidvl.evaluation import EvalError
    from bidvl.evaluation.fid import ClassifierFeatures, feature_extractor

    extractor = feature_extractor(str(features))
    assert isinstance(extractor, ClassifierFeatures)
    assert extractor(torch.zeros(3, 1, 16, 16)).shape == (3, 16)
    with pytest.raises(EvalError, match="1-channel 16 px"):
        extractor(torch.zeros(2, 1, 32, 32))


@pytest.mark.process
def test_feature_script_refuses_unlabelled_or_bad_output(tmp_path, digits16):
    p = run(["launch/train_feature_classifier.py", "--shards", str(digits16), "--out", str(tmp_path / "x.pt")])
    assert p.returncode == 2 and "--out" in p.stderr


@pytest.mark.slow
def test_study_runs_evaluates_reports_and_skips_finished_runs(tmp_path, digits16, features):
    study = {
        "title": "tiny study", "base": str(REPO / "configs/digits.yaml"), "out": str(tmp_path / "runs"),
        "report": str(tmp_path / "docs" / "study.md"), "budget_minutes": 0.01, "parallel": 2,
        "common": [*TINY, f"data.train={digits16}", "train.max_steps=100000", "eval.every=3",
                   "eval.metrics=rmse,ood", "eval.max_test=64", "checkpoint.every=5", "health.every=2"],
        "eval": {"num_samples": 200, "features": str(features), "batch_size": 100,
                 "ood": [str(tmp_path / "ood")], "auto_build_ood": {str(tmp_path / "ood"): ["digits", 16]}},
        "runs": [{"name": "bidvl_offset", "overrides": []},
                 {"name": "vae", "overrides": ["objective.name=vae"]},
                 {"name": "divergence_triangle", "overrides": ["objective.name=divergence_triangle",
                                                               "objective.w_latent=0.1"]}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    report = (tmp_path / "docs" / "study.md").read_text()
    assert_images_resolve(tmp_path / "docs" / "study.md", at_least=7)
    for name in ("bidvl_offset", "vae", "divergence_triangle"):
        result = json.loads((tmp_path / "runs" / name / "study_result.json").read_text())
        assert result["steps"] > 0 and result["budget_used_min"] >= 0.01
        assert {"eval/fid", "eval/rmse", "eval/auroc_uniform", "eval/auroc_ood"} <= set(result["scalars"])
        assert f"| {name} |" in report
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith(f" | {health_cell(tmp_path / 'runs' / name)} |")  # the run's last check
        assert verdict_of(tmp_path / "runs" / name)["verdict"] in row
        assert (tmp_path / "docs/images/study" / f"{name}_samples.png").is_file()
    vae = json.loads((tmp_path / "runs/vae/study_result.json").read_text())
    assert vae["ood_score"].startswith("ELBO")
    assert (tmp_path / "docs/images/study/curves.png").stat().st_size > 10_000
    # Hand-written findings after the marker survive a rewrite; finished runs are skipped.
    (tmp_path / "docs/study.md").write_text(report + "\n## Findings\nkept text\n")
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("finished earlier: skipped") == 3
    assert "kept text" in (tmp_path / "docs/study.md").read_text()


@pytest.mark.process
def test_study_file_errors_name_the_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md", "runs": [{"name": "a b"}]}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "runs[0].name" in p.stderr
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md", "runs": [], "budget": 3}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "unknown key(s) budget" in p.stderr
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md", "runs": [], "budgets": [30, 10]}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "budgets=[30, 10]: expected minutes > 0 in increasing order" in p.stderr
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md", "runs": [],
                                    "budgets": [10], "budget_minutes": 10}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "budget_minutes and budgets both given" in p.stderr
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md",
                                    "runs": [{"name": "a", "budgets": [5]}]}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "runs[0].budgets: only in a study with `budgets`" in p.stderr
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md", "runs": [{"name": "a", "seed": 1}]}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "runs[0]: unknown key(s) seed" in p.stderr


def write_study(tmp_path, **keys) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "digits", "out": "o", "report": "r.md", "runs": [{"name": "a"}], **keys}))
    return path


def test_a_study_file_loads_typed_with_its_derived_values(tmp_path):
    path = write_study(tmp_path, budgets=[10, 30, 90], threads="2", common=["train.batch_size=8"],
                       eval={"num_samples": 200, "ood": ["shards/x"], "auto_build_ood": {"shards/x": ["digits", 16]}},
                       runs=[{"name": "vae", "overrides": ["objective.name=vae"]},
                             {"name": "vae_seed1", "method": "vae", "label": "VAE, seed 1", "budgets": [10]}])
    study = load_study(path)
    assert isinstance(study, Study) and isinstance(study.eval, StudyEval)
    assert all(isinstance(run, StudyRun) for run in study.runs)
    assert study.scaling and study.budgets == [10.0, 30.0, 90.0] and study.path == str(path)
    assert study.threads == 2 and study.parallel == 1 and study.budget_clock == "process"
    assert study.common == ["train.batch_size=8"] and study.title == "Study"
    assert study.eval.num_samples == 200 and study.eval.fid_ref == "test" and study.eval.features == ""
    assert study.eval.auto_build_ood == {"shards/x": ["digits", 16]}
    vae, seed1 = study.runs
    assert (vae.label, vae.method, vae.overrides) == ("vae", "vae", ["objective.name=vae"])
    assert (seed1.label, seed1.method) == ("VAE, seed 1", "vae")
    assert study.run_budgets(vae) == [10.0, 30.0, 90.0] and study.run_budgets(seed1) == [10.0]
    assert study.result_name(30.0) == "study_result_30min.json"
    # One budget: budget_minutes (default 10); --budget-minutes replaces it.
    plain = load_study(write_study(tmp_path, budget_minutes=5, eval={"ood": None, "features": None}))
    assert not plain.scaling and plain.budgets == [5.0] and plain.budget_minutes == 5.0
    assert plain.result_name(5.0) == "study_result.json" and plain.eval.ood == []
    assert load_study(write_study(tmp_path)).budgets == [10.0]
    assert load_study(path.parent / "s.yaml", budget_override=2.5).budgets == [2.5]
    assert load_study("fashion_mnist_scaling").scaling  # a shipped study, by name


@pytest.mark.parametrize("keys, message", [
    ({"budget": 3}, "unknown key(s) budget; expected base, budget_clock"),
    ({"runs": [{"name": "a", "seed": 1}]}, "runs[0]: unknown key(s) seed; expected budgets, label"),
    ({"eval": {"fid": 1}}, "eval: unknown key(s) fid"),
    ({"runs": [{"name": "a b"}]}, "runs[0].name='a b': expected letters, digits, _ . -"),
    ({"runs": [{"overrides": []}]}, "runs[0].name='': expected letters, digits, _ . -"),
    ({"runs": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}, "run names repeat: a"),
    ({"budgets": [10], "budget_minutes": 10}, "budget_minutes and budgets both given: expected one"),
    ({"budgets": [30, 10]}, "budgets=[30, 10]: expected minutes > 0 in increasing order"),
    ({"budgets": 30}, "budgets=30: expected a list of minutes, e.g. [10, 30, 90]"),
    ({"budgets": ["ten"]}, "budgets=['ten']: expected numbers (minutes)"),
    ({"budget_minutes": 0}, "budgets=[0]: expected minutes > 0 in increasing order"),
    ({"runs": [{"name": "a", "budgets": [5]}]}, "runs[0].budgets: only in a study with `budgets`"),
    ({"budgets": [5, 10], "runs": [{"name": "a", "budgets": [10, 5]}]},
     "runs[0].budgets=[10, 5]: expected minutes > 0 in increasing order"),
    ({"threads": "abc"}, "threads='abc': expected an integer"),
    ({"parallel": 1.5}, "parallel=1.5: expected an integer"),
    ({"common": "train.max_steps=5"}, "common='train.max_steps=5': expected a list of strings"),
    ({"eval": {"num_samples": "many"}}, "eval.num_samples='many': expected an integer"),
    ({"runs": [{"name": "a", "overrides": "x=1"}]}, "runs[0].overrides='x=1': expected a list of strings"),
    ({"runs": [{"name": "a"}, {"name": "b", "label": [1]}]}, "runs[1].label=[1]: expected a string"),
    ({"runs": 5}, "runs=5: expected a list of runs"),
    ({"eval": [1]}, "eval=[1]: expected a mapping of"),
])
def test_each_refusal_of_a_study_file_names_the_file_and_key(tmp_path, keys, message):
    path = write_study(tmp_path, **keys)
    with pytest.raises(StudyError) as caught:
        load_study(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)


def test_a_study_file_without_a_key_or_not_a_mapping_of_keys_is_refused(tmp_path):
    path = tmp_path / "s.yaml"
    for text, message in (("out: o\nreport: r.md\nruns: []\n", "key 'base' is missing"),
                          ("base: digits\nout: o\nreport: r.md\n", "key 'runs' is missing"),
                          ("runs: [\n", "not readable as YAML"), ("- 1\n", "expected a mapping of study keys")):
        path.write_text(text)
        with pytest.raises(StudyError, match=re.escape(f"{path}: {message}")):
            load_study(path)
    with pytest.raises(StudyError, match="study file nosuch does not exist"):
        load_study("nosuch")


def test_a_study_file_is_read_as_written(tmp_path):
    """Overrides are passed on as they are: OmegaConf's `${...}` is not resolved in a study file."""
    path = write_study(tmp_path, runs=[{"name": "a", "overrides": ["run.dir=${HOME}/x", "data.train=???"]}])
    assert load_study(path).runs[0].overrides == ["run.dir=${HOME}/x", "data.train=???"]


STUDY_MODULES = ["config", "report", "scaling", "runner", "stages"]


@pytest.mark.process
@pytest.mark.parametrize("module", [*STUDY_MODULES, "__init__"])
def test_each_study_module_imports_on_its_own(module):
    name = "bidvl.study" if module == "__init__" else f"bidvl.study.{module}"
    p = subprocess.run([sys.executable, "-c", f"import {name}"], env=ENV, capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]


def test_no_import_cycle_inside_the_study_package():
    """config <- report <- scaling <- runner: only the runner (and the package's __init__) imports
    the runner; config imports no other study module."""
    import ast

    import bidvl.study

    folder = Path(bidvl.study.__file__).parent
    imports = {}
    for module in STUDY_MODULES:
        tree = ast.parse((folder / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names.add(("." * node.level) + (node.module or ""))
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        imports[module] = {n for n in names if n.startswith("bidvl.study") or n.startswith(".")}
    for module in ("config", "report", "scaling", "stages"):
        assert not any(n in ("bidvl.study.runner", ".runner", "bidvl.study", ".") for n in imports[module]), module
    assert imports["config"] == set() and imports["stages"] == set()
    assert imports["report"] == {"bidvl.study.config"}
    assert imports["scaling"] == {"bidvl.study.config", "bidvl.study.report"}


def assert_images_resolve(report: Path, at_least: int) -> None:
    """Every image the report shows is a file at the path it links (relative to the report)."""
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert len(links) >= at_least
    assert [link for link in links if not (report.parent / link).is_file()] == []


def test_gap_trend_finds_where_a_closing_gap_reaches_zero():
    from bidvl.study.scaling import gap_trend, trend_text

    a, b, cross = gap_trend([(10, 4.0), (30, 2.0), (90, 0.5)])
    assert b < 0 < a and cross == pytest.approx(math.exp(-a / b))
    assert 90 < cross < 200  # 4 -> 2 -> 0.5 per factor 3: zero a little after 90
    assert gap_trend([(10, 1.0), (100, 1.0 + 2 * math.log(10))])[:2] == pytest.approx((1 - 2 * math.log(10), 2.0))
    assert gap_trend([(10, 1.0), (100, 3.0)])[2] is None  # widening: no crossing
    assert gap_trend([(10, 1.0)]) is None
    assert trend_text([(10, 1.0), (100, 3.0)]).startswith("not closing")
    assert trend_text([(10, 1.0), (100, -0.5)]) == "the method is ahead at 100 min"
    assert trend_text([(10, 0.03), (30, 0.0)]) == "level with the VAE at 30 min"  # e.g. both AUROC 1
    assert "zero at ~" in trend_text([(10, 4.0), (30, 2.0), (90, 0.5)])


def test_gap_rows_fit_a_method_mean_only_through_budgets_all_its_runs_reach():
    """Three seeds at 10 minutes and one at 10, 30, 90: the mean's trend must not read the change of
    runs between 10 and 30 minutes as a change with minutes; each run gets its own row and trend."""
    from bidvl.study.scaling import by_method, gap_rows

    def point(name, method, budget, fid, rmse=0.2, auroc=1.0):
        return {"name": name, "method": method, "budget_min": budget, "budget_used_min": budget,
                "scalars": {"eval/fid": fid, "eval/rmse": rmse, "eval/auroc_uniform": auroc}}

    results = [point("b", "b", 10, 24), point("b", "b", 30, 24), point("b", "b", 90, 30),
               point("b1", "b", 10, 9), point("b2", "b", 10, 6),
               point("vae", "vae", 10, 14), point("vae", "vae", 30, 12), point("vae", "vae", 90, 10),
               point("vae1", "vae", 10, 12)]
    rows = [r for r in gap_rows(by_method(results), [10, 30, 90]) if r["label"] == "FID-style score"]
    assert [r["run"] for r in rows] == ["mean", "b", "b1", "b2"]
    mean, b, b1, _ = rows
    assert mean["cells"] == {10: (pytest.approx(13 - 13), 3), 30: (12, 1), 90: (20, 1)}
    assert mean["trend"] == [(10, pytest.approx(0))]  # only 10 min holds all three runs
    assert b["cells"] == {10: (11, 1), 30: (12, 1), 90: (20, 1)} and len(b["trend"]) == 3
    assert b1["cells"] == {10: (-4, 1)} and b1["trend"] == [(10, -4)]
    auroc = [r for r in gap_rows(by_method(results), [10, 30, 90]) if r["label"] == "AUROC vs uniform noise"]
    assert auroc[0]["cells"][10] == (0.0, 3)  # the VAE's minus the method's


@pytest.mark.slow
def test_scaling_study_resumes_each_run_from_budget_to_budget(tmp_path, digits16, features):
    """`budgets`: each run trains to the first budget, is evaluated, then resumes in its folder to
    the next; extra seeds at the first budget only are one method with their seed-0 run."""
    budgets = [0.01, 0.03]
    study = {
        "title": "tiny scaling", "base": str(REPO / "configs/digits.yaml"), "out": str(tmp_path / "runs"),
        "report": str(tmp_path / "docs" / "scaling.md"), "budgets": budgets, "parallel": 2,
        "common": [*TINY, f"data.train={digits16}", "train.max_steps=100000", "eval.every=0",
                   "checkpoint.every=5"],
        "eval": {"num_samples": 200, "features": str(features), "batch_size": 100},
        "runs": [{"name": "bidvl_offset", "overrides": []},
                 {"name": "vae", "overrides": ["objective.name=vae"]},
                 {"name": "vae_seed1", "method": "vae", "budgets": budgets[:1],
                  "overrides": ["objective.name=vae", "run.seed=1"]}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    for name in ("bidvl_offset", "vae"):
        first, second = (json.loads((tmp_path / "runs" / name / f"study_result_{b:g}min.json").read_text())
                         for b in budgets)
        assert first["budget_used_min"] >= 0.01 and second["budget_used_min"] >= 0.03
        assert second["steps"] > first["steps"] and second["budget_min"] == 0.03
        assert {"eval/fid", "eval/rmse", "eval/auroc_uniform"} <= set(second["scalars"])
        log = (tmp_path / "runs" / name / "study.log").read_text()
        assert "resumed from" in log and f"at step {first['steps']}" in log  # not retrained from step 0
        assert (tmp_path / "runs" / name / "samples_0.01min.png").is_file()
    assert not (tmp_path / "runs/vae_seed1/study_result_0.03min.json").exists()
    assert json.loads((tmp_path / "runs/vae_seed1/study_result_0.01min.json").read_text())["method"] == "vae"
    report = (tmp_path / "docs" / "scaling.md").read_text()
    assert_images_resolve(tmp_path / "docs" / "scaling.md", at_least=11)
    assert "| vae | 0.01 | 2 |" in report  # two seeds of the VAE at the first budget: mean ± sd
    assert "| bidvl_offset | mean | FID-style score |" in report and "gap at 0.03 min" in report
    assert (tmp_path / "docs/images/scaling/scaling.png").stat().st_size > 10_000
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 0 and p.stdout.count("finished earlier: skipped") == 5
