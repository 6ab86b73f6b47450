"""Training benchmarks (run by hand; figures go to bench/README.md). Each figure is a ratio or is
measured against a baseline in the same run.

    python bench/train_bench.py step-time    # acedist train (1 worker, ZeRO-2) vs a bare PyTorch loop
    python bench/train_bench.py loader       # samples/s one worker reads from shards at the real dimensions
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import ACE15, CORPUS, FRAMES_PER_SECOND, REAL_LATENT_DIM, REAL_TEXT_DIM, pack_tensors  # noqa: E402,F401

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["step-time", "loader"])
    args = parser.parse_args()
    runners = {"step-time": step_time, "loader": loader}
    print(json.dumps({args.which: runners[args.which]()}, indent=1))


if __name__ == "__main__":
    main()
