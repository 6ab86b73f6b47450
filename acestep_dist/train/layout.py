"""What a training run writes into each checkpoint and into RUN/final (read by `acedist export`).

Besides the DeepSpeed engine states, a checkpoint holds ``acedist_state.json`` (step, model, its
family and variant, the config, the world size, and ``weights``: the files the family's
``Trainable.save`` wrote, relative to the checkpoint). ``final/`` holds the state and those files.
"""

STATE_FILE = "acedist_state.json"
FINAL_DIR = "final"


def weight_files(state: dict) -> list[str]:
    """The trained-weight files (or folders) a state lists; a state from before states listed them
    gets its family's legacy names."""
    if isinstance(state.get("weights"), list):
        return [str(name) for name in state["weights"]]
    from ..families import LEGACY_FAMILY, get

    return get(state.get("family", LEGACY_FAMILY)).legacy_weights(state)
