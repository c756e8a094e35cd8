"""The engine's data seam: what `Trainer.fit(stream)` reads batches from.

A stream has `batches_per_epoch` (micro-batches per rank and epoch, for the LR schedule) and
`open(start_batch)`, an iterator of (images, labels, skipped) from micro-batch `start_batch` on
(called again after a rollback). `ShardStream` is the one over `data.train`'s shards; tests pass
their own (e.g. a slowed one).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError
from .meta import read_meta
from .reader import train_stream


class ShardStream:
    """data.train's shards as this rank's training stream; built there first (main process) when
    the folder has no meta.json and data.auto_build names a dataset. Checks meta.json against
    data.resolution, data.channels and data.train_split (ConfigError naming the key)."""

    def __init__(self, cfg: Config, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        folder = Path(cfg.data.train)
        if not (folder / "meta.json").is_file() and cfg.data.auto_build:
            if accelerator.is_main_process:
                from .build import build_shards

                accelerator.print(f"building {cfg.data.auto_build} shards in {folder} (first use)")
                build_shards(cfg.data.auto_build, out=str(folder), resolution=cfg.data.resolution)
            accelerator.wait_for_everyone()
        meta = read_meta(folder)
        for key, value in (("resolution", cfg.data.resolution), ("channels", cfg.data.channels)):
            if meta[key] != value:
                raise ConfigError(f"data.{key}={value} but {folder / 'meta.json'} says {key}={meta[key]}")
        if cfg.data.train_split not in meta["splits"]:
            raise ConfigError(f"data.train_split={cfg.data.train_split!r}: {folder / 'meta.json'} has "
                              f"splits {', '.join(meta['splits'])}")
        self.batches_per_epoch = self._stream(0).batches_per_epoch

    def _stream(self, start_batch: int):
        cfg, acc = self.cfg, self.accelerator
        return train_stream(
            cfg.data.train, cfg.data.train_split, cfg.train.batch_size, seed=cfg.run.seed,
            rank=acc.process_index, world_size=acc.num_processes, num_workers=cfg.data.num_workers,
            start_batch=start_batch, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
            max_skipped=cfg.data.max_skipped,
        )

    def open(self, start_batch: int):
        return iter(self._stream(start_batch))
