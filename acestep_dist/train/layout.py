"""What a training run writes into each checkpoint and into RUN/final (read by `acedist export`).

Besides the DeepSpeed engine states, a checkpoint holds ``acedist_state.json`` (step, model, its
family and variant, the config, the world size, and ``weights``: the files the family's
``Trainable.save`` wrote, relative to the checkpoint). ``final/`` holds the state and those files.
A run with ``use_ema`` adds ``ema/`` (the weight average saved as the weights are, with a state of
its own, so export and generate read it like ``final/``) and, in checkpoints, the average itself
(``ema_average.safetensors``, float32, what a resume reloads).
"""

STATE_FILE = "acedist_state.json"
FINAL_DIR = "final"
EMA_DIR = "ema"
EMA_AVERAGE_FILE = "ema_average.safetensors"


def ema_files(state: dict, checkpoint: bool = True) -> list[str]:
    """The weight-average files a state says its folder holds (``final/`` keeps only ``ema/``)."""
    if not state.get("ema"):
        return []
    return [EMA_DIR, EMA_AVERAGE_FILE] if checkpoint else [EMA_DIR]


def weight_files(state: dict) -> list[str]:
    """The trained-weight files (or folders) a state lists; a state from before states listed them
    gets its family's legacy names."""
    if isinstance(state.get("weights"), list):
        return [str(name) for name in state["weights"]]
    from ..families import LEGACY_FAMILY, get

    return get(state.get("family", LEGACY_FAMILY)).legacy_weights(state)
