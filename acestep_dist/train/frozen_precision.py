"""The frozen base in 8 bits (``base_model_precision``): every frozen ``nn.Linear`` of the module a
worker trains (the DiT's base layers under the adapters, and the frozen encoders) keeps its weight
quantized by torchao, one byte per weight plus a scale per output row. Adapters train on top in
the run's compute dtype; what they learn is saved without the base, so it loads on the
full-precision model as it is.

Two choices here were measured (torchao 0.18, optimum-quanto 0.2.7, DeepSpeed 0.19, peft 0.21):

- torchao's own quantized ``Linear`` runs under autograd and keeps a full-precision copy of each
  weight for the backward pass: a training step then held 1.08x the memory of the unquantized
  model. ``FrozenQuantizedLinear`` below keeps only the quantized weight and expands one layer at a
  time, in the forward and again in the backward.
- The quantized weights are non-persistent buffers, not parameters: DeepSpeed cannot take tensor
  subclasses as parameters (it swaps parameters on ``.to()``, views them as bytes to broadcast, and
  partitions them under ZeRO-3), and engine checkpoints need not carry a frozen base that every
  worker rebuilds identically from the model on a resume. Under ZeRO-3 each worker therefore holds
  the whole quantized base (a quarter of its float32 size).

optimum-quanto (SimpleTuner's ``int8-quanto``) is refused with the reason (``config.QUANTO_REFUSED``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import QUANTO_REFUSED
from ..errors import UserError

FP8_CAPABILITY = (8, 9)  # CUDA GPUs with float8 types: Ada (sm_89), Hopper (sm_90) and later


def check_device_support(precision: str, device: torch.device,
                         capability: Callable[[torch.device], tuple[int, int]] | None = None) -> None:
    """fp8 storage needs a GPU with float8 types (compute capability 8.9 or newer); the CPU's
    conversion kernels serve any CPU."""
    if precision != "fp8-torchao" or device.type != "cuda":
        return
    found = (capability or torch.cuda.get_device_capability)(device)
    if tuple(found) < FP8_CAPABILITY:
        raise UserError(f"base_model_precision fp8-torchao needs a GPU with float8 support (compute capability "
                        f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} or newer: L4, L40S, RTX 40xx, H100); this GPU "
                        f"reports {found[0]}.{found[1]}: use int8-torchao")


class _FrozenLinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen quantized ``W``: the gradient reaches ``x`` only, and nothing of
    ``W``'s full-precision size outlives the call."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        # the quantized tensor itself, not a saved expansion: it is the layer's buffer and lives anyway
        ctx.weight = weight
        dense = weight.dequantize().to(x.dtype)
        return torch.nn.functional.linear(x, dense, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output @ ctx.weight.dequantize().to(grad_output.dtype), None, None


class FrozenQuantizedLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored quantized (a torchao tensor with
    ``dequantize()``). ``weight`` keeps its name, so code that reads a layer's weight (peft's DoRA
    norm, a LoRA's dtype checks) finds it; ``bias`` stays a (frozen) parameter."""

    def __init__(self, linear: torch.nn.Linear, quantized_weight: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", quantized_weight, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinearFunction.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={type(self.weight).__name__}")


@dataclass(frozen=True)
class QuantizedBase:
    """What ``quantize_frozen_base`` did: for the worker's console line and the tests."""

    precision: str
    layers: int
    weights: int  # elements of the quantized weights
    bytes_before: int
    bytes_after: int

    def describe(self) -> str:
        return (f"frozen base {self.precision}: {self.layers} linear layers, {self.weights / 1e6:,.1f}M weights, "
                f"{self.bytes_before / 2**20:,.1f} MiB -> {self.bytes_after / 2**20:,.1f} MiB")


def _torchao_config(precision: str):
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as error:
        raise UserError(f"base_model_precision {precision} needs torchao: pip install 'acestep-dist[quant]' "
                        f"(a torchao release built for your torch): {error}") from None
    return Int8WeightOnlyConfig() if precision == "int8-torchao" else Float8WeightOnlyConfig()


def check_quantization_available(precision: str) -> None:
    """On the driver: the library a precision needs is installed (workers would fail later)."""
    if precision != "no_change":
        _torchao_config(precision)


def _stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a plain tensor, or of a tensor subclass's inner tensors (quantized data and scales)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _shared_weights(module: torch.nn.Module) -> set[int]:
    """Ids of parameters held by more than one module (tied weights): left as they are, since a
    quantized copy beside the shared original would add memory, not save it."""
    seen: dict[int, int] = {}
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None:
                seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def frozen_linears(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, layer) of every ``nn.Linear`` in ``module`` whose weight is frozen and
    not tied: what ``quantize_frozen_base`` stores in 8 bits."""
    shared = _shared_weights(module)
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if type(child) is torch.nn.Linear and not child.weight.requires_grad and id(child.weight) not in shared]


def quantize_frozen_base(module: torch.nn.Module, precision: str) -> QuantizedBase | None:
    """Replace every frozen ``nn.Linear`` in ``module`` (weight not trained, not tied) by a
    ``FrozenQuantizedLinear`` holding its weight in ``precision``, on the device it is on. Layers
    are converted one at a time, so the peak is the model plus one layer. ``None`` for no_change."""
    if precision == "no_change":
        return None
    if precision == "int8-quanto":
        raise UserError(QUANTO_REFUSED)
    from torchao.quantization import quantize_

    config = _torchao_config(precision)
    layers = weights = before = after = 0
    for parent, name, child in frozen_linears(module):
        before += _stored_bytes(child.weight)
        weights += child.weight.numel()
        quantize_(child, config)
        quantized = child.weight.detach()
        setattr(parent, name, FrozenQuantizedLinear(child, quantized))
        after += _stored_bytes(quantized)
        layers += 1
    if layers == 0:
        raise UserError(f"base_model_precision {precision}: the model has no frozen linear layer to store in 8 bits")
    return QuantizedBase(precision, layers, weights, before, after)
