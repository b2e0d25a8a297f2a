"""Debug codecs for tests and the ``debug`` config, like audiocraft's ``get_debug_compression_model``.

The default (``tiny``) has the real ``facebook/encodec_32khz`` layout (32 kHz mono, hop 640, 50 frames/s, 4
codebooks of 2048) with seeded random weights, saved with ``save_pretrained`` so the pipeline loads it by path
through the same ``EncodecCodec.load`` as the hub model. A randomly initialised ``EncodecModel`` has all-zero
codebooks, so every code would be 0; the codebooks are therefore fitted to the random encoder's output on
synthetic audio, one RVQ layer at a time, which makes the codes spread over the codebooks like a trained model's do.

``tiny_24khz`` and ``tiny_48khz`` have the layouts of ``facebook/encodec_24khz`` (causal, 5 bandwidths, 32 x 1024)
and ``facebook/encodec_48khz`` (stereo, normalised, 1 s chunks with 1% overlap, time group norm, 16 x 1024).
``dac_tiny`` and ``mimi_tiny`` (``pipeline.codecs.testing_more``) do the same for the other families.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from transformers import EncodecConfig, EncodecModel

# Bump when the recipe below changes: it is part of the cache key, so stale fixtures are never reused.
FIXTURE_VERSION = 1
VARIANTS = ("tiny", "full", "tiny_24khz", "tiny_48khz")
SAMPLE_RATE = 32_000
# Seconds of synthetic audio the codebooks are fitted on (50 frames per second): fewer frames than codebook
# entries, which is fine (see _codebook_entries). The full encoder is ~30x slower on CPU, so it gets less.
_FIT_SECONDS = {"tiny": 60.0, "full": 20.0, "tiny_24khz": 40.0, "tiny_48khz": 20.0}
_KMEANS_ITERS = 8
# Frames per k-means cluster: with fewer, clusters collapse onto single frames and the next residual is zero.
_FRAMES_PER_CLUSTER = 2

# Narrow layers for fast CPU tests, shared by the tiny variants.
_NARROW = dict(num_filters=4, hidden_size=16, num_lstm_layers=1)
# The published 24 and 48 kHz configs (facebook/encodec_24khz, facebook/encodec_48khz config.json), but narrow.
_OTHER_LAYOUTS = {
    "tiny_24khz": dict(
        sampling_rate=24_000, audio_channels=1, normalize=False, chunk_length_s=None, overlap=None,
        upsampling_ratios=[8, 5, 4, 2], codebook_size=1024, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
        use_causal_conv=True, use_conv_shortcut=True, norm_type="weight_norm", pad_mode="reflect",
    ),
    "tiny_48khz": dict(
        sampling_rate=48_000, audio_channels=2, normalize=True, chunk_length_s=1.0, overlap=0.01,
        upsampling_ratios=[8, 5, 4, 2], codebook_size=1024, target_bandwidths=[3.0, 6.0, 12.0, 24.0],
        use_causal_conv=False, use_conv_shortcut=True, norm_type="time_group_norm", pad_mode="reflect",
    ),
}


def fixture_config(variant: str = "tiny") -> EncodecConfig:
    """The ``EncodecConfig`` of a fixture variant.

    Args:
        variant: ``full`` is the exact ``facebook/encodec_32khz`` architecture (~57M parameters); ``tiny`` keeps
            its rate, hop, codebook count and size but has narrow layers (~0.17M parameters) for fast CPU tests.
            ``tiny_24khz`` and ``tiny_48khz`` are narrow versions of the 24 and 48 kHz models.
    """
    if variant not in VARIANTS:
        raise ValueError(f"fixture variant must be one of {VARIANTS}, got {variant!r}")
    if variant in _OTHER_LAYOUTS:
        return EncodecConfig(**_OTHER_LAYOUTS[variant], **_NARROW)
    widths = {
        "full": dict(num_filters=64, hidden_size=128, num_lstm_layers=2),
        "tiny": dict(num_filters=4, hidden_size=16, num_lstm_layers=1),
    }[variant]
    return EncodecConfig(
        sampling_rate=SAMPLE_RATE,
        audio_channels=1,
        normalize=False,
        chunk_length_s=None,
        overlap=None,
        upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048,
        target_bandwidths=[2.2],
        use_causal_conv=False,
        use_conv_shortcut=False,
        num_residual_layers=1,
        pad_mode="reflect",
        norm_type="weight_norm",
        kernel_size=7,
        last_kernel_size=7,
        residual_kernel_size=3,
        dilation_growth_rate=2,
        compress=2,
        trim_right_ratio=1.0,
        **widths,
    )


def synth_audio(seconds: float, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> torch.Tensor:
    """Deterministic varied test audio: half-second pieces of tones, chirps, noise, AM, clicks and near-silence.

    Args:
        seconds: length in seconds.
        sample_rate: rate in Hz.
        seed: the same seed gives the same samples.

    Returns:
        float32 ``[n]`` in ``[-1, 1]``, ``n = round(seconds * sample_rate)``.
    """
    gen = torch.Generator().manual_seed(seed)
    n = round(seconds * sample_rate)
    piece = sample_rate // 2
    pieces = [_synth_piece(piece, sample_rate, gen) for _ in range(-(-n // piece))]
    audio = torch.cat(pieces)[:n] if pieces else torch.zeros(0)
    return audio.clamp(-1.0, 1.0).to(torch.float32)


def _synth_piece(n: int, sample_rate: int, gen: torch.Generator) -> torch.Tensor:
    """One piece of a random kind at a random (log-uniform) level."""
    t = torch.arange(n, dtype=torch.float64) / sample_rate

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()

    def log_uniform(lo: float, hi: float) -> float:
        return math.exp(uniform(math.log(lo), math.log(hi)))

    kind = int(torch.randint(6, (), generator=gen))
    if kind == 0:  # a few partials
        wave = sum(uniform(0.2, 1.0) * torch.sin(2 * math.pi * log_uniform(40, 8000) * t) for _ in range(3))
    elif kind == 1:  # exponential chirp
        f0, f1 = log_uniform(40, 12000), log_uniform(40, 12000)
        phase = 2 * math.pi * f0 * t[-1] / math.log(f1 / f0) * ((f1 / f0) ** (t / t[-1]) - 1)
        wave = torch.sin(phase)
    elif kind == 2:  # white noise, or its running sum (brown noise), which is mostly low frequencies
        wave = torch.randn(n, generator=gen, dtype=torch.float64)
        wave = wave if uniform(0, 1) < 0.5 else torch.cumsum(wave, 0) / math.sqrt(n)
    elif kind == 3:  # amplitude-modulated tone
        wave = torch.sin(2 * math.pi * log_uniform(100, 5000) * t) * torch.sin(2 * math.pi * log_uniform(1, 30) * t)
    elif kind == 4:  # click train
        wave = (torch.rand(n, generator=gen, dtype=torch.float64) < log_uniform(1e-4, 1e-2)).to(torch.float64)
    else:  # near-silence
        wave = 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)
    wave = wave / wave.abs().max().clamp_min(1e-12)
    return (log_uniform(0.03, 0.9) * wave).to(torch.float32)


@torch.no_grad()
def build_fixture_codec(out_dir: str | os.PathLike, variant: str = "tiny", seed: int = 0) -> Path:
    """Build a fixture EnCodec with fitted codebooks and ``save_pretrained`` it.

    Args:
        out_dir: directory to save into (created; existing files are overwritten).
        variant: one of ``VARIANTS`` (see ``fixture_config``).
        seed: seeds the weights, the fitting audio and k-means.

    Returns:
        ``out_dir`` as a Path, loadable with ``EncodecModel.from_pretrained`` or ``codec.pretrained=out_dir``.
    """
    config = fixture_config(variant)
    with one_thread():
        torch.manual_seed(seed)
        model = EncodecModel(config).eval()
        frames = _encoder_frames(model, _FIT_SECONDS[variant], seed)
        frames = _center_encoder_output(model, frames)
        _fit_codebooks(model, frames, torch.Generator().manual_seed(seed))
    out = Path(out_dir)
    model.save_pretrained(out)
    return out


def _encoder_frames(model: EncodecModel, seconds: float, seed: int) -> torch.Tensor:
    """Encoder output frames ``[N, D]`` for ``seconds`` of synthetic audio, fed as the model's encode feeds it:
    with its channel count, cut into its chunks (without overlap: these are only fitting data), normalised."""
    config = model.config
    audio = synth_channels(seconds, config.sampling_rate, config.audio_channels, seed)[None]  # [1, C, L]
    if config.chunk_length is not None:
        audio = audio.unfold(-1, config.chunk_length, config.chunk_length)[0].transpose(0, 1)  # [chunks, C, L]
    if config.normalize:
        audio = audio / (audio.mean(dim=1, keepdim=True).pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-8)
    return model.encoder(audio).transpose(1, 2).reshape(-1, config.hidden_size).contiguous()


def synth_channels(seconds: float, sample_rate: int, channels: int, seed: int = 0) -> torch.Tensor:
    """``synth_audio`` for 1 or 2 channels ``[C, n]``: the right channel mixes the left with other audio, so the
    two are correlated like a stereo recording and still differ."""
    left = synth_audio(seconds, sample_rate, seed)
    if channels == 1:
        return left[None]
    return torch.stack([left, (0.5 * left + 0.5 * synth_audio(seconds, sample_rate, seed + 1000)).clamp(-1, 1)])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for a block: fitted weights depend on float reduction order, and the same seed must
    give the same files on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _center_encoder_output(model: EncodecModel, frames: torch.Tensor) -> torch.Tensor:
    """Shift the encoder's last bias so the frames have zero mean; returns the shifted frames.

    A random encoder's output is a large constant offset plus small variations. The RVQ distance
    ``|x|^2 - 2 x.e + |e|^2`` then cancels catastrophically in fp32, and float noise as small as a batch-size
    change in the convolutions flips ~5% of codes. Centred, the fixture is about as stable as a trained model.
    The last bias is the group norm's with ``time_group_norm`` (it follows the convolution and undoes any shift
    of the convolution's bias), else the convolution's.
    """
    mean = frames.mean(dim=0)
    last = model.encoder.layers[-1]
    (last.norm.bias if model.config.norm_type == "time_group_norm" else last.conv.bias).sub_(mean)
    return frames - mean


def _fit_codebooks(model: EncodecModel, frames: torch.Tensor, gen: torch.Generator) -> None:
    """Fit each RVQ layer to the residual the layers before it leave, as the model's own encode computes it.

    Args:
        model: the model whose ``quantizer.layers[*].codebook`` buffers are overwritten.
        frames: encoder output frames ``[N, D]``.
        gen: random generator for k-means initialisation.
    """
    residual = frames
    for layer in model.quantizer.layers:
        book = layer.codebook
        embed = _codebook_entries(residual, book.codebook_size, gen)
        book.embed.copy_(embed)
        book.embed_avg.copy_(embed)
        book.inited.fill_(1.0)
        indices = book.encode(residual)
        book.cluster_size.copy_(torch.bincount(indices, minlength=book.codebook_size).to(book.cluster_size))
        residual = residual - book.decode(indices)


def _codebook_entries(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` codebook entries for points ``x`` ``[N, D]``: k-means centroids plus jittered copies of them.

    There are fewer frames than entries, so only ``N / _FRAMES_PER_CLUSTER`` are true centroids; the rest are
    centroids moved by a fraction of the spread, so unseen audio still spreads over the whole codebook.
    """
    n_clusters = max(1, min(size, x.shape[0] // _FRAMES_PER_CLUSTER))
    centroids = _kmeans(x, n_clusters, gen)
    extra = size - n_clusters
    picks = torch.randint(n_clusters, (extra,), generator=gen)
    jitter = 0.5 * x.std(dim=0) * torch.randn(extra, x.shape[1], generator=gen)
    return torch.cat([centroids, centroids[picks] + jitter])


def _kmeans(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's algorithm from ``k`` random distinct points; an emptied cluster keeps its previous centroid."""
    centroids = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(_KMEANS_ITERS):
        assign = torch.cdist(x, centroids).argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def fixture_codec_dir(variant: str = "tiny", seed: int = 0, cache_root: str | os.PathLike | None = None) -> Path:
    """The directory of a fixture codec, built on first use and reused after.

    Safe for concurrent processes: each builds into a temporary folder and renames it into place; the loser of a
    race discards its copy. The key holds the torch and transformers versions, whose random streams and file
    layout the weights depend on.

    Args:
        variant: an EnCodec variant (``VARIANTS``: ``tiny``, ``full``, ``tiny_24khz``, ``tiny_48khz``), or
            ``dac_tiny`` / ``mimi_tiny`` (``pipeline.codecs.testing_more``).
        seed: see ``build_fixture_codec``.
        cache_root: where fixtures live; default ``$AUDIO_TOKENIZE_CACHE/fixtures``, else
            ``~/.cache/audio-tokenize/fixtures``.
    """
    name, version, build = _recipe(variant)
    root = Path(cache_root) if cache_root is not None else _default_cache_root()
    key = f"{name}-seed{seed}-v{version}-torch{torch.__version__}-tf{transformers.__version__}"
    final = root / key.replace("+", "_")
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        build(tmp, seed)
        tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache should be readable by all
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # a real failure, not a lost race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _recipe(variant: str) -> tuple[str, int, Callable[[Path, int], Path]]:
    """Cache name, recipe version and builder ``(out_dir, seed) -> out_dir`` of a fixture variant."""
    if variant in VARIANTS:
        return f"encodec-{variant}", FIXTURE_VERSION, lambda out, seed: build_fixture_codec(out, variant, seed)
    from pipeline.codecs.testing_more import FIXTURES, VERSIONS  # imported late: it imports this module

    if variant not in FIXTURES:
        raise ValueError(f"fixture variant must be one of {VARIANTS + tuple(FIXTURES)}, got {variant!r}")
    return variant, VERSIONS[variant], FIXTURES[variant]


def _default_cache_root() -> Path:
    env = os.environ.get("AUDIO_TOKENIZE_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "audio-tokenize"
    return base / "fixtures"
