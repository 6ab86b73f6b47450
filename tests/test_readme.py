"""README claims that the tests of their own modules did not check. Each test quotes the claim it checks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from acestep_dist.config import PrepConfig, TrainConfig, load_config
from acestep_dist.errors import ModelLoadError, UserError

from conftest import TRAIN_COMMON

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = [["model", "tiny"], ["model", "info"], ["prep"], ["annotate"], ["inspect"], ["convert"], ["train"], ["export"],
            ["generate"]]


def _acedist(*args: str):
    from click.testing import CliRunner

    from acestep_dist.cli import cli

    return CliRunner().invoke(cli, list(args), prog_name="acedist")


def test_every_command_has_help():
    """"Every command has `--help`.\""""
    for command in COMMANDS:
        result = _acedist(*command, "--help")
        assert result.exit_code == 0 and f"Usage: acedist {' '.join(command)}" in result.output, command


@pytest.mark.parametrize("args, message", [
    (["prep", "/no/such/songs", "--model", "/no/model", "--out", "{tmp}/o"], "model '/no/model': no such folder"),
    (["train", "--data", "{tmp}", "--model", "/no/model", "--output", "{tmp}/r", "learnig_rate=1e-4"],
     "unknown key 'learnig_rate' (did you mean 'learning_rate'?)"),
    (["train", "--config", "/no/such.yaml", "--data", "{tmp}", "--model", "m", "--output", "{tmp}/r"], "does not exist"),
    (["inspect", "/no/such/shards"], "no shards"),
    (["annotate", "/no/such/songs", "--out", "{tmp}/a.csv"], "does not exist"),
    (["annotate", "{tmp}", "--out", "{tmp}/a.txt"], "must end in .csv or .jsonl"),
    (["export", "/no/such/run", "--out", "{tmp}/e"], "is not an acedist run"),
    (["generate", "--model", "/no/such/model", "--prompt", "x", "--out", "{tmp}/x.wav"], "no such folder"),
    (["model", "info", "/no/such/model"], "no such folder"),
])
def test_a_bad_input_is_one_error_line_and_status_1(args, message, tmp_path):
    """"A bad input (missing folder, unreadable model, mistyped config key) ends with one `Error: ...` line and
    exit status 1, never a stack trace.\""""
    result = _acedist(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # no exception escaped
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


def test_a_mistyped_option_is_a_usage_error_with_status_2():
    """"A mistyped option or option value (an unknown `--variant`) is a usage error: exit status 2, with a hint.\""""
    result = _acedist("model", "tiny", "--out", "x", "--variant", "huge")
    assert result.exit_code == 2
    assert "Invalid value for '--variant'" in result.stderr and "Try 'acedist model tiny --help'" in result.stderr


def test_prep_output_holds_what_the_readme_lists(train_shards):
    """The table "What lands in `--out`" (and "No pickles")."""
    report = json.loads((train_shards / "prep_report.json").read_text())
    assert {"inputs", "accepted", "rejected", "warned", "samples", "audio_seconds", "bytes", "wall_seconds",
            "fingerprint", "config"} <= set(report)
    manifest = [json.loads(line) for line in (train_shards / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == report["samples"] == 12
    for row in manifest:
        assert {"key", "shard", "duration", "frames", "text_tokens", "lyric_tokens", "source", "offset", "repeat"} <= set(row)
    markers = sorted(train_shards.glob("shard-*.json"))
    assert markers and all({"sha256", "bytes", "samples", "rejected", "warnings"} <= set(json.loads(m.read_text()))
                           for m in markers)
    for name in ("errors.jsonl", "warnings.jsonl"):
        assert (train_shards / name).is_file()
    from acestep_dist.shards import iter_samples

    for tar in sorted(train_shards.glob("shard-*.tar")):
        with tarfile.open(tar) as archive:
            fields = {member.name.split(".", 1)[1] for member in archive.getmembers()}
        assert fields == {"meta.json", "tensors.safetensors"}  # JSON and safetensors only: nothing to unpickle
        with open(tar, "rb") as f:
            for sample in iter_samples(f):
                assert {"caption", "lyrics", "bpm", "keyscale", "timesignature", "language", "duration", "source",
                        "sha256", "offset", "crop"} <= set(sample["meta"])
                assert sample["text_states"].dtype == sample["latent_std"].dtype == torch.bfloat16


def test_prep_defaults_are_the_readme_defaults():
    """"`max_duration` (240 s), `min_duration` (1 s), `crop` = `start` ..., `silence_fraction` (reject > 95 %
    exact zeros)" in `configs/prep/default.yaml` and in the built-in defaults alike."""
    for config in (PrepConfig(), load_config(PrepConfig, ROOT / "configs" / "prep" / "default.yaml")):
        assert (config.max_duration, config.min_duration, config.crop, config.silence_fraction) == (240, 1, "start", 0.95)


def test_random_crop_is_seeded_per_key():
    """"`crop` = ... `random` (seeded per key, offset recorded)\""""
    from acestep_dist.prep import window_offsets

    config = PrepConfig(crop="random", max_duration=10)
    offsets = {key: window_offsets(100.0, config, key) for key in ("a", "b", "c", "d")}
    for key, (windows, warnings) in offsets.items():
        assert window_offsets(100.0, config, key) == (windows, warnings)  # a rerun picks the same window
        [(offset, length)] = windows
        assert 0 <= offset <= 90 and length == 10 and f"at {offset:.3f} s" in warnings[0]
    assert len({windows[0][0] for windows, _ in offsets.values()}) == 4
    assert window_offsets(100.0, PrepConfig(crop="random", max_duration=10, crop_seed=1), "a") != offsets["a"]


def test_long_lyrics_are_truncated_with_a_warning(tmp_path, corpus):
    """"caption / lyric length limits (truncated with a warning)\""""
    from acestep_dist.sources import load_source

    audio = sorted((corpus / "music").glob("*.flac"))[0]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": str(audio), "caption": "piano", "lyrics": "la-" * 50}) + "\n")
    listing = load_source(manifest, PrepConfig(lyrics_max_chars=20))
    assert listing.records[0].lyrics == ("la-" * 50)[:20]
    assert [w.reason for w in listing.warnings] == ["lyrics longer than limit (150 > 20 chars); truncated to 20"]


def test_prep_overwrite_replaces_another_config_and_nothing_written_is_status_1(tmp_path, corpus, prep_model,
                                                                               ray_session):
    """"Output made with another model or prep config is never mixed in: prep refuses, or replaces it with
    `--overwrite`." and "`1` fatal error (... nothing written)\""""
    from pipelines.prep import EXIT_FATAL, EXIT_OK, run_prep

    songs = sorted(p for p in (corpus / "music").glob("*.flac"))[:1]
    manifest = tmp_path / "songs.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(p), "caption": "x"}) + "\n" for p in songs))
    out = tmp_path / "out"
    quiet = dict(log=lambda _: None)
    assert run_prep(str(manifest), str(prep_model), str(out), PrepConfig(max_duration=2), **quiet).exit_code == EXIT_OK
    first = json.loads((out / "prep_report.json").read_text())["fingerprint"]
    with pytest.raises(UserError, match="--overwrite"):
        run_prep(str(manifest), str(prep_model), str(out), PrepConfig(max_duration=3), **quiet)
    result = run_prep(str(manifest), str(prep_model), str(out), PrepConfig(max_duration=3), overwrite=True, **quiet)
    assert result.exit_code == EXIT_OK and result.report["fingerprint"] != first
    manifest_rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [round(row["duration"]) for row in manifest_rows] == [3]  # the new windows only
    assert json.loads((out / "prep_state.json").read_text())["fingerprint"] == result.report["fingerprint"]

    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"audio": str(tmp_path / "gone.wav"), "caption": "x"}) + "\n")
    nothing = run_prep(str(missing), str(prep_model), str(tmp_path / "none"), PrepConfig(), **quiet)
    assert nothing.exit_code == EXIT_FATAL and nothing.report["samples"] == 0
    assert "audio file not found" in (tmp_path / "none" / "errors.jsonl").read_text()


def test_lr_schedulers_warm_up_then_follow_their_shape():
    """"`lr_scheduler` cosine/constant/linear, `lr_warmup_steps`\""""
    from acestep_dist.train.loop import lr_lambda

    total = 20
    curves = {name: [lr_lambda(TrainConfig(lr_scheduler=name, lr_warmup_steps=4), total)(s) for s in range(total)]
              for name in ("cosine", "constant", "linear")}
    for name, curve in curves.items():
        assert curve[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]), name  # linear warm-up to the full rate
    assert curves["constant"][4:] == [1.0] * (total - 4)
    assert all(a > b for a, b in zip(curves["linear"][4:], curves["linear"][5:])) and curves["linear"][-1] < 0.1
    assert all(a > b for a, b in zip(curves["cosine"][4:], curves["cosine"][5:])) and curves["cosine"][-1] < 0.01
    assert curves["cosine"][8] > curves["linear"][8]  # cosine stays high longer


def test_a_run_folder_holds_checkpoints_metrics_and_validation(reference_run):
    """"Checkpoints every `checkpointing_steps` into `RUN/checkpoint_*` (DeepSpeed engine + optimizer + scheduler
    states, the adapter as a diffusers LoRA file, the step)", "Metrics to TensorBoard in `RUN/tb` (loss, lr, grad
    norm, samples/s, step time ...)" and validation renders "to `RUN/samples/step-N.wav` and TensorBoard"."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkpoints = sorted(p for p in reference_run.glob("checkpoint_*") if p.is_dir())
    steps = []
    for checkpoint in checkpoints:
        assert (checkpoint / "lora.safetensors").is_file()
        engine = {p.name for p in (checkpoint / "engine").iterdir()}
        assert any("optim_states" in name for name in engine) and any("model_states" in name for name in engine)
        model_states = next((checkpoint / "engine").glob("*model_states.pt"))
        # DeepSpeed's own file: read only to check it holds the scheduler (resume unpickles it: our own runs only)
        assert torch.load(model_states, map_location="cpu", weights_only=False)["lr_scheduler"] is not None
        steps.append(json.loads((checkpoint / "acedist_state.json").read_text())["step"])
    assert sorted(steps) == [5, 10]  # checkpointing_steps=5 of 10

    events = EventAccumulator(str(reference_run / "tb"), size_guidance={"audio": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/step_time_s"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10]  # log_interval=5
    assert "validation" in tags["audio"] and [e.step for e in events.Audio("validation")] == [5, 10]


def test_final_lora_loads_in_diffusers_pipeline_at_scale_1(reference_run, prep_model, tmp_path):
    """"`lora.safetensors` (diffusers' LoRA format with the adapter config in the header:
    `AceStepPipeline.load_lora_weights` takes it at scale 1)\""""
    from diffusers import AceStepPipeline

    from acestep_dist.audio import read_audio_simple
    from acestep_dist.generate import GenerateRequest, generate

    lora = reference_run / "final" / "lora.safetensors"
    prompt = dict(prompt="calm piano", lyrics="[verse]\nla", duration=1.0, language="en", bpm=90, steps=3,
                  guidance=1.0, shift=3.0, seed=5)
    pipe = AceStepPipeline.from_pretrained(prep_model)
    pipe.load_lora_weights(str(lora))  # the run's own file, no scale given
    theirs = pipe(prompt=prompt["prompt"], lyrics=prompt["lyrics"], audio_duration=1.0, vocal_language="en", bpm=90,
                  num_inference_steps=3, guidance_scale=1.0, shift=3.0,
                  generator=torch.Generator("cpu").manual_seed(5), output_type="pt").audios[0].float()
    generate(str(prep_model), GenerateRequest.text(**prompt), tmp_path / "ours.wav", lora=str(lora), log=lambda _: None)
    ours = torch.from_numpy(read_audio_simple(tmp_path / "ours.wav")[0]).float()
    generate(str(prep_model), GenerateRequest.text(**prompt), tmp_path / "base.wav", log=lambda _: None)
    base = torch.from_numpy(read_audio_simple(tmp_path / "base.wav")[0]).float()
    assert (ours - theirs).abs().max() <= 1e-5 and (ours - base).abs().max() > 1e-3


def test_export_takes_a_run_its_final_or_one_checkpoint(reference_run, tmp_path):
    """"`acedist export RUN` takes a run folder (its `final/`), `final/` itself or one `checkpoint_*` folder\""""
    from safetensors.torch import load_file

    from acestep_dist.export import export

    files = {}
    for label, source in [("run", reference_run), ("final", reference_run / "final")]:
        [written] = export(source, tmp_path / label, "comfyui", name="x", log=lambda _: None)
        files[label] = load_file(written)
    assert files["run"].keys() == files["final"].keys()
    assert all(torch.equal(files["run"][k], files["final"][k]) for k in files["run"])
    checkpoint = min((p for p in reference_run.glob("checkpoint_*") if p.is_dir()),
                     key=lambda p: json.loads((p / "acedist_state.json").read_text())["step"])
    export(checkpoint, tmp_path / "step5", "diffusers", log=lambda _: None)
    assert "step 5" in (tmp_path / "step5" / "README.txt").read_text()

    unfinished = tmp_path / "unfinished"
    shutil.copytree(checkpoint, unfinished / checkpoint.name)
    with pytest.raises(UserError, match="holds checkpoints but no final/.*checkpoint_\\* folders"):
        export(unfinished, tmp_path / "u", log=lambda _: None)


def test_silence_latent_is_never_unpickled(tmp_path):
    """"`silence_latent.pt` loads with `torch.load(weights_only=True)`\": a file with other pickled objects is
    refused without running them."""
    from acestep_dist.families.ace_step_15.loading import _load_silence_latent

    ran = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    torch.save({"latent": torch.zeros(1, 4, 8), "extra": Payload()}, tmp_path / "silence_latent.pt")
    with pytest.raises(ModelLoadError, match="pickled objects other than tensors"):
        _load_silence_latent(tmp_path)
    assert not ran.exists()
    torch.save(torch.zeros(1, 4, 8), tmp_path / "silence_latent.pt")
    assert _load_silence_latent(tmp_path).shape == (1, 8, 4)


def test_the_shipped_recipes_are_the_listed_ones():
    """"Shipped recipes ...: `configs/train/turbo-lora.yaml`, `base-lora.yaml`, `sft-lora.yaml`, `base-full.yaml`,
    `xl-lora.yaml`; prep defaults in `configs/prep/default.yaml`.\""""
    listed = re.search(r"Shipped recipes[^:]*:(.*?)\n\n", README, re.S).group(1)
    names = {Path(n).name for n in re.findall(r"`([\w/.-]+\.yaml)`", listed)}
    shipped = {p.name for p in (ROOT / "configs" / "train").glob("*.yaml")} | {"default.yaml"}
    assert names == shipped
    variants = {"turbo-lora": "turbo", "base-lora": "base", "sft-lora": "sft", "base-full": "base", "xl-lora": "xl"}
    for stem in variants:
        config = load_config(TrainConfig, ROOT / "configs" / "train" / f"{stem}.yaml")
        assert config.model_type == ("full" if stem.endswith("full") else "lora"), stem


def test_the_layout_section_names_files_that_exist():
    """The "Layout" section: every module and folder it names exists."""
    block = README.split("## Layout", 1)[1]
    names = re.findall(r"[\w./]+", block)
    library = ROOT / "acestep_dist"
    modules = [n for n in names if n.endswith(".py")]
    assert "cli.py" in modules and "storage.py" in modules
    for name in modules:
        assert (library / name).is_file() or (ROOT / "pipelines" / name).is_file(), name
    for folder in ("acestep_dist", "pipelines", "cluster", "configs", "tests", "bench", "acestep_dist/sources",
                   "acestep_dist/train", "acestep_dist/families/ace_step_15"):
        assert (ROOT / folder).is_dir(), folder
    train = re.search(r"train/ \(([^)]*)\)", block).group(1)
    family = re.search(r"families/ace_step_15/ \(([^)]*)\)", block, re.S).group(1)
    for part in re.findall(r"\w+", train):
        assert (library / "train" / f"{part}.py").is_file(), part
    for part in re.findall(r"\w+", family):
        assert (library / "families" / "ace_step_15" / f"{part}.py").is_file(), part
    for name in ("local_cluster.py", "aws.yaml", "gcp.yaml", "onprem.yaml", "kuberay/raycluster.yaml",
                 "kuberay/rayjob-prep.yaml", "kuberay/rayjob-train.yaml"):  # "See `cluster/` for ..."
        assert (ROOT / "cluster" / name).is_file()


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_corpus_skips_or_fails_in_ci(ci, tmp_path):
    """"Tests that use the shared music corpus ... skip with a message when it is absent ...; in CI (`CI=true`) a
    missing corpus fails the run.\""""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(ACESTEP_CORPUS=str(tmp_path / "no-corpus"), **({"CI": "true"} if ci else {}))
    test = "tests/test_readme.py::test_long_lyrics_are_truncated_with_a_warning"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if ci:
        assert done.returncode != 0 and "test corpus missing" in done.stdout, done.stdout[-2000:]
    else:
        assert done.returncode == 0 and "1 skipped" in done.stdout and "test corpus not found" in done.stdout


def test_convert_writes_embedded_audio_once_and_takes_the_first_non_empty_caption_field(tmp_path, corpus):
    """"the caption from the first non-empty `--caption-field` (repeatable) ... Audio stored inside the dataset is
    written once to `NAME.audio/` beside the manifest.\""""
    import datasets

    from acestep_dist.convert import convert_dataset

    wav = sorted((corpus / "music").glob("*.wav"))[0]
    storage = datasets.Features({"bytes": datasets.Value("binary"), "path": datasets.Value("string")})
    features = datasets.Features({"audio": storage, "description": datasets.Value("string"),
                                  "tags": datasets.Value("string")})
    datasets.Dataset.from_dict({
        "audio": [{"bytes": wav.read_bytes(), "path": "one.wav"}, {"bytes": wav.read_bytes(), "path": "two.wav"}],
        "description": ["", "a calm piano piece"],
        "tags": ["piano, calm", "ignored"],
    }, features=features).cast_column("audio", datasets.Audio(decode=False)).save_to_disk(str(tmp_path / "ds"))
    config = PrepConfig(audio_caption_fields=["description", "tags"])
    for _ in range(2):  # a second conversion reuses the written files
        convert_dataset(str(tmp_path / "ds"), tmp_path / "songs.jsonl", config=config, log=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "songs.jsonl").read_text().splitlines()]
    assert [row["caption"] for row in rows] == ["piano, calm", "a calm piano piece"]
    written = list((tmp_path / "songs.audio").iterdir())
    assert len(written) == 1 and written[0].read_bytes() == wav.read_bytes()  # same bytes: one file
    assert {row["audio"] for row in rows} == {str(written[0])}


def test_lora_presets_and_rslora_survive_every_export_format(prep_model, tmp_path):
    """"`use_rslora`, `lora_preset` attention / attention+mlp" and the three export spellings: an attention+mlp
    rsLoRA read back from each format acts on the DiT exactly as the trained adapter."""
    from acestep_dist.families.ace_step_15 import AceStep15
    from acestep_dist.families.ace_step_15.lora_formats import read_lora, write_comfyui, write_diffusers, write_peft
    from acestep_dist.families.ace_step_15.training import build_trainable

    config = TrainConfig(**{**TRAIN_COMMON, "lora_preset": "attention+mlp", "use_rslora": True, "lora_rank": 4,
                            "lora_alpha": 8.0})
    family = AceStep15.load(str(prep_model), ("transformer", "condition_encoder", "text_encoder", "tokenizer"))
    trainable = build_trainable(family, config)
    transformer = family.components.transformer
    with torch.no_grad():  # a non-zero adapter (B starts at zero)
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    weights = trainable.lora_weights()
    assert {"gate_proj", "up_proj", "down_proj", "to_q", "to_out.0"} <= set(weights.targets)
    files = {"diffusers": write_diffusers(weights, tmp_path / "diffusers"), "peft": write_peft(weights, tmp_path / "peft"),
             "comfyui": write_comfyui(weights, tmp_path / "comfyui" / "x.safetensors")}

    dims = transformer.config
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 20, dims.audio_acoustic_hidden_dim, generator=generator),
                  timestep=torch.tensor([0.5]), timestep_r=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 6, dims.hidden_size, generator=generator),
                  context_latents=torch.randn(1, 20, dims.in_channels - dims.audio_acoustic_hidden_dim,
                                              generator=generator), return_dict=False)
    transformer.eval()
    with torch.no_grad():
        expected = transformer(**inputs)[0]
    for name, path in files.items():
        read = read_lora(path)
        assert (read.spec.rank, set(read.targets)) == (4, set(weights.targets)), name
        # ComfyUI has no rsLoRA flag: its alpha carries the same scale (8 / sqrt(4) = 16 / 4)
        assert read.spec.scale == pytest.approx(8.0 / 2) and (read.spec.use_rslora or name == "comfyui"), name
        other = AceStep15.load(str(prep_model), ("transformer", "condition_encoder", "text_encoder", "tokenizer"))
        build_trainable(other, TrainConfig(**{**config.model_dump(), "init_lora": str(path)}))
        other.components.transformer.eval()
        with torch.no_grad():
            assert (other.components.transformer(**inputs)[0] - expected).abs().max() <= 1e-6, name
    plain = AceStep15.load(str(prep_model), ("transformer", "condition_encoder", "text_encoder", "tokenizer"))
    build_trainable(plain, TrainConfig(**{**config.model_dump(), "use_rslora": False,
                                          "init_lora": None}))  # the same weights at alpha / r instead of alpha / sqrt(r)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(plain.components.transformer, weights.state, adapter_name="default")
    plain.components.transformer.eval()
    with torch.no_grad():
        assert (plain.components.transformer(**inputs)[0] - expected).abs().max() > 1e-4  # rsLoRA's scale counts


@pytest.mark.slow
def test_accumulation_zero1_and_optimizer_offload_train_what_a_plain_batch_trains(reference_run, train_shards,
                                                                                   prep_model, tmp_path):
    """"`gradient_accumulation_steps`", "DeepSpeed (ZeRO 0-3, optional optimizer offload ...)": 1 worker x batch 1 x
    2 accumulation steps under ZeRO-1 with the optimizer offloaded trains the weights of 1 worker x batch 2, ZeRO-2."""
    from acestep_dist.families.ace_step_15.lora_formats import read_lora
    from pipelines.train import run_train

    run = tmp_path / "accumulated"
    config = TrainConfig(**{**TRAIN_COMMON, "train_batch_size": 1, "gradient_accumulation_steps": 2, "zero_stage": 1,
                            "offload_optimizer": True})
    run_train(config, str(train_shards), str(prep_model), str(run), workers=1, log=lambda _: None)
    got = read_lora(run / "final" / "lora.safetensors").state
    expected = read_lora(reference_run / "final" / "lora.safetensors").state
    assert got.keys() == expected.keys()
    assert max(float((got[k] - expected[k]).abs().max()) for k in got) <= 1e-5


def test_embedded_audio_with_a_url_out_is_rejected_saying_what_to_do(tmp_path, corpus):
    """"A Hugging Face dataset whose audio is stored inside it needs a local `--out` ...; for an `s3://` output run
    `acedist convert` first." (prep lists a source without an audio cache folder when --out is a URL)"""
    import datasets

    from acestep_dist.sources import load_source

    wav = sorted((corpus / "music").glob("*.wav"))[0]
    storage = datasets.Features({"bytes": datasets.Value("binary"), "path": datasets.Value("string")})
    datasets.Dataset.from_dict({"audio": [{"bytes": wav.read_bytes(), "path": "x.wav"}], "caption": ["piano"]},
                               features=datasets.Features({"audio": storage, "caption": datasets.Value("string")})
                               ).cast_column("audio", datasets.Audio(decode=False)).save_to_disk(str(tmp_path / "ds"))
    listing = load_source(tmp_path / "ds", PrepConfig(), cache_dir=None)
    assert not listing.records
    assert "needs a local --out" in listing.rejected[0].reason and "acedist convert" in listing.rejected[0].reason


def test_a_missing_source_is_one_error_line(prep_model, tmp_path):
    result = _acedist("prep", "/no/such/songs", "--model", str(prep_model), "--out", str(tmp_path / "o"))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "source /no/such/songs does not exist" in lines[0], result.stderr
