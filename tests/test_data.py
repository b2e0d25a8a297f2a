"""``pipeline.data`` on a real output: split across ranks and workers, determinism, crops, delay, HF loading."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import base_overrides, compose, read_rows
from pipeline.data import TokenDataset, collate, delay, from_hf, to_example, undelay
from pipeline.testing.dummies import synth, write_audio
from pipeline.tokenize import run

# Seconds per file at 32 kHz; 5 s windows give 19 rows (250 frames, plus tails of 50 to 225 frames) in 5 shards.
SECONDS = [12.0, 3.0, 7.5, 5.0, 9.0, 2.0, 11.0, 4.5, 6.0, 14.0]
CARD = 2048


@pytest.fixture(scope="module")
def out(tmp_path_factory, tiny_codec_dir):
    corpus = tmp_path_factory.mktemp("corpus")
    for i, seconds in enumerate(SECONDS):
        write_audio(corpus / f"song_{i:02d}.wav", synth(seconds, 32000, 1, "music", seed=i), 32000)
    out = tmp_path_factory.mktemp("out")
    overrides = base_overrides(corpus, out, tiny_codec_dir, "segment.length_s=5", "output.unit_size=2")
    assert run(compose(overrides)) == 0
    return out


@pytest.fixture(scope="module")
def rows(out):
    return read_rows(out)


def _keys(batches) -> list[tuple[str, int]]:
    return [(i, int(s)) for b in batches for i, s in zip(b["id"], b["segment_index"])]


def _rank_keys(source, rank: int, world: int, **kw) -> list[tuple[str, int]]:
    ds = TokenDataset(source, rank=rank, world_size=world, crop_frames=64, **kw)
    return _keys(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ds.collate))


@pytest.mark.parametrize("split", ["file", "row_group", "row"])
def test_two_ranks_two_workers_cover_every_row_once(out, rows, split):
    source = out if split != "row_group" else list((out / "data").glob("*.parquet"))  # a folder, or its files
    keys = [k for rank in (0, 1) for k in _rank_keys(source, rank, 2, split=split, even_ranks=False)]
    assert len(keys) == len(set(keys)) == len(rows) == 19
    assert set(keys) == set(rows)


def test_even_ranks_take_equal_steps(out, rows):
    per_rank = [_rank_keys(out, rank, 2, split="file") for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0.7 * len(rows) / 2
    assert not set(per_rank[0]) & set(per_rank[1])
    ds = TokenDataset(out, rank=0, world_size=2)
    assert ds.epoch_size(num_workers=2) == len(per_rank[0])


def test_equal_shards_split_evenly_across_ranks_and_steps_agree(tmp_path, tiny_codec_dir):
    """10 equal shards on 2 ranks x 2 workers: each rank gets half the rows, none cut by even_ranks (dealing
    straight to consumers gave the ranks 24 and 16 rows, and even_ranks cut 8); ``steps_per_epoch`` is the number
    of batches both ranks can take, although each worker's last batch is partial."""
    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(20):
        write_audio(corpus / f"song_{i:02d}.wav", synth(4.0, 32000, 1, "music", seed=i), 32000)
    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir, "segment.length_s=2", "output.unit_size=2"))) == 0
    assert len(list((out / "data").glob("*.parquet"))) == 10
    batches, steps = [], set()
    for rank in (0, 1):
        ds = TokenDataset(out, rank=rank, world_size=2, split="file")
        assert ds.epoch_size(num_workers=2) == 20  # 40 rows, none cut
        batches.append(list(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=ds.collate)))
        steps.add(ds.steps_per_epoch(batch_size=3, num_workers=2))
    assert sum(len(b["id"]) for b in batches[0]) == sum(len(b["id"]) for b in batches[1]) == 20
    assert steps == {min(len(b) for b in batches)}  # the same on every rank, and every rank has that many


def test_deterministic_by_seed_and_epoch(out):
    def sequence(seed: int, epoch: int) -> list[tuple[str, int, int]]:
        ds = TokenDataset(out, crop_frames=100, seed=seed, shuffle_buffer=4)
        ds.set_epoch(epoch)
        return [(e["id"], e["segment_index"], e["start"]) for e in ds]

    assert sequence(0, 0) == sequence(0, 0)
    assert sequence(0, 0) != sequence(1, 0)
    assert sequence(0, 0) != sequence(0, 1)
    assert {s[:2] for s in sequence(0, 0)} == {s[:2] for s in sequence(0, 1)}  # same rows, other order and crops


def test_same_codes_as_parquet(out, rows):
    ds = TokenDataset(out, shuffle=False, fields=("id", "segment_index", "n_frames", "duration_s"))
    examples = list(ds)
    assert [(e["id"], e["segment_index"]) for e in examples] == sorted(rows, key=lambda k: (k[0], k[1]))
    for e in examples:
        stored = rows[(e["id"], e["segment_index"])]
        assert e["codes"].dtype == torch.int64 and e["codes"].shape == (4, stored["n_frames"])
        np.testing.assert_array_equal(e["codes"].numpy(), stored["codes"])
        assert e["mask"].all() and e["token_mask"].all() and e["duration_s"] == stored["duration_s"]


def test_crops_pad_and_mask(out, rows):
    ds = TokenDataset(out, crop_frames=200, random_crop=True, seed=3)
    starts = []
    for e in ds:
        stored = rows[(e["id"], e["segment_index"])]["codes"]
        n, start, length = stored.shape[1], e["start"], e["length"]
        assert e["codes"].shape == (4, 200) and e["mask"].shape == (200,)
        assert length == min(200, n) and 0 <= start <= max(0, n - 200)
        np.testing.assert_array_equal(e["codes"][:, :length].numpy(), stored[:, start : start + length])
        assert (e["codes"][:, length:] == CARD).all() and int(e["mask"].sum()) == length
        assert torch.equal(e["token_mask"], e["mask"].expand(4, -1))
        starts.append(start)
    assert any(starts), "random crops of 250-frame rows start somewhere other than 0"
    fixed = TokenDataset(out, crop_frames=200, random_crop=False)
    assert all(e["start"] == 0 for e in fixed)


def _audiocraft_delay(z: torch.Tensor, special: int, delays: list[int] | None = None) -> torch.Tensor:
    """audiocraft's DelayedPatternProvider layout (``delays``, default ``[0, 1, ..., K-1]``) +
    Pattern.build_pattern_sequence(keep_only_valid_steps=False)."""
    k, t = z.shape
    delays = list(range(k)) if delays is None else delays
    steps = t + max(delays)
    layout = [[]] + [[(s - d, q) for q, d in enumerate(delays) if s - d >= 0] for s in range(steps)]
    out = torch.full((k, len(layout)), special, dtype=z.dtype)
    for step, coords in enumerate(layout):
        for tt, q in coords:
            if tt < t:
                out[q, step] = z[q, tt]
    return out


def _transformers_stereo_delay(z: torch.Tensor, special: int) -> torch.Tensor:
    """transformers' ``MusicgenForCausalLM.build_delay_pattern_mask`` for ``audio_channels=2``: codebooks ``2c`` and
    ``2c + 1`` (L and R of codebook c) both shifted by ``c``, before the start step."""
    k, t = z.shape
    out = torch.full((k, t + k // 2 - 1), special, dtype=z.dtype)
    for c in range(k // 2):
        out[2 * c, c : t + c], out[2 * c + 1, c : t + c] = z[2 * c], z[2 * c + 1]
    return out


def test_delay_matches_audiocraft_and_undelay_inverts():
    z = torch.randint(0, CARD, (4, 37))
    delayed = delay(z, CARD)
    assert delayed.shape == (4, 41)
    assert torch.equal(delayed, _audiocraft_delay(z, CARD))
    assert torch.equal(undelay(delayed), z)
    batch = torch.randint(0, CARD, (3, 8, 20))
    assert torch.equal(undelay(delay(batch, CARD)), batch)


def test_stereo_delay_shares_a_step_per_codebook_pair():
    """Stereo rows ``[L0, R0, L1, R1, ...]``: MusicGen-stereo delays L and R of a codebook together (audiocraft
    delays ``[0, 0, 1, 1, 2, 2, 3, 3]``, transformers' ``audio_channels=2`` pattern), so K=8 adds 4 steps, not 8."""
    z = torch.randint(0, CARD, (8, 30))
    delayed = delay(z, CARD, group=2)
    assert delayed.shape == (8, 34)
    assert torch.equal(delayed, _audiocraft_delay(z, CARD, [0, 0, 1, 1, 2, 2, 3, 3]))
    assert torch.equal(delayed[:, 1:], _transformers_stereo_delay(z, CARD))  # after the start step
    assert torch.equal(undelay(delayed, group=2), z)
    assert not torch.equal(delayed[:, :34], delay(z, CARD)[:, :34])  # the mono pattern differs


def test_delayed_examples(out, rows):
    ds = TokenDataset(out, crop_frames=200, delay_pattern=True, seed=1)
    for e in ds:
        length = e["length"]
        assert e["codes"].shape == (4, 204) and int(e["mask"].sum()) == length + 4
        stored = rows[(e["id"], e["segment_index"])]["codes"]
        plain = undelay(e["codes"])
        np.testing.assert_array_equal(plain[:, :length].numpy(), stored[:, e["start"] : e["start"] + length])
        assert e["codes"][:, 0].eq(CARD).all()  # the start step
        assert int(e["token_mask"].sum()) == 4 * length and torch.equal(undelay(e["token_mask"])[:, :length],
                                                                         torch.ones(4, length, dtype=torch.bool))


def test_collate_pads_whole_rows():
    examples = [to_example({"codes": np.full((4, n), 7), "id": f"x{n}", "segment_index": 0}) for n in (5, 9)]
    batch = collate(examples, pad_token=CARD)
    assert batch["codes"].shape == (2, 4, 9) and batch["codes"].dtype == torch.int64
    assert batch["mask"].sum(1).tolist() == [5, 9] and (batch["codes"][0, :, 5:] == CARD).all()
    assert batch["id"] == ["x5", "x9"] and batch["length"].tolist() == [5, 9]


def test_load_dataset_rows_give_the_same_examples(out, tmp_path):
    from datasets import load_dataset

    # A private cache: datasets 5.2 keys a local folder's cache by its name and card only, so another folder
    # called out0 with the same card YAML would be served from the cache instead.
    hf = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    options = dict(crop_frames=120, random_crop=True, delay_pattern=True, seed=5)
    ours = {(e["id"], e["segment_index"]): e for e in TokenDataset(out, **options)}
    wrapped = from_hf(hf, fields=("id", "segment_index", "genre"), **options)
    assert len(wrapped) == len(ours) == hf.num_rows
    for i in range(len(wrapped)):
        theirs = wrapped[i]
        mine = ours[(theirs["id"], theirs["segment_index"])]
        assert torch.equal(theirs["codes"], mine["codes"]) and theirs["start"] == mine["start"]
        assert torch.equal(to_example(hf[i], **options)["codes"], theirs["codes"])
    batch = next(iter(DataLoader(wrapped, batch_size=4, shuffle=True, collate_fn=wrapped.collate)))
    assert batch["codes"].shape == (4, 4, 124) and len(batch["genre"]) == 4


def test_rank_from_torch_distributed(out, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ds = TokenDataset(out)
        assert (ds.rank, ds.world_size, ds.even_ranks) == (0, 1, False)
    finally:
        dist.destroy_process_group()


def test_bad_arguments(out):
    with pytest.raises(ValueError, match="not columns"):
        TokenDataset(out, fields=("id", "nope"))
    with pytest.raises(ValueError, match="both rank and world_size"):
        TokenDataset(out, rank=1)
    with pytest.raises(ValueError, match="split must be"):
        TokenDataset(out, split="rows")
    with pytest.raises(ValueError, match="crop_frames"):
        TokenDataset(out, crop_frames=0)


def test_a_unit_of_only_failed_items_still_loads(tmp_path, tiny_codec_dir):
    """A unit whose every item failed writes a shard with the schema and no row group: ``load_dataset`` (plain and
    streaming) and ``TokenDataset`` read the output (a row group of 0 rows made ``datasets`` fail with "BatchSize
    must be greater than 0")."""
    from datasets import load_dataset

    corpus = tmp_path / "in"
    corpus.mkdir()
    write_audio(corpus / "a_song.wav", synth(6.0, 32000, 1, "music", seed=1), 32000)
    write_audio(corpus / "b_song.wav", synth(4.0, 32000, 1, "music", seed=2), 32000)
    (corpus / "c_bad.wav").write_bytes(b"RIFF not really a wave file" * 10)
    (corpus / "d_empty.wav").write_bytes(b"")
    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir, "segment.length_s=5", "output.unit_size=2"))) == 0
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 2 and pq.ParquetFile(shards[1]).metadata.num_row_groups == 0
    assert pq.read_table(shards[1]).schema.equals(pq.read_table(shards[0]).schema)
    hf = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert hf.num_rows == 3 and sorted(set(hf["id"])) == ["a_song.wav", "b_song.wav"]
    streamed = load_dataset(str(out), split="train", streaming=True)
    assert sum(1 for _ in streamed) == 3
    assert len(list(TokenDataset(out, shuffle=False))) == 3
    from pipeline.verify import VerifyOptions, verify

    result = verify(out, VerifyOptions(sample=2, decode=0, report_dir=tmp_path / "report"))
    assert result.ok, result.problems
