"""Per-step learning-rate schedule of the DPMamba recipe."""

import math

import torch
from speechbrain.utils.checkpoints import register_checkpoint_hooks, mark_as_loader, mark_as_saver


@register_checkpoint_hooks
class WarmupCosineScheduler:
    """Linear warmup to ``lr``, then cosine decay to ``final_ratio * lr`` at ``total_steps``.

    DPMamba's setup: 20k warmup steps, then per-step cosine decay to 1% of the
    peak. Call it once per optimizer step; its step count is checkpointed, so a
    resumed run continues the schedule where it stopped.

    Arguments
    ---------
    lr : float
        Peak learning rate.
    warmup_steps : int
        Steps of linear warmup (0 for none).
    total_steps : int
        Step at which the decay reaches ``final_ratio * lr`` (held afterwards).
    final_ratio : float
        Final learning rate as a fraction of the peak.

    Example
    -------
    >>> opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> scheduler = WarmupCosineScheduler(1.0, warmup_steps=2, total_steps=4, final_ratio=0.01)
    >>> [round(scheduler(opt), 3) for _ in range(5)]
    [0.5, 1.0, 0.505, 0.01, 0.01]
    """

    def __init__(self, lr: float, warmup_steps: int, total_steps: int, final_ratio: float = 0.01):
        self.peak_lr = lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_ratio = final_ratio
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        """Learning rate after ``step`` optimizer steps (1-based)."""
        if step <= self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        decay_steps = max(1.0, self.total_steps - self.warmup_steps)  # short runs: all warmup
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.peak_lr * (self.final_ratio + (1 - self.final_ratio) * cosine)

    def __call__(self, optimizer: torch.optim.Optimizer) -> float:
        """Advances one step and sets the optimizer's learning rate; returns it."""
        self.step_count += 1
        lr = self.lr_at(self.step_count)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    @mark_as_saver
    def save(self, path):
        torch.save({"step_count": self.step_count}, path)

    @mark_as_loader
    def load(self, path, end_of_epoch=False):
        del end_of_epoch  # the schedule counts steps, not epochs
        self.step_count = torch.load(path)["step_count"]
