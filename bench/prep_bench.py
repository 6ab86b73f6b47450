"""Prep benchmarks (run by hand; figures go to bench/README.md). Each figure is a ratio or is
measured against a baseline in the same run.

    python bench/prep_bench.py cpu-stage      # decode + resample + window + write, encoders excluded
    python bench/prep_bench.py ray-speedup    # Ray prep on 2 CPUs vs the same stages in one process
    python bench/prep_bench.py shard-bytes    # bytes per 60 s clip at the real model dimensions
    python bench/prep_bench.py worker-rss     # peak RSS of a decode task: 12-minute file, 1-hour file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ACE15, CORPUS, FRAMES_PER_SECOND, REAL_LATENT_DIM, REAL_TEXT_DIM, ROOT, pack_tensors  # noqa: E402,F401

from acestep_dist.audio import decode_window, probe_audio  # noqa: E402
from acestep_dist.config import PrepConfig  # noqa: E402
from acestep_dist.shards import EncodedSample, write_shard  # noqa: E402
from acestep_dist.sources import load_source  # noqa: E402


def cpu_stage() -> dict:
    """Audio seconds per CPU second of the CPU stage on the corpus music (one process, one thread)."""
    import fsspec

    torch.set_num_threads(1)
    listing = load_source(CORPUS / "music", PrepConfig())
    fs = fsspec.filesystem("file")
    audio_seconds = 0.0
    with tempfile.TemporaryDirectory() as out:
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        samples = []
        for record in listing.records:
            info = probe_audio(record.audio)
            window = decode_window(record.audio, 0.0, min(info.duration, 240.0), 48000)
            audio_seconds += window.duration
            frames = window.wave.shape[1] // 1920
            # the encoders are excluded: write placeholder tensors of the real shapes
            blob = pack_tensors(torch.zeros(frames, REAL_LATENT_DIM), torch.ones(frames, REAL_LATENT_DIM),
                                torch.zeros(100, REAL_TEXT_DIM), torch.zeros(200, dtype=torch.int32))
            meta = {"duration": window.duration, "frames": frames, "text_tokens": 100, "lyric_tokens": 200,
                    "source": record.audio, "offset": 0.0}
            samples.append(EncodedSample(record.key, meta, blob))
        write_shard(fs, out, 0, samples, [], [], "bench", "bench", ACE15.schema)
        cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    return {"audio_seconds": round(audio_seconds, 1), "cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 2),
            "realtime_per_core": round(audio_seconds / cpu, 1)}


def ray_speedup(model: str, overrides: list[str], repeat: int = 1) -> dict:
    """Wall time of the same prep (tiny model, corpus music listed ``repeat`` times) in one plain
    process and with Ray on 2 CPUs."""
    import fsspec

    from acestep_dist.prep import AudioEncoder, TextEncoder, decode_row, expand_windows, plan_input

    config = PrepConfig(shard_size_mb=1000)
    songs = load_source(CORPUS / "music", config).records
    manifest = Path(tempfile.mkdtemp()) / "songs.jsonl"
    manifest.write_text("".join(json.dumps({**r.to_dict(), "key": f"{r.key}_{copy}"}) + "\n"
                                for copy in range(repeat) for r in songs))
    listing = load_source(manifest, config)
    planned = [plan_input(r, config) for r in listing.records]

    torch.set_num_threads(1)
    start = time.perf_counter()
    latents = AudioEncoder(ACE15.name, model, device="cpu")
    texts = TextEncoder(ACE15.name, model, config, {}, device="cpu")
    encoded = [latents(decode_row(w, config, 48000)) for row in planned for w in expand_windows(row)]
    batch = {k: np.array([r[k] for r in encoded], dtype=object) for k in encoded[0]}
    out = texts(batch)
    with tempfile.TemporaryDirectory() as folder:
        samples = [EncodedSample(out["key"][i], json.loads(out["meta"][i]), out["tensors"][i]) for i in range(len(encoded))]
        write_shard(fsspec.filesystem("file"), folder, 0, samples, [], [], "bench", "bench", ACE15.schema)
    plain = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "acestep_dist.cli", "prep", str(manifest), "--model", model, "--out", folder,
                        "shard_size_mb=1000", *overrides], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with_ray = time.perf_counter() - start
    return {"inputs": len(listing.records), "plain_process_s": round(plain, 1), "ray_2_cpus_s": round(with_ray, 1),
            "speedup": round(plain / with_ray, 2)}


def shard_bytes() -> dict:
    """Bytes per 60 s clip with everything training needs, at the real dimensions."""
    import fsspec

    frames = 60 * FRAMES_PER_SECOND
    results = {}
    with tempfile.TemporaryDirectory() as out:
        fs = fsspec.filesystem("file")
        index = 0
        for text_tokens, lyric_tokens in ((100, 300), (256, 2048)):
            # prep cache_condition=true adds the condition encoder's output: lyrics + 1 timbre + caption
            # tokens x the 2B model's condition width (2048), bf16 (default) or float32
            for cache in (None, "bfloat16", "float32"):
                condition_tokens = lyric_tokens + 1 + text_tokens
                extra = {} if cache is None else {
                    "condition_states": torch.randn(condition_tokens, 2048).to(getattr(torch, cache))}
                blob = pack_tensors(torch.randn(frames, REAL_LATENT_DIM), torch.rand(frames, REAL_LATENT_DIM),
                                    torch.randn(text_tokens, REAL_TEXT_DIM), torch.randint(0, 151643, (lyric_tokens,)),
                                    **extra)
                meta = {"caption": "x" * 120, "lyrics": "y" * 1500, "duration": 60.0, "frames": frames,
                        "text_tokens": text_tokens, "lyric_tokens": lyric_tokens, "source": "/data/songs/a.flac",
                        "offset": 0.0, "sha256": "0" * 64,
                        **({} if cache is None else {"condition_tokens": condition_tokens})}
                marker = write_shard(fs, out, index, [EncodedSample("a", meta, blob)] * 10, [], [], "b", "b",
                                     ACE15.schema)
                index += 1
                label = f"text {text_tokens} + lyrics {lyric_tokens} tokens" + (f", condition cached {cache}" if cache else "")
                results[label] = round(marker.bytes / 10 / 1e6, 3)
    return {"mb_per_60s_clip": results}


def _rss_child(path: str, offset: float, length: float) -> None:
    window = decode_window(path, offset, length, 48000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(window.duration, 1), "peak_rss_mb": round(peak, 1)}))


def worker_rss() -> dict:
    """Peak RSS of a fresh process decoding one 240 s window (what a decode task holds)."""
    import av

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        hour = Path(folder) / "one_hour.mp3"
        with av.open(str(hour), "w") as container:  # a 1-hour MP3: 44.1 kHz stereo noise bursts
            stream = container.add_stream("libmp3lame", rate=44100, layout="stereo")
            rng = np.random.default_rng(0)
            block = (rng.standard_normal((2, 44100)) * 0.1).astype(np.float32)
            for second in range(3600):
                frame = av.AudioFrame.from_ndarray(block, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 44100, second * 44100
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        cases = {"12-minute mp3, first 240 s": (CORPUS / "broken" / "long_12min.mp3", 0.0),
                 "1-hour mp3, 240 s at 3000 s": (hour, 3000.0)}
        baseline = subprocess.run([sys.executable, "-c", "import resource, acestep_dist.audio, soxr, av; "
                                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                                  capture_output=True, text=True, cwd=ROOT, check=True)
        results["imports only (baseline)"] = {"peak_rss_mb": round(float(baseline.stdout.strip()), 1)}
        for label, (path, offset) in cases.items():
            child = subprocess.run([sys.executable, __file__, "_rss", str(path), str(offset), "240"],
                                   capture_output=True, text=True, cwd=ROOT, check=True)
            results[label] = json.loads(child.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["cpu-stage", "ray-speedup", "shard-bytes", "worker-rss", "_rss"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--model", help="tiny checkpoint for ray-speedup (default: build one)")
    parser.add_argument("--repeat", type=int, default=1, help="ray-speedup: list the corpus this many times")
    parser.add_argument("--latent-dim", type=int, default=4,
                        help="latent width of the built tiny model (8 makes the VAE cost dominate, as a real VAE does)")
    args = parser.parse_intermixed_args()
    if args.which == "_rss":
        _rss_child(args.args[0], float(args.args[1]), float(args.args[2]))
        return
    if args.which == "ray-speedup" and not args.model:
        args.model = str(ACE15.write_tiny(Path(tempfile.mkdtemp()) / "tiny", "turbo", latent_dim=args.latent_dim))
    runners = {"cpu-stage": cpu_stage, "shard-bytes": shard_bytes, "worker-rss": worker_rss,
               "ray-speedup": lambda: ray_speedup(args.model, args.args, args.repeat)}
    print(json.dumps({args.which: runners[args.which]()}, indent=1))


if __name__ == "__main__":
    main()
