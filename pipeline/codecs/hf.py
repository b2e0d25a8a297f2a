"""What every transformers codec shares: loading (local directory or Hub id + revision, offline-safe), weight-norm
folding, freezing, numeric precision pinning and the fingerprint. ``EncodecCodec``, ``DacCodec`` and ``MimiCodec``
subclass ``TransformersCodec`` and add only their encode/decode paths.

Tokens must not depend on where they were computed more than float rounding forces: weight norm is folded once
on CPU (exact), the RVQ nearest-neighbour search always runs in IEEE fp32 (TF32 or bf16 distances flip codes near
cell boundaries), and whatever still changes tokens (dtype, TF32, versions, device kind, threads) goes into
``fingerprint()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
from huggingface_hub import HfApi, constants, is_offline_mode
from huggingface_hub.errors import HFValidationError, RevisionResolutionError
from huggingface_hub.utils import get_session
from torch.nn.utils import parametrize
from transformers import AutoConfig, PreTrainedModel

from pipeline.codecs import FAMILIES
from pipeline.codecs.base import Codec
from pipeline.plan import device_kind as _kind_of
from pipeline.config import CodecConfig
from pipeline.cuda_graphs import CudaGraphs

log = logging.getLogger(__name__)

# What loading from the Hub raises when the id is wrong, the Hub is unreachable or the cache misses. transformers
# turns most of it into OSError; huggingface_hub's own errors cover the revision resolution done here first.
_HUB_ERRORS = (OSError, RevisionResolutionError, HFValidationError)


class CodecLoadError(RuntimeError):
    """The codec weights could not be found or loaded; the message says how to point at local weights."""


class TransformersCodec(Codec):
    """A frozen transformers codec model behind ``Codec``; build it with ``load``.

    Subclasses set the class attributes and, in ``__init__`` after ``super().__init__``, the ``Codec`` attributes
    (``sample_rate``, ``channels``, ``hop_length``, ``num_codebooks``, ``cardinality``).

    Attributes:
        family: the ``codec.family`` value that selects this class.
        label: the model's name in messages.
        model_class: the transformers class ``from_pretrained`` is called on.
        model_type: the ``model_type`` a checkpoint's ``config.json`` must declare.
        model: the underlying model (weight norm folded, eval mode, no grad).
    """

    family: ClassVar[str]
    label: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    model_type: ClassVar[str]
    # Only EnCodec has bandwidths; the fingerprint reports None for the others.
    bandwidth: float | None = None
    # Mimi has transformer layers: their attention kernel (sdpa or eager, transformers' choice at load) rounds
    # differently, so it is in the fingerprint; None for the purely convolutional codecs.
    has_attention: ClassVar[bool] = False

    def __init__(self, model: PreTrainedModel, cfg: CodecConfig, device: torch.device, provenance: dict[str, Any]):
        self.model = model
        self.cfg = cfg
        self._device = device
        self._provenance = provenance
        cuda = device.type == "cuda"
        self._bf16 = cuda and cfg.dtype == "bfloat16"
        self._tf32 = cuda and cfg.tf32
        self._compiled = cuda and cfg.compile
        self.graphs = CudaGraphs(self) if cuda and cfg.cuda_graph else None
        # The widest full-rate activation is the first convolution's output: ``width`` channels per input sample
        # (64 for EnCodec 32 kHz: 64 x 30 s rows fail with "input tensor must fit into 32-bit index math", seen on
        # an H200). CPU kernels index with 64 bits, but no CPU batch comes near this.
        width = getattr(model.config, "num_filters", None) or getattr(model.config, "encoder_hidden_size", None) or 64
        self.max_batch_samples = (2**31 - 1) // (2 * width)  # x2: the reflect padding and rounding of the convs

    @classmethod
    def load(cls, cfg: CodecConfig, device: torch.device) -> TransformersCodec:
        """Load weights from a local directory or the Hub, fold weight norm, freeze, move to ``device``.

        Args:
            cfg: the codec config; ``cfg.pretrained`` is a hub id or a ``save_pretrained`` directory.
            device: where ``encode`` runs. On CPU, ``torch.set_num_threads(cfg.threads)`` is applied here, since
                the thread count changes float reduction order (and is in the fingerprint).

        Raises:
            CodecLoadError: the weights are neither a local checkpoint nor reachable/cached on the Hub.
            ValueError: the checkpoint is another family's, or ``cfg`` asks for what the model cannot do.
        """
        if device.type == "cuda" and device.index is None:
            # An explicit index: the current device is per thread, and the launcher thread starts on device 0.
            device = torch.device("cuda", torch.cuda.current_device())
        model, commit = load_pretrained(cls.model_class, cls.model_type, cls.label, cfg)
        provenance = {"commit": commit, "weights_sha256": weights_sha256(model)}
        fold_weight_norm(model)
        model.eval().requires_grad_(False)
        model.to(device)
        if device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        codec = cls(model, cfg, device, provenance)
        log.info("loaded codec %s", codec.fingerprint())
        return codec

    @property
    def device(self) -> torch.device:
        return self._device

    def fingerprint(self) -> dict[str, Any]:
        """What changes tokens. ``dtype``, ``tf32`` and ``compile`` are the effective values, not the requested."""
        cpu = self._device.type == "cpu"
        return {
            "family": self.family,
            "pretrained": self.cfg.pretrained,
            "revision": self.cfg.revision,
            # Hub commit the revision resolved to (None for a local directory).
            "commit": self._provenance["commit"],
            # sha256 of the loaded state dict: identifies the weights whatever path or id they came from.
            "weights_sha256": self._provenance["weights_sha256"],
            "bandwidth": self.bandwidth,
            "num_codebooks": self.num_codebooks,
            "cardinality": self.cardinality,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "hop": self.hop_length,
            "dtype": "bfloat16" if self._bf16 else "float32",
            "tf32": self._tf32,
            "compile": self._compiled,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device_kind": device_kind(self._device),
            # Intra-op threads change CPU reduction order; on CUDA they do not touch the numerics.
            "threads": torch.get_num_threads() if cpu else None,
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None)
            if self.has_attention else None,
        }

    def _check_audio(self, audio: torch.Tensor) -> None:
        if audio.ndim != 3 or audio.shape[1] != self.channels or audio.shape[-1] == 0:
            raise ValueError(f"audio must be [B, {self.channels}, L>0], got shape {tuple(audio.shape)}")
        if audio.dtype != torch.float32:
            raise ValueError(f"audio must be float32, got {audio.dtype}")

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` as int64 on the codec's device, checked to be ``[B, K<=num_codebooks, T]``."""
        if codes.ndim != 3 or codes.shape[1] > self.num_codebooks:
            raise ValueError(f"codes must be [B, K<={self.num_codebooks}, T], got shape {tuple(codes.shape)}")
        return codes.to(self._device, torch.long)

    def _compile(self, module: torch.nn.Module) -> Any:
        """``module`` compiled when ``cfg.compile`` applies (CUDA); dynamic=False: one static graph per bucket."""
        if not self._compiled:
            return module
        # Every convolution layer is the same Python code at another shape: with dynamic=False each is one more
        # compile of it, and past dynamo's default limit (8) the rest silently runs eager (seen on an H200).
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        return torch.compile(module, dynamic=False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the encoder when ``cfg.dtype`` asks for it (CUDA only); never around the RVQ."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._bf16)

    def _conv_precision(self) -> contextlib.AbstractContextManager:
        """cuDNN convolutions and RNNs in TF32 or IEEE fp32 per ``cfg.tf32`` (CUDA only)."""
        if self._device.type != "cuda":
            return contextlib.nullcontext()
        mode = "tf32" if self._tf32 else "ieee"
        return fp32_precision([(torch.backends.cudnn.conv, mode), (torch.backends.cudnn.rnn, mode)])

    def _rvq_precision(self) -> contextlib.AbstractContextManager:
        """IEEE fp32 matmuls for the RVQ distances, whatever the process-wide setting."""
        flags = torch.backends.cuda.matmul if self._device.type == "cuda" else torch.backends.mkldnn.matmul
        return fp32_precision([(flags, "ieee")])


def check_num_codebooks(cfg: CodecConfig, label: str, low: int, high: int) -> int:
    """``codec.num_codebooks`` checked to be in ``[low, high]`` (None: ``high``); ``codec.bandwidth`` refused.

    Args:
        cfg: the codec config.
        label: the model's name in messages.
        low: fewest codebooks the model can emit.
        high: codebooks the checkpoint has.
    """
    if cfg.bandwidth is not None:
        raise ValueError(f"codec.bandwidth={cfg.bandwidth} is EnCodec's way to pick K; {label} picks it with "
                         f"codec.num_codebooks ({low}..{high}): set codec.bandwidth=null")
    k = high if cfg.num_codebooks is None else int(cfg.num_codebooks)
    if not low <= k <= high:
        raise ValueError(f"codec.num_codebooks={cfg.num_codebooks}, but {cfg.pretrained} has {high} codebooks; "
                         f"use {low}..{high} (null = all)")
    return k


def fit_length(audio: torch.Tensor, length: int) -> torch.Tensor:
    """``audio [..., L]`` cut or zero-padded on the right to ``length`` samples."""
    return torch.nn.functional.pad(audio, (0, length - audio.shape[-1])) if audio.shape[-1] < length \
        else audio[..., :length]


def fold_weight_norm(model: torch.nn.Module) -> int:
    """Replace every weight-norm ``g * v / ||v||`` by the weight it computes, once.

    Exact: the stored weight is the tensor the parametrization would compute on every forward. Doing it once on
    CPU before moving to the device also makes the weights identical on every device.

    Args:
        model: modified in place.

    Returns:
        The number of modules folded.
    """
    folded = 0
    for module in list(model.modules()):  # a snapshot: folding edits the module tree
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            folded += 1
        elif hasattr(module, "weight_g") and hasattr(module, "weight_v"):  # pre-parametrization weight_norm
            torch.nn.utils.remove_weight_norm(module)
            folded += 1
    return folded


@contextlib.contextmanager
def fp32_precision(settings: list[tuple[Any, str]]) -> Iterator[None]:
    """Set torch's per-backend ``fp32_precision`` flags for a block, then restore them.

    Only the torch>=2.9 ``fp32_precision`` API is used: torch raises when it is mixed with the legacy
    ``allow_tf32`` flags. The flags are process-wide, so concurrent threads would see them.
    """
    saved = [(flags, flags.fp32_precision) for flags, _ in settings]
    try:
        for flags, value in settings:
            flags.fp32_precision = value
        yield
    finally:
        for flags, value in saved:
            flags.fp32_precision = value


def load_pretrained(model_class: type[PreTrainedModel], model_type: str, label: str,
                    cfg: CodecConfig) -> tuple[PreTrainedModel, str | None]:
    """``model_class.from_pretrained`` in fp32, failing fast with a hint when no weights are found.

    Args:
        model_class: e.g. ``EncodecModel``.
        model_type: the ``model_type`` the checkpoint must declare (a DAC checkpoint loaded as EnCodec would
            otherwise come out half random).
        label: the model's name in messages.
        cfg: ``pretrained`` (local directory or Hub id) and ``revision`` are used.

    Returns:
        The model and the Hub commit it came from (None for a local directory).
    """
    local = Path(cfg.pretrained).expanduser()
    if local.is_dir():
        _check_model_type(_local_model_type(local, label), model_type, cfg)
        try:
            return model_class.from_pretrained(local, dtype=torch.float32), None
        except OSError as err:
            raise CodecLoadError(f"codec.pretrained={local} is a directory but not a loadable {label} checkpoint "
                                 f"(expected config.json + model.safetensors from save_pretrained): {err}") from err
    # huggingface_hub retries connection errors with backoff (~25 s) and some of its calls have no timeout, so
    # probe once with a short timeout and go cache-only when the Hub cannot answer.
    offline = not _hub_reachable()
    try:
        revision = HfApi().resolve_revision(cfg.pretrained, revision=cfg.revision, local_files_only=offline)
        config = AutoConfig.from_pretrained(cfg.pretrained, revision=revision, local_files_only=offline)
        _check_model_type(config.model_type, model_type, cfg)
        model = model_class.from_pretrained(
            cfg.pretrained, config=config, revision=revision, local_files_only=offline, dtype=torch.float32
        )
    except _HUB_ERRORS as err:
        raise CodecLoadError(_load_hint(cfg, offline, err)) from err
    return model, revision.resolved


def _local_model_type(path: Path, label: str) -> str | None:
    """``model_type`` from a local checkpoint's ``config.json``; raises ``CodecLoadError`` when it is unreadable."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise CodecLoadError(f"codec.pretrained={path} is a directory but not a loadable {label} checkpoint "
                             f"(expected config.json + model.safetensors from save_pretrained): {err}") from err


def _check_model_type(found: str | None, expected: str, cfg: CodecConfig) -> None:
    if found == expected:
        return
    # Each family is named after the model_type its checkpoints declare.
    hint = f"set codec.family={found}" if found in FAMILIES else "point codec.pretrained at a checkpoint of that family"
    raise ValueError(f"codec.pretrained={cfg.pretrained} is a {found!r} checkpoint, but codec.family={cfg.family} "
                     f"loads {expected!r} checkpoints; {hint}")


def _hub_reachable() -> bool:
    """Whether the Hub answers one HEAD within ``HF_HUB_ETAG_TIMEOUT`` seconds (False in offline mode)."""
    if is_offline_mode():
        return False
    try:
        response = get_session().head(constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception:  # any transport failure (DNS, refused, timeout, TLS) means: not reachable now
        return False
    return response.status_code < 500


def _load_hint(cfg: CodecConfig, offline: bool, err: Exception) -> str:
    """The error message: what was tried, and the two ways to use weights without the Hub."""
    why = "the Hub could not be reached and it is not in the local cache" if offline else "the Hub refused it"
    revision = f" --revision {cfg.revision}" if cfg.revision else ""
    return (
        f"cannot load codec weights codec.pretrained={cfg.pretrained!r}: it is not a local directory, so it was "
        f"looked up as a Hugging Face Hub id, and {why} ({type(err).__name__}: {err}).\n"
        f"To use local weights, download once on a machine with Hub access:\n"
        f"    hf download {cfg.pretrained}{revision} --local-dir DIR\n"
        f"(huggingface-cli download ... with huggingface_hub<1.0), copy DIR here and pass codec.pretrained=DIR.\n"
        f"Or fill the Hub cache ({constants.HF_HUB_CACHE}, set by HF_HOME / HF_HUB_CACHE) the same way without "
        f"--local-dir; with HF_HUB_OFFLINE=1 the cache is then used without any network call."
    )


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def device_kind(device: torch.device) -> str:
    """``cuda:<GPU name>`` or ``cpu:<CPU model>``: different hardware may round differently."""
    if device.type == "cuda":
        return _kind_of("cuda", torch.cuda.get_device_name(device))
    return _kind_of("cpu")

