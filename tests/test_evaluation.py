"""Evaluation: Fréchet distance, RMSE / AUROC on known inputs, the Inception path with stand-in
weights, world-size independence (1 vs 2 CPU processes), sampling, periodic evaluation, errors."""

import hashlib
import importlib.util
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch import nn

from conftest import BIN, ENV, REPO, TINY, train_tiny
from bidvl.config import load_config, to_yaml
from bidvl.data.meta import shard_name, write_meta
from bidvl.evaluation import EvalError, EvalOptions, evaluate_nets, frechet_distance, load_run
from bidvl.evaluation import fid as fid_lib
from bidvl.evaluation.fid import statistics
from bidvl.evaluation.sampling import dealt_batches, latents, sample_images, uniform_noise
from bidvl.models.registry import Nets



def launch_module(name, folder="launch"):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_cli = launch_module("evaluate")
sample_cli = launch_module("sample")
probe_cli = launch_module("energy_probe", "tools")


def write_shards(folder: Path, splits: dict, per_shard: int = 4) -> Path:
    """A shards folder from uint8 arrays: {split: (N, H, W) or (N, H, W, 3)}."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_splits = {}
    for split, images in splits.items():
        shards = []
        for k, start in enumerate(range(0, len(images), per_shard)):
            chunk = images[start:start + per_shard]
            with tarfile.open(folder / shard_name(split, k), "w") as tar:
                for i, image in enumerate(chunk):
                    buf = io.BytesIO()
                    Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(buf, "PNG")
                    info = tarfile.TarInfo(f"{split}{start + i:05d}.png")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
            shards.append({"name": shard_name(split, k), "count": len(chunk)})
        meta_splits[split] = {"count": len(images), "shards": shards}
    first = next(iter(splits.values()))
    write_meta(folder, {"source": "test", "resolution": first.shape[1],
                        "channels": 1 if first.ndim == 3 else 3, "num_classes": None,
                        "options": {}, "splits": meta_splits})
    return folder


def random_images(n, resolution=16, channels=1, seed=0):
    shape = (n, resolution, resolution) + ((3,) if channels == 3 else ())
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)




@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, digits16):
    """4 training steps on digits at 16 px: checkpoints at steps 2 and 4, then the export."""
    return train_tiny(tmp_path_factory.mktemp("runs") / "run", digits16, "train.max_steps=4", "checkpoint.every=2")


def read_report(run, step=4):
    return json.loads((Path(run) / "eval" / f"step_{step:08d}.json").read_text())


# ------------------------------------------------------------------ Fréchet distance


def scipy_reference(mu1, s1, mu2, s2, eps=1e-6):
    """The standard formula (pytorch-fid / TTUR): sqrtm of the product, eps offset when singular."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_frechet_distance_equals_the_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    value = frechet_distance(*statistics(a), *statistics(b))
    assert value == pytest.approx(scipy_reference(*statistics(a), *statistics(b)), rel=1e-9)
    assert frechet_distance(*statistics(b), *statistics(a)) == pytest.approx(value, rel=1e-9)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("samples", [10, 20, 40])
def test_frechet_distance_is_stable_for_rank_deficient_covariances(samples):
    """Fewer samples than dimensions: both covariances are singular (rank < 64)."""
    rng = np.random.default_rng(samples)
    a, b = rng.normal(size=(samples, 64)), rng.normal(size=(samples, 64)) * 1.3 + 0.1
    value = frechet_distance(*statistics(a), *statistics(b))
    assert np.isfinite(value) and value >= 0
    assert value == pytest.approx(scipy_reference(*statistics(a), *statistics(b)), rel=1e-6)
    same = frechet_distance(*statistics(a), *statistics(a))
    assert 0.0 <= same < 1e-6


# ------------------------------------------------------------------ RMSE and AUROC by hand


class ConstantGenerator(nn.Module):
    def __init__(self, value, shape):
        super().__init__()
        self.value, self.shape = value, shape

    def forward(self, h):
        return torch.full((len(h), *self.shape), self.value)


class ZeroEncoder(nn.Module):
    def forward(self, v):
        zeros = torch.zeros(len(v), 8)
        return zeros, zeros


class MeanEnergy(nn.Module):
    def forward(self, v):
        return v.flatten(1).mean(1)  # dark images have low energy = high score -E


def test_rmse_and_auroc_equal_hand_computed_values(tmp_path):
    # In-distribution test images: constant gray levels; E(v) = mean pixel, score = -E(v).
    levels_in = np.array([0, 10, 40, 80, 120, 160], dtype=np.uint8)
    levels_ood = np.array([30, 90, 200, 250], dtype=np.uint8)
    data = write_shards(tmp_path / "in", {"train": np.full((4, 16, 16), 7, np.uint8),
                                          "test": np.repeat(levels_in, 256).reshape(-1, 16, 16)})
    ood = write_shards(tmp_path / "other", {"test": np.repeat(levels_ood, 256).reshape(-1, 16, 16)})
    cfg = load_config(None, [*TINY, f"data.train={data}"])
    c = 0.25  # the generator's constant output
    nets = Nets(MeanEnergy(), ZeroEncoder(), ConstantGenerator(c, (1, 16, 16)))
    report = evaluate_nets(None, cfg, nets, EvalOptions(metrics=("rmse", "ood"), ood=(str(ood),)))

    v = levels_in.astype(np.float64) / 127.5 - 1
    sse = 256 * (c - v) ** 2  # per image: 256 pixels, all off by (c - v)
    assert report["rmse"]["sse_per_image"] == pytest.approx(sse.mean(), rel=1e-6)
    assert report["rmse"]["rmse"] == pytest.approx(math.sqrt(sse.sum() / (6 * 256)), rel=1e-6)
    assert report["rmse"]["rmse_01"] == pytest.approx(math.sqrt(np.mean(((c + 1) / 2 - (v + 1) / 2) ** 2)), rel=1e-6)

    # AUROC = P(score_in > score_ood): count pairs, ties count 1/2 (none here).
    s_in, s_ood = -v, -(levels_ood / 127.5 - 1)
    pairs = (s_in[:, None] > s_ood[None, :]).sum()
    assert report["ood"]["auroc"]["other"] == pytest.approx(pairs / (6 * 4))
    # Uniform noise has mean ~0; half of the test images are darker than any noise image.
    noise_scores = -uniform_noise(torch.arange(6), (1, 16, 16), 0).flatten(1).mean(1).double().numpy()
    pairs = (s_in[:, None] > noise_scores[None, :]).sum()
    assert report["ood"]["auroc"]["uniform"] == pytest.approx(pairs / 36)
    assert report["scalars"]["eval/auroc_other"] == report["ood"]["auroc"]["other"]
    assert report["ood"]["sets"]["uniform"]["count"] == 6


def test_samples_and_noise_do_not_depend_on_batching():
    for world in (1, 2, 3):
        seen = []
        rounds = [list(dealt_batches(10, 3, rank, world)) for rank in range(world)]
        assert len({len(r) for r in rounds}) == 1  # same number of rounds on every rank
        for r in rounds:
            seen += [int(i) for batch in r if batch is not None for i in batch if i < 10]
        assert sorted(seen) == list(range(10))
    all_at_once = latents(torch.arange(10), 8, seed=3)
    assert torch.equal(latents(torch.tensor([7, 2]), 8, seed=3), all_at_once[[7, 2]])
    assert not torch.equal(latents(torch.arange(10), 8, seed=4), all_at_once)
    noise = uniform_noise(torch.arange(5), (1, 4, 4), 0)
    assert noise.min() >= -1 and noise.max() <= 1
    assert torch.equal(uniform_noise(torch.tensor([4]), (1, 4, 4), 0), noise[4:])


def test_padding_rows_are_dropped_and_single_process_layout():
    from bidvl.evaluation.gather import IndexedRows, process_layout

    assert process_layout(None) == (torch.device("cpu"), 0, 1, True)
    rows = IndexedRows(None)
    rows.add(torch.tensor([3, -1, 1]), energy=torch.tensor([30.0, 0.0, 10.0], dtype=torch.float64))
    rows.add_padding(2, torch.float64, energy=())  # a rank with nothing of its own this round
    out = rows.result()
    assert out["index"].tolist() == [1, 3] and out["energy"].tolist() == [10.0, 30.0]


def test_reconstruction_pairs_interleave_images_and_reconstructions():
    from bidvl.evaluation.sampling import reconstruction_pairs

    class Encoder(nn.Module):  # mu = mean of each image, logvar ignored
        def forward(self, v):
            return v.flatten(1).mean(1, keepdim=True), None

    v = torch.rand(3, 1, 4, 4) * 2 - 1
    pairs = reconstruction_pairs(Encoder(), lambda mu: mu.expand(-1, 16).reshape(-1, 1, 4, 4), v)
    assert pairs.shape == (6, 1, 4, 4) and pairs.dtype == torch.float32
    assert torch.equal(pairs[0::2], v)
    assert torch.allclose(pairs[1::2], v.mean((1, 2, 3), keepdim=True).expand_as(v))


def test_uint8_conversion_recovers_the_shard_bytes():
    pixels = torch.arange(256, dtype=torch.float32)
    images = (pixels / 127.5 - 1).reshape(1, 1, 16, 16)  # as the reader decodes them
    out = fid_lib.to_uint8_rgb(images)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 16, 16)
    assert torch.equal(out[0, 0].flatten().long(), pixels.long()) and torch.equal(out[0, 0], out[0, 2])


# ------------------------------------------------------------------ run folders and checkpoints


def test_checkpoint_selection(tiny_run, tmp_path):
    default = load_run(tiny_run)
    assert (default.kind, default.step) == ("export", 4)
    latest = load_run(tiny_run, "latest")
    assert (latest.kind, latest.step) == ("checkpoint", 4)
    for a, b in zip(default.nets, latest.nets):  # export and last checkpoint hold the same weights
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(x, y), k
    assert load_run(tiny_run, 2).step == 2 and load_run(tiny_run, "final").kind == "export"
    with pytest.raises(EvalError, match=r"step_00000007 is not a complete checkpoint.*step_00000002, step_00000004"):
        load_run(tiny_run, 7)
    # An incomplete checkpoint (no COMPLETE marker) is never picked.
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    shutil.copytree(copy / "checkpoints" / "step_00000004", copy / "checkpoints" / "step_00000009")
    (copy / "checkpoints" / "step_00000009" / "COMPLETE").unlink()
    assert load_run(copy, "latest").step == 4


# ------------------------------------------------------------------ the commands


def event_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for folder in {p.parent for p in Path(run, "tensorboard").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return found


@pytest.mark.slow
def test_two_processes_give_the_figures_of_one(tiny_run, digits16, small_features, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ood = write_shards(tmp_path / "noise16", {"test": random_images(40)})
    args = ["--run", str(run), "--metrics", "fid,rmse,ood", "--features", str(small_features),
            "--num-samples", "96", "--batch-size", "25", "--ood", str(ood)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes (OMP_NUM_THREADS=1): CPU kernels
    try:  # may round differently with another thread count
        assert evaluate_cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    one = read_report(run)
    assert one["world_size"] == 1 and "FID-style (features: small.pt)" in one["fid"]["label"]
    assert set(one["ood"]["auroc"]) == {"uniform", "noise16"}
    md = (run / "eval" / "step_00000004.md").read_text()
    assert "| Model | uniform | noise16 |" in md and "RMSE per pixel value" in md
    tags = event_scalars(run)
    for tag in ("eval/fid", "eval/rmse", "eval/auroc_uniform", "eval/auroc_noise16"):
        assert tags[tag][-1] == (4, pytest.approx(one["scalars"][tag], rel=1e-6)), tag

    shutil.rmtree(digits16 / "fid_stats")  # the 2-process run computes the reference itself
    shutil.rmtree(run / "eval")
    env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", "0", str(REPO / "launch/evaluate.py"), *args],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_report(run)
    assert two["world_size"] == 2
    assert two["scalars"] == one["scalars"]  # exactly, not approximately
    assert two["rmse"]["num_images"] == 360 and two["ood"]["sets"]["noise16"]["count"] == 40
    assert two["fid"]["reference"]["count"] == 1437


def random_inception_weights(path):
    """torch-fidelity's Inception-v3 with its own random init (no download), saved as a state dict."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None), \
            mock.patch.object(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {}):
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.slow
def test_inception_fid_end_to_end(tiny_run, tmp_path, monkeypatch, capsys):
    """The real Inception path (torch-fidelity, 299 px) with stand-in weights: values are
    meaningless, the path is the one the published weights take. A tiny test split keeps it short."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    weights = random_inception_weights(tmp_path / "inception.pth")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    small = write_shards(tmp_path / "small", {"test": random_images(4, seed=1)})
    cfg = load_config(run / "config.yaml", [f"data.test={small}"])
    (run / "config.yaml").write_text(to_yaml(cfg))

    def no_download(*args, **kwargs):
        raise AssertionError("torch-fidelity tried to download weights")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_download)
    monkeypatch.setenv(fid_lib.ENV_WEIGHTS, str(weights))  # the env variable names the file
    args = ["--run", str(run), "--metrics", "fid", "--num-samples", "4", "--batch-size", "4",
            "--fid-ref", "test"]
    assert evaluate_cli.main(args) == 0, capsys.readouterr().err
    report = read_report(run)
    assert report["fid"]["comparable_to_published"] is True
    assert report["fid"]["label"].startswith("FID (TF-compatible Inception-v3")
    assert np.isfinite(report["fid"]["value"]) and report["fid"]["value"] >= 0
    assert report["fid"]["reference"]["count"] == 4
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in report["fid"]["extractor"]
    assert list((small / "fid_stats").glob("test-*.npz"))  # cached beside the shards


def test_energy_probe_reports_every_set(tiny_run, capsys):
    from bidvl.evaluation.metrics import energies

    assert probe_cli.main(["--run", str(tiny_run), "--num", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num"] == 40 and report["step"] == 4
    names = {"test", "test+noise0.05", "test+noise0.1", "test+noise0.3", "test_blurred", "uniform", "samples"}
    assert set(report["sets"]) == names
    for name in names - {"test"}:
        assert 0.0 <= report["sets"][name]["auroc_vs_test"] <= 1.0
    # The test row is the mean energy of the first 40 test images, computed directly.
    run = load_run(tiny_run)
    from bidvl.data import eval_stream

    images, _, index = next(iter(eval_stream(run.cfg.data.train, "test", 40)))
    expected = energies(run.nets.energy_net, images[index >= 0]).mean().item()
    assert report["sets"]["test"]["mean_energy"] == pytest.approx(expected, rel=1e-6)


def test_sample_command(tiny_run, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in (tiny_run / "model").glob("*.safetensors")}
    png, npy = tmp_path / "grid.png", tmp_path / "samples.npy"
    assert sample_cli.main(["--run", str(tiny_run), "--num", "6", "--out", str(png), "--npy", str(npy),
                            "--batch-size", "4"]) == 0
    samples = np.load(npy)
    assert samples.shape == (6, 1, 16, 16) and samples.dtype == np.float32
    assert samples.min() >= -1 and samples.max() <= 1
    assert Image.open(png).size[0] > 16
    run = load_run(tiny_run)  # the same images as samples 0..5 of the FID set (same seed and batch)
    expected = sample_images(run.nets.generator, 6, 8, seed=0, batch_size=4)
    np.testing.assert_array_equal(samples, expected.numpy())
    assert sample_cli.main(["--run", str(tiny_run), "--num", "6", "--out", str(png), "--npy", str(npy),
                            "--reconstruct", "--bn-mode", "eval"]) == 0
    assert np.load(npy).shape == (6, 1, 16, 16)
    assert before == {p.name: p.read_bytes() for p in (tiny_run / "model").glob("*.safetensors")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "samples.npy"]  # no temp files left


def test_sample_command_refuses_what_memory_cannot_hold_and_names_a_failed_write(tiny_run, tmp_path, capsys,
                                                                                 monkeypatch):
    from bidvl import ceilings

    png, npy = tmp_path / "grid.png", tmp_path / "samples.npy"
    monkeypatch.setattr(ceilings, "available_memory", lambda: 2**20)  # 1 MiB at hand
    assert sample_cli.main(["--run", str(tiny_run), "--num", "1000", "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --num 1000: the images need about 0.0 GiB (1000 x 1 x 16 x 16 float32, with the "
                          "grid and the .npy copy), more than the 0.0 GiB of memory available"), err
    assert not png.exists()
    monkeypatch.undo()
    assert ceilings.available_memory() > 2**20  # the real figure, from /proc/meminfo

    def full_disk(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    assert sample_cli.main(["--run", str(tiny_run), "--num", "4", "--out", str(png), "--npy", str(npy)]) == 2
    assert capsys.readouterr().err == (f"error: cannot write {npy}: ENOSPC (No space left on device); the previous "
                                       f"samples.npy, if any, is untouched\n")
    assert png.is_file() and not npy.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_periodic_evaluation(tiny_run, small_features, monkeypatch):
    from accelerate import Accelerator

    from bidvl.evaluation import PeriodicEvaluation

    accelerator = Accelerator(cpu=True)
    run = load_run(tiny_run)
    cfg = load_config(tiny_run / "config.yaml", ["eval.metrics=fid,rmse,ood", "eval.max_test=50",
                                                 "eval.num_samples=32", "eval.batch_size=16",
                                                 f"eval.features={small_features}"])
    for net in run.nets:
        net.train()
    state = [{k: v.clone() for k, v in net.state_dict().items()} for net in run.nets]
    rng = torch.get_rng_state()
    figures = PeriodicEvaluation(accelerator, cfg)(*run.nets, step=4)
    assert set(figures) == {"eval/fid", "eval/rmse", "eval/rmse_running_stats", "eval/rmse_01", "eval/sse_per_image",
                            "eval/auroc_uniform"}
    assert all(np.isfinite(v) for v in figures.values())
    assert all(net.training for net in run.nets)
    for net, saved in zip(run.nets, state):  # weights and buffers untouched
        assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)  # training's RNG stream is left alone
    # max_test: the figures of the first 50 test images
    report = evaluate_nets(None, cfg, run.nets, EvalOptions(metrics=("rmse",), max_test=50, batch_size=16))
    assert report["rmse"]["num_images"] == 50 and report["rmse"]["rmse"] == pytest.approx(figures["eval/rmse"])

    # Without weights (none in an empty hub cache either) or features FID is skipped, with one warning.
    monkeypatch.delenv(fid_lib.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tiny_run.parent / "empty_torch_home"))
    cfg = load_config(tiny_run / "config.yaml", ["eval.metrics=fid,rmse", "eval.max_test=16"])
    periodic = PeriodicEvaluation(accelerator, cfg)
    with pytest.warns(UserWarning, match="FID is skipped"):
        figures = periodic(*run.nets, step=4)
    assert "eval/fid" not in figures and "eval/rmse" in figures
    with warnings.catch_warnings():  # once per run
        warnings.simplefilter("error")
        periodic(*run.nets, step=4)
    with pytest.warns(UserWarning, match="FID is skipped"):  # another run in the same process: its own warning
        PeriodicEvaluation(accelerator, cfg)(*run.nets, step=4)


def test_timm_feature_spec(tmp_path):
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=0, in_chans=3)
    path = tmp_path / "feat.safetensors"
    fid_lib.save_timm_features(model, "test_resnet", path, in_chans=3, input_size=32)
    extractor = fid_lib.feature_extractor(features=str(path))
    features = extractor(torch.rand(4, 1, 16, 16) * 2 - 1)
    assert features.shape == (4, model.num_features)
    assert "not comparable to published FID" in extractor.label


# ------------------------------------------------------------------ bad inputs


def test_bad_inputs_fail_with_clear_errors(tiny_run, tmp_path, capsys, monkeypatch):
    def error_of(args):
        assert evaluate_cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_run / "config.yaml", empty / "config.yaml")
    err = error_of(["--run", str(empty), "--metrics", "rmse"])
    assert "no exported model" in err and "no complete checkpoint" in err and str(empty) in err

    big = write_shards(tmp_path / "big32", {"test": random_images(4, resolution=32)})
    err = error_of(["--run", str(tiny_run), "--metrics", "ood", "--ood", str(big)])
    assert str(big) in err and "resolution 32" in err and "resolution 16" in err
    rgb = write_shards(tmp_path / "rgb16", {"test": random_images(4, channels=3)})
    err = error_of(["--run", str(tiny_run), "--metrics", "ood", "--ood", str(rgb)])
    assert str(rgb) in err and "channels 3" in err and "channels 1" in err

    monkeypatch.delenv(fid_lib.ENV_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    err = error_of(["--run", str(tiny_run), "--metrics", "fid"])
    assert "--inception-weights" in err and fid_lib.ENV_WEIGHTS in err and fid_lib.PUBLISHED_WEIGHTS in err
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / fid_lib.PUBLISHED_WEIGHTS) in err
    assert "--download-weights" in err
    missing = tmp_path / "nowhere" / fid_lib.PUBLISHED_WEIGHTS
    err = error_of(["--run", str(tiny_run), "--metrics", "fid", "--inception-weights", str(missing)])
    assert str(missing) in err and "does not exist" in err
    assert not (tiny_run / "eval").exists()  # nothing written on failure


@pytest.mark.slow
def test_launch_scripts_exit_2_with_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch/evaluate.py"), "--run", str(tmp_path / "none")],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: run folder {tmp_path / 'none'} does not exist"


def test_progress_bars_only_on_a_terminal_and_on_the_main_process(monkeypatch):
    """Long passes (FID features, reference statistics, held-out and noise passes, sampling) show a
    tqdm bar on the main process when stderr is a terminal, and nothing in logs or pipes."""
    import io

    from bidvl.evaluation.gather import progress, rounds
    from bidvl.evaluation.sampling import dealt_batches, sample_images

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    generator = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Unflatten(1, (1, 4, 4)))
    for stderr, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stderr)
        images = sample_images(generator, 10, 4, seed=0, batch_size=3)
        assert images.shape == (10, 1, 4, 4)
        assert ("samples:" in stderr.getvalue() and "/4 " in stderr.getvalue()) == shown  # 4 batches of 3
        assert stderr.getvalue().rstrip().splitlines()[-1].startswith("samples: 4 batches in ")  # both

    class OtherRank:
        device, process_index, num_processes, is_main_process = torch.device("cpu"), 1, 2, False

    batches = dealt_batches(10, 3, 1, 2)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress(batches, OtherRank(), "x", rounds(10, 3, 2)) is batches
    assert sys.stderr.getvalue() == ""


def test_evaluating_the_export_refreshes_its_model_card(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    card = run / "model" / "README.md"
    assert "None yet:" in card.read_text()
    # A checkpoint's evaluation is not the export's: the card keeps what it says.
    assert evaluate_cli.main(["--run", str(run), "--checkpoint", "2", "--metrics", "rmse", "--max-test", "40"]) == 0
    assert "None yet:" in card.read_text()
    assert evaluate_cli.main(["--run", str(run), "--metrics", "rmse", "--max-test", "40"]) == 0
    assert f"refreshed the evaluation in {card}" in capsys.readouterr().out
    text = card.read_text()
    report = (run / "eval" / "step_00000004.md").read_text().strip()
    assert f"## Evaluation\n\nFrom `eval/step_00000004.md`:\n\n{report}\n\n## Samples\n" in text
    assert "| steps | 4 (max_steps 4) |" in text and "![64 samples](samples.png)" in text  # the rest kept
    assert not list(card.parent.glob("*.tmp*"))


def test_inception_weights_are_looked_for_in_order(tmp_path, monkeypatch):
    """The flag, else BIDVL_INCEPTION_WEIGHTS, else torch's hub cache (where torch-fidelity keeps
    them), else none: periodic evaluation and health checks then go without, evaluate.py says where
    to put them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fid_lib.ENV_WEIGHTS, raising=False)
    assert fid_lib.inception_weights_file() == ""
    assert fid_lib.feature_extractor(required=False) is None
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / fid_lib.PUBLISHED_WEIGHTS
    assert fid_lib.hub_cache_weights() == cached
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert fid_lib.inception_weights_file() == str(cached)
    monkeypatch.setenv(fid_lib.ENV_WEIGHTS, "from_env.pth")
    assert fid_lib.inception_weights_file() == "from_env.pth"
    assert fid_lib.inception_weights_file("given.pth") == "given.pth"


@pytest.mark.slow
def test_download_weights_fetches_into_the_hub_cache_once(tiny_run, tmp_path, monkeypatch, capsys):
    """evaluate.py --download-weights on a machine without the weights: fetched over HTTP (a server on
    127.0.0.1 stands in for the release URL) into TORCH_HOME/hub/checkpoints, then FID runs with them;
    a second evaluation finds them there without the flag. A failing download names the URL and
    leaves no file."""
    import functools
    import http.server
    import threading


    served = tmp_path / "served"
    served.mkdir()
    weights = random_inception_weights(served / fid_lib.PUBLISHED_WEIGHTS)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv(fid_lib.ENV_WEIGHTS, raising=False)
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
        cached = fid_lib.hub_cache_weights()
        run = tmp_path / "run"
        shutil.copytree(tiny_run, run)
        small = write_shards(tmp_path / "small", {"test": random_images(4, seed=1)})
        cfg = load_config(run / "config.yaml", [f"data.test={small}"])
        (run / "config.yaml").write_text(to_yaml(cfg))
        args = ["--run", str(run), "--metrics", "fid", "--num-samples", "4", "--batch-size", "4", "--fid-ref", "test"]

        missing = f"http://127.0.0.1:{httpd.server_port}/nothing-here.pth"
        monkeypatch.setattr(fid_lib, "PUBLISHED_URL", missing)
        assert evaluate_cli.main([*args, "--download-weights"]) == 2
        err = capsys.readouterr().err
        assert missing in err and "404" in err, err
        assert not cached.exists() and not any(cached.parent.iterdir())  # no partial file left

        monkeypatch.setattr(fid_lib, "PUBLISHED_URL",
                            f"http://127.0.0.1:{httpd.server_port}/{fid_lib.PUBLISHED_WEIGHTS}")
        assert evaluate_cli.main([*args, "--download-weights"]) == 0, capsys.readouterr().err
        assert cached.read_bytes() == weights.read_bytes()
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        assert digest in read_report(run)["fid"]["extractor"]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert evaluate_cli.main(args) == 0, capsys.readouterr().err  # the server is gone: found in the cache
    assert digest in read_report(run)["fid"]["extractor"]


def test_a_vae_is_scored_by_its_elbo_and_the_report_names_the_generator(tiny_run, tmp_path):
    """The objective decides the OOD score (bidvl.objectives.Objective.ood_score*): for the VAE the
    negative ELBO, which runs the generator, so the report says which generator scored."""
    import dataclasses

    from accelerate import Accelerator

    from bidvl.evaluation.evaluator import evaluate_run

    run = load_run(tiny_run)
    opts = EvalOptions(metrics=("ood",), batch_size=32, max_test=64, seed=0)
    reports = {}
    for name in ("bidvl", "vae"):
        cfg = dataclasses.replace(run.cfg, objective=dataclasses.replace(run.cfg.objective, name=name))
        out = tmp_path / name
        reports[name], _ = evaluate_run(Accelerator(cpu=True), out, dataclasses.replace(run, cfg=cfg), opts)
    assert reports["bidvl"]["ood"]["score"] == "-E(v)" and "generator" not in reports["bidvl"]["ood"]
    assert reports["vae"]["ood"]["score"].startswith("ELBO(v)") and reports["vae"]["ood"]["generator"] == "trained"
    assert reports["vae"]["ood"]["auroc"] != reports["bidvl"]["ood"]["auroc"]


def test_evaluation_options_are_checked_once_when_made():
    """EvalOptions checks itself against bidvl.config's ranges (those of the eval.* keys), however
    it is made: the command line, the study's stage, the periodic evaluation, a library call."""
    from bidvl.errors import BidvlError

    for kwargs, message in (({"num_samples": 1}, "--num-samples 1: expected an integer in [2, 2**31)"),
                            ({"batch_size": 0}, "--batch-size 0: expected an integer in [1, 2**31)"),
                            ({"max_test": -1}, "--max-test -1"), ({"seed": 2**32}, "--seed 4294967296"),
                            ({"num_workers": -2}, "--num-workers -2"), ({"metrics": ("fid", "is")}, "metric 'is'"),
                            ({"bn_mode": "frozen"}, "--bn-mode 'frozen'"), ({"fid_ref": "val"}, "--fid-ref 'val'")):
        with pytest.raises(BidvlError, match=re.escape(message)):
            EvalOptions(**kwargs)
    assert EvalOptions(metrics=("rmse",), num_samples=2, max_test=0).num_samples == 2
