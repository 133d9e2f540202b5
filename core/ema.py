"""An exponential moving average (EMA) of the adapter's weights.

Small-data DreamBooth at the high rates adapters need does not settle: from one step to the next the weights
wander around what the subject asks for, and which prompts they disturb on the way changes with the training seed
(README, "What the demo adapters learn"). The average of the last steps' weights sits in the middle of that
wandering. With `train.ema_decay` set, the trainer keeps the average beside the weights it trains and everything a
user sees is the average: the samples, the saved adapter, the checkpoints' adapters and the paused run in the
playground. The optimizer keeps training the live weights.

shadow <- d * shadow + (1 - d) * weight after every optimizer step, with d = min(decay, (1 + n) / (10 + n)) after n
updates: early on the average follows the weights closely, so it is not held back by the untrained start.
"""
from __future__ import annotations

import contextlib

import torch


def ema_rate(decay: float, updates: int) -> float:
    """The decay used for update number `updates` (1, 2, ...): the warm-up keeps the first averages close."""
    return min(decay, (1 + updates) / (10 + updates))


class AdapterEMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]
        self._trained: list[list[torch.Tensor]] = []  # the trained weights while the average is in the model

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        keep = ema_rate(self.decay, self.updates)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - keep)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the duration (samples, saving, a pause); the trained ones after."""
        self._trained.append([p.detach().clone() for p in self.params])
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            put_back(self.params, self._trained.pop())

    def state_dict(self) -> dict:
        """The live (trained) weights and the update count; the average itself is what the checkpoint's adapter
        file holds (saved inside `applied`)."""
        trained = self._trained[0] if self._trained else self.params  # saved during a pause: the average is in
        return {"updates": self.updates, "live": [p.detach().cpu().clone() for p in trained]}

    def load_state_dict(self, state: dict | None) -> None:
        """After the checkpoint's adapter (the average) was loaded into the model: that becomes the average again,
        and the trained weights go back into the model. None (a checkpoint saved without an average): the average
        starts again from the loaded weights."""
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0
        if state is not None:
            put_back(self.params, state["live"])
            self.updates = int(state["updates"])


@torch.no_grad()
def put_back(params: list[torch.nn.Parameter], live: list[torch.Tensor]) -> None:
    """The trained weights a checkpoint kept beside its averaged adapter, back into the model."""
    if len(live) != len(params) or any(w.shape != p.shape for p, w in zip(params, live)):
        raise ValueError("The checkpoint's trained weights do not fit this adapter (other targets or rank?).")
    for p, w in zip(params, live):
        p.copy_(w.to(p.device, p.dtype))
