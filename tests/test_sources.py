"""Sources: folder (symlinks, odd names), manifest (jsonl/csv, malformed lines), hf (parquet, arrow,
save_to_disk, streaming) and fsspec URLs against a local S3 server; each kind also end to end."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from helpers import base_overrides, compose, free_port, moto_environment, read_rows
from pipeline.audio import decode_audio
from pipeline.sources import FolderSource, HfSource, ManifestSource, build_source
from pipeline.sources.manifest import ManifestError
from pipeline.testing.dummies import synth, write_audio
from pipeline.tokenize import run

SR = 16000


def _wav(seconds: float, seed: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synth(seconds, SR, 1, "music", seed=seed).T, SR, format=fmt)
    return buf.getvalue()


def _write(path: Path, seconds: float = 1.5, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, synth(seconds, SR, 1, "music", seed=seed), SR, None)
    return path


def _overrides(kind: str, path: str, out: Path, codec_dir: Path, *extra: str) -> list[str]:
    """``base_overrides`` (tiny codec, small settings) with another dataset kind."""
    rest = base_overrides(Path("."), out, codec_dir, *extra)[2:]  # a URL must not go through Path
    return [f"dataset={kind}", f"dataset.path={path}", *rest]


def _failures(out: Path) -> dict[str, dict]:
    logs = (out / "failures").glob("*.jsonl")
    return {r["item_id"]: r for f in logs for r in map(json.loads, f.read_text().splitlines())}


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())


# ---------------------------------------------------------------------------------------------------- folder


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory) -> Path:
    """Names and links a real collection has: spaces, unicode, upper-case endings, links in and out, a loop."""
    base = tmp_path_factory.mktemp("odd")
    root, outside = base / "root", base / "outside"
    _write(root / "Dir With Spaces" / "Ünïcödé sóng №1.WAV", seed=1)
    _write(root / "b.FLAC", seed=2)
    _write(root / "sub" / "c.wav", seed=3)
    (root / "notes.txt").write_text("not audio")
    _write(root / ".hidden.wav", seed=4)
    _write(outside / "linked target.wav", seed=5)
    _write(outside / "dir" / "d.wav", seed=6)
    (root / "file link.wav").symlink_to(outside / "linked target.wav")
    (root / "dir link").symlink_to(outside / "dir", target_is_directory=True)
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)  # inside root: listed once, real path
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "broken.wav").symlink_to(base / "nowhere.wav")
    return root


ODD_OK = {"Dir With Spaces/Ünïcödé sóng №1.WAV", "b.FLAC", "sub/c.wav", "file link.wav", "dir link/d.wav"}


def test_folder_lists_links_and_odd_names_once(odd_tree):
    items = FolderSource(str(odd_tree), ["wav", "flac"]).list_items()
    assert {it.id for it in items} == ODD_OK | {"broken.wav"}
    assert [it.index for it in items] == list(range(len(items)))
    unfollowed = FolderSource(str(odd_tree), ["wav", "flac"], follow_symlinks=False).list_items()
    assert {it.id for it in unfollowed} == ODD_OK - {"dir link/d.wav"} | {"broken.wav"}
    assert {it.id for it in FolderSource(str(odd_tree), ["FLAC"]).list_items()} == {"b.FLAC"}


def test_folder_non_utf8_name_fails_alone(tmp_path):
    _write(tmp_path / "ok.wav")
    bad = os.path.join(os.fsencode(tmp_path), b"bad\xff name.wav")
    with open(bad, "wb") as f:
        f.write(_wav(1.0, 0))
    source = FolderSource(str(tmp_path), ["wav"])
    items = {it.id: it for it in source.list_items()}
    assert set(items) == {"ok.wav", "bad\\xff name.wav"}
    json.dumps([it.source for it in items.values()]).encode("utf-8")  # storable in the plan
    with pytest.raises(ValueError, match="not valid UTF-8"):
        source.fetch(items["bad\\xff name.wav"])


def test_folder_end_to_end_accounts_for_links(odd_tree, tmp_path, tiny_codec_dir):
    out = tmp_path / "out"
    assert run(compose(_overrides("folder", str(odd_tree), out, tiny_codec_dir, "dataset.extensions=[wav,flac]"))) == 0
    assert {i for i, _ in read_rows(out)} == ODD_OK
    assert set(_failures(out)) == {"broken.wav"}
    stats = _stats(out)
    assert (stats["items"], stats["ok"], stats["failed"]) == (6, 5, 1)


# -------------------------------------------------------------------------------------------------- manifest


def _manifest_corpus(root: Path) -> list[str]:
    """Audio under root/audio plus the lines of an audiocraft manifest, good and bad, about it."""
    for i, name in enumerate(["a.wav", "sub/b.wav", "c d.wav"]):
        _write(root / "audio" / name, seconds=1.5 + i * 0.5, seed=i)
    good = [
        {"path": "audio/a.wav", "duration": 1.5, "sample_rate": SR, "genre": "rock", "bpm": 120,
         "description": "an a", "label": "L1"},
        {"path": "audio/sub/b.wav", "duration": 2.0, "sample_rate": SR, "moods": ["calm", "dark"]},
        {"path": str(root / "audio" / "c d.wav"), "duration": 2.5, "sample_rate": SR},
    ]
    lines = [json.dumps(g) for g in good]
    lines.insert(1, "")  # blank: not an item
    lines += ['{"path": "audio/a.wav"', '{"duration": 3.0}', '{"path": "audio/x.wav", "duration": "long"}',
              json.dumps(good[0]), "[1, 2]", '{"path": "audio/missing.wav", "duration": 1.0}']
    return lines


def test_manifest_jsonl_gz_every_line_is_an_item(tmp_path):
    lines = _manifest_corpus(tmp_path)
    manifest = tmp_path / "data.jsonl.gz"
    manifest.write_bytes(gzip.compress("\n".join(lines).encode()))
    source = ManifestSource(str(manifest))
    items = {it.id: it for it in source.list_items()}
    assert len(items) == sum(1 for line in lines if line.strip())
    a = items["audio/a.wav"]
    assert a.source == str(tmp_path / "audio" / "a.wav") and a.duration_s == 1.5
    assert a.metadata == {"genre": "rock", "bpm": 120, "description": "an a", "label": "L1"}
    assert items["audio/c d.wav"].duration_s == 2.5  # an absolute path under root gets a relative id
    assert source.fetch(a).data == a.source
    broken = {i: it for i, it in items.items() if i.startswith("data.jsonl.gz#L")}
    messages = {}
    for i, it in broken.items():
        with pytest.raises(ManifestError) as e:
            source.fetch(it)
        messages[int(i.rsplit("L", 1)[1])] = str(e.value)
    assert set(messages) == {5, 6, 7, 8, 9}
    assert "line 5: not valid JSON" in messages[5] and "no 'path' field" in messages[6]
    assert "duration 'long'" in messages[7] and "duplicate id 'audio/a.wav' (first on line 1)" in messages[8]
    assert "JSON list" in messages[9] and str(manifest) in messages[5]


def test_manifest_line_with_a_surrogate_fails_alone_naming_the_line(tmp_path):
    """``json.dumps`` writes a non-UTF-8 file name as a lone surrogate escape (``caf\\udce9.wav``): such a line
    stopped planning ('utf-8' codec can't encode). It fails on its own, named, like any malformed line; the
    other lines are items, and every listed id and source can be stored (the item list is UTF-8)."""
    _write(tmp_path / "good.wav")
    lines = [json.dumps({"path": "good.wav"}), json.dumps({"path": "caf\udce9.wav"}),
             json.dumps({"path": "good.wav", "title": "t\ud800"}, ensure_ascii=True)]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    source = ManifestSource(str(manifest))
    items = {it.id: it for it in source.list_items()}
    assert set(items) == {"good.wav", "data.jsonl#L2", "data.jsonl#L3"}
    for it in items.values():
        json.dumps([it.id, it.source, it.metadata], ensure_ascii=False).encode("utf-8")
    for number, field in ((2, "path"), (3, "title")):
        with pytest.raises(ManifestError, match=rf"line {number}: field '{field}' is not valid Unicode"):
            source.fetch(items[f"data.jsonl#L{number}"])


def test_manifest_csv_columns_root_and_bad_rows(tmp_path):
    for name in ("x.wav", "y.wav"):
        _write(tmp_path / "elsewhere" / name)
    manifest = tmp_path / "meta" / "list.csv"
    manifest.parent.mkdir()
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["key", "file", "genre", "bpm", "artist_country"], ["k1", "x.wav", "jazz", "90", "FR"],
                     ["k2", "y.wav", "", "", "DE"], ["k3", "z.wav", "pop", "1", "US", "extra cell"], ["", "y.wav"]])
    source = ManifestSource(str(manifest), root=str(tmp_path / "elsewhere"), path_column="file", id_column="key")
    items = {it.id: it for it in source.list_items()}
    assert set(items) == {"k1", "k2", "list.csv#L4", "list.csv#L5"}
    assert items["k1"].metadata == {"genre": "jazz", "bpm": "90", "artist_country": "FR"}
    assert items["k2"].metadata == {"artist_country": "DE"} and items["k2"].source == str(tmp_path / "elsewhere/y.wav")
    with pytest.raises(ManifestError, match="line 4: 6 cells, header has 5"):
        source.fetch(items["list.csv#L4"])
    with pytest.raises(ManifestError, match="line 5: no 'key' field"):
        source.fetch(items["list.csv#L5"])


def test_manifest_bom_crlf_and_ids_outside_root(tmp_path):
    inside, outside = _write(tmp_path / "m" / "in.wav"), _write(tmp_path / "out.wav")
    lines = [json.dumps({"path": "in.wav"}), json.dumps({"path": str(outside), "duration": None})]
    (tmp_path / "m" / "data.ndjson").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    items = ManifestSource(str(tmp_path / "m" / "data.ndjson")).list_items()
    assert [(it.id, it.source, it.duration_s) for it in items] == [(str(outside), str(outside), None),
                                                                   ("in.wav", str(inside), None)]


def test_manifest_end_to_end_metadata_and_failures(tmp_path, tiny_codec_dir):
    lines = _manifest_corpus(tmp_path)
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(lines))
    out = tmp_path / "out"
    assert run(compose(_overrides("manifest", str(manifest), out, tiny_codec_dir))) == 0
    rows = read_rows(out)
    assert {i for i, _ in rows} == {"audio/a.wav", "audio/sub/b.wav", "audio/c d.wav"}
    a = rows[("audio/a.wav", 0)]
    assert (a["genre"], a["bpm"], a["description"]) == ("rock", 120.0, "an a")
    assert json.loads(a["metadata"]) == {"label": "L1"}
    assert rows[("audio/sub/b.wav", 0)]["moods"] == ["calm", "dark"]
    failures = _failures(out)
    assert set(failures) == {f"data.jsonl#L{n}" for n in (5, 6, 7, 8, 9)} | {"audio/missing.wav"}
    assert failures["data.jsonl#L5"]["error_type"] == "ManifestError"
    assert "data.jsonl line 5" in failures["data.jsonl#L5"]["message"]
    stats = _stats(out)
    assert stats["items"] == sum(1 for line in lines if line.strip()) == stats["ok"] + stats["failed"]


# -------------------------------------------------------------------------------------------------------- hf


def _hf_rows(n: int, paths: list[str] | None = None) -> dict:
    paths = paths or [f"clip_{i}.wav" for i in range(n)]
    return {
        "audio": [{"bytes": _wav(1.0 + 0.25 * i, seed=10 + i), "path": paths[i]} for i in range(n)],
        "genre": [["rock", "pop"][i % 2] for i in range(n)],
        "bpm": [100.0 + i for i in range(n)],
        "moods": [["happy"] for _ in range(n)],
        "label": [i % 2 for i in range(n)],
        "year": [2000 + i for i in range(n)],
        "embedding": [[0.5, 0.25] for _ in range(n)],  # not scalar: left out by default
    }


def _hf_dataset(n: int, paths: list[str] | None = None):
    from datasets import Audio, ClassLabel, Dataset

    ds = Dataset.from_dict(_hf_rows(n, paths))
    # Cast (not encode) to Audio: encoding would need torchcodec; casting only re-labels the stored struct.
    return ds.cast_column("audio", Audio()).cast_column("label", ClassLabel(names=["vocal", "instrumental"]))


@pytest.fixture(scope="module")
def hf_data(tmp_path_factory) -> Path:
    """The same 5 train rows as hub-style Parquet (2 files, row groups of 2), as a save_to_disk DatasetDict,
    plus a 2-row test split."""
    from datasets import DatasetDict

    base = tmp_path_factory.mktemp("hf")
    train, test = _hf_dataset(5), _hf_dataset(2, ["t0.wav", "t1.wav"])
    (base / "parquet").mkdir()
    train.select(range(3)).to_parquet(str(base / "parquet" / "train-00000-of-00002.parquet"), batch_size=2)
    train.select(range(3, 5)).to_parquet(str(base / "parquet" / "train-00001-of-00002.parquet"), batch_size=2)
    test.to_parquet(str(base / "parquet" / "test-00000-of-00001.parquet"))
    DatasetDict({"train": train, "test": test}).save_to_disk(str(base / "disk"))
    return base


def _check_hf_items(source: HfSource, n: int = 5) -> None:
    items = source.list_items()
    assert [it.id for it in items] == [f"clip_{i}.wav" for i in range(n)]
    meta = items[3].metadata
    assert meta == {"genre": "pop", "bpm": 103.0, "moods": ["happy"], "label": "instrumental", "year": 2003}
    for i in (4, 0, 3):  # out of order: row-group and stream caches must find their way back
        fetched = source.fetch(items[i])
        audio = decode_audio(fetched.data, target_sr=SR)
        assert audio.samples.shape[-1] == round((1.0 + 0.25 * i) * SR)
        np.testing.assert_allclose(audio.samples[0], synth(1.0 + 0.25 * i, SR, 1, seed=10 + i)[0], atol=1e-4)


def test_hf_parquet_files_rows_metadata_and_pickling(hf_data):
    source = HfSource(str(hf_data / "parquet"))
    assert source.mode == "files"
    _check_hf_items(source)
    assert len(pickle.dumps(source)) < 2000  # settings only: workers reopen the files themselves
    test = HfSource(str(hf_data / "parquet"), split="test").list_items()
    assert [it.id for it in test] == ["t0.wav", "t1.wav"] and test[0].source.endswith("test-00000-of-00001.parquet[0]")
    one = HfSource(str(hf_data / "parquet" / "train-00001-of-00002.parquet"), metadata_columns=["genre"])
    assert [it.metadata for it in one.list_items()] == [{"genre": "pop"}, {"genre": "rock"}]
    with pytest.raises(ValueError, match="splits"):
        HfSource(str(hf_data / "parquet"), split="validation").list_items()


def test_hf_disk_arrow_and_stream(hf_data, tmp_path, monkeypatch):
    disk = HfSource(str(hf_data / "disk"))
    assert disk.mode == "disk"
    _check_hf_items(disk)
    arrow_files = HfSource(str(hf_data / "disk" / "train" / "*.arrow"))
    _check_hf_items(arrow_files)
    # The hub path, on a local directory: load_dataset (download + Arrow cache), and streaming.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    _check_hf_items(HfSource(str(hf_data / "parquet"), mode="hub"))
    _check_hf_items(HfSource(str(hf_data / "parquet"), streaming=True, mode="hub"))


def test_hf_ids_from_column_or_row_numbers(tmp_path):
    _hf_dataset(3, ["z.wav", "b.wav", "a.wav"]).to_parquet(str(tmp_path / "order.parquet"))
    kept = HfSource(str(tmp_path / "order.parquet")).list_items()
    assert [(it.id, it.index) for it in kept] == [("z.wav", 0), ("b.wav", 1), ("a.wav", 2)]  # row order, not id
    ds = _hf_dataset(3, ["same.wav"] * 3)
    ds.to_parquet(str(tmp_path / "data.parquet"))
    assert [it.id for it in HfSource(str(tmp_path / "data.parquet")).list_items()] == ["row-000000", "row-000001",
                                                                                        "row-000002"]
    by_year = HfSource(str(tmp_path / "data.parquet"), id_column="year").list_items()
    assert [it.id for it in by_year] == ["2000", "2001", "2002"] and "year" not in by_year[0].metadata
    with pytest.raises(ValueError, match="no column"):
        HfSource(str(tmp_path / "data.parquet"), audio_column="sound").list_items()


def test_hf_rows_with_a_repeated_or_empty_id_fail_alone(tmp_path, tiny_codec_dir):
    """With ``dataset.id_column``, a row whose id repeats an earlier row's, or is empty, is listed and fails with
    the reason (as a bad manifest line does); the run goes on and tokenizes the others."""
    ds = _hf_dataset(4).add_column("key", ["k0", "k1", "k0", ""])
    ds.to_parquet(str(tmp_path / "keyed.parquet"))
    out = tmp_path / "out"
    assert run(compose(_overrides("hf", str(tmp_path / "keyed.parquet"), out, tiny_codec_dir,
                                  "dataset.id_column=key"))) == 0
    assert {i for i, _ in read_rows(out)} == {"k0", "k1"}
    failures = _failures(out)
    assert set(failures) == {f"{tmp_path / 'keyed.parquet'}[2]", f"{tmp_path / 'keyed.parquet'}[3]"}
    messages = sorted(f["message"] for f in failures.values())
    assert "row 2 repeats id 'k0' (first on row 0" in messages[0] and "row 3 has no id" in messages[1]
    assert _stats(out)["ok"] == 2 and _stats(out)["failed"] == 2


def test_hf_audio_as_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write(tmp_path / "clips" / "p.wav", seconds=1.25)
    pq.write_table(pa.table({"file": ["clips/p.wav"], "text": ["hello"]}), tmp_path / "rows.parquet")
    source = HfSource(str(tmp_path / "rows.parquet"), audio_column="file")
    (item,) = source.list_items()
    assert (item.id, item.metadata) == ("clips/p.wav", {"text": "hello"})
    assert source.fetch(item).data == str(tmp_path / "clips" / "p.wav")


def test_hf_empty_audio_cell_is_an_empty_file(tmp_path):
    """0 bytes in the audio column fail as ``empty`` (README "Bad input"), like a 0-byte file, not as a row with
    no audio; 0 bytes beside a path still read the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.audio import EmptyFile, decode_audio

    _write(tmp_path / "clips" / "p.wav", seconds=1.0)
    cells = [{"bytes": b"", "path": None}, {"bytes": b"", "path": "clips/p.wav"}]
    pq.write_table(pa.table({"audio": cells}), tmp_path / "rows.parquet")
    source = HfSource(str(tmp_path / "rows.parquet"))
    empty, with_path = sorted(source.list_items(), key=lambda it: it.index)
    with pytest.raises(EmptyFile):
        decode_audio(source.fetch(empty).data, target_sr=32000)
    assert source.fetch(with_path).data == str(tmp_path / "clips" / "p.wav")


@pytest.mark.parametrize("where", ["parquet", "disk"])
def test_hf_end_to_end(hf_data, tmp_path, tiny_codec_dir, where):
    out = tmp_path / "out"
    assert run(compose(_overrides("hf", str(hf_data / where), out, tiny_codec_dir))) == 0
    rows = read_rows(out)
    assert {i for i, _ in rows} == {f"clip_{i}.wav" for i in range(5)}
    row = rows[("clip_3.wav", 0)]
    assert (row["genre"], row["bpm"], row["moods"]) == ("pop", 103.0, ["happy"])
    assert json.loads(row["metadata"]) == {"label": "instrumental", "year": 2003}
    assert row["source_sample_rate"] == SR and row["n_samples"] == round(1.75 * 32000)
    assert _stats(out)["ok"] == 5


def test_hf_name_that_is_neither_local_nor_on_the_hub(monkeypatch):
    """A misspelled local folder is taken for a Hub name; when the Hub cannot load it, the error says both readings
    in one line (a ValueError: the run stops with the message, not a traceback)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in CI: fail fast, as offline does
    with pytest.raises(ValueError, match=r"'my_dataset_typo' is no local path.*write it as \./my_dataset_typo"):
        HfSource("my_dataset_typo").list_items()


def test_hf_rename_a_caption_column_to_description(hf_data, tmp_path, tiny_codec_dir):
    """``dataset.rename`` maps a source's field onto a row column (a caption as MusicGen's ``description``); the
    renamed field leaves ``metadata``; the tokens are those of the run without it."""
    from datasets import load_from_disk

    ds = load_from_disk(str(hf_data / "disk"))["train"]
    captioned = ds.add_column("caption", [f"a {g} tune, take {i}" for i, g in enumerate(ds["genre"])])
    captioned.to_parquet(str(tmp_path / "captioned.parquet"))
    out = tmp_path / "out"
    assert run(compose(_overrides("hf", str(tmp_path / "captioned.parquet"), out, tiny_codec_dir,
                                  "dataset.rename={caption: description, year: released}"))) == 0
    rows = read_rows(out)
    row = rows[("clip_3.wav", 0)]
    assert row["description"] == "a pop tune, take 3" and row["genre"] == "pop"
    assert json.loads(row["metadata"]) == {"label": "instrumental", "released": 2003}
    plain = tmp_path / "plain"
    assert run(compose(_overrides("hf", str(hf_data / "parquet"), plain, tiny_codec_dir))) == 0
    reference = read_rows(plain)
    assert rows.keys() == reference.keys() and all(reference[k]["description"] is None for k in reference)
    assert all(np.array_equal(rows[k]["codes"], reference[k]["codes"]) for k in rows)


# --------------------------------------------------------------------------------------------------- s3 (moto)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3-compatible server (moto) on loopback with a bucket of audio, a sidecar and a manifest."""
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with moto_environment():  # spawned decode workers inherit it
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{server._port}"
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="music")
        manifest = [{"path": "a.wav", "genre": "folk"}, {"path": "s3://music/audio/sub dir/b.flac"},
                    {"path": "gone.wav"}]
        for key, body in [("audio/a.wav", _wav(1.5, 1)), ("audio/sub dir/b.flac", _wav(2.0, 2, "FLAC")),
                          ("audio/sub dir/b.json", json.dumps({"genre": "ambient", "mood_x": 1}).encode()),
                          ("audio/.hidden.wav", _wav(1.0, 3)), ("audio/readme.txt", b"hi"),
                          ("lists/data.jsonl", "".join(json.dumps(m) + "\n" for m in manifest).encode())]:
            client.put_object(Bucket="music", Key=key, Body=body)
        yield {"client_kwargs": {"endpoint_url": endpoint}}
        server.stop()


def test_s3_folder_and_manifest_listing_and_fetch(s3):
    folder = FolderSource("s3://music/audio/", ["wav", "flac"], storage_options=s3)
    items = folder.list_items()
    assert [(it.id, it.source) for it in items] == [("a.wav", "s3://music/audio/a.wav"),
                                                    ("sub dir/b.flac", "s3://music/audio/sub dir/b.flac")]
    fetched = folder.fetch(items[1])
    assert fetched.metadata == {"genre": "ambient", "mood_x": 1}
    assert decode_audio(fetched.data, target_sr=SR).samples.shape[-1] == 2 * SR
    manifest = ManifestSource("s3://music/lists/data.jsonl", root="s3://music/audio", storage_options=s3)
    assert [it.id for it in manifest.list_items()] == ["a.wav", "gone.wav", "sub dir/b.flac"]


def test_s3_hf_parquet(s3, hf_data):
    import boto3

    client = boto3.client("s3", endpoint_url=s3["client_kwargs"]["endpoint_url"])
    for f in sorted((hf_data / "parquet").glob("*.parquet")):
        client.upload_file(str(f), "music", f"hf/{f.name}")
    _check_hf_items(HfSource("s3://music/hf/train-*.parquet", storage_options=s3))
    _check_hf_items(HfSource("s3://music/hf", storage_options=s3))  # split picked by file name, as on the hub
    assert len(HfSource("s3://music/hf", split="test", storage_options=s3).list_items()) == 2


def test_s3_end_to_end(s3, tmp_path, tiny_codec_dir):
    options = f"dataset.storage_options={{client_kwargs: {{endpoint_url: '{s3['client_kwargs']['endpoint_url']}'}}}}"
    out = tmp_path / "folder"
    assert run(compose(_overrides("folder", "s3://music/audio", out, tiny_codec_dir, options))) == 0
    rows = read_rows(out)
    assert {i for i, _ in rows} == {"a.wav", "sub dir/b.flac"}
    assert rows[("sub dir/b.flac", 0)]["genre"] == "ambient"
    assert rows[("a.wav", 0)]["source"] == "s3://music/audio/a.wav"
    out = tmp_path / "manifest"
    assert run(compose(_overrides("manifest", "s3://music/lists/data.jsonl", out, tiny_codec_dir, options,
                                  "dataset.root=s3://music/audio"))) == 0
    rows = read_rows(out)
    assert {i for i, _ in rows} == {"a.wav", "sub dir/b.flac"} and rows[("a.wav", 0)]["genre"] == "folk"
    assert set(_failures(out)) == {"gone.wav"}


def test_build_source_kinds_and_bad_options(tmp_path):
    for kind in ("folder", "manifest", "hf"):
        compose([f"dataset={kind}", f"dataset.path={tmp_path}", "output.dir=x"])  # every shipped config composes
    cfg = compose(["dataset=folder", f"dataset.path={tmp_path}", "output.dir=x", "dataset.storage_options=3"])
    with pytest.raises(ValueError, match="storage_options must be a dict"):
        build_source(cfg.dataset)
    with pytest.raises(ValueError, match="unknown manifest format"):
        ManifestSource(str(_write(tmp_path / "a.wav")))
