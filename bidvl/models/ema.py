"""Exponential moving average of a net (the generator's, with train.ema > 0; off by default, as
the authors)."""

from __future__ import annotations

import copy

import torch

from .registry import cpu_state_dict

WARMUP_OFFSET = 10  # decay_k = min(decay, (1 + k) / (WARMUP_OFFSET + k)), diffusers' EMAModel schedule


class EMA:
    """ema = d * ema + (1 - d) * param after every update; buffers are copied. d is `decay`; with
    `warmup` (train.ema_warmup) it is min(decay, (1 + k) / (10 + k)) at the k-th update since the
    EMA started (0.1, 0.18, 0.25, ... reaching 0.999 after ~9000 updates), as diffusers' EMAModel
    and timm's warm-up ramps do: a young EMA follows the net instead of keeping its initial
    weights for ~1/(1 - decay) steps. The count k is the caller's (TrainState.ema_updates), so
    that it is saved and restored with the run."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    def decay_at(self, updates: int) -> float:
        """The decay of the update after `updates` earlier ones."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + updates) / (WARMUP_OFFSET + updates))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, updates: int = 0):
        decay = self.decay_at(updates)
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(b)

    @torch.no_grad()
    def start_from(self, module: torch.nn.Module):
        """The EMA becomes a copy of `module`'s weights (an EMA turned on when resuming a run)."""
        for ema_t, t in zip([*self.module.parameters(), *self.module.buffers()],
                            [*module.parameters(), *module.buffers()]):
            ema_t.copy_(t.detach())

    def state_dict(self):

        return cpu_state_dict(self.module)

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
