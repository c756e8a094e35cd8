"""A trained model, ready to use: `bidvl.load(path)`.

    import bidvl
    m = bidvl.load("runs/digits/model")          # or the run folder: export, else latest checkpoint
    x = m.sample(16)                             # (16, C, H, W) in [-1, 1]
    x_hat = m.reconstruct(x)                     # G(mu(x)), same shape
    scores = m.ood_score(x)                      # (16,), higher = more in-distribution

Everything runs under no_grad with the nets' weights never changed. Images are float tensors in
[-1, 1] of the run's (C, H, W); results come back on the CPU.

BatchNorm: `sample` and `reconstruct` default to bn_mode="train" (batch statistics, as the authors
sample, and as launch/sample.py does by default; buffers are restored after each batch), so a
result depends on the other images in its batch. bn_mode="eval" uses the running statistics, which
is what the evaluation's reconstruction RMSE uses. `energy` and `ood_score` always run in eval mode
(as the evaluation's OOD AUROC).

The generator is the EMA (`generator_ema.safetensors`, written with train.ema > 0) when the folder
has one, unless ema=False; `m.generator_kind` says which ("ema" | "trained").

The Hugging Face Hub, through huggingface_hub's ModelHubMixin: `m.save_pretrained(folder)` writes
the export format (what `bidvl.load` reads) with the model card (Hub front matter: library_name
bidvl, license, tags; the paper's BibTeX), samples.png and health.json; `m.push_to_hub("user/name")`
uploads that folder; `BiDVLModel.from_pretrained("user/name")` downloads it into the Hub cache
(or finds it there: `local_files_only=True` offline) and loads it, and `from_pretrained(folder)`
on a local folder is `bidvl.load(folder)`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin, snapshot_download
from safetensors.torch import save_file

from bidvl import objectives
from bidvl.checkpoint import TrainState
from bidvl.config import Config, to_yaml
from bidvl.evaluation.loading import LoadedRun, load_run, net_states
from bidvl.evaluation.metrics import energies
from bidvl.evaluation.sampling import forward_in_mode, restored_buffers, sample_images
from bidvl.health import verdict_of
from bidvl.model_card import NUM_SAMPLES, SEED, write_hub_config, write_model_card
from bidvl.models import cpu_state_dict
from bidvl.run_dir import CARD_FILES, CONFIG_FILE, EMA_FILE, EXPORT_FILES, TRAIN_STATE_FILE


class BiDVLModel(ModelHubMixin, library_name="bidvl", license="apache-2.0",
                 pipeline_tag="unconditional-image-generation", tags=["bidvl", "energy-based-model"]):
    """The three nets of a run (eval mode, requires_grad off), its config and step.

    Attributes: energy_net, encoder, generator (torch modules), cfg, step, source (the folder the
    weights came from), kind ("export" | "checkpoint"), generator_kind ("ema" | "trained"), device.
    """

    def __init__(self, run: LoadedRun, device: torch.device | str = "cpu"):
        self.run = run
        self.energy_net, self.encoder, self.generator = run.nets
        self.device = torch.device(device)
        self._hub_mixin_config = None  # the mixin's record of init arguments: not a config of ours

    cfg: Config = property(lambda self: self.run.cfg)
    step: int = property(lambda self: self.run.step)
    source: Path = property(lambda self: self.run.source)
    kind: str = property(lambda self: self.run.kind)
    generator_kind: str = property(lambda self: self.run.generator)

    @property
    def health(self) -> dict | None:
        """The run's health check of these weights (bidvl.health: `verdict`, `reasons`, `figures`):
        the export's health.json, or the run's last check up to this checkpoint; None if unchecked."""
        return verdict_of(self.source, self.step)

    def __repr__(self) -> str:
        c = self.cfg
        health = self.health
        return (f"BiDVLModel({c.objective.name}, {c.model.arch} {c.data.channels}x{c.data.resolution}"
                f"x{c.data.resolution}, step {self.step}, generator {self.generator_kind}, "
                f"health {health['verdict'] if health else 'not checked'}, from {self.source})")

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch_size: int = 100, bn_mode: str = "train") -> torch.Tensor:
        """(n, C, H, W) float32 in [-1, 1]: G(h), h ~ N(0, I). Sample i depends only on (seed, i)
        and the batch it is generated in (bn_mode train): the same images as
        `launch/sample.py --num n --seed seed --batch-size batch_size --bn-mode bn_mode`."""
        return sample_images(self.generator, n, self.cfg.model.latent_dim, seed, batch_size, bn_mode,
                             self.device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, bn_mode: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(h|x), each (B, latent_dim)."""
        mu, logvar = forward_in_mode(self.encoder, bn_mode, self._images(x))
        return mu.float().cpu(), logvar.float().cpu()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, bn_mode: str = "train") -> torch.Tensor:
        """G(mu(x)) for images x (B, C, H, W) in [-1, 1]: float32, same shape, in [-1, 1]. Both nets
        in `bn_mode` for the whole batch (as launch/sample.py --reconstruct)."""
        v = self._images(x)
        with restored_buffers(self.encoder), restored_buffers(self.generator):
            mu, _ = forward_in_mode(self.encoder, bn_mode, v)
            return forward_in_mode(self.generator, bn_mode, mu).float().cpu()

    @torch.no_grad()
    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) float64 energies E(x), eval mode; lower = more likely under the model. For
        objective.name=vae (no trained energy net) the negative ELBO at h = mu(x), as the
        evaluation scores a VAE."""
        scorer = objectives.build(self.cfg).ood_scorer(self.energy_net, self.encoder, self.generator)
        return energies(scorer, self._images(x)).cpu()

    def ood_score(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) float64 -E(x): higher = more in-distribution. The score whose AUROC
        launch/evaluate.py reports (in-distribution images as positives)."""
        return -self.energy(x)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """Writes the model as an export folder (see `_save_pretrained`) and returns its path;
        `push_to_hub=True, repo_id=...` also uploads it (huggingface_hub's ModelHubMixin)."""
        pushed = super().save_pretrained(save_directory, **kwargs)
        return pushed if kwargs.get("push_to_hub") else Path(save_directory)

    def _save_pretrained(self, save_directory: Path) -> None:
        """{energy,encoder,generator}.safetensors (step in their metadata), config.yaml and, when
        the EMA is loaded, generator_ema.safetensors with the trained generator beside it, so that
        loading the folder gives this model again; the model card (README.md with the Hub's front
        matter), samples.png, health.json and config.json (for the Hub): the export's own when the
        weights come from one, else written here from the checkpoint's train state and 64 samples."""



        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"step": str(self.step)}
        generator = cpu_state_dict(self.generator)
        if self.generator_kind == "ema":  # the trained generator is only on disk
            trained = net_states(self.source, self.kind, ema=False)["generator"][0]
            save_file(generator, str(folder / EMA_FILE))
            generator = trained
        else:
            (folder / EMA_FILE).unlink(missing_ok=True)  # an older save's EMA would be loaded instead
        for name, state in zip(EXPORT_FILES, (cpu_state_dict(self.energy_net), cpu_state_dict(self.encoder),
                                              generator)):
            save_file(state, str(folder / name), metadata=meta)
        (folder / CONFIG_FILE).write_text(to_yaml(self.cfg))
        if self.kind == "export" and (self.source / CARD_FILES[0]).is_file():
            if self.source.resolve() != folder.resolve():
                for name in CARD_FILES:
                    if (self.source / name).is_file():
                        shutil.copyfile(self.source / name, folder / name)
        else:  # a checkpoint: the card the export would have had, from its train state
            state = TrainState.read(self.source / TRAIN_STATE_FILE)
            samples = sample_images(self.generator, NUM_SAMPLES, self.cfg.model.latent_dim, SEED, device=self.device)
            write_model_card(folder, self.cfg, state, "not recorded (saved from a checkpoint)", samples,
                             self.generator_kind == "ema", max(state.world_size, 1), self.health)
        write_hub_config(folder, self.cfg, self.step)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, device: torch.device | str = "cpu",
                         ema: bool | None = None, **_) -> BiDVLModel:
        """A local folder: `bidvl.load(folder, device, ema)`. A Hub id ("user/name"): the repository's
        files through the Hub cache (huggingface_hub.snapshot_download), then loaded the same way."""
        if os.path.isdir(model_id):
            return load(model_id, device=device, ema=ema)

        folder = snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                   force_download=force_download, local_files_only=local_files_only,
                                   token=token)
        return load(folder, device=device, ema=ema)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        c, r = self.cfg.data.channels, self.cfg.data.resolution
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, r, r):
            raise ValueError(f"expected images of shape (B, {c}, {r}, {r}) in [-1, 1], got {tuple(x.shape)}")
        return x.to(self.device, torch.float32)


def load(path: str | os.PathLike, device: torch.device | str = "cpu", ema: bool | None = None,
         checkpoint: str | int | None = None) -> BiDVLModel:
    """A trained model from a run folder (its export if present, else its latest complete
    checkpoint; `checkpoint` = latest | final | STEP | a checkpoint folder picks one) or from an
    exported RUN_DIR/model folder alone. ema: None = the generator EMA if the folder has one,
    False = the trained generator, True = the EMA or an error naming the missing file."""
    return BiDVLModel(load_run(path, checkpoint, device=device, ema=ema), device)
