"""Shared fixtures. The fixture codecs are built once per machine (cached) and shared by the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_codec_dir() -> Path:
    """A ``save_pretrained`` directory of the tiny fixture EnCodec (32 kHz layout, hop 640, 4 x 2048 codes)."""
    from pipeline.codecs.testing import fixture_codec_dir

    return fixture_codec_dir("tiny")


@pytest.fixture(scope="session")
def full_codec_dir() -> Path:
    """The same, with the exact ``facebook/encodec_32khz`` architecture (~57M parameters, random fitted weights)."""
    from pipeline.codecs.testing import fixture_codec_dir

    return fixture_codec_dir("full")
