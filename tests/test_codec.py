"""The EnCodec codec on the fixture models: shapes, spread codes, exactness against transformers, load errors."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from torch.nn.utils import parametrize
from transformers import EncodecModel

from pipeline.codecs import Codec, load_codec, resolve_device
from pipeline.codecs.encodec import CodecLoadError, _fp32_precision, fold_weight_norm
from pipeline.codecs.testing import fixture_codec_dir, synth_audio
from pipeline.config import CodecConfig

HOP = 640
K = 4
FINGERPRINT_KEYS = {
    "family", "pretrained", "revision", "commit", "weights_sha256", "bandwidth", "num_codebooks", "cardinality",
    "sample_rate", "channels", "hop", "dtype", "tf32", "compile", "torch", "transformers", "device_kind", "threads",
    "attn_implementation",
}  # fmt: skip


def _load(path: Path, **overrides) -> Codec:
    return load_codec(CodecConfig(pretrained=str(path), device="cpu", **overrides))


def _batch(seconds: float, seeds: list[int]) -> torch.Tensor:
    """``[len(seeds), 1, L]`` of different synthetic audio."""
    return torch.stack([synth_audio(seconds, seed=seed) for seed in seeds])[:, None]


def _reference_codes(path: Path, audio: torch.Tensor) -> torch.Tensor:
    """Codes from a plain ``EncodecModel.encode`` (weight norm not folded), as ``[B, K, T]``."""
    model = EncodecModel.from_pretrained(path).eval()
    with torch.inference_mode():
        return model.encode(audio, bandwidth=2.2).audio_codes[0]


@pytest.fixture(scope="module")
def tiny(tiny_codec_dir: Path) -> Codec:
    return _load(tiny_codec_dir)


def test_fixture_loads_by_path_with_the_32khz_layout(tiny: Codec) -> None:
    assert (tiny.sample_rate, tiny.channels, tiny.hop_length) == (32_000, 1, HOP)
    assert (tiny.num_codebooks, tiny.cardinality, tiny.frame_rate) == (K, 2048, 50.0)
    assert tiny.device == torch.device("cpu")


@pytest.mark.parametrize("length", [1, HOP - 1, HOP, HOP + 1, 32_000 + 17])
def test_codes_are_int64_of_ceil_length_over_hop(tiny: Codec, length: int) -> None:
    codes = tiny.encode(0.1 * torch.randn(2, 1, length, generator=torch.Generator().manual_seed(length)))
    assert codes.shape == (2, K, -(-length // HOP)) == (2, K, tiny.n_frames(length))
    assert codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < tiny.cardinality


def test_codes_spread_over_the_codebooks(tiny: Codec) -> None:
    # 5 s = 250 frames; measured 196, 226, 213, 203 distinct codes per codebook. A fixture with unfitted
    # (all-zero) codebooks gives 1.
    codes = tiny.encode(_batch(5.0, [1]))[0]
    distinct = [len(torch.unique(row)) for row in codes]
    assert min(distinct) > 150, distinct


def test_weight_norm_folding_is_exact(tiny: Codec, tiny_codec_dir: Path) -> None:
    unfolded = EncodecModel.from_pretrained(tiny_codec_dir).eval()
    names = [name for name, module in unfolded.named_modules() if parametrize.is_parametrized(module, "weight")]
    assert len(names) > 10
    assert not any(parametrize.is_parametrized(module) for module in tiny.model.modules())
    folded = dict(tiny.model.named_modules())
    for name in names:
        assert torch.equal(folded[name].weight, unfolded.get_submodule(name).weight), name
    assert fold_weight_norm(unfolded) == len(names)


def test_codes_equal_transformers_encode_on_a_batch(tiny: Codec, tiny_codec_dir: Path) -> None:
    audio = _batch(3.0, [2, 3, 4])
    assert torch.equal(tiny.encode(audio), _reference_codes(tiny_codec_dir, audio))


def test_convolutions_pad_without_device_tensors(tiny: Codec, tiny_codec_dir: Path) -> None:
    # transformers keeps the padding arithmetic in tensor buffers that follow the model to the GPU (a host sync per
    # layer); the codec makes them Python ints, and the codes stay transformers' (previous test, and the lengths
    # here that need extra padding at several layers).
    from transformers.models.encodec.modeling_encodec import EncodecConv1d

    convs = [m for m in tiny.model.modules() if isinstance(m, EncodecConv1d)]
    assert len(convs) > 10 and all(isinstance(m.stride, int) and isinstance(m.padding_total, int) for m in convs)
    assert not any(name in ("stride", "kernel_size", "padding_total") for name, _ in tiny.model.named_buffers())
    for length in (HOP * 7 + 3, 32_000 - 1):
        audio = 0.1 * torch.randn(2, 1, length, generator=torch.Generator().manual_seed(length))
        codes = tiny.encode(audio)
        assert torch.equal(codes, _reference_codes(tiny_codec_dir, audio))
        assert len(torch.unique(codes)) > 20  # fitted codebooks: not every code 0


def test_convolutions_in_row_groups_give_the_same_codes(tiny_codec_dir: Path) -> None:
    # On CUDA the encoder's convolutions run in groups of rows under the 32-bit index limit (the LSTM and the RVQ
    # take the whole batch); forced on CPU here with a limit of two 2 s rows per group.
    codec = _load(tiny_codec_dir)
    audio = _batch(2.0, [20, 21, 22, 23, 24])
    whole = codec.encode(audio)
    assert codec._encoder.groups(5, 64_000) == 1  # CPU: never split
    codec._encoder.max_elements = int(2 * codec._encoder.width * (64_000 + 1024))
    assert codec._encoder.groups(5, 64_000) == 3 and codec._encoder.groups(4, 64_000) == 2
    assert torch.equal(codec.encode(audio), whole)
    assert torch.equal(whole, _reference_codes(tiny_codec_dir, audio))
    assert len(torch.unique(whole)) > 500


def test_codes_do_not_depend_on_batch_mates(tiny: Codec) -> None:
    # The fixture's encoder output is centred so fp32 noise from batch size does not flip codes (it did for 5%).
    audio = _batch(3.0, [10, 11, 12, 13])
    alone = torch.cat([tiny.encode(audio[i : i + 1]) for i in range(len(audio))])
    assert torch.equal(tiny.encode(audio), alone)


def test_decode_gives_audio_of_frames_times_hop(tiny: Codec) -> None:
    codes = tiny.encode(_batch(1.0, [5, 6]))
    audio = tiny.decode(codes)
    assert audio.shape == (2, 1, codes.shape[-1] * HOP)
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all()


def test_fingerprint_has_effective_settings(tiny_codec_dir: Path) -> None:
    codec = _load(tiny_codec_dir, dtype="bfloat16", tf32=True, compile=True, threads=2)
    fingerprint = codec.fingerprint()
    assert set(fingerprint) == FINGERPRINT_KEYS
    # On CPU none of bf16, TF32 or compile apply, and the fingerprint says what ran, not what was asked.
    assert (fingerprint["dtype"], fingerprint["tf32"], fingerprint["compile"]) == ("float32", False, False)
    assert fingerprint["threads"] == torch.get_num_threads() == 2
    assert fingerprint["device_kind"].startswith("cpu:")
    assert (fingerprint["family"], fingerprint["hop"], fingerprint["num_codebooks"]) == ("encodec", HOP, K)
    assert fingerprint["commit"] is None  # a local directory has no Hub commit
    assert fingerprint["weights_sha256"] == _load(tiny_codec_dir).fingerprint()["weights_sha256"]


def test_fixture_build_is_deterministic_and_cached(tmp_path: Path, tiny: Codec) -> None:
    built = fixture_codec_dir("tiny", cache_root=tmp_path)
    assert fixture_codec_dir("tiny", cache_root=tmp_path) == built
    assert [p.name for p in tmp_path.iterdir()] == [built.name]  # no temporary folders left behind
    assert _load(built).fingerprint()["weights_sha256"] == tiny.fingerprint()["weights_sha256"]


def _with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` with ``config.json`` keys changed."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_chunked_model_goes_through_model_encode(tiny: Codec, tiny_codec_dir: Path, tmp_path: Path) -> None:
    chunked = _load(_with_config(tiny_codec_dir, tmp_path / "chunked", chunk_length_s=1.0, overlap=0.0))
    audio = _batch(2.3, [1, 2])
    codes = chunked.encode(audio)
    assert codes.shape == (2, K, tiny.n_frames(audio.shape[-1]))
    assert torch.equal(codes[..., :50], tiny.encode(audio[..., :32_000]))  # a chunk is encoded on its own
    with pytest.raises(ValueError, match="overlapping chunks"):
        _load(_with_config(tiny_codec_dir, tmp_path / "overlap", chunk_length_s=1.0, overlap=0.01))


def test_precision_flags_are_restored() -> None:
    flags = [torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul]
    before = [f.fp32_precision for f in flags]
    with _fp32_precision([(f, "ieee") for f in flags]):
        assert all(f.fp32_precision == "ieee" for f in flags)
    assert [f.fp32_precision for f in flags] == before


def test_bad_config_fails_fast(tiny_codec_dir: Path) -> None:
    with pytest.raises(ValueError, match="bandwidth"):
        _load(tiny_codec_dir, bandwidth=6.0)
    with pytest.raises(ValueError, match="family"):
        _load(tiny_codec_dir, family="dac")
    with pytest.raises(ValueError, match="num_codebooks"):
        _load(tiny_codec_dir, num_codebooks=8)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def _assert_load_error_is_fast_and_helpful(pretrained: str) -> None:
    start = time.monotonic()
    with pytest.raises(CodecLoadError) as error:
        load_codec(CodecConfig(pretrained=pretrained, device="cpu"))
    # Without the reachability probe, huggingface_hub's retries take ~25 s when the Hub is unreachable.
    assert time.monotonic() - start < 5.0
    message = str(error.value)
    assert "--local-dir DIR" in message and "codec.pretrained=DIR" in message and "HF_HUB_OFFLINE=1" in message


def test_missing_hub_id_offline_raises_load_error_fast(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _assert_load_error_is_fast_and_helpful("facebook/encodec_32khz")


def test_missing_hub_id_online_raises_load_error_fast(monkeypatch, tmp_path: Path) -> None:
    # Unreachable Hub (this sandbox) or a 404 from the real one: either way a quick CodecLoadError.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _assert_load_error_is_fast_and_helpful("audio-tokenize-tests/no-such-codec")


def test_missing_local_directory_raises_load_error(tmp_path: Path) -> None:
    with pytest.raises(CodecLoadError, match="not a local directory"):
        load_codec(CodecConfig(pretrained=str(tmp_path / "missing"), device="cpu"))
    with pytest.raises(CodecLoadError, match="not a loadable EnCodec checkpoint"):
        load_codec(CodecConfig(pretrained=str(tmp_path), device="cpu"))


def test_cached_hub_id_loads_offline_and_records_the_commit(monkeypatch, tmp_path: Path, tiny_codec_dir) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--fixture--encodec-tiny"
    shutil.copytree(tiny_codec_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    fingerprint = load_codec(CodecConfig(pretrained="fixture/encodec-tiny", device="cpu")).fingerprint()
    assert fingerprint["commit"] == commit
    assert fingerprint["weights_sha256"] == _load(tiny_codec_dir).fingerprint()["weights_sha256"]


@pytest.mark.timeout(300)
def test_full_variant_matches_transformers_and_spreads(full_codec_dir: Path) -> None:
    # The real 32 kHz architecture; 2 s keeps it to about a second of CPU encoding.
    codec = _load(full_codec_dir)
    audio = _batch(2.0, [2])
    codes = codec.encode(audio)
    assert codes.shape == (1, K, 100)
    assert torch.equal(codes, _reference_codes(full_codec_dir, audio))
    # Measured 61, 89, 92, 86 distinct codes of 100 frames.
    assert min(len(torch.unique(row)) for row in codes[0]) > 40
