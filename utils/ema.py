"""Exponential moving average of a model's parameters (saved in checkpoints, used for evaluation)."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Keeps ``shadow``, a frozen copy of a module whose floating-point parameters follow
    θ_ema ← d·θ_ema + (1 − d)·θ after every :meth:`update`; buffers are copied.

    ``decay = 0`` makes the shadow a plain copy of the latest weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.shadow.parameters(), model.parameters()):
            if e.dtype.is_floating_point:
                e.lerp_(p.detach(), 1.0 - self.decay)
            else:
                e.copy_(p)
        for e, b in zip(self.shadow.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shadow.load_state_dict(state)
