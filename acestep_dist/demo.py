"""`make demo`: the whole chain on a tiny random-weight model, as far as the chain exists.

Stages: build a tiny ACE-Step 1.5 (or, with ``--family ace-step-v1``, v1) checkpoint -> synthesise captioned clips with lyrics
(SimpleTuner folder layout) -> `acedist prep` them into WebDataset shards on an embedded Ray
cluster -> `acedist inspect` the shards -> `acedist train` a LoRA on them (Ray Train + DeepSpeed)
-> `acedist export` it in the three LoRA formats -> `acedist generate` a wav with it. Nothing here
is faked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_MARKER = ".acedist-demo"

CLIPS = [
    # (name, caption, lyrics or None, bpm, key, time signature, root Hz)
    ("sunrise", "ambient, soft synth pads, calm, slow tempo, C major, 4/4", "[verse]\nmorning light on the water\nslowly rising", 72, "C major", "4", 261.63),
    ("march", "brass band, festive, marching, fast tempo, Bb major, 2/4", None, 120, "Bb major", "2", 233.08),
    ("lullaby", "music box, lullaby, gentle, waltz, G major, 3/4", "[verse]\nsleep now little one\nthe stars are out", 84, "G major", "3", 196.00),
    ("drone", "dark ambient, low drone, minimal, A minor, 4/4", None, 60, "A minor", "4", 110.00),
]


def synthesize_clips(folder: Path, seconds: float = 4.0, sample_rate: int = 44100) -> list[Path]:
    """Chord arpeggios with a caption ``NAME.txt`` and, for some, lyrics ``NAME.lyrics``."""
    from .audio import write_audio

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    rng = np.random.default_rng(0)
    for name, caption, lyrics, bpm, _key, _ts, root in CLIPS:
        n = int(seconds * sample_rate)
        t = np.arange(n) / sample_rate
        beat = 60.0 / bpm
        ratios = [1.0, 1.25, 1.5, 2.0]  # a major-ish arpeggio, one note per beat
        note = (t // beat).astype(int) % len(ratios)
        freq = root * np.take(ratios, note)
        envelope = np.exp(-3.0 * (t % beat))
        left = 0.4 * envelope * np.sin(2 * np.pi * np.cumsum(freq) / sample_rate)
        right = 0.4 * envelope * np.sin(2 * np.pi * np.cumsum(freq * 1.003) / sample_rate)
        audio = np.stack([left, right]) + 0.003 * rng.standard_normal((2, n))
        path = write_audio(folder / f"{name}.flac", audio, sample_rate)
        (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        if lyrics:
            (folder / f"{name}.lyrics").write_text(lyrics + "\n", encoding="utf-8")
        written.append(path)
    with open(folder / "metadata.csv", "w", encoding="utf-8") as f:
        f.write("file,bpm,keyscale,timesignature,language\n")
        for name, _caption, lyrics, bpm, key, ts, _root in CLIPS:
            f.write(f"{name}.flac,{bpm},{key},{ts},{'en' if lyrics else ''}\n")
    return written


def _stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _acedist(*args: str, allowed=(0,)) -> None:
    code = subprocess.run([sys.executable, "-m", "acestep_dist.cli", *args]).returncode
    if code not in allowed:
        raise SystemExit(f"acedist {' '.join(args)} failed with exit status {code}")


# per family: the tiny checkpoint's variant folder name, the training recipe and its tiny-model overrides,
# the LoRA file generate renders with, the prep / generate extras
FAMILY_PLANS = {
    "ace-step-1.5": {"title": "ACE-Step 1.5", "model": "tiny-turbo", "recipe": "turbo-lora.yaml", "train": [],
                     "lora": "comfyui/demo-lora.safetensors",
                     "formats": "diffusers, upstream ACE-Step (PEFT) and ComfyUI"},
    # upstream's recipe at a tiny rank (rank 256 on a 64-wide DiT would be no adapter at all)
    "ace-step-v1": {"title": "ACE-Step v1", "model": "tiny-v1", "recipe": "v1-lora.yaml",
                    "train": ["lora_rank=8", "lora_alpha=4", "gradient_checkpointing=false"],
                    "lora": "upstream", "formats": "upstream ACE-Step / SimpleTuner and ComfyUI"},
}


def run(out: Path, family: str = "ace-step-1.5", lyrics_vocab: str | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if out.exists() and any(out.iterdir()):
        # a rerun replaces its own earlier demo; any other folder is the user's and stays untouched
        if not (out / DEMO_MARKER).is_file():
            raise SystemExit(f"{out} exists and is not a demo folder (no {DEMO_MARKER}); "
                             f"choose another DEMO_DIR / --out, the demo deletes and rewrites its folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `make demo` (python -m acestep_dist.demo); rerunning replaces this folder\n")
    report: dict = {}
    started = time.time()

    plan = FAMILY_PLANS[family]
    vocab = ["lyrics_vocab=" + str(Path(lyrics_vocab).resolve())] if lyrics_vocab else []
    _stage(f"1/7 tiny {plan['title']} checkpoint (acedist model tiny)")
    model_dir = out / plan["model"]
    _acedist("model", "tiny", "--family", family, "--out", str(model_dir))

    _stage("2/7 synthesise captioned clips with lyrics")
    clips = synthesize_clips(out / "songs")
    print(f"{len(clips)} clips in {out / 'songs'}")

    _stage("3/7 prep to WebDataset shards on an embedded Ray cluster (acedist prep)")
    shards = out / "shards"
    _acedist("prep", str(out / "songs"), "--model", str(model_dir), "--out", str(shards), *vocab)

    _stage("4/7 verify the shards (acedist inspect)")
    _acedist("inspect", str(shards))

    _stage("5/7 LoRA fine-tune on the shards with Ray Train + DeepSpeed ZeRO-2 (acedist train)")
    run_dir = out / "run"
    _acedist("train", "--config", str(CONFIGS / "train" / plan["recipe"]), "--data", str(shards),
             "--model", str(model_dir), "--output", str(run_dir), "--workers", "1",
             "max_train_steps=8", "checkpointing_steps=4", "log_interval=2", "lr_warmup_steps=2", "learning_rate=1e-3",
             "gradient_accumulation_steps=1", "train_batch_size=2", "validation_step_interval=8",
             "validation_audio_duration=4", *plan["train"], *vocab)
    state = json.loads((run_dir / "final" / "acedist_state.json").read_text())
    report["train_steps"] = state["step"]

    _stage(f"6/7 export the LoRA for {plan['formats']} (acedist export)")
    exported = out / "export"
    _acedist("export", str(run_dir), "--out", str(exported), "--format", "all", "--name", "demo-lora")

    _stage("7/7 render with the exported LoRA (acedist generate; tiny random model: expect noise)")
    wav = out / "sample.wav"
    _acedist("generate", "--model", str(model_dir), "--lora", str(exported / plan["lora"]),
             "--prompt", CLIPS[0][1], "--lyrics", CLIPS[0][2], "--bpm", str(CLIPS[0][3]), "--keyscale", CLIPS[0][4],
             "--timesignature", CLIPS[0][5], "--language", "en", "--duration", "4", "--seed", "0", "--out", str(wav),
             *(["--lyrics-vocab", str(Path(lyrics_vocab).resolve())] if lyrics_vocab else []))
    samples = sum(1 for _ in open(shards / "manifest.jsonl"))
    report.update(samples=samples, sample=str(wav), seconds=round(time.time() - started, 1))
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndemo finished in {report['seconds']} s; report in {out / 'demo_report.json'}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-run", type=Path)
    parser.add_argument("--family", default="ace-step-1.5", choices=sorted(FAMILY_PLANS))
    parser.add_argument("--lyrics-vocab", help="ACE-Step v1: upstream's lyric vocab.json "
                                               "(default: an installed ACE-Step's)")
    args = parser.parse_args()
    run(args.out, args.family, args.lyrics_vocab)


if __name__ == "__main__":
    main()
