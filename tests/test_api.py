"""Using a trained model: `bidvl.load` on a run folder or its exported model/ folder, the generator
EMA by default (--no-ema to opt out), and the same samples as launch/sample.py."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import bidvl
from bidvl.evaluation import EvalError, EvalOptions, evaluate_run, load_run

from conftest import ENV, REPO, train_tiny


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, digits16):
    """2 training steps on digits at 16 px with a generator EMA (train.ema=0.9): a checkpoint at
    step 2, then the export; both hold generator_ema.safetensors."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "ema", digits16, "train.max_steps=2", "train.ema=0.9")


def script(name, *args):
    proc = subprocess.run([sys.executable, str(REPO / ("tools" if name == "energy_probe.py" else "launch") / name), *map(str, args)], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def state(net):
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.process
def test_import_bidvl_is_cheap():
    code = "import sys, bidvl; assert 'torch' not in sys.modules; assert callable(bidvl.load)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_run_folder_and_export_folder_load_the_same_weights(ema_run, tmp_path):
    from_run = bidvl.load(ema_run)
    export = shutil.copytree(ema_run / "model", tmp_path / "model")  # the export folder alone
    from_export = bidvl.load(export)
    assert from_run.kind == from_export.kind == "export" and from_run.step == from_export.step == 2
    assert from_export.source == export
    for name in ("energy_net", "encoder", "generator"):
        assert same(state(getattr(from_run, name)), state(getattr(from_export, name))), name
    assert not from_run.generator.training and not any(p.requires_grad for p in from_run.generator.parameters())
    with pytest.raises(EvalError, match="final weights only"):
        bidvl.load(export, checkpoint="latest")


def test_the_ema_generator_is_used_by_default(ema_run):
    ema_file = load_file(ema_run / "model" / "generator_ema.safetensors")
    trained_file = load_file(ema_run / "model" / "generator.safetensors")
    assert ema_file.keys() == trained_file.keys()  # the EMA is a copy of the generator
    assert not same(ema_file, trained_file)

    default = bidvl.load(ema_run)
    assert default.generator_kind == "ema" and same(state(default.generator), ema_file)
    trained = bidvl.load(ema_run, ema=False)
    assert trained.generator_kind == "trained" and same(state(trained.generator), trained_file)
    assert same(state(trained.encoder), state(default.encoder))  # only the generator differs

    # a checkpoint carries the EMA too
    ckpt = bidvl.load(ema_run, checkpoint="latest")
    assert ckpt.kind == "checkpoint" and ckpt.generator_kind == "ema"
    assert same(state(ckpt.generator), load_file(ckpt.source / "generator_ema.safetensors"))


def test_ema_true_without_an_ema_file_names_the_file(ema_run, tmp_path):
    export = shutil.copytree(ema_run / "model", tmp_path / "model")
    (export / "generator_ema.safetensors").unlink()
    assert bidvl.load(export).generator_kind == "trained"  # ema=None: if present
    with pytest.raises(EvalError, match=str(export / "generator_ema.safetensors")):
        bidvl.load(export, ema=True)


def test_sample_reconstruct_energy_ood_score(ema_run):
    m = bidvl.load(ema_run)
    x = m.sample(5, seed=3)
    assert x.shape == (5, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(m.sample(5, seed=3), x) and not torch.equal(m.sample(5, seed=4), x)
    before = state(m.generator)
    x_hat = m.reconstruct(x)
    assert x_hat.shape == x.shape and x_hat.min() >= -1 and x_hat.max() <= 1
    assert same(state(m.generator), before)  # train-mode BatchNorm leaves the running stats alone
    assert m.reconstruct(x, bn_mode="eval").shape == x.shape
    e = m.energy(x)
    assert e.shape == (5,) and torch.isfinite(e).all()
    assert torch.equal(m.ood_score(x), -e)  # higher = more in-distribution, as the AUROC's score
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        m.energy(torch.zeros(2, 3, 16, 16))


def test_sample_matches_launch_sample(ema_run, tmp_path):
    script("sample.py", "--run", ema_run, "--num", 6, "--seed", 1, "--out", tmp_path / "a.png",
           "--npy", tmp_path / "ema.npy")
    script("sample.py", "--run", ema_run, "--num", 6, "--seed", 1, "--out", tmp_path / "b.png",
           "--npy", tmp_path / "trained.npy", "--no-ema")
    ema, trained = np.load(tmp_path / "ema.npy"), np.load(tmp_path / "trained.npy")
    np.testing.assert_array_equal(ema, bidvl.load(ema_run).sample(6, seed=1).numpy())
    np.testing.assert_array_equal(trained, bidvl.load(ema_run, ema=False).sample(6, seed=1).numpy())
    assert not np.array_equal(ema, trained)


def test_evaluation_report_names_the_generator(ema_run):
    script("evaluate.py", "--run", ema_run, "--metrics", "rmse", "--max-test", 16)
    path = Path(ema_run) / "eval" / "step_00000002.json"
    report = json.loads(path.read_text())
    assert report["generator"] == "ema" and report["rmse"]["generator"] == "ema"
    assert report["weights"]["generator"] == "ema"
    assert "generator: its EMA" in path.with_suffix(".md").read_text()

    run = load_run(ema_run, ema=False)  # as launch/evaluate.py --no-ema
    evaluate_run(None, ema_run, run, EvalOptions(metrics=("rmse",), max_test=16))
    report = json.loads(path.read_text())
    assert report["generator"] == "trained" and report["weights"]["generator"] == "trained"


def test_save_pretrained_round_trip(ema_run, tmp_path):
    """Hub-style save_pretrained / from_pretrained on a local folder (nothing uploaded)."""
    m = bidvl.load(ema_run, checkpoint="latest")  # from a checkpoint: Accelerate's file names
    folder = m.save_pretrained(tmp_path / "pretrained")
    again = bidvl.BiDVLModel.from_pretrained(folder)
    assert again.step == m.step and again.generator_kind == "ema" and again.cfg == m.cfg
    for name in ("energy_net", "encoder", "generator"):
        assert same(state(getattr(again, name)), state(getattr(m, name))), name
    trained = bidvl.BiDVLModel.from_pretrained(folder, ema=False)
    assert same(state(trained.generator), state(bidvl.load(ema_run, checkpoint="latest", ema=False).generator))
    assert torch.equal(again.sample(4), m.sample(4))


def test_energy_probe_samples_from_the_ema_unless_no_ema(ema_run):
    def probe(*extra):
        return json.loads(script("energy_probe.py", "--run", ema_run, "--num", "32", *extra))

    ema, trained = probe(), probe("--no-ema")
    assert (ema["generator"], trained["generator"]) == ("ema", "trained")
    assert ema["sets"]["test"] == trained["sets"]["test"]  # the energy net and the data are the same
    assert ema["sets"]["samples"]["mean_energy"] != trained["sets"]["samples"]["mean_energy"]


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card.split("---\n")[1])


def test_save_pretrained_keeps_the_card_and_writes_one_for_a_checkpoint(ema_run, tmp_path):
    """The export's card (Hub front matter, BibTeX), samples.png, health.json and config.json travel
    with save_pretrained; weights from a checkpoint get the card the export would have had."""
    from_export = bidvl.load(ema_run).save_pretrained(tmp_path / "from_export")
    for name in ("README.md", "samples.png", "config.json"):  # (health.json: none, no check in 2 steps)
        assert (from_export / name).read_bytes() == (ema_run / "model" / name).read_bytes(), name
    meta = front_matter((from_export / "README.md").read_text())
    assert meta["library_name"] == "bidvl" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"bidvl", "energy-based-model", "objective:bidvl", "arch:dcgan", "resolution:16"} <= set(meta["tags"])
    assert "@inproceedings{kan2022bidvl" in (from_export / "README.md").read_text()
    assert json.loads((from_export / "config.json").read_text())["step"] == 2

    m = bidvl.load(ema_run, checkpoint="latest")
    folder = m.save_pretrained(tmp_path / "from_checkpoint")
    card = (folder / "README.md").read_text()
    assert front_matter(card)["library_name"] == "bidvl" and "| steps | 2 " in card and "| generator EMA | decay 0.9" in card
    assert (folder / "samples.png").is_file() and (folder / "config.json").is_file()
    assert bidvl.load(folder).step == 2


def hub_snapshot(cache: Path, repo_id: str, files: Path, commit: str = "0" * 40) -> Path:
    """The Hub cache's layout for a model repository (as huggingface_hub writes it): blobs under
    snapshots/<commit>/, refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_push_to_hub_uploads_the_export_folder_and_from_pretrained_reads_the_hub_cache(
        ema_run, tmp_path, monkeypatch):
    """push_to_hub through huggingface_hub's mixin (the upload mocked: no network): the folder it
    uploads is the save_pretrained folder; from_pretrained("user/name") loads a model found in a
    pre-filled Hub cache, offline, identical to the original."""
    from huggingface_hub import HfApi

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=repo_id)  # what push_to_hub reads of the RepoUrl

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploaded["repo_id"] = repo_id
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "commit-url"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    m = bidvl.load(ema_run)
    assert m.push_to_hub("someone/bidvl-digits") == "commit-url"
    assert uploaded["repo_id"] == "someone/bidvl-digits"
    files = sorted(p.name for p in (tmp_path / "uploaded").iterdir())
    assert files == ["README.md", "config.json", "config.yaml", "encoder.safetensors", "energy.safetensors",
                     "generator.safetensors", "generator_ema.safetensors", "samples.png"]

    cache = tmp_path / "hub"
    hub_snapshot(cache, "someone/bidvl-digits", tmp_path / "uploaded")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = bidvl.BiDVLModel.from_pretrained("someone/bidvl-digits", cache_dir=cache, local_files_only=True)
    assert again.step == m.step and again.generator_kind == "ema"
    for name in ("energy_net", "encoder", "generator"):
        assert same(state(getattr(again, name)), state(getattr(m, name))), name
    trained = bidvl.BiDVLModel.from_pretrained("someone/bidvl-digits", cache_dir=cache, local_files_only=True,
                                               ema=False)
    assert trained.generator_kind == "trained"
    with pytest.raises(Exception, match="someone/nothing-here|cache|offline|local"):
        bidvl.BiDVLModel.from_pretrained("someone/nothing-here", cache_dir=cache, local_files_only=True)


def test_an_untrusted_model_folder_fails_naming_the_file(ema_run, tmp_path):
    """A model folder from elsewhere: a pickle named energy.safetensors, a link out of the folder,
    garbage in a weights file: each an EvalError naming the path, nothing unpickled or followed."""
    import pickle

    export = ema_run / "model"
    folder = tmp_path / "untrusted"
    shutil.copytree(export, folder)
    (folder / "energy.safetensors").write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(EvalError, match=rf"^{folder / 'energy.safetensors'}: not a readable safetensors file"):
        bidvl.load(folder)
    secret = tmp_path / "outside.safetensors"
    shutil.copy(export / "energy.safetensors", secret)
    (folder / "energy.safetensors").unlink()
    (folder / "energy.safetensors").symlink_to(secret)
    with pytest.raises(EvalError, match=rf"^{folder / 'energy.safetensors'} is a link to {secret}, outside {folder}: refused"):
        bidvl.load(folder)
    (folder / "energy.safetensors").unlink()
    shutil.copy(export / "energy.safetensors", folder / "energy.safetensors")
    (folder / "encoder.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EvalError, match=rf"^{folder / 'encoder.safetensors'}: not a readable safetensors file"):
        bidvl.load(folder)
    (folder / "encoder.safetensors").unlink()
    (folder / "encoder.safetensors").symlink_to("energy.safetensors")  # a link inside the folder: read, then
    with pytest.raises(EvalError, match=r"does not fit the net"):  # refused for its content
        bidvl.load(folder)
