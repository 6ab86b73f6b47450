"""An exponential moving average of the trained weights (config ``use_ema``).

After every optimizer step, ``average = decay * average + (1 - decay) * weight`` for each trained
parameter, in float32, on the device of the weights or on the CPU (``ema_device``). Every worker
keeps the same average (ZeRO 0-2 leave each worker the whole weights after a step), so checkpoints
store rank 0's copy and a resumed run reloads it exactly. The average is saved as the family saves
its weights (``Trainable.save`` with the average swapped in), in its own folder beside them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class WeightsAverage:
    def __init__(self, module: torch.nn.Module, decay: float, device: torch.device | str):
        self.decay = decay
        self.parameters = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().to(device, torch.float32, copy=True) for name, p in self.parameters.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, parameter in self.parameters.items():
            average = self.average[name]
            average.lerp_(parameter.detach().to(average.device, torch.float32), 1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.average.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors.keys() != self.average.keys():
            missing, extra = sorted(self.average.keys() - tensors.keys()), sorted(tensors.keys() - self.average.keys())
            raise ValueError(f"the checkpoint's weight average does not fit this run's trained weights "
                             f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, tensor in tensors.items():
            self.average[name].copy_(tensor)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the average for the duration (to save it as the weights are saved)."""
        kept = {name: p.detach().clone() for name, p in self.parameters.items()}
        try:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(self.average[name].to(parameter.device, parameter.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(kept[name])
