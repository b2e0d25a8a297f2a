"""EnCodec (``transformers.EncodecModel``) behind the ``Codec`` interface: the MusicGen tokenizer.

Tokens must not depend on where they were computed more than float rounding forces, so this module pins what it
can: weight norm is folded once on CPU (exact), the RVQ nearest-neighbour search always runs in IEEE fp32 (TF32
or bf16 distances flip codes near cell boundaries), and everything that still changes tokens (dtype, TF32,
versions, device kind, threads) goes into ``fingerprint()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import HfApi, constants, is_offline_mode
from huggingface_hub.errors import HFValidationError, RevisionResolutionError
from huggingface_hub.utils import get_session
from torch.nn.utils import parametrize
from transformers import EncodecModel

from pipeline.codecs.base import Codec
from pipeline.config import CodecConfig

log = logging.getLogger(__name__)

# What loading from the Hub raises when the id is wrong, the Hub is unreachable or the cache misses. transformers
# turns most of it into OSError; huggingface_hub's own errors cover the revision resolution done here first.
_HUB_ERRORS = (OSError, RevisionResolutionError, HFValidationError)


class CodecLoadError(RuntimeError):
    """The codec weights could not be found or loaded; the message says how to point at local weights."""


class EncodecCodec(Codec):
    """A frozen EnCodec: ``[B, C, L]`` float audio in, ``[B, K, ceil(L / hop)]`` int64 codes out.

    Build it with ``EncodecCodec.load``. Attributes are those of ``Codec``; ``model`` is the underlying
    ``EncodecModel`` (weight norm folded, eval mode, no grad).
    """

    def __init__(self, model: EncodecModel, cfg: CodecConfig, device: torch.device, provenance: dict[str, Any]):
        self.model = model
        self.cfg = cfg
        self._device = device
        self._provenance = provenance
        config = model.config
        self.sample_rate = int(config.sampling_rate)
        self.channels = int(config.audio_channels)
        self.hop_length = int(config.hop_length)
        self.cardinality = int(config.codebook_size)
        self.bandwidth = _check_bandwidth(cfg, config.target_bandwidths)
        self.num_codebooks = model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth)
        if cfg.num_codebooks is not None and cfg.num_codebooks != self.num_codebooks:
            raise ValueError(
                f"codec.num_codebooks={cfg.num_codebooks}, but EnCodec at {self.bandwidth} kbps has "
                f"{self.num_codebooks} codebooks; EnCodec picks K with codec.bandwidth, leave num_codebooks null"
            )
        # Models that normalise loudness or chunk the input (the 48 kHz one) go through model.encode; the
        # 32 kHz MusicGen model does neither, and takes the direct encoder -> RVQ path.
        self._via_model_encode = bool(config.normalize) or config.chunk_length_s is not None
        _check_chunking(config)
        cuda = device.type == "cuda"
        self._bf16 = cuda and cfg.dtype == "bfloat16" and not self._via_model_encode
        self._tf32 = cuda and cfg.tf32
        self._compiled = cuda and cfg.compile and not self._via_model_encode
        # dynamic=False: the pipeline pads to a few bucket lengths, one static graph each.
        self._encoder = torch.compile(model.encoder, dynamic=False) if self._compiled else model.encoder

    @classmethod
    def load(cls, cfg: CodecConfig, device: torch.device) -> EncodecCodec:
        """Load weights from a local directory or the Hub, fold weight norm, freeze, move to ``device``.

        Args:
            cfg: the codec config; ``cfg.pretrained`` is a hub id or a ``save_pretrained`` directory.
            device: where ``encode`` runs. On CPU, ``torch.set_num_threads(cfg.threads)`` is applied here, since
                the thread count changes float reduction order (and is in the fingerprint).

        Raises:
            CodecLoadError: the weights are neither a local checkpoint nor reachable/cached on the Hub.
        """
        model, commit = _load_model(cfg)
        provenance = {"commit": commit, "weights_sha256": _weights_sha256(model)}
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

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """Encode a batch; see ``Codec.encode``. Padding is the caller's: every row is encoded as given."""
        self._check_audio(audio)
        with torch.inference_mode(), self._conv_precision():
            if self._via_model_encode:
                with self._rvq_precision():
                    return self._encode_with_model(audio)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._bf16):
                embeddings = self._encoder(audio)
            with self._rvq_precision():
                codes = self.model.quantizer.encode(embeddings.float(), self.bandwidth)  # [K, B, T]
        return codes.transpose(0, 1).contiguous()

    def _encode_with_model(self, audio: torch.Tensor) -> torch.Tensor:
        """``model.encode`` for normalising or chunked models, flattened to ``[B, K, T]``.

        Chunks do not overlap (``_check_chunking``), so concatenating them is the code stream; the zero codes
        padding the last chunk are cut off. Normalising models also return per-chunk scales, which are dropped:
        ``decode`` then yields unit-loudness audio.
        """
        out = self.model.encode(audio, bandwidth=self.bandwidth, return_dict=True)
        codes = out.audio_codes  # [chunks, B, K, frames per chunk]
        batch, k = codes.shape[1], codes.shape[2]
        codes = codes.permute(1, 2, 0, 3).reshape(batch, k, -1)
        return codes[..., : self.n_frames(audio.shape[-1])].contiguous()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode ``[B, K, T]`` codes to float audio ``[B, channels, T * hop]`` (the input's zero padding included)."""
        if codes.ndim != 3:
            raise ValueError(f"codes must be [B, K, T], got shape {tuple(codes.shape)}")
        with torch.inference_mode():
            # transformers takes [chunks, B, K, T] codes and one scale per chunk: a single chunk, no scale.
            out = self.model.decode(codes.to(self._device, torch.long)[None], [None], return_dict=True)
        return out.audio_values

    def fingerprint(self) -> dict[str, Any]:
        """What changes tokens. ``dtype``, ``tf32`` and ``compile`` are the effective values, not the requested."""
        cpu = self._device.type == "cpu"
        return {
            "family": "encodec",
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
            "device_kind": _device_kind(self._device),
            # Intra-op threads change CPU reduction order; on CUDA they do not touch the numerics.
            "threads": torch.get_num_threads() if cpu else None,
        }

    def _check_audio(self, audio: torch.Tensor) -> None:
        if audio.ndim != 3 or audio.shape[1] != self.channels or audio.shape[-1] == 0:
            raise ValueError(f"audio must be [B, {self.channels}, L>0], got shape {tuple(audio.shape)}")
        if audio.dtype != torch.float32:
            raise ValueError(f"audio must be float32, got {audio.dtype}")

    def _conv_precision(self) -> contextlib.AbstractContextManager:
        """cuDNN convolutions and the LSTM in TF32 or IEEE fp32 per ``cfg.tf32`` (CUDA only)."""
        if self._device.type != "cuda":
            return contextlib.nullcontext()
        mode = "tf32" if self._tf32 else "ieee"
        return _fp32_precision([(torch.backends.cudnn.conv, mode), (torch.backends.cudnn.rnn, mode)])

    def _rvq_precision(self) -> contextlib.AbstractContextManager:
        """IEEE fp32 matmuls for the RVQ distances, whatever the process-wide setting."""
        flags = torch.backends.cuda.matmul if self._device.type == "cuda" else torch.backends.mkldnn.matmul
        return _fp32_precision([(flags, "ieee")])


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
def _fp32_precision(settings: list[tuple[Any, str]]) -> Iterator[None]:
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


def _load_model(cfg: CodecConfig) -> tuple[EncodecModel, str | None]:
    """``EncodecModel.from_pretrained`` in fp32, failing fast with a hint when no weights are found.

    Returns:
        The model and the Hub commit it came from (None for a local directory).
    """
    local = Path(cfg.pretrained).expanduser()
    if local.is_dir():
        try:
            return EncodecModel.from_pretrained(local, dtype=torch.float32), None
        except OSError as err:
            raise CodecLoadError(f"codec.pretrained={local} is a directory but not a loadable EnCodec checkpoint "
                                 f"(expected config.json + model.safetensors from save_pretrained): {err}") from err
    # huggingface_hub retries connection errors with backoff (~25 s) and some of its calls have no timeout, so
    # probe once with a short timeout and go cache-only when the Hub cannot answer.
    offline = not _hub_reachable()
    try:
        revision = HfApi().resolve_revision(cfg.pretrained, revision=cfg.revision, local_files_only=offline)
        model = EncodecModel.from_pretrained(
            cfg.pretrained, revision=revision, local_files_only=offline, dtype=torch.float32
        )
    except _HUB_ERRORS as err:
        raise CodecLoadError(_load_hint(cfg, offline, err)) from err
    return model, revision.resolved


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


def _check_bandwidth(cfg: CodecConfig, supported: list[float]) -> float:
    bandwidth = supported[0] if cfg.bandwidth is None else float(cfg.bandwidth)
    if bandwidth not in supported:
        raise ValueError(f"codec.bandwidth={cfg.bandwidth} is not supported by {cfg.pretrained}; use one of {list(supported)}")
    return bandwidth


def _check_chunking(config: Any) -> None:
    """Chunked models are supported only with non-overlapping chunks of whole frames: one code stream."""
    if config.chunk_length_s is None:
        return
    if config.chunk_stride != config.chunk_length or config.chunk_length % config.hop_length:
        raise ValueError(
            f"EnCodec with overlapping chunks (chunk_length_s={config.chunk_length_s}, overlap={config.overlap}) "
            "emits overlapping per-chunk codes, not one [K, T] stream; this pipeline does not support it"
        )


def _weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _device_kind(device: torch.device) -> str:
    """``cuda:<GPU name>`` or ``cpu:<CPU model>``: different hardware may round differently."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{_cpu_model()}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
