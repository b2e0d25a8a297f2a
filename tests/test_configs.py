"""Every shipped config composes into a valid RunConfig; the CLI's help, --cfg and debug run work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import CONF, REPO, compose

GROUPS = ["dataset", "codec", "segment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_shipped_option_composes(group, option, tmp_path):
    overrides = [f"{group}={option}", f"output.dir={tmp_path}"]
    if group == "dataset" and option not in ("example",):
        overrides.append(f"dataset.path={tmp_path}")
    cfg = compose(overrides)
    cfg.validate()
    assert cfg.output.dir == str(tmp_path) or group == "debug"


def test_default_config_is_the_documented_one():
    cfg = compose([])
    assert cfg.codec.pretrained == "facebook/encodec_32khz" and cfg.codec.family == "encodec"
    assert (cfg.segment.kind, cfg.segment.length_s, cfg.channels) == ("window", 30.0, "mono")
    assert cfg.dataset.path.endswith("examples/audio")


def test_bad_values_fail_at_composition():
    with pytest.raises(ValueError, match="segment.kind"):
        compose(["segment.kind=slices"])
    with pytest.raises(Exception):  # the schema rejects a typo'd key
        compose(["segment.lenght_s=3"])


def _cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.tokenize", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_groups():
    out = _cli("--help").stdout
    for group in GROUPS:
        assert f"{group}:" in out


def test_cfg_job_prints_composed_config():
    out = _cli("--cfg", "job", "segment=clip", "output.dir=/x").stdout
    assert "kind: clip" in out and "dir: /x" in out


def test_debug_run_on_bundled_example(tmp_path):
    """The README's offline command, end to end through the CLI, from another working directory."""
    proc = _cli("debug=default", f"output.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["items"] == 5 and stats["ok"] == 4 and stats["skipped"] == 1
    assert "items       5 listed: 4 ok" in proc.stdout


def test_missing_hub_weights_stop_before_any_work(tmp_path):
    """Default codec, no hub access here: a clear message naming the local-directory way, and no output."""
    proc = _cli(f"output.dir={tmp_path / 'out'}", "codec.pretrained=facebook/this-model-is-not-cached",
                cwd=tmp_path)
    assert proc.returncode == 2
    assert "codec.pretrained=DIR" in proc.stderr + proc.stdout
    assert not (tmp_path / "out" / ".state").exists() and not (tmp_path / "out" / "data").exists()
