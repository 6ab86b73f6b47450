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

from acestep_dist import faults
from acestep_dist.config import TrainConfig
from acestep_dist.errors import UserError
from acestep_dist.families import open_model, plugin_env, worker_reference
from acestep_dist.paths import existing_file_text, local_path, local_or_hub
from acestep_dist.ray_cluster import init_ray
from acestep_dist.storage import open_fs, ray_train_storage
from acestep_dist.train.checkpoints import choose_resume_checkpoint, list_checkpoints, missing_weights
from acestep_dist.train.data import EpochPlan, open_training_data, verify_training_shards
from acestep_dist.train.layout import FINAL_DIR, STATE_FILE, weight_files
from acestep_dist.train.loop import train_worker


@dataclass
class TrainResult:
    run: str
    final: str | None  # folder with the trained weights
    steps: int


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
    for item in (*weight_files(state), STATE_FILE):
        source = folder / item
        if source.exists():
            fs.put(str(source), f"{final}/{item}", recursive=source.is_dir())
    published = [p.split(f"{final.rstrip('/')}/", 1)[-1] for p in fs.find(final)]
    missing = missing_weights(state, published)
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


def run_train(
    config: TrainConfig,
    data: str,
    model: str,
    output: str,
    *,
    nodes: int = 1,
    gpus_per_node: int = 0,
    workers: int | None = None,
    address: str | None = None,
    resume: bool = False,
    loader_workers: int = 0,
    log=print,
) -> TrainResult:
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Every path is made absolute here, on the driver: workers run in other directories.
    data, output, model = local_path(data), local_path(output), local_or_hub(model)
    config = resolve_config_paths(config)
    # everything that can be checked here is, before any worker starts: errors name the file
    family, description = open_model(model)  # configs only, no weights (a hub id resolves once here)
    options = family.options(config)
    recipe = family.check_training(description, config, options)
    training = open_training_data(data)
    if training.family != family.name:
        raise UserError(f"{data} holds samples of the model family {training.family}, the model is {family.name}; "
                        f"prepare the data with this model (acedist prep --model {model})")
    verify_training_shards(data, training, log=log)
    refs = training.refs
    scaling, world, use_gpu = _scaling(nodes, gpus_per_node, workers)
    plan = EpochPlan(refs, config.seed, config.train_batch_size, config.gradient_accumulation_steps, world)
    model_ref = worker_reference(model, description)
    fs, root = open_fs(output)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    storage, name, storage_filesystem = ray_train_storage(output)
    earlier = list_checkpoints(fs, root)
    if earlier and not resume:
        raise UserError(f"{output} already holds a run; pass --resume to continue it, or choose a new --output")
    resume_from = None
    if resume:
        chosen = choose_resume_checkpoint(fs, root, output, log=log)
        # a path within Ray's storage filesystem when we made one for it (its endpoint and keys), else a URL
        local = protocol in ("file", "local") or storage_filesystem is not None
        resume_from = chosen.path if local else f"{protocol}://{chosen.path}"
    fs.makedirs(root, exist_ok=True)
    total = config.max_train_steps or config.num_train_epochs * plan.steps_per_epoch
    log(f"train: {len(refs)} samples, {world} worker(s), {total} steps -> {output}; {family.name} "
        f"{description.variant}; {recipe}")

    job = {"config": config.model_dump(), "data": data, "model": model_ref, "family": family.name,
           "family_options": options.model_dump(), "run": output, "use_gpu": use_gpu,
           "loader_workers": loader_workers, "resume_from": resume_from, "resume_filesystem": storage_filesystem,
           "earlier_checkpoints": [p.rstrip("/").rsplit("/", 1)[-1] for p in earlier]}
    started_ray = init_ray(address, dashboard=True)
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=job,
            scaling_config=scaling,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=name, storage_path=storage, storage_filesystem=storage_filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_total_limit),
                failure_config=FailureConfig(max_failures=config.max_failures),
                worker_runtime_env={"env_vars": _worker_env(use_gpu)},
            ),
        )
        try:
            result = trainer.fit()
        except Exception as error:  # Ray wraps the worker's exception
            raise UserError(f"training failed: {_worker_failure(error)}") from error
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if result.checkpoint is None:
        raise UserError("training finished without a checkpoint")
    checkpoint = result.checkpoint
    if resume_from and Path(checkpoint.path).name in job["earlier_checkpoints"]:
        # nothing left to train: Ray's latest is an earlier launch's, the weights are in the one chosen
        checkpoint = Checkpoint(resume_from, filesystem=storage_filesystem)
    final = f"{root}/{FINAL_DIR}"
    with checkpoint.as_directory() as local:
        state = _publish_final(fs, final, local)
    final_url = f"{output.rstrip('/')}/{FINAL_DIR}"  # with its scheme (s3://...), unlike the fs path
    log(f"train: done at step {state['step']}; weights in {final_url}")
    return TrainResult(output, final_url, int(state["step"]))
