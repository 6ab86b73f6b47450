"""The optimizer a run trains with (config ``optimizer``), built in each worker for DeepSpeed to
wrap, and the combinations the driver refuses before any worker starts.

- ``adamw``: torch's AdamW, two fp32 states per trained weight.
- ``adamw8bit``: bitsandbytes' AdamW8bit, the two states in 8 bits (block-wise quantised): a
  quarter of AdamW's state memory. CUDA only.
- ``adafactor``: transformers' Adafactor without momentum, its second moment factored into a row
  and a column vector per matrix. DeepSpeed's ZeRO 1-3 hand the optimizer flat partitions, so its
  moments are factored only under ``zero_stage: 0``.
- ``prodigy``: prodigyopt's Prodigy, Adam whose step size it estimates from the distance travelled
  (``learning_rate`` multiplies that estimate). Under ZeRO 1-3 each worker's optimizer sees a
  partition, so the statistics it estimates from are summed over workers (prodigyopt's
  ``fsdp_in_use``, which does that on CUDA).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")


def check_optimizer(config, world: int, use_gpu: bool) -> None:
    """On the driver: refuse what cannot run where this run trains."""
    where = "on GPUs" if use_gpu else "on CPU"
    if config.optimizer == "adamw8bit":
        if not use_gpu:
            raise UserError("optimizer adamw8bit (bitsandbytes) runs on CUDA GPUs; this run trains on CPU: "
                            "use adamw or adafactor, or give --gpus-per-node")
        if config.offload_optimizer:
            raise UserError("optimizer adamw8bit keeps its 8-bit states on the GPU, offload_optimizer moves the "
                            "optimizer to the CPU: choose one")
    if config.optimizer == "prodigy" and world > 1 and config.zero_stage > 0 and not use_gpu:
        raise UserError(f"optimizer prodigy on {world} workers under ZeRO-{config.zero_stage} sums its step-size "
                        f"statistics over the workers on CUDA (prodigyopt), and this run trains {where}: "
                        f"use zero_stage 0 (every worker then holds the whole optimizer)")
    if config.use_ema and config.zero_stage == 3:
        raise UserError("use_ema averages the trained weights as each worker holds them, and ZeRO-3 splits them "
                        "over the workers: use zero_stage 0, 1 or 2 with use_ema")


def deepspeed_settings(config) -> dict[str, Any]:
    """What DeepSpeed's config needs for the optimizer: ZeRO refuses optimizers it was not tested
    with unless told (it wraps any torch optimizer the same way)."""
    return {"zero_allow_untested_optimizer": True} if config.optimizer != "adamw" else {}


def build_optimizer(config, param_groups: Sequence[dict], world: int, use_gpu: bool) -> torch.optim.Optimizer:
    """The run's optimizer over the trainable's parameter groups (their own ``lr`` each)."""
    groups = [{k: v for k, v in group.items() if k != "name"} for group in param_groups]
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("optimizer adamw8bit needs bitsandbytes on every GPU node: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(groups, lr=config.learning_rate, betas=betas,
                                            weight_decay=config.weight_decay)
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed learning rate (the run's schedule applies), no parameter scaling, no momentum
        return Adafactor(groups, lr=config.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=config.weight_decay)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        rates = sorted({group["lr"] for group in groups})
        if len(rates) > 1:
            names = ", ".join(f"{group.get('name', i)} {group['lr']:g}" for i, group in enumerate(param_groups))
            raise UserError(f"optimizer prodigy estimates one step size for the whole run; the parameter groups ask "
                            f"for different learning rates ({names}): leave the per-part rates unset")
        return Prodigy(groups, lr=config.learning_rate, betas=betas, weight_decay=config.weight_decay,
                       d_coef=config.prodigy_d_coef, d0=config.prodigy_d0, use_bias_correction=True,
                       # the warm-up's small rates would otherwise shrink the denominator of its estimate
                       safeguard_warmup=config.lr_warmup_steps > 0,
                       fsdp_in_use=world > 1 and config.zero_stage > 0)
    raise UserError(f"optimizer {config.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
