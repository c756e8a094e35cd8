"""The study runner (launch/study.py) and the feature classifier script, on tiny digits runs."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ENV, REPO, TINY


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


def test_feature_script_refuses_unlabelled_or_bad_output(tmp_path, digits16):
    p = run(["launch/train_feature_classifier.py", "--shards", str(digits16), "--out", str(tmp_path / "x.pt")])
    assert p.returncode == 2 and "--out" in p.stderr


@pytest.mark.slow
def test_study_runs_evaluates_reports_and_skips_finished_runs(tmp_path, digits16, features):
    study = {
        "title": "tiny study", "base": str(REPO / "configs/digits.yaml"), "out": str(tmp_path / "runs"),
        "report": str(tmp_path / "docs" / "study.md"), "budget_minutes": 0.01, "parallel": 2,
        "common": [*TINY, f"data.train={digits16}", "train.max_steps=100000", "eval.every=3",
                   "eval.metrics=rmse,ood", "eval.max_test=64", "checkpoint.every=5"],
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
    for name in ("bidvl_offset", "vae", "divergence_triangle"):
        result = json.loads((tmp_path / "runs" / name / "study_result.json").read_text())
        assert result["steps"] > 0 and result["budget_used_min"] >= 0.01
        assert {"eval/fid", "eval/rmse", "eval/auroc_uniform", "eval/auroc_ood"} <= set(result["scalars"])
        assert f"| {name} |" in report
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


def test_study_file_errors_name_the_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md", "runs": [{"name": "a b"}]}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "runs[0].name" in p.stderr
    path.write_text(yaml.safe_dump({"base": "x", "out": "o", "report": "r.md", "runs": [], "budget": 3}))
    p = run(["launch/study.py", "--config", str(path)])
    assert p.returncode == 2 and "unknown key(s) budget" in p.stderr
