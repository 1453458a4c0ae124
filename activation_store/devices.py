"""The torch device a component was asked for, checked once, so `--device cuda` on a machine without
a GPU is a one-line error instead of an assertion deep inside torch."""

from __future__ import annotations

from activation_store.errors import ConfigError


def torch_device(name: str):
    """`torch.device(name)`, refusing a CUDA device this machine does not have."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda or cuda:N ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: this machine has no CUDA GPU that torch can use; run with --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
