"""The README: its TOML examples name every trainer field with accepted values, and its pictures exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.grpo.config import GRPOConfig
from trainer.reward.config import DRMTrainConfig

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
    fields = set(cls.model_fields) - {"resume"}  # resume is a flag for the command line
    assert set(values) == fields, f"missing {sorted(fields - set(values))}, unknown {sorted(set(values) - fields)}"
    cls(**values)  # raises ConfigError on a mistyped value


@pytest.mark.parametrize("name, cls", [("drm.toml", DRMTrainConfig), ("grpo.toml", GRPOConfig)])
def test_readme_toml_marks_every_value_that_is_not_the_default(name, cls):
    """The blocks say they hold the defaults; a value that is not one is marked "example" on its line
    (required paths, empty by default, need no mark)."""
    block = re.search(rf"```toml\n# {name}:.*?\n(.*?)```", README, re.S).group(1)
    lines = {line.split("=")[0].strip(): line for line in block.splitlines() if re.match(r"\w+ *=", line)}
    defaults = cls()
    unmarked = [f"{key} = {value!r} (default {getattr(defaults, key)!r})"
                for key, value in readme_toml(name).items()
                if getattr(cls(**{key: value}), key) != getattr(defaults, key) and getattr(defaults, key) != ""
                and "example" not in lines[key]]
    assert not unmarked, unmarked


def test_every_picture_the_readme_shows_exists():
    pictures = re.findall(r'(?:\]\(|src=")(docs/images/[^)"]+)', README)
    assert len(pictures) >= 10
    missing = [p for p in pictures if not (REPO / p).is_file()]
    assert not missing, missing


PLOTS = {"reward trace": "the step-wise sampler's trace_plot",
         "DRM accuracy by noise level": "the demo's figures/drm_accuracy_by_sigma.png"}


def white_fraction(path: Path) -> float:
    """Share of near-white pixels: a matplotlib figure is mostly white, a sample (noise or not) is not."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"))
    return float((pixels.min(axis=-1) >= 250).mean())


@pytest.mark.parametrize("alt", sorted(PLOTS))
def test_every_picture_the_readme_calls_a_plot_is_one(alt):
    match = re.search(rf"!\[{alt}\]\((docs/images/[^)]+)\)", README)
    assert match, f"the README shows no picture called {alt!r} ({PLOTS[alt]})"
    assert white_fraction(REPO / match.group(1)) > 0.5, f"{match.group(1)} is not a plot"


def test_the_reward_trace_picture_is_the_file_the_tool_writes_for_the_trace_plot():
    """tools/build_workflows.py names each image after its SaveImage prefix: the one fed by trace_plot."""
    import json

    workflow = json.loads((REPO / "workflows" / "api" / "drm_stepwise_vs_ksampler.json").read_text(encoding="utf-8"))
    sampler = next(k for k, v in workflow.items() if v["class_type"] == "DRMStepwiseKSampler")
    save = next(v for v in workflow.values() if v["class_type"] == "SaveImage" and v["inputs"]["images"] == [sampler, 3])
    expected = f"docs/images/drm_stepwise_vs_ksampler-{save['inputs']['filename_prefix'].split('/')[-1]}-0.png"
    assert f"![reward trace]({expected})" in README
