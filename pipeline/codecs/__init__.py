"""Codecs: ``load_codec`` builds the one named by ``CodecConfig.family``; the pipeline sees only ``Codec``."""

from __future__ import annotations

import torch

from pipeline.codecs.base import Codec
from pipeline.config import CodecConfig

__all__ = ["Codec", "load_codec", "resolve_device"]

FAMILIES = ("encodec",)


def load_codec(cfg: CodecConfig, device: torch.device | None = None) -> Codec:
    """Load the codec ``cfg`` describes, frozen and on its device. Call it inside the worker that encodes.

    Args:
        cfg: the codec config.
        device: where to run; None resolves ``cfg.device``.

    Raises:
        ValueError: unknown family or backend, unavailable device.
        CodecLoadError: the weights cannot be found (the message says how to use local weights).
    """
    if cfg.backend != "torch":
        raise ValueError(f"codec.backend={cfg.backend!r} is not available yet; use codec.backend=torch")
    device = resolve_device(cfg.device) if device is None else device
    if cfg.family == "encodec":
        # Imported here: transformers takes seconds to import, and configs are built and checked without it.
        from pipeline.codecs.encodec import EncodecCodec

        return EncodecCodec.load(cfg, device)
    raise ValueError(f"unknown codec.family={cfg.family!r}; known: {', '.join(FAMILIES)}")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; otherwise ``torch.device(name)``, checked to exist.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"codec.device={name} but CUDA is not available (CPU build of torch?); use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"codec.device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
