"""Preference-pair data without ComfyUI: pairs files, images, EncodedPairs files, splits, synthetic data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from trainer.demo.synthetic import (
    LATENT_MARGIN,
    PROMPTS,
    WARMTH_MARGIN,
    latent_rule_score,
    make_synthetic_dataset,
    synthetic_latent_pairs,
    warmth,
)
from trainer.reward.encoded import EncodedPairs, encode_pairs
from trainer.reward.encoders import clip_prompt_encoder
from trainer.reward.images import check_resolution, load_image
from trainer.reward.pairs import DatasetError, UnreadableImage, load_pairs


def write_jsonl(path, objects):
    path.write_text("\n".join(json.dumps(o) for o in objects) + "\n")
    return path


# --- pairs files ------------------------------------------------------------------------------


def test_load_pairs_jsonl_resolves_paths_against_the_file_folder(tmp_path):
    absolute = tmp_path / "elsewhere" / "x.png"
    (tmp_path / "data").mkdir()
    pairs = write_jsonl(tmp_path / "data" / "p.jsonl", [
        {"prompt": "a cat", "path1": "img/a.png", "path2": "img/b.png"},
        {"prompt": "a dog", "path1": str(absolute), "path2": "c.png", "confidence": 0.5, "extra": 1},
    ])
    records = load_pairs(pairs)
    assert [r.prompt for r in records] == ["a cat", "a dog"]
    assert records[0].preferred == tmp_path / "data" / "img" / "a.png"
    assert records[0].rejected == tmp_path / "data" / "img" / "b.png"
    assert records[1].preferred == absolute
    assert [r.confidence for r in records] == [None, 0.5]
    assert [r.line for r in records] == [1, 2]
    assert records[0].source == pairs


def test_load_pairs_json_list_records_the_line_of_each_pair(tmp_path):
    pairs = tmp_path / "p.json"
    pairs.write_text('[\n  {"prompt": "a", "path1": "1.png", "path2": "2.png"},\n\n'
                     '  {"prompt": "b",\n   "path1": "3.png", "path2": "4.png", "confidence": 1}\n]\n')
    records = load_pairs(pairs)
    assert [(r.prompt, r.line) for r in records] == [("a", 2), ("b", 4)]
    assert records[1].preferred == tmp_path / "3.png"
    assert records[1].confidence == 1.0


def test_confidence_filter_keeps_pairs_without_confidence(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "path1": "1.png", "path2": "2.png", "confidence": 0.2},
        {"prompt": "b", "path1": "1.png", "path2": "2.png"},
        {"prompt": "c", "path1": "1.png", "path2": "2.png", "confidence": 0.8},
    ])
    assert [r.prompt for r in load_pairs(pairs, min_confidence=0.5)] == ["b", "c"]
    assert len(load_pairs(pairs)) == 3


def test_filter_that_removes_everything_says_how_many_and_what_to_do(tmp_path):
    pairs = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "path1": "1.png", "path2": "2.png", "confidence": 0.2},
        {"prompt": "b", "path1": "1.png", "path2": "2.png", "confidence": 0.4},
    ])
    with pytest.raises(DatasetError) as info:
        load_pairs(pairs, min_confidence=0.9)
    message = str(info.value)
    assert "p.jsonl" in message and "read 2 pairs" in message and "removed all 2" in message
    assert "Lower min_confidence" in message


@pytest.mark.parametrize("line3, expected", [
    ('{"prompt": "c", "path1": "1.png"', "malformed JSON"),
    ('{"prompt": "c", "path1": "1.png"}', "path2"),
    ('{"prompt": 3, "path1": "1.png", "path2": "2.png"}', "'prompt' must be a string"),
    ('{"prompt": "c", "path1": "1.png", "path2": "2.png", "confidence": "high"}', "confidence"),
    ('["c", "1.png", "2.png"]', "expected a JSON object"),
])
def test_bad_jsonl_line_is_named_with_file_and_line(tmp_path, line3, expected):
    good = '{"prompt": "a", "path1": "1.png", "path2": "2.png"}'
    pairs = tmp_path / "bad.jsonl"
    pairs.write_text(f"{good}\n{good}\n{line3}\n{good}\n")
    with pytest.raises(DatasetError) as info:
        load_pairs(pairs)
    message = str(info.value)
    assert str(pairs) in message and "line 3" in message and expected in message


def test_bad_json_list_element_is_named_with_its_line(tmp_path):
    pairs = tmp_path / "bad.json"
    pairs.write_text('[\n{"prompt": "a", "path1": "1.png", "path2": "2.png"},\n{"prompt": "b"}\n]')
    with pytest.raises(DatasetError, match=r"bad\.json, line 3: missing key\(s\) path1, path2"):
        load_pairs(pairs)
    pairs.write_text('[\n{"prompt": "a", "path1": "1.png", "path2": "2.png"}\n{"prompt": "b"}\n]')
    with pytest.raises(DatasetError, match=r"bad\.json, line 3: malformed JSON"):
        load_pairs(pairs)


def test_empty_and_missing_pairs_files_are_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no pairs"):
        load_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(DatasetError, match="nope.jsonl cannot be read"):
        load_pairs(tmp_path / "nope.jsonl")


# --- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -16, 100, 8, 512.0, True, "512"])
def test_check_resolution_refuses_non_multiples_of_16(bad):
    with pytest.raises(ValueError, match="resolution"):
        check_resolution(bad)


def test_check_resolution_accepts_multiples_of_16():
    for good in (16, 64, 512, 1024):
        check_resolution(good)


def test_load_image_resizes_the_shorter_side_and_crops_the_center(tmp_path):
    # 96 wide x 32 high: thirds are red | green | blue; at 16 px only the green middle survives
    pixels = Image.new("RGB", (96, 32))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        pixels.paste(colour, (32 * i, 0, 32 * (i + 1), 32))
    pixels.save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 16)
    assert image.shape == (16, 16, 3) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert torch.allclose(image[4:12, 4:12], torch.tensor([0.0, 1.0, 0.0]).expand(8, 8, 3), atol=0.02)

    # grayscale and taller than wide: converted to RGB, top and bottom cropped
    tall = Image.new("L", (32, 96), 0)
    tall.paste(200, (0, 32, 32, 64))
    tall.save(tmp_path / "tall.png")
    image = load_image(tmp_path / "tall.png", 32)
    assert image.shape == (32, 32, 3)
    assert torch.allclose(image, torch.full((32, 32, 3), 200 / 255), atol=0.01)


def test_load_image_names_missing_and_broken_files(tmp_path):
    with pytest.raises(UnreadableImage, match="missing.png does not exist"):
        load_image(tmp_path / "missing.png", 16)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UnreadableImage, match="broken.png cannot be decoded"):
        load_image(tmp_path / "broken.png", 16)


# --- synthetic data ---------------------------------------------------------------------------


def test_synthetic_dataset_rule_holds_in_every_pair(tmp_path):
    pairs = make_synthetic_dataset(tmp_path, n_pairs=12, resolution=32, seed=3)
    records = load_pairs(pairs)
    assert len(records) == 12
    assert [r.prompt for r in records[:len(PROMPTS)]] == list(PROMPTS)
    assert any(r.confidence is not None for r in records) and any(r.confidence is None for r in records)
    assert len(load_pairs(pairs, min_confidence=1.01)) == sum(r.confidence is None for r in records)
    for r in records:
        preferred, rejected = load_image(r.preferred, 32), load_image(r.rejected, 32)
        assert warmth(preferred) - warmth(rejected) >= WARMTH_MARGIN - 0.01, r
        # the images differ in more than warmth: their textures are independent
        assert (preferred[..., 1] - rejected[..., 1]).abs().mean() > 0.02, r


def test_synthetic_dataset_is_deterministic(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_pairs=3, resolution=32, seed=1)
    b = make_synthetic_dataset(tmp_path / "b", n_pairs=3, resolution=32, seed=1)
    assert a.read_text() == b.read_text()
    for name in ("pair00002_a.png", "pair00002_b.png"):
        assert (a.parent / "images" / name).read_bytes() == (b.parent / "images" / name).read_bytes()


def test_synthetic_latent_pairs_are_deterministic_and_follow_the_rule():
    a, b = synthetic_latent_pairs(10, size=8, seed=5), synthetic_latent_pairs(10, size=8, seed=5)
    for name in ("preferred", "rejected", "context", "pooled", "prompt_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.preferred, synthetic_latent_pairs(10, size=8, seed=6).preferred)
    assert a.preferred.shape == (10, 16, 8, 8) and a.context.shape == (len(PROMPTS), 8, 4096)
    assert a.pooled.shape == (len(PROMPTS), 2048)
    assert (latent_rule_score(a.preferred) - latent_rule_score(a.rejected) >= LATENT_MARGIN - 1e-5).all()


# --- EncodedPairs files and splits ------------------------------------------------------------


def test_encoded_pairs_save_load_round_trip(tmp_path):
    pairs = synthetic_latent_pairs(5, size=4, seed=0)
    pairs.skipped = 2
    pairs.save(tmp_path / "enc.safetensors")
    loaded = EncodedPairs.load(tmp_path / "enc.safetensors")
    for name in ("preferred", "rejected", "context", "pooled", "prompt_index"):
        assert torch.equal(getattr(loaded, name), getattr(pairs, name)), name
    assert loaded.prompts == pairs.prompts and loaded.skipped == 2 and len(loaded) == 5


def test_hand_written_file_in_the_documented_layout_loads(tmp_path):
    from safetensors.torch import save_file

    save_file({"preferred": torch.zeros(3, 16, 4, 4, dtype=torch.float16),
               "rejected": torch.ones(3, 16, 4, 4, dtype=torch.float16),
               "context": torch.zeros(2, 5, 4096), "pooled": torch.zeros(2, 2048),
               "prompt_index": torch.tensor([0, 1, 1], dtype=torch.int32)}, tmp_path / "user.safetensors")
    loaded = EncodedPairs.load(tmp_path / "user.safetensors")
    assert loaded.preferred.dtype == torch.float32 and loaded.prompt_index.dtype == torch.long
    assert loaded.prompts == ["", ""] and loaded.prompt_index.tolist() == [0, 1, 1]


def bad_file_cases():
    good = {"preferred": torch.zeros(3, 16, 4, 4), "rejected": torch.zeros(3, 16, 4, 4),
            "context": torch.zeros(2, 5, 64), "pooled": torch.zeros(2, 32), "prompt_index": torch.tensor([0, 1, 1])}
    nan = dict(good, rejected=torch.full((3, 16, 4, 4), float("nan")))
    return [
        ({k: v for k, v in good.items() if k != "pooled"}, "lacks tensor(s) pooled"),
        (dict(good, rejected=torch.zeros(2, 16, 4, 4)), "preferred and rejected"),
        (dict(good, prompt_index=torch.tensor([0, 1, 2])), "outside 0..1"),
        (dict(good, prompt_index=torch.tensor([0.0, 1.0, 1.0])), "expected integers"),
        (dict(good, pooled=torch.zeros(3, 32)), "same P"),
        (nan, "rejected holds NaN"),
        ({k: v[:0] if k in ("preferred", "rejected", "prompt_index") else v for k, v in good.items()},
         "holds no pairs"),
    ]


@pytest.mark.parametrize("tensors, expected", bad_file_cases())
def test_bad_encoded_pairs_files_are_named_and_explained(tmp_path, tensors, expected):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with pytest.raises(DatasetError) as info:
        EncodedPairs.load(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_missing_truncated_and_pickled_encoded_pairs_files_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        EncodedPairs.load(tmp_path / "nope.safetensors")
    synthetic_latent_pairs(2, size=4).save(tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.safetensors is not a readable safetensors file"):
        EncodedPairs.load(tmp_path / "cut.safetensors")
    torch.save({"preferred": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    with pytest.raises(DatasetError, match="pickle.safetensors is not a readable safetensors file"):
        EncodedPairs.load(tmp_path / "pickle.safetensors")


def rows(pairs):
    return {tuple(row.flatten()[:4].tolist()) for row in pairs.preferred}


def test_split_is_deterministic_and_disjoint():
    pairs = synthetic_latent_pairs(20, size=4, seed=0)
    train, held = pairs.split(0.25, seed=7)
    again_train, again_held = pairs.split(0.25, seed=7)
    assert len(train) == 15 and len(held) == 5
    assert torch.equal(train.preferred, again_train.preferred) and torch.equal(held.preferred, again_held.preferred)
    assert rows(train).isdisjoint(rows(held))
    assert rows(train) | rows(held) == rows(pairs)
    # pairs keep their prompt: the held-out part indexes the same conditioning rows
    original = {tuple(r.flatten()[:4].tolist()): int(i) for r, i in zip(pairs.preferred, pairs.prompt_index)}
    assert all(original[tuple(r.flatten()[:4].tolist())] == int(i) for r, i in zip(held.preferred, held.prompt_index))
    assert any(rows(pairs.split(0.25, seed=other)[1]) != rows(held) for other in range(8, 12))  # the seed matters


def test_split_refuses_fractions_that_leave_no_training_data():
    pairs = synthetic_latent_pairs(4, size=4)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="holdout_fraction"):
            pairs.split(bad, seed=0)
    train, held = pairs.split(0.0, seed=0)
    assert len(train) == 4 and len(held) == 0
    train, held = pairs.split(0.9, seed=0)  # every prompt but one at most
    assert len(train) >= 1 and len(held) == 3


def test_split_is_by_prompt():
    """No prompt (and so none of its pairs' images) is on both sides; the held-out part is about the fraction."""
    pairs = synthetic_latent_pairs(40, size=4, seed=1)  # 4 prompts, 10 pairs each
    train, held = pairs.split(0.1, seed=3)
    assert set(train.prompt_index.tolist()).isdisjoint(held.prompt_index.tolist())
    assert len(held) == 10 and len(train) == 30  # one prompt is the least that holds 10% out
    one_prompt = pairs.subset(torch.nonzero(pairs.prompt_index == 0).flatten())
    with pytest.raises(ValueError, match="share one prompt"):
        one_prompt.split(0.1)


# --- encoding guards that need no real VAE (the comfy tier encodes with one) ----------------------


def test_nan_latents_from_the_vae_are_refused_and_not_cached(tmp_path):
    class NanVAE:
        def encode(self, pixels):
            return torch.full((len(pixels), 16, 2, 2), float("nan"))

    records = load_pairs(make_synthetic_dataset(tmp_path / "data", n_pairs=2, resolution=16))
    with pytest.raises(ValueError, match="NaN or infinite latents.*pair00000_a.png"):  # one `error:` line, exit 2
        encode_pairs(records, NanVAE(), lambda p: (torch.zeros(1, 2, 8), torch.zeros(1, 4)), 16,
                     tmp_path / "cache", vae_id="nan", text_encoder_id="zeros", progress=False)
    assert not (tmp_path / "cache").exists()


def test_encode_pairs_refuses_bad_options_before_any_work(tmp_path):
    records = load_pairs(make_synthetic_dataset(tmp_path / "data", n_pairs=1, resolution=16))
    for options, expected in [({"on_bad_image": "ignore"}, "on_bad_image"), ({"batch_size": 0}, "batch_size"),
                              ({"resolution": 20}, "resolution")]:
        arguments = dict(records=records, vae=None, encode_prompt=None, resolution=16, cache_dir=tmp_path / "cache",
                         vae_id="v", text_encoder_id="t") | options
        with pytest.raises(ValueError, match=expected):
            encode_pairs(**arguments)
    assert not (tmp_path / "cache").exists()


# --- prompt encoder adapter -------------------------------------------------------------------


def test_clip_prompt_encoder_tokenizes_then_encodes_with_pooled_output():
    class FakeClip:
        def __init__(self):
            self.calls = []

        def tokenize(self, text, tokenizer_options=None):
            self.calls.append(("tokenize", text, tokenizer_options))
            return {"tokens": text}

        def encode_from_tokens(self, tokens, return_pooled=False):
            self.calls.append(("encode", tokens, return_pooled))
            return torch.ones(1, 3, 8), torch.zeros(1, 4)

    clip = FakeClip()
    context, pooled = clip_prompt_encoder(clip)("a cat")
    assert clip.calls == [("tokenize", "a cat", {"t5xxl_min_length": 77}), ("encode", {"tokens": "a cat"}, True)]
    assert context.shape == (1, 3, 8) and pooled.shape == (1, 4)
    clip_prompt_encoder(clip, t5_length=512)("a dog")
    assert clip.calls[-2] == ("tokenize", "a dog", {"t5xxl_min_length": 512})
