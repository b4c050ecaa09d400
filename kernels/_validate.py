"""Argument checks shared by the ops: each error names the argument and the value."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(name: str, value, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {value.dtype}; expected one of {names}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def check_unit_vocab_stride(**tensors: torch.Tensor) -> None:
    """Each tensor's last (vocabulary) dimension must have unit stride (any stride when
    it holds at most one element)."""
    for name, tensor in tensors.items():
        if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride in the vocabulary dimension, got strides "
                f"{tensor.stride()}; call .contiguous() first"
            )


def positive_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def finite_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def nonnegative_scalar(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def row_temperature(
    temperature, shape: torch.Size, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Temperature as a ``dtype`` tensor of ``shape`` flattened to rows (float64 keeps a
    Python float exact for float64 logits).

    A scalar becomes a stride-0 view of one element, so no per-row memory is spent.
    A tensor must broadcast to ``shape`` and be positive everywhere.
    """
    if not isinstance(temperature, torch.Tensor):
        value = positive_scalar("temperature", temperature)
        n_rows = math.prod(shape)
        return torch.full((1,), value, dtype=dtype, device=device).expand(n_rows)
    check_tensor("temperature", temperature, FLOAT_DTYPES)
    if temperature.device != device:
        raise ValueError(f"temperature is on {temperature.device} but logits are on {device}")
    try:
        expanded = temperature.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"temperature of shape {tuple(temperature.shape)} does not broadcast to the "
            f"per-token shape {tuple(shape)} (one value per row of logits)"
        ) from None
    rows = expanded.reshape(-1).to(dtype)
    if rows.numel() and not bool(((rows > 0) & torch.isfinite(rows)).all()):
        bad = rows[~((rows > 0) & torch.isfinite(rows))][0].item()
        raise ValueError(f"temperature must be finite and > 0 everywhere, found {bad!r}")
    return rows


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise IndexError for a target outside [0, vocab) that is not ignore_index.

    It reads back one flag: with the positivity check of a tensor temperature, the only
    host synchronization of the log-prob ops (timed by bench/token_logprobs.py).
    """
    if targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(targets[position])
        raise IndexError(
            f"targets{list(position)} = {value} is outside [0, {vocab}) and is not "
            f"ignore_index ({ignore_index})"
        )


def bool_mask(name: str, mask, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """``mask`` of exactly ``shape`` as a bool tensor (nonzero = valid).

    Accepts bool, integer and floating masks; no host synchronization.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} has dtype {mask.dtype}; expected bool, an integer or a float dtype")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}.shape {tuple(mask.shape)} does not match the expected shape {tuple(shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the other tensors are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0
