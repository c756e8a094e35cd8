"""Exponential moving average of a net (the generator's, with train.ema > 0; off by default, as
the authors)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """ema = decay * ema + (1 - decay) * param after every update; buffers are copied."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module):
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(b)

    def state_dict(self):
        from .registry import cpu_state_dict

        return cpu_state_dict(self.module)

    def load_state_dict(self, state):
        self.module.load_state_dict(state)
