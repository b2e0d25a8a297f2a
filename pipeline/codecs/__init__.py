"""Codecs: ``load_codec`` builds the one named by ``CodecConfig.family``; the pipeline sees only ``Codec``."""

from __future__ import annotations

import dataclasses
import importlib

import torch

from pipeline.codecs.base import Codec
from pipeline.codecs.identity import checkpoint_folder, files_key, remember_weights_sha256
from pipeline.config import CodecConfig, codec_threads

__all__ = ["Codec", "load_codec", "resolve_device"]

# codec.family -> (module, class); modules are imported on use, since transformers takes seconds to import and
# configs are built and checked without it.
_CLASSES = {
    "encodec": ("pipeline.codecs.encodec", "EncodecCodec"),
    "dac": ("pipeline.codecs.dac", "DacCodec"),
    "mimi": ("pipeline.codecs.mimi", "MimiCodec"),
}
# Named after the model_type in their checkpoints' config.json.
FAMILIES = tuple(_CLASSES)


def load_codec(cfg: CodecConfig, device: torch.device | None = None) -> Codec:
    """Load the codec ``cfg`` describes, frozen and on its device. Call it inside the worker that encodes.

    Args:
        cfg: the codec config.
        device: where to run; None resolves ``cfg.device``.

    Raises:
        ValueError: unknown family or backend, unavailable device.
        CodecLoadError: the weights cannot be found (the message says how to use local weights).
    """
    if cfg.backend not in ("torch", "onnx"):
        raise ValueError(f"unknown codec.backend={cfg.backend!r}; use torch, or onnx (CPU, EnCodec)")
    if cfg.family not in _CLASSES:
        raise ValueError(f"unknown codec.family={cfg.family!r}; known: {', '.join(FAMILIES)}")
    device = resolve_device(cfg.device) if device is None else device
    # A run resolves ``auto`` before this (``config.resolve_auto``); tools that build a CodecConfig directly too.
    cfg = dataclasses.replace(cfg, threads=codec_threads(cfg.threads, device.type))
    # The files are identified before they are loaded: files rewritten during the load get another key.
    folder = checkpoint_folder(cfg)
    key = files_key(folder) if folder is not None else None
    if cfg.backend == "onnx":
        from pipeline.codecs.onnx_backend import OnnxEncodecCodec

        codec = OnnxEncodecCodec.load(cfg, device)
    else:
        module, name = _CLASSES[cfg.family]
        codec = getattr(importlib.import_module(module), name).load(cfg, device)
    if key is None and (folder := checkpoint_folder(cfg)) is not None:  # a Hub id the load just cached: its
        key = files_key(folder)  # blobs are named by their content, so they cannot have changed since
    remember_weights_sha256(cfg, key, codec.fingerprint()["weights_sha256"])
    return codec


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
