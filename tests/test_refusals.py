"""Refusals that cannot be skipped, and damaged state refused in one line that names the file and the way out.

Each test starts from a real output folder made by a real small run (copied, then changed or damaged as a user, a
crash or a tool would), and runs the pipeline on it as a user does: the CLI where the message is the point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, base_overrides, compose, make_corpus
from pipeline.tokenize import run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root)
    return root


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory, tiny_codec_dir):
    """A finished output folder (3 units), made with the tiny fixture codec; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0
    return out


def _copy(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "out", symlinks=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.tokenize", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the message holds each of ``needles``; returns the output."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert needle in text, text[-3000:]
    return text


def _reopen_last_unit(out):
    sorted((out / "data").glob("*.parquet"))[-1].unlink()
    sorted((out / ".state" / "done").glob("unit-*.json"))[-1].unlink()


def _other_weights(tiny_codec_dir, tmp_path):
    """The fixture checkpoint with one conv weight scaled: another codec with the same architecture."""
    from safetensors.torch import load_file, save_file

    other = shutil.copytree(tiny_codec_dir, tmp_path / "other_codec")
    tensors = load_file(other / "model.safetensors")
    name = next(k for k in tensors if k.startswith("encoder.") and k.endswith("original1"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    return other


def test_a_finished_folder_checks_the_codec_weights(finished, corpus, tmp_path, tiny_codec_dir, monkeypatch):
    """A rerun of a finished folder with another checkpoint was told "nothing to encode", exit 0: the codec was
    never loaded, so its weights were never compared. Now they are, by the hash recorded for the same checkpoint
    files (no load when it is known), or by loading the codec."""
    import pipeline.codecs

    out = _copy(finished, tmp_path)
    before = sorted(p.name for p in (out / "data").iterdir())
    other = _other_weights(tiny_codec_dir, tmp_path)
    _refused(_cli(*base_overrides(corpus, out, other)), "codec.weights_sha256")
    assert sorted(p.name for p in (out / "data").iterdir()) == before

    # The same weights copied elsewhere are the same job (loaded once to learn their hash).
    assert run(compose(base_overrides(corpus, out, shutil.copytree(tiny_codec_dir, tmp_path / "copy")))) == 0

    # Loaded before (the module's run): the hash is known from the files, nothing is loaded.
    def no_load(*args, **kwargs):
        raise AssertionError("a finished folder with known weights loaded the codec")

    monkeypatch.setattr(pipeline.codecs, "load_codec", no_load)
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0


def test_a_resume_with_other_row_settings_is_refused(finished, corpus, tmp_path, tiny_codec_dir):
    """A folder planned with the default row settings resumed with others (exit 0, warned that it was "planned
    before row settings were part of the job", which was false), mixing units with and without ``title``."""
    from pipeline.plan import PlanMismatch, build_plan, check_same_job, fingerprint_detail

    out = _copy(finished, tmp_path)
    _reopen_last_unit(out)
    rows = ["dataset.sidecar_json=false", "dataset.rename={title: description}"]
    with pytest.raises(PlanMismatch, match="rows.sidecar_json"):
        run(compose(base_overrides(corpus, out, tiny_codec_dir, *rows)))
    assert len(list((out / "data").glob("*.parquet"))) == 2  # nothing written

    # Two launches at once: the second finds the first's plan just made (the same check, no older rules).
    plain, changed = (compose(base_overrides(corpus, out, tiny_codec_dir, *extra)) for extra in ([], rows))
    first, second = (build_plan([], cfg, fingerprint_detail(cfg, "cpu", "w"), {}) for cfg in (plain, changed))
    with pytest.raises(PlanMismatch, match="rows.rename"):
        check_same_job(first, second, out)


def test_a_cut_item_list_is_written_again(finished, corpus, tmp_path, tiny_codec_dir):
    """A cut ``items-<hash>.jsonl`` blocked every multi-rank launch for good (its other ranks read it; the first
    never wrote an existing one again): it is named as damaged, and the first rank writes it again."""
    from pipeline.layout import OutputLayout
    from pipeline.plan import PlanMismatch, load_items, load_plan

    out = _copy(finished, tmp_path)
    layout = OutputLayout(out)
    plan = load_plan(layout)
    items = out / ".state" / f"items-{plan.items_hash}.jsonl"
    items.write_bytes(items.read_bytes()[: items.stat().st_size // 2])
    with pytest.raises(PlanMismatch, match=f"items-{plan.items_hash}.jsonl is damaged.*rerun the same command"):
        load_items(layout, plan)  # what a rank other than the first reads
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0
    assert len(load_items(layout, plan)) == plan.n_items


def _damage(out, what):
    """Damage ``out`` as ``what`` says; returns the damaged path (relative) the message must name."""
    state = out / ".state"
    if what == "plan_empty":
        (state / "plan.json").write_bytes(b"")
    elif what == "plan_cut":
        (state / "plan.json").write_bytes((state / "plan.json").read_bytes()[:100])
    elif what == "plan_missing_key":
        plan = json.loads((state / "plan.json").read_text())
        del plan["items_hash"]
        (state / "plan.json").write_text(json.dumps(plan))
    elif what == "marker_cut":
        marker = state / "done" / "unit-00000.json"
        marker.write_bytes(marker.read_bytes()[:20])
        return marker
    elif what == "claim_dir":  # a unit left open, whose claim path is a folder
        _reopen_last_unit(out)
        (state / "claims" / "unit-00002").mkdir()
        return state / "claims" / "unit-00002"
    return state / "plan.json"


@pytest.mark.parametrize("what", ["plan_empty", "plan_cut", "plan_missing_key", "marker_cut", "claim_dir"])
def test_damaged_state_is_one_line_naming_the_file(finished, corpus, tmp_path, tiny_codec_dir, what):
    """Each gave a raw JSONDecodeError / TypeError / IsADirectoryError traceback that named no file."""
    out = _copy(finished, tmp_path)
    path = _damage(out, what)
    text = _refused(_cli(*base_overrides(corpus, out, tiny_codec_dir)), f"{path} is ")
    if what.startswith("plan"):
        assert "output.mode=overwrite" in text
    else:
        assert "delete it and rerun the same command" in text
    if what == "marker_cut":  # the way out it gives works: the unit is encoded again
        path.unlink()
        assert run(compose(base_overrides(corpus, out, tiny_codec_dir))) == 0
        stats = json.loads((out / "stats.json").read_text())
        assert stats["items"] == json.loads((out / ".state" / "plan.json").read_text())["n_items"]


def test_an_overwrite_replaces_a_damaged_plan(finished, corpus, tmp_path, tiny_codec_dir):
    """The way out a damaged plan is refused with: ``output.mode=overwrite`` does not read it first."""
    out = _copy(finished, tmp_path)
    (out / ".state" / "plan.json").write_bytes(b"{")
    assert run(compose(base_overrides(corpus, out, tiny_codec_dir, "output.mode=overwrite"))) == 0
    assert json.loads((out / ".state" / "plan.json").read_text())["n_items"] > 0


def test_a_read_only_output_with_logs_is_one_line(tmp_path):
    """A read-only output folder that has ``.logs`` already (any folder a run wrote to) failed in Hydra, making
    its run folder there, with a traceback; now the run's own one line says it is not writable."""
    out = tmp_path / "out"
    (out / ".logs").mkdir(parents=True)
    # A read-only mount as root can be: immutable folders (root ignores permission bits).
    if subprocess.run(["chattr", "+i", str(out / ".logs"), str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needed to make a folder read-only for root)")
    try:
        _refused(_cli("debug=default", f"output.dir={out}"), "is not writable")
    finally:
        subprocess.run(["chattr", "-i", str(out / ".logs"), str(out)], check=True)


def test_a_folder_that_is_not_a_pipeline_output_is_refused(corpus, tmp_path, tiny_codec_dir):
    """``output.mode=overwrite`` on a folder that was never this pipeline's output deleted the user's
    ``data/important.csv``, ``README.md`` and ``stats.json``; a resume wrote its card over their README.md."""
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    files = {out / "data" / "important.csv": "a,b\n1,2\n", out / "README.md": "# mine\n", out / "stats.json": "{}"}
    for path, text in files.items():
        path.write_text(text)
    with pytest.raises(ValueError, match="not this pipeline's output.*README.md, data/important.csv, stats.json"):
        run(compose(base_overrides(corpus, out, tiny_codec_dir, "output.mode=overwrite")))
    (out / "data" / "important.csv").unlink()
    (out / "stats.json").unlink()
    with pytest.raises(ValueError, match="not this pipeline's output.*README.md"):
        run(compose(base_overrides(corpus, out, tiny_codec_dir)))
    assert all(path.read_text() == text for path, text in files.items() if path.exists())
    assert (out / "README.md").exists() and not (out / ".state" / "plan.json").exists()


def test_what_the_pipeline_writes_before_its_plan_is_not_foreign(tmp_path):
    """Hydra's logs of this run, and what a launch killed before its plan leaves, do not make a folder foreign."""
    from pipeline.layout import OutputLayout
    from pipeline.prepare import _refuse_foreign_folder

    out = tmp_path / "out"
    layout = OutputLayout(out)
    layout.make_dirs()
    (out / ".logs" / "2026-01-01_00-00-00").mkdir(parents=True)
    (out / ".state" / "items-0123456789abcdef.jsonl").write_text("")
    _refuse_foreign_folder(layout)
    (out / "failures" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="failures/notes.txt"):
        _refuse_foreign_folder(layout)


def test_a_hub_id_is_identified_by_its_cached_snapshot(tmp_path, tiny_codec_dir, monkeypatch):
    """A Hub id resolves, without a network call, to its snapshot in the HF cache: its files (links to blobs) are
    what the weights hash is recorded under; a blob rewritten is another key, so no stale hash is read back."""
    import dataclasses

    import huggingface_hub.constants

    from pipeline.codecs.identity import cached_weights_sha256, checkpoint_folder, files_key, remember_weights_sha256
    from pipeline.config import CodecConfig

    monkeypatch.setenv("AUDIO_TOKENIZE_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo, commit = hub / "models--org--codec", "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for i, src in enumerate(sorted(tiny_codec_dir.iterdir())):
        shutil.copy(src, repo / "blobs" / f"blob{i}")
        (repo / "snapshots" / commit / src.name).symlink_to(repo / "blobs" / f"blob{i}")
    cfg = dataclasses.replace(CodecConfig(), pretrained="org/codec")
    assert checkpoint_folder(cfg) == repo / "snapshots" / commit
    assert cached_weights_sha256(cfg) is None  # never loaded: unknown
    remember_weights_sha256(cfg, files_key(checkpoint_folder(cfg)), "abc")
    assert cached_weights_sha256(cfg) == "abc"
    (repo / "blobs" / "blob0").write_bytes((repo / "blobs" / "blob0").read_bytes() + b" ")
    assert cached_weights_sha256(cfg) is None
    assert checkpoint_folder(dataclasses.replace(cfg, pretrained="org/not-cached")) is None
