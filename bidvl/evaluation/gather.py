"""Per-row results from every rank, in global index order.

    device, rank, world, is_main = process_layout(accelerator)   # accelerator=None: one CPU process
    rows = IndexedRows(accelerator)
    for images, _, index in eval_stream(..., rank=rank, world_size=world):  # same batch count on all
        if (index >= 0).any():
            rows.add(index, energy=energies(images))  # collective: every rank calls it every batch
        else:
            rows.add_padding(len(index), torch.float64, energy=())  # nothing of ours: keep in step
    out = rows.result()                              # {"index": sorted, "energy": matching rows}

Rows with index -1 (padding) are dropped and the rest sorted by index, so the result is the same
whatever the world size; a repeated index is an error (a sample counted twice).
"""

from __future__ import annotations

import sys
import time

from typing import NamedTuple

import numpy as np
import torch
from accelerate.utils import broadcast_object_list


class ProcessLayout(NamedTuple):
    device: torch.device
    rank: int
    world: int
    is_main: bool


def process_layout(accelerator) -> ProcessLayout:
    """Where this process runs and its place among the others; `None` means one CPU process."""
    if accelerator is None:
        return ProcessLayout(torch.device("cpu"), 0, 1, True)
    return ProcessLayout(accelerator.device, accelerator.process_index, accelerator.num_processes,
                         accelerator.is_main_process)


def progress(iterable, accelerator, desc: str, total: int | None = None):
    """`iterable` with a tqdm bar on the main process when stderr is a terminal (tqdm's
    disable=None), left off in logs, pipes and on the other ranks; the bar is removed when done
    and the main process prints one summary line, `desc: N batches in T s`, terminal or not
    (for passes of more than one batch)."""
    if not process_layout(accelerator).is_main:
        return iterable
    from tqdm.auto import tqdm

    return _summarised(tqdm(iterable, desc=desc, total=total, disable=None, leave=False, dynamic_ncols=True), desc)


def _summarised(bar, desc: str):
    t0, count = time.perf_counter(), 0
    with bar:
        for item in bar:
            count += 1
            yield item
    if count > 1:  # a pass of one batch (the model card's samples) is not worth a line
        print(f"{desc}: {count} batches in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def rounds(count: int, batch_size: int, world: int) -> int:
    """How many rounds `dealt_batches(count, batch_size, rank, world)` yields (on every rank)."""
    return -(-(-(-count // batch_size)) // world)


def broadcast_from_main(accelerator, obj):
    """The main process's `obj` (any picklable value) on every rank."""
    if process_layout(accelerator).world == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


class IndexedRows:
    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.parts: dict[str, list[np.ndarray]] = {}

    def _gather(self, t: torch.Tensor) -> np.ndarray:
        acc = self.accelerator
        if process_layout(acc).world > 1:
            t = acc.gather(t.to(acc.device).contiguous())
        return t.detach().cpu().numpy()

    def add(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        index = self._gather(index.long())
        keep = index >= 0
        self.parts.setdefault("index", []).append(index[keep])
        for name, value in values.items():
            self.parts.setdefault(name, []).append(self._gather(value)[keep])

    def add_padding(self, count: int, dtype: torch.dtype = torch.float32, **shapes: tuple) -> None:
        """`count` rows of index -1 (dropped by `result`), for a rank with nothing of its own in a
        round: the gathers of every rank stay in step. `shapes` gives each column's row shape and
        `dtype` its type, as the ranks with real rows produce them (the gather needs both equal)."""
        self.add(torch.full((count,), -1),
                 **{name: torch.zeros(count, *shape, dtype=dtype) for name, shape in shapes.items()})

    def result(self) -> dict[str, np.ndarray]:
        if not self.parts:
            return {"index": np.zeros(0, dtype=np.int64)}
        out = {k: np.concatenate(v) for k, v in self.parts.items()}
        order = np.argsort(out["index"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
        if len(out["index"]) and (np.diff(out["index"]) == 0).any():
            raise RuntimeError("a sample index was gathered twice: the evaluation split is broken")
        return out
