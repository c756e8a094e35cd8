"""The engine's data seam: what `Trainer.fit(stream)` reads batches from.

A stream has `batches_per_epoch` (micro-batches per rank and epoch, for the LR schedule) and
`open(start_batch)`, an iterator of (images, labels, skipped) from micro-batch `start_batch` on
(called again after a rollback). `ShardStream` is the one over `data.train`'s shards; tests pass
their own (e.g. a slowed one).
"""

from __future__ import annotations

from pathlib import Path

from ..ceilings import loader_workers_problem
from ..config import Config, ConfigError
from . import remote
from .meta import FOREIGN, is_foreign_folder, read_meta, split_info
from .reader import train_stream


class ShardStream:
    """data.train's shards as this rank's training stream. data.train is any source of
    bidvl.data.remote (local folder, folder URL, pipe: template, explicit shard list); a local
    folder without meta.json is built there first (main process) when data.auto_build names a
    dataset. Checks meta.json against data.resolution, data.channels and data.train_split
    (ConfigError naming the key); a missing meta.json or shard (HTTP 404) is a ShardError naming
    the URL, here, before the first step. So are a global batch larger than the split (every batch
    would repeat images) and more loader workers than the cores can run (bidvl.ceilings)."""

    def __init__(self, cfg: Config, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        source = cfg.data.train
        too_many = loader_workers_problem(cfg.data.num_workers, "data.num_workers")
        if too_many:
            raise ConfigError(too_many)
        if cfg.data.train_count and not remote.is_list(source):
            raise ConfigError(f"data.train_count={cfg.data.train_count}: only for an explicit shard "
                              f"list (e.g. .../train-{{000000..000063}}.tar); {source} is a shards "
                              f"folder whose meta.json gives the counts")
        folder = Path(remote.local_path(source))
        local_folder = not remote.is_remote(source) and not remote.is_list(source)
        if cfg.data.auto_build and not (local_folder and (folder / "meta.json").is_file()):
            if not local_folder:
                raise ConfigError(f"data.auto_build={cfg.data.auto_build!r} builds into a local "
                                  f"folder, but data.train={source} is not one (set "
                                  f"data.auto_build='' or publish the shards there first)")
            if accelerator.is_main_process:
                from .build import build_once

                if not (folder / "meta.json").is_file():
                    accelerator.print(f"building {cfg.data.auto_build} shards in {folder} (first use)")
                build_once(cfg.data.auto_build, folder, cfg.data.resolution)
            accelerator.wait_for_everyone()
        self.net = remote.NetOptions.of(cfg.data)
        described = not remote.is_list(source) and not is_foreign_folder(source)  # has a meta.json
        if described:
            splits = read_meta(source, self.net)["splits"]
            if cfg.data.train_split not in splits:
                raise ConfigError(f"data.train_split={cfg.data.train_split!r}: "
                                  f"{remote.member(source, 'meta.json')} has splits {', '.join(splits)}")
        meta, _, _ = split_info(source, cfg.data.train_split, self.net, cfg.data.train_count,
                                cfg.data.resolution, cfg.data.channels)
        where = remote.member(source, "meta.json") if described else source
        # Shards without meta.json are counted once, here (a download per remote shard), not again
        # on every open.
        self.count = meta["splits"][cfg.data.train_split]["count"] if meta["format"] == FOREIGN \
            else cfg.data.train_count
        for key, value in (("resolution", cfg.data.resolution), ("channels", cfg.data.channels)):
            if meta[key] != value:
                raise ConfigError(f"data.{key}={value} but {where} says {key}={meta[key]}")
        images, processes = meta["splits"][cfg.data.train_split]["count"], accelerator.num_processes
        if cfg.train.batch_size * processes > images:
            fits = (f"at most {images // processes}" if images >= processes
                    else "fewer processes: there are fewer images than processes")
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} on {processes} process(es) takes "
                              f"{cfg.train.batch_size * processes} images a step, but split "
                              f"{cfg.data.train_split!r} of {where} has {images}: every batch would "
                              f"repeat images; lower train.batch_size ({fits})")
        self.batches_per_epoch = self._stream(0).batches_per_epoch

    def _stream(self, start_batch: int):
        cfg, acc = self.cfg, self.accelerator
        return train_stream(
            cfg.data.train, cfg.data.train_split, cfg.train.batch_size, seed=cfg.run.seed,
            rank=acc.process_index, world_size=acc.num_processes, num_workers=cfg.data.num_workers,
            start_batch=start_batch, shuffle_buffer=cfg.data.shuffle_buffer, on_error=cfg.data.on_error,
            max_skipped=cfg.data.max_skipped, net=self.net, count=self.count,
            resolution=cfg.data.resolution, channels=cfg.data.channels, crop=cfg.data.crop,
            flip=cfg.data.flip, verify=cfg.data.verify_shards,
        )

    def open(self, start_batch: int):
        return iter(self._stream(start_batch))
