"""What a training run writes into each checkpoint and into RUN/final (read by `acedist export`)."""

STATE_FILE = "acedist_state.json"  # step, model, variant, config, world size
LORA_FILE = "lora.safetensors"  # the adapter in diffusers' format
TRANSFORMER_DIR = "transformer"  # full fine-tunes: the DiT in diffusers' format
LYRIC_ENCODER_FILE = "lyric_encoder.safetensors"  # when the lyric encoder was trained
FINAL_DIR = "final"
