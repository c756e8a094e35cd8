"""Config and command-line ranges: every option has one, and a value outside it is a one-line error
naming the option, the value and what was expected, before anything is built or written.

    load_config("configs/cifar10.yaml", ["train.energy_optim.lr=nan"])
    # ConfigError: train.energy_optim.lr=nan: expected a finite number > 0

    RANGES["train.ema"].check("train.ema", 1.0)       # the table validate() walks
    path_problem("runs/x/grid.png", "file", writable=True)   # None, or why not
"""

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ENV, REPO
from bidvl.config import CHOICES, RANGES, Config, ConfigError, load_config, path_problem
from bidvl.study import load_study

# Keys whose every string is valid: empty has a meaning, and a file is checked where it is opened.
FREE_TEXT = {"data.test", "eval.features", "eval.inception_weights"}
# Checked in validate() against another key or a registry.
CROSS_CHECKED = {"data.auto_build", "model.timm_name"}

A_FILE = REPO / "README.md"
OPTIMIZER_BAD = [("lr", "0"), ("lr", "-0.1"), ("lr", "nan"), ("lr", "inf"), ("betas", "[0.9]"),
                 ("betas", "[0.5,1.0]"), ("betas", "[nan,0.9]"), ("weight_decay", "-1"), ("weight_decay", "nan"),
                 ("weight_decay", "inf"), ("lr_decay", "0"), ("lr_decay", "1.1"), ("lr_decay", "nan")]
# (override, the key its error names): every key of RANGES, NaN and inf for every float.
BAD = [
    ("run.dir=''", "run.dir"), (f"run.dir={A_FILE}", "run.dir"), (f"run.dir={A_FILE}/run", "run.dir"),
    ("run.seed=-1", "run.seed"), ("run.seed=4294967296", "run.seed"),
    ("data.train=''", "data.train"), ("data.train_split=' '", "data.train_split"),
    ("data.test_split=''", "data.test_split"),
    ("data.resolution=0", "data.resolution"), ("data.resolution=48", "data.resolution"),
    ("data.channels=2", "data.channels"), ("data.num_workers=-1", "data.num_workers"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer"), ("data.max_skipped=-1", "data.max_skipped"),
    ("data.train_count=-1", "data.train_count"), ("data.net_retries=-1", "data.net_retries"),
    ("data.net_backoff=-1", "data.net_backoff"), ("data.net_backoff=nan", "data.net_backoff"),
    ("data.net_timeout=0", "data.net_timeout"), ("data.net_timeout=inf", "data.net_timeout"),
    ("data.net_shard_timeout=0", "data.net_shard_timeout"), ("data.net_shard_timeout=inf", "data.net_shard_timeout"),
    ("train.stop_wait_s=0", "train.stop_wait_s"),
    ("log.peak_tflops=-1", "log.peak_tflops"), ("log.peak_tflops=nan", "log.peak_tflops"),
    ("data.auto_build=mnist", "data.auto_build"),
    ("model.latent_dim=0", "model.latent_dim"), ("model.latent_dim=2147483648", "model.latent_dim"),
    ("model.energy_width=0", "model.energy_width"), ("model.encoder_width=-1", "model.encoder_width"),
    ("model.generator_width=0", "model.generator_width"),
    ("objective.w_latent=-1", "objective.w_latent"), ("objective.w_latent=nan", "objective.w_latent"),
    ("objective.w_latent=inf", "objective.w_latent"), ("objective.r_basic=-0.1", "objective.r_basic"),
    ("objective.r_basic=nan", "objective.r_basic"), ("objective.r_basic=inf", "objective.r_basic"),
    ("objective.lower_steps=0", "objective.lower_steps"),
    ("objective.noise_negatives=-0.1", "objective.noise_negatives"),
    ("objective.noise_negatives=nan", "objective.noise_negatives"),
    ("train.batch_size=0", "train.batch_size"), ("train.max_steps=0", "train.max_steps"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.grad_clip=-1", "train.grad_clip"),
    ("train.grad_clip=nan", "train.grad_clip"), ("train.grad_clip=inf", "train.grad_clip"),
    ("train.encoder_weight_decay=-1", "train.encoder_weight_decay"),
    ("train.ema=1", "train.ema"), ("train.ema=-0.1", "train.ema"), ("train.ema=nan", "train.ema"),
    ("train.time_budget_min=-1", "train.time_budget_min"), ("train.time_budget_min=nan", "train.time_budget_min"),
    ("train.time_budget_min=inf", "train.time_budget_min"),
    ("train.nonfinite_patience=0", "train.nonfinite_patience"),
    ("train.rollback_lr_scale=0", "train.rollback_lr_scale"), ("train.rollback_lr_scale=1.5", "train.rollback_lr_scale"),
    ("train.rollback_lr_scale=nan", "train.rollback_lr_scale"), ("train.max_rollbacks=-1", "train.max_rollbacks"),
    *[(f"train.{opt}.{key}={value}", f"train.{opt}.{key}") for opt in ("energy_optim", "latent_optim")
      for key, value in OPTIMIZER_BAD],
    ("checkpoint.every=0", "checkpoint.every"), ("checkpoint.keep=0", "checkpoint.keep"),
    ("checkpoint.resume=''", "checkpoint.resume"),
    ("log.every=0", "log.every"), ("log.images_every=0", "log.images_every"), ("log.num_images=0", "log.num_images"),
    ("log.trackers=tensorboard,bogus", "log.trackers"), ("log.trackers=mlflow,mlflow", "log.trackers"),
    ("eval.every=-1", "eval.every"), ("eval.metrics=fid,bogus", "eval.metrics"), ("eval.metrics=',,'", "eval.metrics"),
    ("eval.num_samples=1", "eval.num_samples"), ("eval.max_test=-1", "eval.max_test"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("health.every=-1", "health.every"), ("health.num_images=4", "health.num_images"),
    ("health.num_images=8193", "health.num_images"), ("health.warmup=-5", "health.warmup"),
    ("health.min_spread=nan", "health.min_spread"), ("health.min_spread=-1", "health.min_spread"),
    ("health.min_energy_spread=-1", "health.min_energy_spread"),
    ("health.min_energy_spread=nan", "health.min_energy_spread"), ("health.min_nn_ratio=-1", "health.min_nn_ratio"), ("health.min_nn_ratio=inf", "health.min_nn_ratio"),
    ("health.max_hf_ratio=0", "health.max_hf_ratio"), ("health.max_hf_ratio=nan", "health.max_hf_ratio"),
    ("health.min_auroc=1.5", "health.min_auroc"), ("health.min_auroc=nan", "health.min_auroc"),
    ("health.warn_auroc=-0.1", "health.warn_auroc"), ("health.max_rmse_rise=0.9", "health.max_rmse_rise"),
    ("health.max_rmse_rise=nan", "health.max_rmse_rise"), ("health.max_fid_rise=inf", "health.max_fid_rise"),
    ("health.patience=0", "health.patience"), ("health.max_restarts=-1", "health.max_restarts"),
    *[(f"{key}=bogus", key) for key in CHOICES],
]
# Cross-key cases: the second override is the one out of range for the first.
BAD_TOGETHER = [
    (["model.arch=resnet", "data.resolution=16"], "data.resolution"),  # ResNet nets start at 32 px
    (["model.arch=timm"], "model.timm_name"),  # no name
    (["model.arch=timm", "model.timm_name=no_such_net"], "model.timm_name"),
    (["health.min_auroc=0.6", "health.warn_auroc=0.5"], "health.warn_auroc"),  # a warning before unhealthy
    (["health.on_unhealthy=restart", "health.every=300"], "checkpoint.every"),  # 500: no healthy checkpoint
]


def leaf_keys(node=None, prefix=""):
    node = Config() if node is None else node
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


@pytest.mark.parametrize("override,key", BAD, ids=[o for o, _ in BAD])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert message.startswith(f"{key}="), message
    assert "\n" not in message


@pytest.mark.parametrize("overrides,key", BAD_TOGETHER, ids=[" ".join(o) for o, _ in BAD_TOGETHER])
def test_values_out_of_range_for_another_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(None, overrides)


def test_every_option_has_a_check():
    """A new option needs a line in RANGES or CHOICES (or a reason to be free text), and a bad
    value in BAD above."""
    keys = {key for key, value in leaf_keys() if not isinstance(value, bool)}
    assert keys - FREE_TEXT == set(RANGES) | set(CHOICES) | CROSS_CHECKED
    assert set(RANGES) | CROSS_CHECKED <= {key for _, key in BAD + BAD_TOGETHER}


def test_the_edges_of_each_range_are_accepted(tmp_path):
    cfg = load_config(None, [
        "run.seed=2147483647", "train.ema=0", "train.grad_clip=0", "train.time_budget_min=0",
        "train.rollback_lr_scale=1", "train.energy_optim.lr_decay=1", "train.latent_optim.betas=[0,0.999]",
        "train.latent_optim.weight_decay=0", "data.num_workers=0", "data.max_skipped=0", "eval.every=0",
        "eval.metrics=''", "eval.num_samples=2", "eval.max_test=0", "train.max_rollbacks=0",
        "model.arch=resnet", "data.resolution=128", f"run.dir={tmp_path}/not/yet/made",
    ])
    assert cfg.run.seed == 2**31 - 1 and cfg.eval.metrics == "" and cfg.data.resolution == 128
    assert list(tmp_path.iterdir()) == []  # validation creates nothing


def test_defaults_and_every_shipped_config_and_study_run_load():
    load_config()
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    studies = sorted((REPO / "configs" / "studies").glob("*.yaml"))
    assert studies
    for path in studies:
        study = load_study(path)
        for run in study.runs:  # as bidvl.study.runner.run_budget composes them
            load_config(REPO / study.base, [
                *study.common, *run.overrides, f"run.dir={study.out}/{run.name}",
                f"train.time_budget_min={study.budget_minutes}", f"train.budget_clock={study.budget_clock}"])


def test_unreadable_files_and_overrides_are_config_errors(tmp_path):
    cases = {"broken.yaml": b"train: {max_steps: [}\n", "list.yaml": b"- 1\n- 2\n", "scalar.yaml": b"7\n",
             "binary.yaml": b"\x00\xff\xfe"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match=name):
            load_config(tmp_path / name)
    with pytest.raises(ConfigError, match="eval.metrics= , .*not valid YAML"):
        load_config(None, ["eval.metrics= , "])
    with pytest.raises(ConfigError, match="key train.energy_optim.lr: int too large"):
        load_config(None, ["train.energy_optim.lr=1" + "0" * 400])
    with pytest.raises(ConfigError, match=r"train.energy_optim.lr=inf: expected a finite number > 0"):
        load_config(None, ["train.energy_optim.lr=1e400"])  # YAML reads it as inf


def test_path_problem_says_why_without_creating_anything(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert path_problem(tmp_path / "a" / "b" / "grid.png", "file", writable=True) is None
    assert path_problem(tmp_path / "a" / "b", "folder", writable=True) is None
    assert path_problem("", "folder") == "the path is empty"
    assert path_problem(a_file, "folder") == f"{a_file} is a file, expected a folder"
    assert path_problem(tmp_path, "file") == f"{tmp_path} is a folder, expected a file"
    assert path_problem(a_file / "x" / "grid.png", "file") == f"{a_file} is a file, not a folder"
    assert "ends in a separator" in path_problem(f"{tmp_path}/grid.png/", "file")
    assert sorted(tmp_path.iterdir()) == [a_file]


# ---------------------------------------------------------------- command-line options


def launch_module(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}_config", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def places(tmp_path):
    """A run folder (empty: every case fails before it is read), a file, a folder named like a file."""
    (tmp_path / "run").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "folder.npy").mkdir()
    return tmp_path


SAMPLE_BAD = [
    (["--num", "0"], "--num 0: expected an integer in [1, 2**31)"),
    (["--num", "-3"], "--num -3"), (["--batch-size", "0"], "--batch-size 0"),
    (["--seed", "-1"], "--seed -1: expected an integer in [0, 2**31)"), (["--seed", str(2**32)], "--seed"),
    (["--nrow", "-1"], "--nrow -1"),
    (["--out", "{tmp}/out/grid"], "--out {tmp}/out/grid: expected an image file name"),
    (["--out", "{tmp}/a_file/grid.png"], "--out {tmp}/a_file/grid.png: {tmp}/a_file is a file, not a folder"),
    (["--out", "{tmp}/folder.png"], "--out {tmp}/folder.png: {tmp}/folder.png is a folder, expected a file"),
    (["--npy", "{tmp}/folder"], "--npy {tmp}/folder.npy: {tmp}/folder.npy is a folder"),  # np.save adds .npy
]
EVALUATE_BAD = [
    (["--num-samples", "1"], "--num-samples 1: expected an integer in [2, 2**31)"),
    (["--batch-size", "0"], "--batch-size 0"), (["--max-test", "-1"], "--max-test -1"),
    (["--seed", "-1"], "--seed -1"), (["--num-workers", "-1"], "--num-workers -1"),
    (["--metrics", "fid,bogus"], "--metrics 'fid,bogus'"),
]


@pytest.mark.parametrize("args,error", SAMPLE_BAD, ids=[" ".join(a) for a, _ in SAMPLE_BAD])
def test_sample_options_out_of_range(places, capsys, args, error):
    cli = launch_module("sample")
    before = tree(places)
    argv = ["--run", str(places / "run"), "--out", str(places / "out" / "grid.png"), *args]
    assert cli.main([a.format(tmp=places) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + error.format(tmp=places)) and err.count("\n") == 1, err
    assert tree(places) == before  # nothing written


@pytest.mark.parametrize("args,error", EVALUATE_BAD, ids=[" ".join(a) for a, _ in EVALUATE_BAD])
def test_evaluate_options_out_of_range(places, capsys, args, error):
    cli = launch_module("evaluate")
    before = tree(places)
    assert cli.main(["--run", str(places / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error}") and err.count("\n") == 1, err
    assert tree(places) == before


def test_evaluate_checks_the_report_folder_before_evaluating(places, capsys):
    (places / "run" / "eval").write_text("not a folder")
    assert launch_module("evaluate").main(["--run", str(places / "run"), "--metrics", "rmse"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --run {places / 'run'}: cannot write the report: {places / 'run' / 'eval'} is a file, " \
                  "expected a folder\n"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / name), *args], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_scripts_exit_2_with_one_line_and_write_nothing(places):
    """As a user runs them: exit status 2, one `error:` line, no traceback, no file."""
    before = tree(places)
    cases = [
        (run_script("train.py", "train.energy_optim.lr=nan", f"run.dir={places}/train_run"),
         "error: train.energy_optim.lr=nan: expected a finite number > 0"),
        (run_script("sample.py", "--run", str(places / "run"), "--seed", "-1", "--out", f"{places}/out/grid.png"),
         "error: --seed -1: expected an integer in [0, 2**31)"),
        (run_script("evaluate.py", "--run", str(places / "run"), "--batch-size", "0"),
         "error: --batch-size 0: expected an integer in [1, 2**31)"),
    ]
    for proc, error in cases:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [error]
    assert tree(places) == before



@pytest.mark.process
def test_the_config_reference_lists_every_key_and_is_up_to_date():
    """docs/config.md and --help-config come from config.py: every key with its default, what it
    accepts (CHOICES / RANGES) and a meaning; the committed page is what the generator writes now."""
    from bidvl import config_reference

    listed = {key.name: key for key in config_reference.keys()}
    assert set(listed) == {key for key, _ in leaf_keys()}
    assert [name for name, key in listed.items() if not key.meaning] == []
    assert listed["train.energy_optim.lr"].default == 1e-4 and "energy net" in listed["train.energy_optim.lr"].meaning
    assert listed["health.on_unhealthy"].accepts == "`warn` \\| `stop` \\| `restart`"
    assert listed["train.ema"].accepts == RANGES["train.ema"].expected
    assert (REPO / "docs/config.md").read_text() == config_reference.markdown(), (
        "docs/config.md is out of date: python -m bidvl.config_reference > docs/config.md")
    proc = subprocess.run([sys.executable, str(REPO / "launch/train.py"), "--help-config"], env=ENV, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(f"  {name} = " in proc.stdout for name in listed), proc.stdout[-2000:]
    assert "      Adam's learning rate" not in proc.stdout and "energy net: Adam's learning rate" in proc.stdout


def test_a_missing_extra_is_named_with_what_installs_it(monkeypatch):
    """The optional packages (bidvl/extras.py) fail where they are needed, in the caller's error
    class, naming the extra: model.arch=timm without timm is a config error, not a traceback."""
    from bidvl.extras import require

    for module in ("timm", "torch_fidelity", "matplotlib"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=r"^model.arch=timm and timm feature extractors needs the package "
                                          r"timm, which is not installed: pip install 'bidvl\[timm\]'"):
        load_config(REPO / "configs/cifar10.yaml", ["model.arch=timm", "model.timm_name=resnet18"])
    from bidvl.evaluation import EvalError
    from bidvl.study import StudyError

    with pytest.raises(EvalError, match=r"pip install 'bidvl\[fid\]' \(or pip install torch-fidelity\)"):
        require("torch_fidelity.feature_extractor_inceptionv3", EvalError)
    with pytest.raises(StudyError, match=r"bidvl\[study\]"):
        require("matplotlib", StudyError)


# ---------------------------------------------------------------- `auto`, resolved once


def test_resolve_replaces_every_auto_value_once_and_leaves_the_input_alone(monkeypatch):
    from bidvl.config import flatten, resolve, to_dict

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    for overrides, want in (
        ([], {"model.init": "normal", "model.encoder_heads": "bias", "objective.latent_reduction": "mean",
              "objective.lower_latents": "reuse"}),
        (["model.arch=resnet", "data.resolution=64", "data.channels=3"],
         {"model.init": "xavier", "model.encoder_heads": "no_bias", "objective.latent_reduction": "sum_over_dims",
          "objective.lower_latents": "fresh"}),
        (["model.arch=resnet", "data.resolution=32", "data.channels=3", "objective.lower_latents=reuse"],
         {"model.init": "xavier", "model.encoder_heads": "bias", "objective.latent_reduction": "sum_over_dims",
          "objective.lower_latents": "reuse"}),  # an explicit value stays
        (["model.arch=triangle", "data.channels=3"], {"model.init": "triangle"}),
    ):
        cfg = load_config(None, overrides)
        before = flatten(to_dict(cfg))
        resolved = resolve(cfg)
        assert flatten(to_dict(cfg)) == before  # the caller's config is not changed
        flat = flatten(to_dict(resolved))
        assert {k: flat[k] for k in want} == want, overrides
        assert flat["train.mixed_precision"] == "bf16"  # the launcher's
        # only the modes stay `auto`: what to resume, and whether stderr is a terminal
        assert sorted(k for k, v in flat.items() if v == "auto") == ["checkpoint.resume", "log.progress"]
        assert resolve(resolved) == resolved  # idempotent
    assert resolve(load_config(None, []), launcher=False).train.mixed_precision == "auto"


def test_a_config_written_before_a_key_existed_resolves_to_what_the_old_code_ran():
    from bidvl.config import LEGACY, resolve

    cfg = load_config(None, ["model.arch=resnet", "data.resolution=64", "data.channels=3"])
    old = resolve(cfg, written={"model.arch", "data.resolution"}, launcher=False)  # none of LEGACY's keys
    assert (old.model.encoder_heads, old.objective.latent_reduction, old.objective.lower_latents) == (
        LEGACY["model.encoder_heads"], LEGACY["objective.latent_reduction"], LEGACY["objective.lower_latents"])
    assert resolve(cfg, written=set(LEGACY), launcher=False).model.encoder_heads == "no_bias"


def test_an_old_resnet_run_loads_with_the_heads_it_was_trained_with(tmp_path):
    """Loading resolves the run's config as training did: a config.yaml without
    model.encoder_heads (written before the key existed) builds heads with a bias, so the weights fit."""
    import yaml
    from safetensors.torch import save_file

    from bidvl.config import to_yaml
    from bidvl.evaluation import load_run
    from bidvl.models import build_nets, cpu_state_dict

    overrides = ["model.arch=resnet", "data.resolution=64", "data.channels=3", "model.energy_width=8",
                 "model.encoder_width=8", "model.generator_width=8", "model.latent_dim=4",
                 "model.encoder_heads=bias"]
    trained = load_config(None, overrides)
    nets = build_nets(trained.model, channels=3, resolution=64)
    written = yaml.safe_load(to_yaml(trained))
    for section, key in (("model", "encoder_heads"), ("objective", "latent_reduction"), ("objective", "lower_latents")):
        del written[section][key]
    export = tmp_path / "model"
    export.mkdir()
    (export / "config.yaml").write_text(yaml.safe_dump(written))
    for name, net in zip(("energy", "encoder", "generator"), nets):
        save_file(cpu_state_dict(net), str(export / f"{name}.safetensors"), metadata={"step": "3"})
    run = load_run(export)
    assert run.cfg.model.encoder_heads == "bias" and run.step == 3
