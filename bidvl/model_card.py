"""The exported model's card: RUN_DIR/model/README.md (what was trained, on what, for how long,
how it scored, how to load it) and RUN_DIR/model/samples.png beside it.

Written by the engine into the export folder before it is renamed into place, so a card always
describes the weights next to it. The evaluation table is RUN_DIR/eval/step_*.md of the exported
step (else the newest one) at export time; `launch/evaluate.py` refreshes it after evaluating the
export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import ModelCardData
from torchvision.utils import save_image

from . import __version__, objectives
from .benchmarking import device_name
from .config import Config
from .evaluation.sampling import sample_images
from .health import summary, write_export
from .io import write_text
from .run_dir import CARD_FILE, HUB_CONFIG, SAMPLES_FILE, RunDir

NUM_SAMPLES = 64
SEED = 0
EVALUATION, SAMPLES = "## Evaluation\n\n", "\n\n## Samples\n"  # the section refresh_evaluation rewrites


BIBTEX = """@inproceedings{kan2022bidvl,
  title     = {Bi-level Doubly Variational Learning for Energy-based Latent Variable Models},
  author    = {Kan, Ge and L{\\"u}, Jinhu and Wang, Tian and Zhang, Baochang and Zhu, Aichun and
               Huang, Lei and Guo, Guodong and Snoussi, Hichem},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""


def front_matter(cfg: Config) -> str:
    """The card's YAML front matter for the Hugging Face Hub (huggingface_hub's ModelCardData):
    library, license, pipeline tag and tags naming the method, objective, nets and data."""
    data = ModelCardData(
        library_name="bidvl", license="apache-2.0", pipeline_tag="unconditional-image-generation",
        tags=["bidvl", "energy-based-model", "latent-variable-model", "generative-model", "pytorch",
              f"objective:{cfg.objective.name}", f"arch:{cfg.model.arch}",
              f"resolution:{cfg.data.resolution}",
              "data:" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.data.train).name).strip("-") or "unnamed")[:48]])
    return f"---\n{data.to_yaml()}\n---\n"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def latest_evaluation(run_dir: Path, step: int | None = None) -> str:
    """The evaluation table for the card: the report of `step` (the exported weights' step) when
    there is one, else the newest report (its step is in its name and its first lines)."""
    run = RunDir(run_dir)
    reports = run.eval_reports(".md")
    own = run.eval_report(step).with_suffix(".md") if step is not None else None
    report = own if own is not None and own.is_file() else (reports[-1] if reports else None)
    if report is None:
        return (f"None yet: `python launch/evaluate.py --run {run_dir}` writes "
                f"`{run.eval}/step_XXXXXXXX.md` and refreshes this section.")
    return f"From `{report.relative_to(run_dir)}`:\n\n" + report.read_text().strip()


def refresh_evaluation(run_dir: Path, step: int) -> Path | None:
    """Rewrites the Evaluation section of RUN_DIR/model/README.md (launch/evaluate.py calls this
    after evaluating the export). The card is replaced atomically; no card, nothing is done."""
    card = RunDir(run_dir).card
    if not card.is_file():
        return None
    text = card.read_text()
    head, sep, rest = text.partition(EVALUATION)
    _, sep2, tail = rest.partition(SAMPLES)
    if not sep or not sep2:  # not a card of ours (edited by hand): left alone
        return None
    return write_text(card, head + EVALUATION + latest_evaluation(Path(run_dir), step) + SAMPLES + tail)


def write_model_card(folder: Path, cfg: Config, state, devices: str, samples: torch.Tensor,
                     ema: bool, world: int = 1, health: dict | None = None) -> None:
    """README.md + samples.png (a grid of `samples`, in [-1, 1]) into `folder`, and the run's last
    health check (`health`, bidvl.health) as health.json."""


    folder, run_dir = Path(folder), Path(cfg.run.dir)
    save_image(samples, folder / SAMPLES_FILE, nrow=max(1, round(len(samples) ** 0.5)),
               normalize=True, value_range=(-1, 1))
    t, m, d = cfg.train, cfg.model, cfg.data
    images = state.step * t.batch_size * t.grad_accum * world
    rows = [
        ("objective", objectives.build(cfg).describe()),
        ("nets", f"{m.arch}{' ' + m.timm_name if m.timm_name else ''}, latent dim {m.latent_dim}, widths "
                 f"E {m.energy_width} / encoder {m.encoder_width} / generator {m.generator_width}, "
                 f"energy output {m.energy_output}"),
        ("data", f"`{d.train}` split `{d.train_split}`, {d.resolution} px, {d.channels} channel(s)"),
        ("steps", f"{state.step:,} (max_steps {t.max_steps:,})"),
        ("images seen", f"{images:,} (steps x batch {t.batch_size} x grad_accum {t.grad_accum} x {world} processes)"),
        ("training time", f"{_duration(state.budget_used_s)} of data + steps (all resumes; evaluation "
                          "and checkpoints not counted)"),
        ("devices", devices),
        ("precision", t.mixed_precision),
        ("generator EMA", f"decay {t.ema:g} (generator_ema.safetensors)" if ema else "off"),
        ("seed", str(cfg.run.seed)),
        ("run health", summary(health) + (" (health.json; every check: RUN_DIR/health.jsonl)" if health else "")),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    text = f"""{front_matter(cfg)}
# BiDVL model: `{run_dir.name}`

An energy-based latent variable model trained with bidvl (Bi-level Doubly Variational Learning,
Kan et al., CVPR 2022): an energy net E(v), a Gaussian encoder q(h|v) and a generator G(h), as
`energy.safetensors`, `encoder.safetensors` and `generator.safetensors`, with the resolved
`config.yaml` they were trained with.

| | |
|---|---|
{table}

{EVALUATION}{latest_evaluation(run_dir, state.step)}{SAMPLES}
![{NUM_SAMPLES} samples](samples.png)

{len(samples)} samples G(h), h ~ N(0, I) with seed {SEED}, BatchNorm with batch statistics as the
authors sample{", from the EMA generator" if ema else ""}.

## Load

```python
import bidvl

model = bidvl.load("{RunDir(run_dir).export}")   # or the run folder
images = model.sample(16)                    # (16, {d.channels}, {d.resolution}, {d.resolution}) in [-1, 1]
```

Pushed to the Hugging Face Hub (`model.push_to_hub("user/name")`), it loads with
`bidvl.BiDVLModel.from_pretrained("user/name")` (through the Hub cache). From the command line:
`bidvl sample --run {run_dir} --num 64 --out grid.png`, and `bidvl evaluate --run {run_dir}` for
FID, reconstruction RMSE and OOD AUROC.

## Citation

```bibtex
{BIBTEX}
```
"""
    (folder / CARD_FILE).write_text(text)
    write_hub_config(folder, cfg, state.step)
    write_export(folder, health)


def write_hub_config(folder: Path, cfg: Config, step: int) -> None:
    """config.json: what the weights are, for the Hub (the training config is config.yaml)."""


    (Path(folder) / HUB_CONFIG).write_text(json.dumps(
        {"library_name": "bidvl", "bidvl_version": __version__, "step": step, "objective": cfg.objective.name,
         "arch": cfg.model.arch, "resolution": cfg.data.resolution, "channels": cfg.data.channels},
        indent=1) + "\n")


def model_card_writer(accelerator, cfg: Config, state, generator, autocast, ema: bool, health: dict | None = None):
    """`extra(folder)` for Checkpointer.export: samples from `generator` (under `autocast`), then
    the card. Sampling reads no global RNG and restores every buffer: exporting changes nothing."""

    def write(folder: Path) -> None:

        with autocast:
            samples = sample_images(generator, NUM_SAMPLES, cfg.model.latent_dim, SEED, device=accelerator.device)
        kind = "cuda" if accelerator.device.type == "cuda" else "cpu"
        world = accelerator.num_processes
        write_model_card(folder, cfg, state, f"{world} x {device_name(kind)}", samples, ema, world, health)

    return write
