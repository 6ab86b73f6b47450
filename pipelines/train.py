"""Fine-tune an ACE-Step model on `acedist prep` shards with Ray Train + DeepSpeed.

Runs as ``acedist train`` (on a cluster: ``ray job submit -- acedist train ...``). Each worker
runs ``acestep_dist.train.loop.train_worker``; checkpoints go to RUN through Ray Train (local path
or any URL Ray's storage understands), the final weights to RUN/final. The model's family
(``acestep_dist.families``) builds what trains and its loss; the shards must be that family's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acestep_dist import faults
from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families import open_model, plugin_env, worker_reference
from acestep_dist.paths import existing_file_text, local_path, local_or_hub
from acestep_dist.ray_cluster import init_ray
from acestep_dist.storage import open_fs, ray_train_storage
from acestep_dist.train.checkpoints import choose_resume_checkpoint, list_checkpoints, missing_weights
from acestep_dist.train.data import EpochPlan, open_training_data, verify_training_shards
from acestep_dist.train.layout import FINAL_DIR, STATE_FILE, ema_files, weight_files
from acestep_dist.train.loop import train_worker
from acestep_dist.train.frozen_precision import check_quantization_available
from acestep_dist.train.gpus import AUTO, choose_gpus_per_node, visible_gpus
from acestep_dist.train.optimizers import check_optimizer


@dataclass
class TrainResult:
    run: str
    final: str | None  # folder with the trained weights
    steps: int
    estimate: Any = None  # --dry-run: the MemoryEstimate (nothing trained)


def _worker_failure(error: Exception) -> str:
    """One line for a failed fit: the first failing worker's own exception (a UserError's message as
    it is), instead of Ray's wrapper with its traceback."""
    failures = getattr(error, "worker_failures", None) or {}  # ray.train.WorkerGroupError: rank -> exception
    if not failures:
        message = str(error).strip().splitlines()
        return message[-1] if message else type(error).__name__
    failure = failures[min(failures)]
    failure = getattr(failure, "_base_exc", failure)  # Ray's wrapper (traceback text) keeps the original
    lines = str(failure).strip().splitlines()
    if isinstance(failure, UserError):
        return lines[0] if lines else type(failure).__name__
    return f"{type(failure).__name__}: {lines[0]}" if lines else type(failure).__name__


def _publish_final(fs, final: str, checkpoint: str) -> dict:
    """Copy the weights and state of the local checkpoint folder ``checkpoint`` into ``final``; a
    run never reports success without the weights it trained."""
    folder = Path(checkpoint)
    state = json.loads((folder / STATE_FILE).read_text())
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    missing = missing_weights(state, files)
    if missing:
        raise UserError(f"checkpoint {folder.name} (step {state['step']}) lacks {', '.join(missing)}: no weights for "
                        f"{final}; resume with --resume to redo the last steps")
    if fs.exists(final):
        # final/ is replaced only when it is ours (an earlier publish left its state file there)
        if not fs.exists(f"{final}/{STATE_FILE}"):
            raise UserError(f"{final} exists and was not written by acedist (no {STATE_FILE}); move it away")
        fs.rm(final, recursive=True)
    fs.makedirs(final, exist_ok=True)
    for item in (*weight_files(state), *ema_files(state, checkpoint=False), STATE_FILE):
        source = folder / item
        if source.exists():
            fs.put(str(source), f"{final}/{item}", recursive=source.is_dir())
    published = [p.split(f"{final.rstrip('/')}/", 1)[-1] for p in fs.find(final)]
    missing = missing_weights(state, published, checkpoint=False)
    if missing:
        raise UserError(f"{final} lacks {', '.join(missing)} after copying it from {folder.name}")
    return state


def _scaling(nodes: int, gpus_per_node: int, workers: int | None):
    from ray.train import ScalingConfig

    if nodes < 1 or gpus_per_node < 0 or (workers is not None and workers < 1):
        raise UserError("--nodes must be >= 1, --gpus-per-node >= 0 and --workers >= 1")
    if gpus_per_node:
        if workers is not None:
            raise UserError("--workers is for CPU runs; with GPUs the workers are --nodes x --gpus-per-node")
        count, use_gpu = nodes * gpus_per_node, True
    else:
        count, use_gpu = workers or nodes, False
    # one worker per node when each node holds one: spread over the nodes, never two on one
    strategy = "STRICT_SPREAD" if nodes > 1 and count == nodes else ("SPREAD" if nodes > 1 else "PACK")
    resources = {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}
    return ScalingConfig(num_workers=count, use_gpu=use_gpu, resources_per_worker=resources,
                         placement_strategy=strategy), count, use_gpu


def _worker_env(use_gpu: bool) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           # Ray Train's print patch logs every line twice; our workers print plain progress lines
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # settings users give the driver, which remote nodes' workers would not inherit
    for name, value in os.environ.items():
        # (AWS_*: an S3 endpoint and credentials for reading --data and writing samples/ and tb/)
        if name.startswith(("GLOO_", "NCCL_", "HF_", "AWS_")) or name in ("PYTHONPATH",):
            env[name] = value
    # ours, each on purpose: the families to register, and a test's fault injection
    return {**env, **plugin_env(), **faults.environment()}


def resolve_config_paths(config: TrainConfig) -> TrainConfig:
    """The config with its file settings fixed on the driver: ``init_lora`` absolute, and a
    ``validation_lyrics`` that names a file replaced by the file's text."""
    updates = {}
    if config.init_lora:
        updates["init_lora"] = local_path(config.init_lora)
    lyrics = existing_file_text(config.validation_lyrics, option="validation_lyrics")
    if lyrics != config.validation_lyrics:
        updates["validation_lyrics"] = lyrics
    return config.model_copy(update=updates) if updates else config


@dataclass
class _Checked:
    """What the driver checked and resolved before any worker starts (paths made absolute)."""

    config: TrainConfig
    data: str
    model: str
    output: str
    family: Any
    description: Any
    options: Any  # the family's own settings
    recipe: Any
    refs: list
    scaling: Any  # ray.train.ScalingConfig
    world: int
    use_gpu: bool
    plan: EpochPlan
    model_ref: str  # what the workers load
    schema: Any  # of the samples in --data (their family is the model's)
    stored: dict  # the optional tensors every sample holds (TrainingData.stored)

    @property
    def schema_version(self) -> int:
        return self.schema.version


@dataclass
class _RunFolder:
    """RUN as fsspec opens it (``fs``, ``root``) and as Ray Train's ``RunConfig`` takes it."""

    url: str  # as the user gave it, made absolute if a path
    fs: Any
    root: str
    storage: str
    name: str
    storage_filesystem: Any  # a pyarrow filesystem made on the driver for a URL, else None


def _check_on_driver(config: TrainConfig, data: str, model: str, output: str, nodes: int, gpus_per_node: int,
                     workers: int | None, log) -> _Checked:
    # Every path is made absolute here, on the driver: workers run in other directories.
    data, output, model = local_path(data), local_path(output), local_or_hub(model)
    config = resolve_config_paths(config)
    # everything that can be checked here is, before any worker starts: errors name the file
    family, description = open_model(model)  # configs only, no weights (a hub id resolves once here)
    options = family.options(config)
    if config.model_type == "lora" and config.adapter not in family.adapters:
        raise UserError(f"adapter {config.adapter!r}: {family.title} trains {', '.join(family.adapters)} adapters")
    training = open_training_data(data)
    if training.family != family.name:
        raise UserError(f"{data} holds samples of the model family {training.family}, the model is {family.name}; "
                        f"prepare the data with this model (acedist prep --model {model})")
    recipe = family.check_training(description, config, options, training.stored)
    scaling, world, use_gpu = _scaling(nodes, gpus_per_node, workers)
    check_optimizer(config, world, use_gpu)
    check_quantization_available(config.base_model_precision)
    if config.optimizer == "prodigy" and config.learning_rate < 0.1:
        log(f"train: note: with prodigy, learning_rate ({config.learning_rate:g}) multiplies the step size it "
            f"estimates; its authors use 1.0 (acedist's default for prodigy)")
    verify_training_shards(data, training, log=log)
    plan = EpochPlan(training.refs, config.seed, config.train_batch_size, config.gradient_accumulation_steps, world)
    return _Checked(config, data, model, output, family, description, options, recipe, training.refs, scaling, world,
                    use_gpu, plan, worker_reference(model, description), training.schema, training.stored)


def _open_run_folder(output: str) -> _RunFolder:
    fs, root = open_fs(output)
    storage, name, storage_filesystem = ray_train_storage(output)
    return _RunFolder(output, fs, root, storage, name, storage_filesystem)


def _choose_resume(run: _RunFolder, resume: bool, checked: _Checked, log) -> tuple[list[str], str | None]:
    """The names of the checkpoints earlier launches left in RUN, and the checkpoint to resume from
    (None for a new run); RUN may hold a run only when it is resumed."""
    earlier = list_checkpoints(run.fs, run.root)
    if earlier and not resume:
        raise UserError(f"{run.url} already holds a run; pass --resume to continue it, or choose a new --output")
    resume_from = None
    if resume:
        chosen = choose_resume_checkpoint(run.fs, run.root, run.url, log=log)
        zero_stage = checked.config.zero_stage
        if zero_stage > 0 and chosen.world_size != checked.world:
            # ZeRO keeps one optimizer partition per worker: another worker count cannot load them
            raise UserError(f"--resume: {chosen.name} was written by {chosen.world_size} worker(s) under ZeRO-"
                            f"{zero_stage}, this launch has {checked.world}; resume with the same number of workers")
        protocol = run.fs.protocol if isinstance(run.fs.protocol, str) else run.fs.protocol[0]
        # a path within Ray's storage filesystem when we made one for it (its endpoint and keys), else a URL
        local = protocol in ("file", "local") or run.storage_filesystem is not None
        resume_from = chosen.path if local else f"{protocol}://{chosen.path}"
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in earlier], resume_from


def _worker_job(checked: _Checked, run: _RunFolder, loader_workers: int, resume_from: str | None,
                earlier: list[str]) -> dict:
    """The ``train_loop_config`` every worker gets."""
    return {"config": checked.config.model_dump(), "data": checked.data, "model": checked.model_ref,
            "family": checked.family.name, "schema_version": checked.schema_version,
            "family_options": checked.options.model_dump(), "run": run.url,
            "use_gpu": checked.use_gpu, "loader_workers": loader_workers, "resume_from": resume_from,
            "resume_filesystem": run.storage_filesystem, "earlier_checkpoints": earlier}


def _build_trainer(checked: _Checked, run: _RunFolder, job: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config=job,
        scaling_config=checked.scaling,
        torch_config=TorchConfig(backend="nccl" if checked.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run.name, storage_path=run.storage, storage_filesystem=run.storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=checked.config.checkpoints_total_limit),
            failure_config=FailureConfig(max_failures=checked.config.max_failures),
            worker_runtime_env={"env_vars": _worker_env(checked.use_gpu)},
        ),
    )


def _fit(trainer):
    try:
        return trainer.fit()
    except Exception as error:  # Ray wraps the worker's exception
        raise UserError(f"training failed: {_worker_failure(error)}") from error


def _publish_final_checkpoint(run: _RunFolder, result, resume_from: str | None, earlier: list[str],
                              log) -> TrainResult:
    """Publish the weights of the fit's last checkpoint to RUN/final."""
    from ray.train import Checkpoint

    if result.checkpoint is None:
        raise UserError("training finished without a checkpoint")
    checkpoint = result.checkpoint
    if resume_from and Path(checkpoint.path).name in earlier:
        # nothing left to train: Ray's latest is an earlier launch's, the weights are in the one chosen
        checkpoint = Checkpoint(resume_from, filesystem=run.storage_filesystem)
    final = f"{run.root}/{FINAL_DIR}"
    with checkpoint.as_directory() as local:
        state = _publish_final(run.fs, final, local)
    final_url = f"{run.url.rstrip('/')}/{FINAL_DIR}"  # with its scheme (s3://...), unlike the fs path
    log(f"train: done at step {state['step']}; weights in {final_url}")
    return TrainResult(run.url, final_url, int(state["step"]))


def _dry_run(checked: _Checked):
    """The report of ``acedist train --dry-run``: counts and one worker's estimated memory, from the
    model built without weights and one fake step over a micro-batch of the data's largest sample."""
    from acestep_dist.flow import per_sample_generators
    from acestep_dist.train.data import Item, SampleReader
    from acestep_dist.train.memory_estimate import estimate

    config = checked.config
    largest = max(range(len(checked.refs)), key=lambda index: checked.refs[index].tensor_size)
    reader = SampleReader(checked.refs, checked.schema)
    try:
        sample = reader.read(Item(largest, 0, 0, 0))
    finally:
        reader.close()
    samples = [sample] * config.train_batch_size
    trained = (f"{config.adapter} r{config.lora_rank} ({config.lora_preset})" if config.model_type == "lora"
               else "full fine-tune")
    setting = (f"{checked.family.title} {checked.description.variant}, {trained}, {checked.world} worker(s) on "
               f"{'GPU' if checked.use_gpu else 'CPU'}, ZeRO-{config.zero_stage}, "
               f"{config.mixed_precision if checked.use_gpu else 'fp32'}, optimizer {config.optimizer}"
               f"{', gradient checkpointing' if config.gradient_checkpointing else ''}")
    result = estimate(checked.family, checked.description, config, checked.options, checked.stored,
                      samples, per_sample_generators(range(len(samples))), world=checked.world,
                      use_gpu=checked.use_gpu, setting=setting)
    audio = next(spec for spec in checked.schema.tensors if spec.length == "frames" and not spec.optional)
    result.sample_seconds = sample[audio.name].shape[audio.axis] / checked.description.frames_per_second
    return result


def run_train(
    config: TrainConfig,
    data: str,
    model: str,
    output: str,
    *,
    nodes: int = 1,
    gpus_per_node: int | str = AUTO,
    workers: int | None = None,
    address: str | None = None,
    resume: bool = False,
    loader_workers: int = 0,
    dry_run: bool = False,
    log=print,
) -> TrainResult:
    gpus_per_node, why = choose_gpus_per_node(
        gpus_per_node, nodes, workers, lambda: visible_gpus(address, lambda: init_ray(address, dashboard=True), dry_run))
    log(f"train: {why}")
    checked = _check_on_driver(config, data, model, output, nodes, gpus_per_node, workers, log)
    if dry_run:
        estimate = _dry_run(checked)
        log(estimate.render("GPU" if checked.use_gpu else "CPU"))
        return TrainResult(run=checked.output, final=None, steps=0, estimate=estimate)
    config = checked.config
    run = _open_run_folder(checked.output)
    earlier, resume_from = _choose_resume(run, resume, checked, log)
    run.fs.makedirs(run.root, exist_ok=True)
    total = config.max_train_steps or config.num_train_epochs * checked.plan.steps_per_epoch
    log(f"train: {len(checked.refs)} samples, {checked.world} worker(s), {total} steps -> {run.url}; "
        f"{checked.family.name} {checked.description.variant}; {checked.recipe}")

    job = _worker_job(checked, run, loader_workers, resume_from, earlier)
    started_ray = init_ray(address, dashboard=True)
    try:
        result = _fit(_build_trainer(checked, run, job))
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return _publish_final_checkpoint(run, result, resume_from, earlier, log)
