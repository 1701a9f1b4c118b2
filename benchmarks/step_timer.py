"""The training benchmarks' clock: the wall time of every optimizer step, measured by a trainer callback."""

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    """``times``: seconds of each step, from its start to its end — on a GPU once its kernels have finished
    (they run asynchronously: without the synchronize a step would look as long as its launches)."""

    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)
