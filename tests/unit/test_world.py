"""The shapes world and its oracle: the oracle must read rendered pictures back, and grade them sensibly."""

from __future__ import annotations

import pytest
import torch

from trainer.demo.world import (
    COLOURS,
    SHAPES,
    Scene,
    all_prompts,
    encode_prompts,
    judge,
    parse_prompt,
    random_scene,
    render,
)


def test_the_grammar_round_trips_and_refuses_what_it_does_not_know():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == len(SHAPES) * len(COLOURS) * (len(COLOURS) - 1)
    for p in prompts:
        shape, colour, background = parse_prompt(p)
        assert Scene(shape, colour, background).prompt == p
    for bad in ("a red circle on a red background", "a red hexagon on a blue background", "a red circle", ""):
        with pytest.raises(ValueError, match="grammar"):
            parse_prompt(bad)


def test_the_oracle_reads_every_prompt_back_from_random_scenes():
    gen = torch.Generator().manual_seed(0)
    scenes = [random_scene(gen, p) for p in all_prompts()]
    verdict = judge(render(scenes), [s.prompt for s in scenes])
    assert verdict.matches.all(), [(s.prompt, verdict.shape[i], verdict.colour[i], verdict.background[i])
                                   for i, s in enumerate(scenes) if not verdict.matches[i]]


def test_a_picture_of_another_prompt_does_not_match():
    scene = Scene("circle", "red", "blue")
    others = [Scene("square", "red", "blue"), Scene("triangle", "red", "blue"), Scene("circle", "green", "blue"),
              Scene("circle", "red", "white")]
    verdict = judge(render(others), [scene.prompt] * len(others))
    assert not verdict.matches.any()
    assert verdict.shape[:2] == ["square", "triangle"] and verdict.colour[2] == "green"
    assert verdict.background[3] == "white"


def test_quality_prefers_large_centred_clean_shapes():
    good = Scene("circle", "red", "blue", 0.5, 0.5, 0.35)
    small = Scene("circle", "red", "blue", 0.5, 0.5, 0.14)
    off_centre = Scene("circle", "red", "blue", 0.26, 0.3, 0.22)
    centred_mid = Scene("circle", "red", "blue", 0.5, 0.5, 0.22)
    images = render([good, small, off_centre, centred_mid])
    blurred = torch.nn.functional.avg_pool2d(images[:1], 5, stride=1, padding=2, count_include_pad=False)
    noisy = (images[:1] + 0.2 * torch.randn(images[:1].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    verdict = judge(torch.cat([images, blurred, noisy]), [good.prompt] * 6)
    q = verdict.quality
    assert q[0] > q[3] > q[1], "larger is better"
    assert q[3] > q[2], "centred is better"
    assert q[0] > q[4] and q[0] > q[5], "blur and noise are worse"
    assert ((q >= 0) & (q <= 1)).all()
    assert torch.equal(verdict.score, verdict.matches.float() + q)


def test_a_shape_touching_the_edge_loses_clearance():
    inside = Scene("square", "yellow", "green", 0.5, 0.5, 0.3)
    touching = Scene("square", "yellow", "green", 0.31, 0.5, 0.3)
    q = judge(render([inside, touching]), [inside.prompt] * 2).quality
    assert q[0] > q[1]


def test_an_empty_or_noise_picture_shows_nothing():
    gen = torch.Generator().manual_seed(1)
    plain = render([Scene("circle", "red", "blue", 0.5, 0.5, 0.0)])
    noise = torch.rand(1, 3, 64, 64, generator=gen)
    verdict = judge(torch.cat([plain, noise]), ["a red circle on a blue background"] * 2)
    assert not verdict.matches.any()
    assert verdict.shape[0] is None and verdict.quality[0] == 0


def test_preference_is_a_margin_on_the_score():
    good, bad = Scene("circle", "red", "blue"), Scene("square", "red", "blue")
    verdict = judge(render([good, bad, good]), [good.prompt] * 3)
    assert verdict.prefers(0, 1) is True and verdict.prefers(1, 0) is False and verdict.prefers(0, 2) is None


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="expected \\[B, 3, H, W\\]"):
        judge(torch.rand(1, 64, 64, 3), ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="one prompt per image"):
        judge(torch.rand(2, 3, 64, 64), ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="square pictures"):
        judge(torch.rand(1, 3, 64, 48), ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="NaN"):
        judge(torch.full((1, 3, 64, 64), float("nan")), ["a red circle on a blue background"])
    with pytest.raises(ValueError, match="grammar"):
        judge(torch.rand(1, 3, 64, 64), ["a cat"])


def test_the_text_encoder_is_fixed_and_tells_word_order():
    a = encode_prompts(["a red circle on a blue background", "a blue circle on a red background"])
    b = encode_prompts(["a red circle on a blue background", "a blue circle on a red background"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (2, 3, 4096) and a[1].shape == (2, 2048)
    assert not torch.allclose(a[0][0], a[0][1]) and not torch.allclose(a[1][0], a[1][1])
    assert 0.8 < float(a[0].std()) < 1.2 and 0.8 < float(a[1].std()) < 1.2


def test_an_oblong_shape_keeps_its_name_and_loses_quality():
    from trainer.demo.world import COLOURS, shape_mask

    fg, bg = torch.tensor(COLOURS["green"]).view(3, 1, 1), torch.tensor(COLOURS["white"]).view(3, 1, 1)
    images, prompts = [], []
    for shape in ("circle", "square", "triangle"):
        for half_y in (0.3, 0.2):
            cover = shape_mask(shape, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([0.3]), 64,
                               torch.tensor([half_y]))
            images.append(bg + (fg - bg) * cover)
            prompts.append(f"a green {shape} on a white background")
    verdict = judge(torch.stack(images), prompts)
    assert verdict.matches.all(), list(zip(prompts, verdict.shape))
    q = verdict.quality.view(3, 2)
    assert (q[:, 0] > q[:, 1]).all()
