"""Per-row results from every rank, in global index order.

    rows = IndexedRows(accelerator)                  # accelerator=None: one process, no collectives
    for images, _, index in eval_stream(...):        # every rank: same number of batches
        rows.add(index, energy=energies(images))     # collective: every rank calls it every batch
    out = rows.result()                              # {"index": sorted, "energy": matching rows}

Rows with index -1 (padding) are dropped and the rest sorted by index, so the result is the same
whatever the world size; a repeated index is an error (a sample counted twice).
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.utils import broadcast_object_list


def broadcast_from_main(accelerator, obj):
    """The main process's `obj` (any picklable value) on every rank."""
    if accelerator is None or accelerator.num_processes == 1:
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
        if acc is not None and acc.num_processes > 1:
            t = acc.gather(t.to(acc.device).contiguous())
        return t.detach().cpu().numpy()

    def add(self, index: torch.Tensor, **values: torch.Tensor) -> None:
        index = self._gather(index.long())
        keep = index >= 0
        self.parts.setdefault("index", []).append(index[keep])
        for name, value in values.items():
            self.parts.setdefault(name, []).append(self._gather(value)[keep])

    def result(self) -> dict[str, np.ndarray]:
        if not self.parts:
            return {"index": np.zeros(0, dtype=np.int64)}
        out = {k: np.concatenate(v) for k, v in self.parts.items()}
        order = np.argsort(out["index"], kind="stable")
        out = {k: v[order] for k, v in out.items()}
        if len(out["index"]) and (np.diff(out["index"]) == 0).any():
            raise RuntimeError("a sample index was gathered twice: the evaluation split is broken")
        return out
