"""`make demo`: the whole chain on a tiny random-weight model, as far as the chain exists.

Stages so far: build a tiny ACE-Step 1.5 checkpoint -> synthesise captioned clips with lyrics
(SimpleTuner folder layout) -> encode them with the model (latent stats, text states, lyric ids)
and take the variant's training loss -> render a wav with the family sampler (diffusers'
AceStepPipeline). Prep, train and export join as their issues land; nothing here is faked.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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


def run(out: Path) -> dict:
    import torch

    from .audio import read_audio_simple, write_audio
    from .families.ace_step_15 import AceStep15
    from .flow import per_sample_generators
    from .records import Record

    torch.set_num_threads(1)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    report: dict = {}
    started = time.time()

    _stage("1/4 tiny ACE-Step 1.5 checkpoint (acedist model tiny)")
    model_dir = out / "tiny-turbo"
    subprocess.run([sys.executable, "-m", "acestep_dist.cli", "model", "tiny", "--out", str(model_dir)], check=True)

    _stage("2/4 synthesise captioned clips")
    clips = synthesize_clips(out / "songs")
    print(f"{len(clips)} clips in {out / 'songs'}")

    _stage("3/4 encode the clips and take the training loss")
    family = AceStep15.load(model_dir)
    records, samples = [], []
    for (name, caption, lyrics, bpm, key, ts, _root), path in zip(CLIPS, clips):
        audio, rate = read_audio_simple(path)
        # The prep stage resamples with soxr; the demo's clips are synthesised at 44.1 kHz.
        import soxr

        wave = torch.from_numpy(soxr.resample(audio.T, rate, family.sample_rate, quality="HQ").T.copy())
        record = Record(key=name, audio=str(path), caption=caption, lyrics=lyrics, bpm=bpm, keyscale=key,
                        timesignature=ts, language="en" if lyrics else None, duration=wave.shape[1] / family.sample_rate)
        stats = family.encode_audio(wave)
        records.append(record)
        samples.append({"latent_mean": stats.mean, "latent_std": stats.std})
    for sample, states, ids in zip(samples, family.encode_text(records), family.tokenize_lyrics(records)):
        sample.update(text_states=states, lyric_ids=ids)
    batch = family.collate(samples)
    with torch.no_grad():
        loss, per_sample = family.training_loss(batch, per_sample_generators(range(len(samples))))
    print(f"variant {family.variant.name}: latents {tuple(batch.latent_mean.shape)}, loss {loss.item():.4f}")
    report["loss"] = loss.item()

    _stage("4/4 render a wav with the family sampler (untrained model: expect noise)")
    audio = family.generate(records[0], duration=4.0, seed=0)
    wav = write_audio(out / "sample.wav", audio[0].numpy(), family.sample_rate)
    print(f"wrote {wav} ({audio.shape[-1] / family.sample_rate:.1f} s, {family.sample_rate} Hz)")
    report.update(sample=str(wav), seconds=round(time.time() - started, 1))
    (out / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndemo finished in {report['seconds']} s; report in {out / 'demo_report.json'}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-run", type=Path)
    run(parser.parse_args().out)


if __name__ == "__main__":
    main()
