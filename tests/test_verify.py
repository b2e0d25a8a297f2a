"""``pipeline.verify`` as the tests' oracle: a real run passes; each kind of damage fails, naming the problem."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import base_overrides, compose, make_corpus
from pipeline.testing.dummies import synth, write_audio
from pipeline.tokenize import run
from pipeline.verify import VerifyOptions, main, verify

STRUCTURE_ONLY = VerifyOptions(sample=0, decode=0)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tiny_codec_dir):
    corpus = tmp_path_factory.mktemp("corpus")
    make_corpus(corpus)
    out = tmp_path_factory.mktemp("out")
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0
    return out


@pytest.fixture
def damaged(tokenized, tmp_path):
    """A private copy of the output to break (the report goes elsewhere so the copy stays a clean output)."""
    copy = tmp_path / "out"
    shutil.copytree(tokenized, copy, ignore=shutil.ignore_patterns("verify"))
    return copy


def test_real_output_passes_with_report(tokenized, tmp_path):
    result = verify(tokenized, VerifyOptions(sample=6, decode=2, seed=1, report_dir=tmp_path / "report"))
    assert result.ok, result.problems
    report = json.loads((tmp_path / "report/report.json").read_text())
    assert report["ok"] and report["structure"]["rows"] == 10 and report["structure"]["units"] == 3
    # Same (audio, config), only the batch shape differs: near-ties may flip, the bulk may not.
    assert report["reencode"]["rows"] == 6 and report["reencode"]["flip_rate"] < 0.01
    assert len(report["reencode"]["flip_rate_per_codebook"]) == 4
    assert len(report["roundtrip"]) == 2
    for r in report["roundtrip"]:  # random fixture weights: the quality is poor but must be a number
        assert math.isfinite(r["si_snr_db"]) and math.isfinite(r["log_mel_l1"])
        assert (tmp_path / "report/audio").joinpath(r["decoded_wav"].split("/")[-1]).stat().st_size > 1000
    books = report["codebooks"]
    assert len(books["entropy_bits"]) == 4 and all(0 < h <= 11 for h in books["entropy_bits"])
    for name in ("report.md", "durations.png", "codebook_usage.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_report_inside_output_is_invisible_to_load_dataset(damaged, tmp_path):
    from datasets import load_dataset

    assert verify(damaged, VerifyOptions(sample=1, decode=1)).ok
    assert (damaged / "verify/report.md").exists() and list((damaged / "verify/audio").glob("*.wav"))
    # A private cache: datasets keys a local folder's cache by its name and card, not by its files.
    ds = load_dataset(str(damaged), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 10 and set(ds.column_names) >= {"id", "codes"}


def test_missing_marker(damaged):
    (damaged / ".state/done/unit-00001.json").unlink()
    result = verify(damaged, STRUCTURE_ONLY)
    assert not result.ok and "marker" in result.checks_failed()
    assert any("unit 1 has no done marker" in str(p) for p in result.problems)


def test_duplicated_row(damaged):
    shard = damaged / "data/train-00000-of-00003.parquet"
    table = pq.read_table(shard)
    _rewrite(shard, pa.concat_tables([table, table.slice(0, 1)]))
    result = verify(damaged, STRUCTURE_ONLY)
    assert {"duplicate", "row_count"} <= result.checks_failed()
    assert any(table["id"][0].as_py() in str(p) for p in result.problems if p.check == "duplicate")


def test_rows_of_another_item(damaged):
    """A shard whose rows name an item the plan does not put in that unit (another job's audio written into this
    folder, as a refused launch could once cause): the planned item is missing, the other is alien."""
    shard = damaged / "data/train-00001-of-00003.parquet"
    table = pq.read_table(shard)
    first = table["id"][0].as_py()
    ids = pa.array([f"elsewhere/{i}" if i == first else i for i in table["id"].to_pylist()], pa.string())
    _rewrite(shard, table.set_column(table.schema.get_field_index("id"), table.schema.field("id"), ids))
    result = verify(damaged, STRUCTURE_ONLY)
    assert result.checks_failed() == {"items"}
    message = next(str(p) for p in result.problems if p.check == "items")
    assert "unit 1: 1 planned items" in message and first in message and f"elsewhere/{first}" in message


def test_changed_fingerprint_metadata(damaged):
    shard = damaged / "data/train-00002-of-00003.parquet"
    table = pq.read_table(shard)
    meta = {**table.schema.metadata, b"pipeline.fingerprint": b"0123456789abcdef"}
    pq.write_table(table.replace_schema_metadata(meta), shard)
    result = verify(damaged, STRUCTURE_ONLY)
    assert result.checks_failed() == {"fingerprint"}
    assert "train-00002-of-00003.parquet has fingerprint 0123456789abcdef" in str(result.problems[0])


def test_truncated_n_frames(damaged):
    shard = damaged / "data/train-00001-of-00003.parquet"
    table = pq.read_table(shard)
    frames = table["n_frames"].to_numpy().copy()
    frames[0] -= 1
    _rewrite(shard, table.set_column(table.schema.get_field_index("n_frames"), table.schema.field("n_frames"),
                                     pa.array(frames, pa.int32())))
    result = verify(damaged, STRUCTURE_ONLY)
    assert {"n_frames", "codes_shape"} <= result.checks_failed()
    assert any(f"{table['id'][0].as_py()}#0" in str(p) for p in result.problems if p.check == "n_frames")


def test_codes_out_of_range_and_stray_shard(damaged):
    shard = damaged / "data/train-00001-of-00003.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[0]["codes"][2][5] = 4096  # cardinality is 2048
    _rewrite(shard, pa.Table.from_pylist(rows, schema=table.schema))
    shutil.copy(shard, damaged / "data/train-00000-of-00002.parquet")  # a leftover of another job
    result = verify(damaged, STRUCTURE_ONLY)
    assert {"code_range", "stray_shard"} <= result.checks_failed()


def test_wrong_codes_fail_the_reencode(damaged):
    """Codes that pass every structural check but are not what the codec makes of the audio."""
    shard = damaged / "data/train-00000-of-00003.parquet"
    table = pq.read_table(shard)
    rng = np.random.default_rng(0)
    rows = table.to_pylist()
    for row in rows:
        row["codes"] = rng.integers(0, 2048, size=np.shape(row["codes"])).tolist()
    _rewrite(shard, pa.Table.from_pylist(rows, schema=table.schema))
    result = verify(damaged, VerifyOptions(sample=10, decode=0))
    assert result.checks_failed() == {"flip_rate"}
    assert result.report["reencode"]["flip_rate"] > 0.2


def test_stereo_output_passes(tmp_path, tiny_codec_dir):
    """Stereo rows interleave L and R per codebook; re-encode and decode must undo that the same way."""
    import soundfile as sf

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_audio(corpus / "st.wav", synth(4.0, 44100, 2, "music", seed=1), 44100)
    out = tmp_path / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir, "channels=stereo", "decode.workers=0"))) == 0
    result = verify(out, VerifyOptions(sample=1, decode=1))
    assert result.ok, result.problems
    assert result.report["structure"]["codec"]["num_codebooks"] == 8
    assert result.report["reencode"]["flip_rate"] < 0.01
    assert sf.info(result.report["roundtrip"][0]["decoded_wav"]).channels == 2
    # The report names stereo rows' codebooks by channel: L0, R0, L1, ... (not k=0..7).
    assert result.report["codebook_labels"] == ["L0", "R0", "L1", "R1", "L2", "R2", "L3", "R3"]
    page = (result.report_dir / "report.md").read_text()
    assert "| L0 | R0 | L1 |" in page and "| R3 |" in page and "k=1" not in page


def test_hf_rows_are_fetched_like_the_workers_do(tmp_path, tiny_codec_dir):
    """Rows whose source is a dataset row, not a file: verify rebuilds the plan's source to fetch them."""
    import io

    import soundfile as sf

    cells = []
    for i, seconds in enumerate([3.0, 12.0]):
        buf = io.BytesIO()
        sf.write(buf, synth(seconds, 24000, 1, seed=i).T, 24000, format="WAV")
        cells.append({"bytes": buf.getvalue(), "path": f"clip{i}.wav"})
    pq.write_table(pa.table({"audio": cells, "genre": ["jazz", "rock"]}), tmp_path / "clips.parquet")
    out = tmp_path / "out"
    overrides = [o for o in base_overrides(tmp_path, out, tiny_codec_dir, "decode.workers=0")
                 if not o.startswith("dataset")] + ["dataset=hf", f"dataset.path={tmp_path / 'clips.parquet'}"]
    assert run(compose(overrides)) == 0
    result = verify(out, VerifyOptions(sample=3, decode=1))
    assert result.ok and not result.warnings, (result.problems, result.warnings)
    assert result.report["reencode"]["rows"] == 3


def test_not_an_output_folder(tmp_path):
    result = verify(tmp_path, STRUCTURE_ONLY)
    assert result.checks_failed() == {"plan"}


def test_cli_exit_codes(damaged, capsys):
    assert main([str(damaged), "--sample", "0", "--decode", "0"]) == 0
    assert "PASS" in capsys.readouterr().out
    (damaged / ".state/done/unit-00002.json").unlink()
    assert main([str(damaged), "--sample", "0", "--decode", "0", "--report-dir", str(damaged.parent / "r")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "unit 2 has no done marker" in out
    assert "[marker]" in (damaged.parent / "r/report.md").read_text()


def _rewrite(path, table: pa.Table) -> None:
    """Write ``table`` over a shard, keeping the shard's metadata (fingerprint, codec)."""
    meta = pq.read_schema(path).metadata
    pq.write_table(table.replace_schema_metadata(meta), path)
