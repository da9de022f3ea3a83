"""The README: its TOML examples name every trainer field with accepted values, and its pictures exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from trainer.config import _convert, _field_types
from trainer.drm_train import DRMTrainConfig
from trainer.grpo_train import GRPOConfig

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the pack itself runs on 3.10

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def readme_toml(name: str) -> dict:
    match = re.search(rf"```toml\n# {name}:.*?\n(.*?)```", README, re.S)
    assert match, f"README has no ```toml block starting with '# {name}:'"
    return tomllib.loads(match.group(1))


@pytest.mark.parametrize("name, cls", [("drm.toml", DRMTrainConfig), ("grpo.toml", GRPOConfig)])
def test_readme_toml_is_complete_and_typed(name, cls):
    values = readme_toml(name)
    fields = {f.name for f in dataclasses.fields(cls)} - {"resume"}  # resume is a flag for the command line
    assert set(values) == fields, f"missing {sorted(fields - set(values))}, unknown {sorted(set(values) - fields)}"
    kinds = _field_types(cls)
    cls(**{k: _convert(k, kinds[k], v) for k, v in values.items()})  # raises ConfigError on a mistyped value


def test_every_picture_the_readme_shows_exists():
    pictures = re.findall(r'(?:\]\(|src=")(docs/images/[^)"]+)', README)
    assert len(pictures) >= 10
    missing = [p for p in pictures if not (REPO / p).is_file()]
    assert not missing, missing
