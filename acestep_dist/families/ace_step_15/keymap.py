"""Key names between upstream ACE-Step 1.5 checkpoints and diffusers' module names.

Upstream keeps the whole model in one ``model.safetensors``: ``decoder.*`` (the DiT), ``encoder.*``
(the condition encoder), a top-level ``null_condition_emb``, and ``tokenizer.*`` / ``detokenizer.*``
(the 5 Hz audio codec, not needed for text2music). diffusers renames the attention projections and
norms and unwraps the DiT's ``proj_in`` / ``proj_out`` Sequentials; every other name is shared.
The upstream DiT config carries both the DiT and the condition encoder dimensions.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

# upstream substring -> diffusers substring, applied to every attention module
ATTENTION_RENAMES = (
    (".q_proj.", ".to_q."),
    (".k_proj.", ".to_k."),
    (".v_proj.", ".to_v."),
    (".o_proj.", ".to_out.0."),
    (".q_norm.", ".norm_q."),
    (".k_norm.", ".norm_k."),
)
DIT_RENAMES = (("proj_in.1.", "proj_in_conv."), ("proj_out.1.", "proj_out_conv."))
NULL_CONDITION_KEY = "null_condition_emb"
SILENCE_LATENT_KEY = "silence_latent"


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def _unrename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(new, old)
    return key


def upstream_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Split an upstream state dict into (transformer, condition_encoder, ignored keys)."""
    transformer: dict[str, torch.Tensor] = {}
    condition: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("decoder."):
            # the leading "." lets the attention renames match top-level names too
            name = _rename(_rename("." + key[len("decoder."):], ATTENTION_RENAMES), DIT_RENAMES)
            transformer[name[1:]] = value
        elif key.startswith("encoder."):
            condition[_rename("." + key[len("encoder."):], ATTENTION_RENAMES)[1:]] = value
        elif key == NULL_CONDITION_KEY:
            condition[NULL_CONDITION_KEY] = value
        else:
            ignored.append(key)
    return transformer, condition, ignored


def diffusers_to_upstream(
    transformer: Mapping[str, torch.Tensor], condition_encoder: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse: one upstream-named state dict (``silence_latent`` is left out: upstream keeps
    it in its own ``silence_latent.pt``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in transformer.items():
        name = _unrename(_unrename("." + key, DIT_RENAMES), ATTENTION_RENAMES)
        out["decoder." + name[1:]] = value
    for key, value in condition_encoder.items():
        if key == SILENCE_LATENT_KEY:
            continue
        if key == NULL_CONDITION_KEY:
            out[NULL_CONDITION_KEY] = value
        else:
            out["encoder." + _unrename("." + key, ATTENTION_RENAMES)[1:]] = value
    return out


_SHARED_FIELDS = (
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "attention_bias",
    "attention_dropout",
    "rms_norm_eps",
    "sliding_window",
)
_DIT_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "in_channels",
    "audio_acoustic_hidden_dim",
    "patch_size",
    "layer_types",
) + _SHARED_FIELDS


def upstream_configs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """diffusers configs (transformer, condition_encoder) from an upstream variant ``config.json``."""
    dit = {k: config[k] for k in _DIT_FIELDS if k in config}
    encoder_hidden = config.get("encoder_hidden_size") or config["hidden_size"]
    dit["encoder_hidden_size"] = encoder_hidden
    dit["is_turbo"] = bool(config.get("is_turbo", False))
    dit["model_version"] = config.get("model_version")
    condition = {k: config[k] for k in _SHARED_FIELDS if k in config}
    condition.update(
        hidden_size=encoder_hidden,
        intermediate_size=config.get("encoder_intermediate_size") or config["intermediate_size"],
        text_hidden_dim=config["text_hidden_dim"],
        timbre_hidden_dim=config["timbre_hidden_dim"],
        num_lyric_encoder_hidden_layers=config["num_lyric_encoder_hidden_layers"],
        num_timbre_encoder_hidden_layers=config["num_timbre_encoder_hidden_layers"],
    )
    # XL: the condition encoder has its own head counts
    if config.get("encoder_num_attention_heads"):
        condition["num_attention_heads"] = config["encoder_num_attention_heads"]
    if config.get("encoder_num_key_value_heads"):
        condition["num_key_value_heads"] = config["encoder_num_key_value_heads"]
    return dit, condition


def upstream_config(dit_config: Mapping[str, Any], condition_config: Mapping[str, Any],
                    timestep_mu: float = -0.4, timestep_sigma: float = 1.0) -> dict[str, Any]:
    """The inverse of ``upstream_configs``: one upstream variant ``config.json`` from diffusers'
    DiT and condition-encoder configs (XL keeps the encoder's own widths in ``encoder_*``)."""
    config = {k: v for k, v in dict(dit_config).items() if not k.startswith("_")}
    config.pop("encoder_hidden_size", None)
    config.update(
        architectures=["AceStepConditionGenerationModel"],
        text_hidden_dim=condition_config["text_hidden_dim"],
        timbre_hidden_dim=condition_config["timbre_hidden_dim"],
        num_lyric_encoder_hidden_layers=condition_config["num_lyric_encoder_hidden_layers"],
        num_timbre_encoder_hidden_layers=condition_config["num_timbre_encoder_hidden_layers"],
        max_position_embeddings=32768,
        use_sliding_window=True,
        timestep_mu=timestep_mu,
        timestep_sigma=timestep_sigma,
        data_proportion=0.5,
        model_version=str(dit_config.get("model_version") or "").removeprefix("xl-") or None,
    )
    if condition_config["hidden_size"] != dit_config["hidden_size"]:  # XL
        config.update(
            encoder_hidden_size=condition_config["hidden_size"],
            encoder_intermediate_size=condition_config["intermediate_size"],
            encoder_num_attention_heads=condition_config["num_attention_heads"],
            encoder_num_key_value_heads=condition_config["num_key_value_heads"],
        )
    return config
