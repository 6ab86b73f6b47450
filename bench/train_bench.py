"""Training benchmarks (run by hand; figures go to bench/README.md). Each figure is a ratio or is
measured against a baseline in the same run.

    python bench/train_bench.py step-time    # acedist train (1 worker, ZeRO-2) vs a bare PyTorch loop
    python bench/train_bench.py loader       # samples/s one worker reads from shards at the real dimensions
    python bench/train_bench.py cached-condition  # LoRA step time, condition cached by prep vs in the loop,
                                                  # at the real 2B DiT / condition encoder sizes
    python bench/train_bench.py dry-run-accuracy  # --dry-run's memory estimate vs the measured peak of the
                                                  # same step (real 2B DiT, float32 on CPU)
    python bench/train_bench.py frozen-base  # memory of a LoRA step on the real 2B DiT, its frozen base
                                             # stored in bf16 vs int8 (and fp8, and float32), one
                                             # fresh process each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import ACE15, CORPUS, FRAMES_PER_SECOND, REAL_LATENT_DIM, REAL_TEXT_DIM, pack_tensors, real_sample, real_trainable  # noqa: E402,F401

from acestep_dist.config import PrepConfig, TrainConfig  # noqa: E402
from acestep_dist.shards import EncodedSample, write_shard  # noqa: E402
from acestep_dist.train.data import EpochPlan, SampleReader, open_training_data  # noqa: E402


def _tb_scalars(folder: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def step_time(steps: int = 60, clip_seconds: float = 20.0, batch: int = 2) -> dict:
    """Steady-state seconds per optimizer step: acedist train (Ray Train worker, DeepSpeed ZeRO-2,
    keyed randomness, checkpoint at the end) vs a plain loop (AdamW, same model, LoRA, data, loss)."""
    from pipelines.prep import run_prep
    from pipelines.train import run_train

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    model = ACE15.write_tiny(work / "model", "turbo", latent_dim=4)
    run_prep(str(CORPUS / "music"), str(model), str(work / "shards"), PrepConfig(max_duration=clip_seconds),
             log=lambda _: None)
    config = TrainConfig(max_train_steps=steps, train_batch_size=batch, gradient_accumulation_steps=1,
                         checkpointing_steps=steps, log_interval=10, lr_warmup_steps=0, zero_stage=2)

    # bare loop: the same family loss, LoRA and data reader, no Ray, no DeepSpeed
    family = ACE15.load(ACE15.describe(str(model)), "train")
    trainable = family.trainable(config, ACE15.train_options())
    optimizer = torch.optim.AdamW([p for g in trainable.param_groups for p in g["params"]], lr=config.learning_rate)
    refs = open_training_data(str(work / "shards")).refs
    plan, reader = EpochPlan(refs, 0, batch, 1, 1), SampleReader(refs, ACE15.schema)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        items = plan.micro_batch_items(step, 0, 0)
        loss, _, _ = trainable.module(family.collate([reader.read(i) for i in items]), [plan.generator(i) for i in items])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in trainable.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    bare = statistics.median(times[10:])

    run_train(config, str(work / "shards"), str(model), str(work / "run"), workers=1, log=lambda _: None)
    windows = _tb_scalars(work / "run" / "tb", "train/step_time_s")
    ours = statistics.median(windows[1:])  # the first window holds DeepSpeed's warm-up
    return {"clip_seconds": clip_seconds, "batch": batch, "bare_loop_s_per_step": round(bare, 4),
            "acedist_train_s_per_step": round(ours, 4), "ratio": round(ours / bare, 3)}


def loader(samples: int = 256, clip_seconds: float = 60.0, batch: int = 8) -> dict:
    """Samples/s one worker reads (seek + safetensors + collate into a padded batch) from shards
    holding real-size samples: latents [1500, 64] mean + std, text [100, 1024], lyrics 300 ids."""
    import fsspec

    frames = int(clip_seconds * FRAMES_PER_SECOND)
    with tempfile.TemporaryDirectory() as out:
        fs = fsspec.filesystem("file")
        manifest = []
        per_shard = 64
        for shard in range(samples // per_shard):
            encoded = []
            for i in range(per_shard):
                key = f"s{shard}_{i}"
                blob = pack_tensors(torch.randn(frames, REAL_LATENT_DIM), torch.rand(frames, REAL_LATENT_DIM),
                                    torch.randn(100, REAL_TEXT_DIM), torch.randint(0, 151643, (300,)))
                meta = {"caption": "c", "lyrics": "l", "duration": clip_seconds, "frames": frames, "text_tokens": 100,
                        "lyric_tokens": 300, "source": "a.flac", "offset": 0.0, "sha256": "0"}
                encoded.append(EncodedSample(key, meta, blob))
            marker = write_shard(fs, out, shard, encoded, [], [], "bench", "bench", ACE15.schema)
            manifest += marker.samples
        with open(f"{out}/manifest.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in manifest)
        refs = open_training_data(out).refs
        plan, reader = EpochPlan(refs, 0, batch, 1, 1), SampleReader(refs, ACE15.schema)
        # the family as training loads it (collate pads lyrics with its tokenizer's pad id)
        tiny = ACE15.write_tiny(Path(out) / "model", "turbo")
        family = ACE15.load(ACE15.describe(str(tiny)), "train")
        for _ in range(2):  # the second pass is the measured one: page cache warm, as in epoch 2+
            start = time.perf_counter()
            for step in range(plan.steps_per_epoch):
                batch_samples = [reader.read(i) for i in plan.micro_batch_items(step, 0, 0)]
                family.collate(batch_samples)
            elapsed = time.perf_counter() - start
    read = plan.steps_per_epoch * batch
    return {"samples": read, "seconds": round(elapsed, 3), "samples_per_s": round(read / elapsed, 1),
            "mb_per_sample": round(refs[0].tensor_size / 1e6, 3)}


def cached_condition(clip_seconds: float = 30.0, lyric_tokens: int = 300, text_tokens: int = 100,
                     steps: int = 2, threads: int = 2) -> dict:
    """Seconds per LoRA optimizer step (batch 1, forward + backward + AdamW) with the condition
    computed in the loop (condition encoder + token table, frozen, forward only) vs read from the
    sample (prep cache_condition), on the real ACE-Step 1.5 2B sizes with random weights in float32
    on CPU. One process, one DiT with its adapter shared by both, the two modes alternating step by
    step so machine noise falls on both alike."""
    from acestep_dist.families.ace_step_15.training import FlowMatchingModule

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    family, in_loop = real_trainable("cpu", TrainConfig(lr_warmup_steps=0), cached=False)
    condition_encoder = family.components.condition_encoder
    cached = FlowMatchingModule(family, in_loop.recipe, cached_condition=True)  # the same DiT and adapter
    sample = real_sample(clip_seconds, family, lyric_tokens, text_tokens, cached=False)
    sample["condition_states"] = family.encode_condition([sample["text_states"]], [sample["lyric_ids"]])[0].to(torch.bfloat16)
    batches = {"in_loop": family.collate([{k: v for k, v in sample.items() if k != "condition_states"}]),
               "cached": family.collate([sample])}
    modules = {"in_loop": in_loop.module, "cached": cached}
    parameters = [p for group in in_loop.param_groups for p in group["params"]]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    times: dict[str, list[float]] = {"in_loop": [], "cached": []}
    for step in range(steps + 1):  # the first round warms up both
        for mode in ("in_loop", "cached") if step % 2 == 0 else ("cached", "in_loop"):
            start = time.perf_counter()
            loss, _, _ = modules[mode](batches[mode], [torch.Generator().manual_seed(step)])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:
                times[mode].append(time.perf_counter() - start)
    not_loaded = sum(p.numel() for p in condition_encoder.parameters()) + 151669 * REAL_TEXT_DIM
    in_loop_s, cached_s = statistics.median(times["in_loop"]), statistics.median(times["cached"])
    return {"clip_seconds": clip_seconds, "lyric_tokens": lyric_tokens, "text_tokens": text_tokens,
            "condition_tokens": int(sample["condition_states"].shape[0]), "threads": threads,
            "in_loop_s_per_step": round(in_loop_s, 2), "cached_s_per_step": round(cached_s, 2),
            "speedup": round(in_loop_s / cached_s, 3),
            "weights_not_loaded_gb_bf16": round(2 * not_loaded / 1e9, 2),
            "condition_mb_per_sample_bf16": round(2 * sample["condition_states"].numel() / 1e6, 2)}


FROZEN_BASE_MODES = ("bf16", "int8-torchao", "fp8-torchao", "float32")


def _memory_status(field: str) -> int:
    """A /proc/self/status size in bytes (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _release_freed_memory() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def dry_run_accuracy(clip_seconds: float = 10.0) -> dict:
    """``acedist train --dry-run``'s estimate (the model on the meta device, one fake step) against
    the measured peak of the same LoRA step (``frozen_base_worker`` with the base in float32: one
    worker, AdamW, float32 on CPU, as ZeRO-0 holds it), at the real 2B DiT's sizes."""
    import subprocess
    import sys

    from acestep_dist.train.memory_estimate import estimate_trainable

    config = TrainConfig(lr_warmup_steps=0, zero_stage=0)
    family, trainable = real_trainable("meta", config)
    start = time.perf_counter()
    estimate = estimate_trainable(trainable, family.collate([real_sample(clip_seconds, family)]), 1,
                                  [torch.Generator().manual_seed(1)], config, world=1, use_gpu=False, setting="bench")
    estimate_s = time.perf_counter() - start
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}  # see frozen_base
    out = subprocess.run([sys.executable, __file__, "frozen-base-worker", "--mode", "float32", "--clip-seconds",
                          str(clip_seconds)], check=True, capture_output=True, text=True, env=env).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    weights = sum(size for name, size in estimate.gpu if "weights" in name)
    step_estimate = estimate.steady - weights  # gradients, optimizer states, activations
    step_measured = measured["step_peak_gb"] * 1e9 - measured["resident_model_gb"] * 1e9
    return {"clip_seconds": clip_seconds, "estimated_peak_gb": round(estimate.steady / 1e9, 3),
            "measured_peak_gb": measured["step_peak_gb"],
            "peak_ratio": round(estimate.steady / (measured["step_peak_gb"] * 1e9), 3),
            "estimated_step_gb": round(step_estimate / 1e9, 3), "measured_step_gb": round(step_measured / 1e9, 3),
            "step_ratio": round(step_estimate / step_measured, 3),
            "estimated_weights_gb": round(weights / 1e9, 3), "measured_resident_model_gb": measured["resident_model_gb"],
            "estimate_seconds": round(estimate_s, 1), "lines": [(name, round(size / 1e9, 3)) for name, size in estimate.gpu]}


def frozen_base_worker(mode: str, clip_seconds: float = 10.0, threads: int = 2) -> dict:
    """One LoRA step (batch 1, forward + backward + AdamW) of the real 2B DiT with random weights,
    its frozen linear layers stored as ``mode``, the condition cached (so the DiT is the only
    frozen model held); compute in float32 throughout (bf16 matmuls are ~190x slower on this CPU:
    every stored form is expanded to float32 one layer at a time by the same code, so the modes
    differ in what is stored only). Resident memory after the base is converted, and the peak of
    the step above it, from the kernel's own counters."""
    from acestep_dist.train.frozen_precision import (FrozenQuantizedLinear, _stored_bytes, frozen_linears,
                                                     quantize_frozen_base)

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _release_freed_memory()
    before_model = _memory_status("VmRSS")
    family, trainable = real_trainable("cpu", TrainConfig(lr_warmup_steps=0))
    module = trainable.module
    if mode in ("int8-torchao", "fp8-torchao"):
        quantize_frozen_base(module, mode)
    elif mode == "bf16":  # the same layer, its weight stored in bf16 (expanded to float32 per matmul)
        for parent, name, child in frozen_linears(module):
            setattr(parent, name, FrozenQuantizedLinear(child, child.weight.detach().to(torch.bfloat16)))
    _release_freed_memory()
    resident = _memory_status("VmRSS") - before_model
    frozen_linear = [m.weight for m in module.modules()
                     if (type(m) is torch.nn.Linear and not m.weight.requires_grad) or isinstance(m, FrozenQuantizedLinear)]
    frozen_linear_bytes = sum(_stored_bytes(w) for w in frozen_linear)
    other_frozen_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad
                             and not any(p is w for w in frozen_linear))
    batch = family.collate([real_sample(clip_seconds, family)])
    parameters = [p for group in trainable.param_groups for p in group["params"]]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    peaks, times = [], []
    for step in range(2):  # the first also allocates AdamW's states; the second is a steady step
        _release_freed_memory()
        start_rss = _memory_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        loss, _, _ = module(batch, [torch.Generator().manual_seed(step)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        peaks.append(_memory_status("VmHWM") - start_rss)
    _release_freed_memory()
    return {"mode": mode, "clip_seconds": clip_seconds, "frozen_linear_weights": sum(w.numel() for w in frozen_linear),
            "frozen_linear_gb": frozen_linear_bytes / 1e9, "other_frozen_gb": other_frozen_bytes / 1e9,
            "resident_model_gb": resident / 1e9, "trainable_parameters": sum(p.numel() for p in parameters),
            "step_peak_above_start_gb": peaks[-1] / 1e9, "step_peak_gb": (_memory_status("VmRSS") - before_model
                                                                          + peaks[-1]) / 1e9,
            "step_s": times[-1], "loss": float(loss.detach())}


def frozen_base(clip_seconds: float = 10.0) -> dict:
    """``frozen_base_worker`` for each mode in a fresh process (a process's peak never goes down);
    the ratios are against the bf16 base measured the same way."""
    import subprocess
    import sys

    results = {}
    for mode in FROZEN_BASE_MODES:
        # glibc's malloc raises its mmap threshold as large blocks are freed, and then keeps the
        # freed layer-sized blocks of a step in its heap: a fixed threshold returns them at once, so
        # the peak counts live tensors (as GPU memory would), not the allocator's leftovers
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        out = subprocess.run([sys.executable, __file__, "frozen-base-worker", "--mode", mode, "--clip-seconds",
                              str(clip_seconds)], check=True, capture_output=True, text=True, env=env).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    bf16 = results["bf16"]
    for mode, result in results.items():
        # the frozen weights' share of a step: what the base holds resident (the step's own memory,
        # activations and adapter states, is the same in every mode: see step_peak_above_start_gb)
        result["frozen_share_vs_bf16"] = round(result["resident_model_gb"] / bf16["resident_model_gb"], 3)
        result["step_peak_vs_bf16"] = round(result["step_peak_gb"] / bf16["step_peak_gb"], 3)
        result["step_time_vs_bf16"] = round(result["step_s"] / bf16["step_s"], 3)
        for key, value in list(result.items()):
            if isinstance(value, float):
                result[key] = round(value, 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["step-time", "loader", "cached-condition", "frozen-base",
                                          "frozen-base-worker", "dry-run-accuracy"])
    parser.add_argument("--clip-seconds", type=float, default=None)
    parser.add_argument("--mode", choices=FROZEN_BASE_MODES, default="bf16", help="frozen-base-worker")
    args = parser.parse_args()
    if args.which == "frozen-base-worker":  # one line of JSON for frozen-base
        print(json.dumps(frozen_base_worker(args.mode, args.clip_seconds or 10.0)))
        return
    runners = {"step-time": step_time, "loader": loader, "cached-condition": cached_condition,
               "frozen-base": frozen_base, "dry-run-accuracy": dry_run_accuracy}
    if args.clip_seconds is not None:
        print(json.dumps({args.which: runners[args.which](clip_seconds=args.clip_seconds)}, indent=1))
        return
    print(json.dumps({args.which: runners[args.which]()}, indent=1))


if __name__ == "__main__":
    main()
