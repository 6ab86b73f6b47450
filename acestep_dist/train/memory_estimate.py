"""``acedist train --dry-run``: the parameter counts of the run's model and the memory one worker's
GPU will peak at, without training and without reading weights.

The model is built on the meta device from its config files, with the run's adapters; the counts are
exact. Memory per worker is the sum of:

- weights: the frozen ones in the run's compute dtype (or 8 bits with ``base_model_precision``),
  the trained ones likewise, split over the workers at ZeRO-3;
- gradients, the fp32 master copy and the optimizer's states of the trained weights, as DeepSpeed
  keeps them at the run's ZeRO stage (split over the workers from stage 1 or 2 on; host memory
  with ``offload_optimizer``), ZeRO's gradient bucket, and the weight average of ``use_ema``;
- activations: one real forward and backward pass of the family's loss over a batch of the data's
  longest sample, run on fake tensors (shapes and dtypes only: no compute, no memory) under torch's
  memory tracker, so gradient checkpointing, the attention layout and every saved tensor count as
  they are;
- a fixed allowance for the CUDA context and the allocator's slack (a rule of thumb, not measured).

The start-up peak (the model loaded in the compute dtype before the base is quantized) is reported
beside it: the larger of the two is what a GPU must hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .frozen_precision import frozen_linears

GB = 1e9
GPU_SIZES_GB = (8, 12, 16, 24, 80)
# CUDA context, cuBLAS / NCCL workspaces and allocator fragmentation per process: a rule of thumb
RUNTIME_ALLOWANCE = 0.8 * GB
# optimizer state bytes per trained element, in the fp32 the optimizer sees (torch AdamW: two
# states; bitsandbytes: two uint8 states plus an fp32 scale per block of 256; Adafactor under ZeRO:
# one, since ZeRO hands it flat partitions it cannot factor; Prodigy: four)
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / 256, "adafactor": 4.0, "prodigy": 16.0}
# bytes per output row beside the weights of a quantized layer (fp32 scale; int8 also a zero point)
QUANTIZED_ROW_BYTES = {"int8-torchao": 5, "fp8-torchao": 4}


@dataclass
class MemoryEstimate:
    """One worker's memory, line by line (bytes), with what it was computed for."""

    setting: str  # the run in one line
    parameters: list[tuple[str, int, int]]  # (module, parameters, trained)
    gpu: list[tuple[str, float]] = field(default_factory=list)
    host: list[tuple[str, float]] = field(default_factory=list)
    start_up: float = 0.0
    activations: float = 0.0
    sample_seconds: float = 0.0
    batch: int = 1
    activation_problem: str | None = None  # why the fake step failed (activations then count 0)
    notes: list[str] = field(default_factory=list)  # what the figures leave out, said under them

    @property
    def steady(self) -> float:
        return sum(size for _, size in self.gpu)

    @property
    def peak(self) -> float:
        return max(self.steady, self.start_up)

    def fits(self) -> list[int]:
        return [size for size in GPU_SIZES_GB if self.peak <= size * GB]

    def render(self, device: str) -> str:
        lines = [f"dry run: {self.setting}", "", f"  {'parameters':<34}{'total':>15}{'trained':>15}"]
        for name, total, trained in self.parameters:
            lines.append(f"  {name:<34}{total:>15,}{trained:>15,}")
        total = sum(t for _, t, _ in self.parameters)
        trained = sum(t for _, _, t in self.parameters)
        lines += [f"  {'all':<34}{total:>15,}{trained:>15,}", "", f"  memory per worker ({device}), estimated:"]
        lines += [f"    {name:<46}{size / GB:>8.2f} GB" for name, size in self.gpu]
        lines.append(f"    {'= while training':<46}{self.steady / GB:>8.2f} GB")
        lines.append(f"    {'start-up (model loaded before training)':<46}{self.start_up / GB:>8.2f} GB")
        if self.activation_problem:
            lines.append(f"  activations NOT estimated (the fake step failed: {self.activation_problem}); "
                         f"the totals above leave them out")
        elif self.sample_seconds:
            per_second = self.activations / (self.batch * self.sample_seconds)
            lines.append(f"  activations: {per_second / 1e6:,.1f} MB per sample-second "
                         f"(batch {self.batch} x {self.sample_seconds:.1f} s, the data's longest sample)")
        lines += [f"  {note}" for note in self.notes]
        if self.host:
            lines.append("  host memory per worker (offload_optimizer):")
            lines += [f"    {name:<46}{size / GB:>8.2f} GB" for name, size in self.host]
        if device == "GPU":
            fits = self.fits()
            lines.append(f"  peak {self.peak / GB:.2f} GB: fits on GPUs of "
                         + (", ".join(f"{size} GB" for size in fits) if fits else f"none of {GPU_SIZES_GB} GB"))
        else:
            lines.append(f"  peak {self.peak / GB:.2f} GB of RAM per worker")
        return "\n".join(lines)


@dataclass(frozen=True)
class FrozenBytes:
    """The frozen parameters as a worker stores them: quantized (``base_model_precision``; buffers
    DeepSpeed never splits), the rest in the compute dtype, and all of them before quantization."""

    quantized: int
    plain: int
    unquantized: int


def frozen_bytes(module: torch.nn.Module, precision: str, dtype: torch.dtype) -> FrozenBytes:
    size = torch.empty((), dtype=dtype).element_size()
    quantized = 0
    seen: set[int] = set()
    if precision in QUANTIZED_ROW_BYTES:  # the layers quantize_frozen_base converts
        for _, _, layer in frozen_linears(module):
            seen.add(id(layer.weight))
            quantized += layer.weight.numel() + QUANTIZED_ROW_BYTES[precision] * layer.out_features
    frozen = {id(p): p for p in module.parameters() if not p.requires_grad}
    plain = sum(p.numel() * size for key, p in frozen.items() if key not in seen)
    return FrozenBytes(quantized, plain, sum(p.numel() * size for p in frozen.values()))


def _largest_block(module: torch.nn.Module) -> int:
    """Parameters of the largest repeated block (an element of a ModuleList): what ZeRO-3 gathers
    whole while it runs."""
    sizes = [sum(p.numel() for p in block.parameters())
             for sub in module.modules() if isinstance(sub, torch.nn.ModuleList) for block in sub]
    return max(sizes, default=0)


def _fake_copy_of_parameters(module: torch.nn.Module, dtype: torch.dtype, mode) -> None:
    """Every parameter and buffer replaced, in place, by a fake tensor of its shape (floating ones
    in ``dtype``): the module then runs on shapes alone."""
    with mode:
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None:
                    kind = dtype if param.is_floating_point() else param.dtype
                    sub._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=kind),
                                                               requires_grad=param.requires_grad)
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None:
                    kind = dtype if buffer.is_floating_point() else buffer.dtype
                    sub._buffers[name] = torch.empty(buffer.shape, dtype=kind)


class _NoHook:
    def remove(self) -> None:
        pass


def step_activation_bytes(module: torch.nn.Module, batch: Any, generators: Sequence[torch.Generator],
                          dtype: torch.dtype) -> int:
    """The peak of one forward and backward pass of ``module(batch, generators)`` beyond its
    weights and their gradients: activations, saved tensors and temporaries. The module's
    parameters become fake tensors (the module is used up); ``batch`` stays real (its small
    tensors drive the loss's data-dependent steps)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_copy_of_parameters(module, dtype, mode)
    tracker = MemTracker()
    # the tracker hooks every parameter's gradient, which a frozen one cannot have: mark them hooked
    for param in module.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHook(), _NoHook())
    with tracker:
        loss = module(batch, generators)[0]
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")
    counted = (_MemRefType.ACT, _MemRefType.TEMP, _MemRefType.OTH)
    return int(max(sum(snapshot.get(kind, 0) for kind in counted) for snapshot in peak.values()))


def zero_bytes(config, trained: int, world: int, dtype: torch.dtype) -> tuple[list[tuple[str, float]],
                                                                             list[tuple[str, float]]]:
    """What DeepSpeed keeps of ``trained`` elements per worker at the run's ZeRO stage: (GPU lines,
    host lines)."""
    from .loop import reduce_bucket_size

    stage, size = config.zero_stage, torch.empty((), dtype=dtype).element_size()
    mixed = dtype != torch.float32
    split = world if stage >= 1 else 1
    states = OPTIMIZER_STATE_BYTES[config.optimizer] * trained / split
    # fp32 copies of the trained weights: of half-precision ones always; ZeRO 1-3 flatten a copy
    # of their partition even in float32
    master = 4 * trained / split if mixed or stage >= 1 else 0.0
    gradients = size * trained / (world if stage >= 2 else 1)
    gpu: list[tuple[str, float]] = [
        ("trained weights" + (" (split over workers)" if stage == 3 else ""), size * trained / (world if stage == 3 else 1)),
        ("gradients" + (" (split)" if stage >= 2 else ""), gradients)]
    host: list[tuple[str, float]] = []
    optimizer = [(f"optimizer states ({config.optimizer}" + (", split)" if split > 1 else ")"), states)]
    if master:
        optimizer.append(("fp32 master weights" + (" (split)" if split > 1 else ""), master))
    if stage == 0 and mixed:  # DeepSpeed's bf16 / fp16 optimizer wrapper accumulates in fp32
        optimizer.append(("fp32 gradient accumulation", 4 * trained))
    if config.offload_optimizer:
        host += optimizer + [("fp32 gradients", 4 * trained / split)]
    else:
        gpu += optimizer
        if stage >= 1:  # the step's fp32 copy of the gradient partition
            gpu.append(("fp32 gradient partition at the step", 4 * trained / split))
    if stage >= 1:
        gpu.append(("ZeRO gradient bucket", size * reduce_bucket_size(trained)))
    if config.use_ema and config.ema_device == "accelerator":
        gpu.append(("weight average (use_ema, fp32)", 4 * trained))
    return gpu, host


def _module_counts(module: torch.nn.Module) -> list[tuple[str, int, int]]:
    rows = []
    for name, child in module.named_children():
        params = list(child.parameters())
        if params:
            rows.append((name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)))
    return rows


def estimate(family, description, config, options, stored, samples: Sequence[dict], generators, *, world: int,
             use_gpu: bool, setting: str) -> MemoryEstimate:
    """The estimate for one worker of a run (``samples``: the micro-batch whose activations count):
    the family builds the run's model on the meta device (no weights read)."""
    from .loop import compute_dtype

    validates = config.validation_step_interval > 0  # rank 0 then holds what a render needs as well
    loaded = family.load(description, "validate" if validates else "train", dtype=compute_dtype(config, use_gpu),
                         device="meta")
    trainable = loaded.trainable(config, options, stored)
    try:
        validation = validation_parts(loaded, trainable.module) if validates else None
    except NotImplementedError as error:
        validation, problem = None, str(error)
    result = estimate_trainable(trainable, loaded.collate(list(samples)), len(samples), generators, config,
                                world=world, use_gpu=use_gpu, setting=setting)
    if validation is not None:
        names, size = validation
        # loaded with the model, so part of the start-up too; the render's own activations are not
        result.gpu.append((f"validation parts, rank 0 only ({', '.join(names)})", float(size)))
        result.start_up += size
        result.notes.append("validation renders (rank 0): their activations are not counted")
    elif validates:
        result.notes.append(f"validation parts of rank 0 NOT counted ({problem})")
    return result


def validation_parts(loaded, trained_module) -> tuple[list[str], int]:
    """The loaded parts a validation render uses beyond what trains (names, bytes): the parameters
    and buffers of ``loaded.parts()`` the trained module does not hold."""
    held = {id(t) for t in (*trained_module.parameters(), *trained_module.buffers())}
    names, size = [], 0
    for name, part in loaded.parts().items():
        extra = [t for t in (*part.parameters(), *part.buffers()) if id(t) not in held]
        if extra:
            names.append(name)
            size += sum(t.numel() * t.element_size() for t in extra)
            held.update(id(t) for t in extra)
    return names, size


def estimate_trainable(trainable, batch, batch_size: int, generators, config, *, world: int, use_gpu: bool,
                       setting: str, activations: float | None = None) -> MemoryEstimate:
    """The estimate for a trainable built on the meta device (its module is used up). ``activations``:
    those of an estimate that ran the same step already (the fake step is then skipped)."""
    from .loop import compute_dtype

    dtype = compute_dtype(config, use_gpu)
    module = trainable.module
    counts = _module_counts(module)
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = frozen_bytes(module, config.base_model_precision, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    result = MemoryEstimate(setting, counts, batch=batch_size)
    if frozen.quantized:
        result.gpu.append((f"frozen weights, {config.base_model_precision}", float(frozen.quantized)))
    if config.zero_stage == 3:  # every parameter split over the workers, a block or two gathered at a time
        result.gpu.append(("frozen weights (split over workers)", frozen.plain / world))
        result.gpu.append(("ZeRO-3 gathered blocks (two)", 2.0 * size * _largest_block(module)))
    else:
        result.gpu.append(("frozen weights", float(frozen.plain)))
    zero_gpu, result.host = zero_bytes(config, trained, world, dtype)
    result.gpu += zero_gpu
    if activations is None:
        try:
            activations = float(step_activation_bytes(module, batch, generators, dtype))
        except Exception as error:  # torch's tracker and fake tensors are young: the rest still stands
            result.activation_problem = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            activations = 0.0
    result.activations = activations
    result.gpu.append(("activations and temporaries of a step", result.activations))
    if use_gpu:
        result.gpu.append(("CUDA context and allocator (rule of thumb)", RUNTIME_ALLOWANCE))
    # start-up: every part loaded in the compute dtype before the base is quantized; the trained
    # weights are part of it (a full fine-tune's are the model)
    result.start_up = frozen.unquantized + size * trained + (RUNTIME_ALLOWANCE if use_gpu else 0.0)
    return result
