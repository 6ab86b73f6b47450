"""The ``acedist`` command line: parses options and calls the library. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

from . import __version__, families
from .errors import UserError


def _export_formats() -> list[str]:
    from .export import export_formats

    return export_formats()


def _variant_choices() -> list[str]:
    return [*families.union("variants"), *(alias for f in families.families() for alias in f.variant_aliases)]


class _Group(click.Group):
    """Turns a ``UserError`` anywhere below into one ``Error: ...`` line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            raise click.ClickException(str(error)) from None


def _quiet_libraries() -> None:
    """diffusers / transformers print a progress bar per weight file and advisory warnings; our
    commands report their own progress. Set through the libraries' own environment switches, so a
    command that loads no model never imports them (seconds per command), and Ray workers started
    from here inherit the same quiet."""
    import importlib
    import logging
    import os
    import warnings

    # torchao (the [quant] extra; diffusers imports it whenever it is installed) logs a warning for
    # each CUDA kernel a CPU-only torch cannot load; the weight-only path uses none of them
    logging.getLogger("torchao").setLevel(logging.ERROR)
    # AutoencoderOobleck still builds with torch's older weight_norm; nothing for a user to do
    warnings.filterwarnings("ignore", message=".*weight_norm.*is deprecated", category=FutureWarning)
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    # Libraries this process imported already (the CLI run from Python) read those switches at
    # import: tell them directly.
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    for library in ("transformers", "diffusers"):
        if library in sys.modules:
            logging_module = importlib.import_module(f"{library}.utils.logging")
            logging_module.disable_progress_bar()
            logging_module.set_verbosity_error()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="acedist")
@click.option("-v", "--verbose", is_flag=True, help="show the model libraries' own progress bars and warnings")
def cli(verbose: bool) -> None:
    """Distributed data prep and fine-tuning for ACE-Step music models."""
    if not verbose:
        _quiet_libraries()


@cli.group(cls=_Group)
def model() -> None:
    """Build or describe model checkpoints."""


@model.command("tiny")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="folder to write")
@click.option("--family", "family_name", default=families.names()[0], show_default=True, type=click.Choice(families.names()))
@click.option("--variant", type=click.Choice(_variant_choices()), help="default: the family's own default")
@click.option("--latent-dim", type=click.IntRange(min=2), help="VAE latent channels, where the family has them "
                                                                 "(ACE-Step 1.5: 8 by default, 64 in the real model)")
@click.option("--part", "parts", multiple=True, metavar="NAME=FOLDER",
              help="copy a component folder instead of random weights, where the family takes one "
                   "(ACE-Step v1: dcae, vocoder)")
@click.option("--seed", default=0, show_default=True, type=int)
def model_tiny(out_dir: str, family_name: str, variant: str | None, latent_dim: int | None, parts: tuple[str, ...],
               seed: int) -> None:
    """Write a tiny random-weight checkpoint of a family's real architecture, for tests and demos."""
    from pathlib import Path

    family = families.get(family_name)
    variant = family.variant_name(variant or family.default_variant)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    options: dict = {"latent_dim": latent_dim} if latent_dim is not None else {}
    for part in parts:
        name, sep, folder = part.partition("=")
        if not sep or not name or not folder:
            raise UserError(f"--part {part!r}: give NAME=FOLDER")
        if not Path(folder).is_dir():
            raise UserError(f"--part {part!r}: {folder} is not a folder")
        options[name] = str(Path(folder).resolve())
    family.write_tiny(out, variant, seed=seed, **options)
    click.echo(f"wrote tiny {family.name} {variant} checkpoint to {out}")


@model.command("info")
@click.argument("model_path")
def model_info(model_path: str) -> None:
    """Show the family, layout, variant and sizes of a checkpoint (folder or hub id), from its config files."""
    _family, description = families.open_model(model_path)
    info = description.as_dict()
    info.update(info.pop("details"))
    click.echo(json.dumps(info, indent=2))


@model.command("list")
def model_list() -> None:
    """The model families this acedist knows, with their variants, LoRA presets, export formats and tasks."""
    for family in families.families():
        aliases = ", ".join(f"{alias} = {name}" for alias, name in family.variant_aliases.items())
        click.echo(f"{family.name}")
        click.echo(f"  variants      {', '.join(family.variants)}" + (f" (aliases: {aliases})" if aliases else ""))
        click.echo(f"  lora presets  {', '.join(family.lora_presets) or '-'}")
        click.echo(f"  adapters      {', '.join(family.adapters) or '-'}")
        click.echo(f"  lora formats  {', '.join(family.lora_formats) or '-'}")
        click.echo(f"  full formats  {', '.join(family.full_formats) or '-'}")
        click.echo(f"  tasks         {', '.join(family.tasks)}")


@cli.command()
@click.argument("source")
@click.argument("overrides", nargs=-1)
@click.option("--model", required=True, help="diffusers folder, upstream checkpoint folder, or hub id")
@click.option("--out", required=True, help="output folder (local path or fsspec URL)")
@click.option("--address", help="Ray cluster to run on (default: an embedded local cluster)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="prep YAML (see configs/prep/)")
@click.option("--source-type", type=click.Choice(["folder", "hf", "upstream", "manifest", "diffsynth", "acestep-json"]),
              help="force the source kind instead of detecting it")
@click.option("--overwrite", is_flag=True,
              help="replace prep's own earlier output made with another model or config; in a non-empty folder that "
                   "is not a prep output, write beside its files (prep never deletes a file it did not write)")
def prep(source, overrides, model, out, address, config_path, source_type, overwrite) -> None:
    """Decode, encode and shard SOURCE for training. OVERRIDES are key=value prep settings.

    Exit status: 0 when every input was written; 3 when some inputs were rejected (listed in
    OUT/errors.jsonl) and the rest written; 1 on a fatal error (also when another prep holds OUT).
    Rerunning resumes.
    """
    from pipelines.prep import run_prep

    from .config import PrepConfig, load_config

    config = load_config(PrepConfig, config_path, overrides)
    result = run_prep(source, model, out, config, address=address, source_type=source_type, overwrite=overwrite,
                      log=click.echo)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("source")
@click.option("--out", default="annotations.csv", show_default=True,
              help="the file to write: .csv (also a folder's metadata.csv) or .jsonl")
@click.option("--only-missing", "mode", flag_value="only-missing", default=True,
              help="keep every value the source gives; estimate the missing ones (default)")
@click.option("--all", "mode", flag_value="all",
              help="estimated values replace given ones (which stay in the file as NAME_given)")
@click.option("--address", help="Ray cluster to run on (default: an embedded local cluster)")
@click.option("--source-type", type=click.Choice(["folder", "hf", "upstream", "manifest", "diffsynth", "acestep-json"]),
              help="force the source kind instead of detecting it")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file (your edits in it are lost)")
def annotate(source, out, mode, address, source_type, overwrite) -> None:
    """Estimate tempo, key, metre and lyric language for SOURCE's songs, and check their quality.

    Writes one row per song: the given and estimated values (each marked given or estimated, with
    the estimate's confidence), quality flags and near-duplicate groups; review it, then
    `acedist prep OUT --model ...`. Exit status: 0 when every song was analysed; 3 when some were
    not (listed, with the reason); 1 on a fatal error.
    """
    from pipelines.annotate import run_annotate

    result = run_annotate(source, out, mode=mode, source_type=source_type, address=address, overwrite=overwrite,
                          log=click.echo)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("overrides", nargs=-1)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="training recipe (see configs/train/)")
@click.option("--data", required=True, help="an `acedist prep` output folder (local path or fsspec URL)")
@click.option("--model", required=True, help="diffusers folder, upstream checkpoint folder, or hub id")
@click.option("--output", required=True, help="run folder: checkpoints, tb/, samples/, final/")
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="machines to spread workers over")
@click.option("--gpus-per-node", default="auto", show_default=True,
              help="GPU workers per node; auto: the GPUs each node has (CPU when none has any; on an autoscaling "
                   "cluster give the number, auto counts the nodes already up); 0: train on CPU")
@click.option("--workers", type=click.IntRange(min=1), help="CPU workers (default: one per node)")
@click.option("--address", help="Ray cluster to run on (default: an embedded local cluster)")
@click.option("--resume", is_flag=True, help="continue the run in --output from its last checkpoint")
@click.option("--loader-workers", default=0, show_default=True, type=click.IntRange(min=0),
              help="DataLoader processes per worker reading shards ahead")
@click.option("--dry-run", is_flag=True, help="check everything, print the parameter counts and each worker's "
                                              "estimated peak memory, and stop (no weights are read, nothing is "
                                              "written)")
def train(overrides, config_path, data, model, output, nodes, gpus_per_node, workers, address, resume,
          loader_workers, dry_run) -> None:
    """Fine-tune MODEL on prepared shards with Ray Train + DeepSpeed. OVERRIDES are key=value settings
    (SimpleTuner's names: learning_rate=1e-4 max_train_steps=2000 lora_rank=16 ...)."""
    from pipelines.train import run_train

    from .config import TrainConfig, load_config

    config = load_config(TrainConfig, config_path, overrides)
    run_train(config, data, model, output, nodes=nodes, gpus_per_node=gpus_per_node, workers=workers,
              address=address, resume=resume, loader_workers=loader_workers, dry_run=dry_run, log=click.echo)


@cli.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="manifest to write (.jsonl)")
@click.option("--audio-root", type=click.Path(file_okay=False),
              help="folder relative audio paths are resolved against (for an upstream dataset: the folder its "
                   "converter ran in); default: the dataset folder's parent, then the current directory (other datasets: "
                   "the dataset folder first)")
@click.option("--dedupe/--no-dedupe", default=True, show_default=True,
              help="collapse an upstream dataset's repeated rows into one record with repeat = their count")
@click.option("--allow-outside-paths", is_flag=True,
              help="accept audio paths that lead outside --audio-root (or the default folders): absolute paths and "
                   "../ in a dataset you trust")
@click.option("--caption-field", "caption_fields", multiple=True,
              help="other datasets: caption column, repeatable, first non-empty wins [default: caption, prompt, tags]")
@click.option("--lyrics-column", help="other datasets: the lyrics column [default: lyrics]")
@click.option("--audio-column", help="other datasets: Audio or path column [default: audio]")
@click.option("--split", help="the split of a dataset with several [default: train]")
def convert(source, out, audio_root, dedupe, allow_outside_paths, caption_fields, lyrics_column, audio_column,
            split) -> None:
    """Convert the Hugging Face dataset SOURCE (save_to_disk folder or hub id) to a manifest for prep.

    A dataset made by ACE-Step v1's convert2hf_dataset.py is recognised by its columns; any other
    is read SimpleTuner-style (--caption-field, --lyrics-column). Writes OUT, a manifest that
    `acedist prep` reads, and beside it NAME.report.json.

    Exit status: 0 when every row was converted; 3 when some were not (audio not found, no caption;
    listed in the report) and the rest written; 1 on a fatal error.
    """
    from .config import PrepConfig, load_config
    from .convert import convert_dataset

    settings = {"audio_caption_fields": list(caption_fields) or None, "lyrics_column": lyrics_column,
                "audio_column": audio_column, "dataset_split": split}
    config = load_config(PrepConfig, None, {k: v for k, v in settings.items() if v is not None})
    result = convert_dataset(source, out, audio_root=audio_root, dedupe=dedupe, allow_outside_paths=allow_outside_paths,
                             config=config, log=click.echo)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("run")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write")
@click.option("--format", "fmt", default="all", show_default=True,
              type=click.Choice(_export_formats()),
              help="what the run's family writes (`acedist model list`); ACE-Step 1.5 LoRA: diffusers file, "
                   "upstream PEFT folder, ComfyUI file; full fine-tunes: diffusers pipeline, upstream files")
@click.option("--name", help="file name stem of the ComfyUI LoRA (default: the run folder's name)")
@click.option("--ema", is_flag=True, help="export the weight average the run kept (use_ema) instead of its weights")
def export(run, out, fmt, name, ema) -> None:
    """Export the weights of RUN (a run folder, its final/ or one checkpoint_* folder) into OUT.

    OUT/README.txt says which file goes where (diffusers, upstream ACE-Step, ComfyUI).
    """
    from .export import export as export_weights

    export_weights(run, out, fmt, name=name, log=click.echo, ema=ema)


@cli.command()
@click.option("--model", required=True, help="diffusers folder, upstream checkpoint folder, or hub id")
@click.option("--lora", help="an adapter (LoRA, DoRA, LoKr, LoHa) in any format export writes: diffusers, PEFT (folder, "
                             "or its adapter_model.safetensors), ComfyUI, LyCORIS, upstream v1, or a run's final/ file")
@click.option("--lora-scale", default=1.0, show_default=True, type=float)
@click.option("--prompt", required=True, help="the caption: genre, instruments, mood, ...")
@click.option("--lyrics", help="lyrics text, or a lyrics file (one line with a / or a .txt/.lyrics/.lrc/.md "
                                "ending must be a file) (default: instrumental)")
@click.option("--duration", type=float,
              help="seconds, at most 600 (default 30; with --src-audio the source's length, which --duration may only "
                   "repeat)")
@click.option("--bpm", type=int)
@click.option("--keyscale", help='e.g. "A minor"')
@click.option("--timesignature", help='beats per bar, e.g. "4"')
@click.option("--language", help="lyrics language code, e.g. en")
@click.option("--steps", type=click.IntRange(min=1), help="sampler steps (default: the variant's)")
@click.option("--guidance", type=float, help="guidance scale (default: the variant's)")
@click.option("--shift", type=float, help="timestep shift (default: the variant's)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--task", type=click.Choice(families.union("tasks")),
              help="default: repaint with --repaint, cover with --src-audio alone, else text2music")
@click.option("--src-audio", type=click.Path(dir_okay=False, exists=True),
              help="source audio: cover it, or repaint part of it with --repaint")
@click.option("--repaint", nargs=2, type=float, metavar="START END",
              help="seconds of --src-audio to regenerate (0 <= START < END <= its length)")
@click.option("--cover-strength", default=1.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--lyrics-vocab", type=click.Path(dir_okay=False, exists=True),
              help="ACE-Step v1: upstream's lyric vocab.json (default: an installed ACE-Step's)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="FILE.wav (float) or FILE.flac")
def generate(model, lora, lora_scale, prompt, lyrics, duration, bpm, keyscale, timesignature, language, steps,
             guidance, shift, seed, task, src_audio, repaint, cover_strength, lyrics_vocab, out) -> None:
    """Render PROMPT (and lyrics) to audio with MODEL, optionally with a LoRA."""
    from .generate import GenerateRequest, generate as render
    from .paths import existing_file_text

    lyrics = existing_file_text(lyrics, option="--lyrics")
    request = GenerateRequest.text(prompt, lyrics, bpm, keyscale, timesignature, language, duration=duration,
                                   steps=steps, guidance=guidance, shift=shift, seed=seed, src_audio=src_audio,
                                   repaint=tuple(repaint) if repaint else None, cover_strength=cover_strength,
                                   task=task, options={"lyrics_vocab": lyrics_vocab} if lyrics_vocab else {})
    render(model, request, out, lora=lora, lora_scale=lora_scale, log=click.echo)


@cli.command()
@click.argument("out")
def inspect(out) -> None:
    """Verify every shard in OUT (checksums, counts, tensor shapes, unique keys, manifest lines) and
    summarise the dataset; or, for an `acedist annotate` file (.csv / .jsonl), compare its
    estimates with the values given beside them and count its quality flags.

    Writes OUT/inspect_report.json and OUT/inspect_report.png (an annotations file: NAME.review.json
    and NAME.review.png beside it). Exit status 2 names each corrupt shard, each key that occurs
    twice and each unreadable manifest line.
    """
    if out.lower().endswith((".csv", ".jsonl")):
        from .annotate.review import review_annotations

        _report, code = review_annotations(out, log=click.echo)
    else:
        from .inspect_report import inspect_output

        _report, code = inspect_output(out, log=click.echo)
    sys.exit(code)


def main() -> None:
    cli(prog_name="acedist")


if __name__ == "__main__":
    sys.exit(main())
