"""Encoding preference pairs through a real comfy.sd.VAE (a tiny random TAESD) with a fake prompt encoder."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from trainer.demo.synthetic import make_synthetic_dataset, tiny_vae
from trainer.reward.encoded import EncodedPairs, encode_pairs
from trainer.reward.images import load_image
from trainer.reward.pairs import DatasetError, load_pairs

RESOLUTION = 64


class CountingVAE:
    """Wraps a comfy VAE and counts the images it encodes."""

    def __init__(self, vae):
        self.vae, self.images = vae, 0

    def encode(self, pixels):
        self.images += len(pixels)
        return self.vae.encode(pixels)


class FakePromptEncoder:
    """Deterministic SD3-shaped conditioning from a hash of the prompt; token count varies with the prompt."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt):
        self.calls += 1
        seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        gen = torch.Generator().manual_seed(seed)
        tokens = 6 + len(prompt) % 3
        return torch.randn(1, tokens, 4096, generator=gen), torch.randn(1, 2048, generator=gen)


@pytest.fixture(scope="module")
def vae(comfyui):
    return tiny_vae(seed=0)


@pytest.fixture
def dataset(tmp_path):
    return load_pairs(make_synthetic_dataset(tmp_path / "data", n_pairs=6, resolution=RESOLUTION, seed=0))


def encode(records, vae, encoder, cache_dir, **kwargs):
    options = dict(vae_id="tiny-taesd", text_encoder_id="fake", progress=False, batch_size=4)
    return encode_pairs(records, vae, encoder, RESOLUTION, cache_dir, **(options | kwargs))


def test_encode_pairs_shapes_and_pair_order(vae, dataset, tmp_path):
    encoder = FakePromptEncoder()
    result = encode(dataset, CountingVAE(vae), encoder, tmp_path / "cache")
    assert len(result) == 6 and result.skipped == 0
    assert result.preferred.shape == (6, 16, 8, 8) and result.rejected.shape == (6, 16, 8, 8)
    assert result.preferred.dtype == torch.float32
    assert result.pooled.shape == (4, 2048) and encoder.calls == 4
    assert [result.prompts[i] for i in result.prompt_index] == [r.prompt for r in dataset]
    # pair i holds the latents of its own images, in VAE space (what vae.encode returns)
    direct = vae.encode(torch.stack([load_image(dataset[2].preferred, RESOLUTION),
                                     load_image(dataset[2].rejected, RESOLUTION)]))
    assert torch.allclose(result.preferred[2], direct[0], atol=1e-5)
    assert torch.allclose(result.rejected[2], direct[1], atol=1e-5)
    assert not torch.allclose(result.preferred[2], result.rejected[2], atol=1e-3)


def test_contexts_of_different_lengths_are_right_padded_with_zeros(vae, dataset, tmp_path):
    result = encode(dataset, vae, FakePromptEncoder(), None)
    lengths = [6 + len(p) % 3 for p in result.prompts]
    assert len(set(lengths)) > 1, "the fake encoder should give different token counts"
    assert result.context.shape == (4, max(lengths), 4096)
    for row, (prompt, length) in enumerate(zip(result.prompts, lengths)):
        assert torch.equal(result.context[row, :length], FakePromptEncoder()(prompt)[0][0])
        assert (result.context[row, length:] == 0).all()


def test_second_run_is_served_from_the_cache(vae, dataset, tmp_path):
    first = encode(dataset, CountingVAE(vae), FakePromptEncoder(), tmp_path / "cache")
    counting, encoder = CountingVAE(vae), FakePromptEncoder()
    second = encode(dataset, counting, encoder, tmp_path / "cache")
    assert counting.images == 0 and encoder.calls == 0
    for name in ("preferred", "rejected", "context", "pooled", "prompt_index"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert second.prompts == first.prompts


def test_cache_keys_follow_the_file_and_the_model_ids(vae, dataset, tmp_path):
    encode(dataset, vae, FakePromptEncoder(), tmp_path / "cache")
    touched = dataset[1].rejected
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    counting, encoder = CountingVAE(vae), FakePromptEncoder()
    encode(dataset, counting, encoder, tmp_path / "cache")
    assert counting.images == 1 and encoder.calls == 0
    counting, encoder = CountingVAE(vae), FakePromptEncoder()
    encode(dataset, counting, encoder, tmp_path / "cache", vae_id="other-vae", text_encoder_id="other-te")
    assert counting.images == 12 and encoder.calls == 4


def test_missing_image_stops_with_image_file_and_line(vae, dataset, tmp_path):
    dataset[4].rejected.unlink()
    with pytest.raises(DatasetError) as info:
        encode(dataset, vae, FakePromptEncoder(), tmp_path / "cache", batch_size=2)
    message = str(info.value)
    assert dataset[4].rejected.name in message and "pairs.jsonl line 5" in message and "on_bad_image" in message
    # images before the bad one were cached, each as a complete file, and nothing half-written is left
    files = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(files) == 8
    assert all(p.suffix == ".safetensors" for p in files)
    direct = vae.encode(load_image(dataset[0].preferred, RESOLUTION)[None])[0]
    cached = [load_file(p)["latent"] for p in files]
    assert any(torch.allclose(c, direct, atol=1e-5) for c in cached)


def test_skip_drops_exactly_the_pairs_with_bad_images(vae, dataset, tmp_path, caplog):
    full = encode(dataset, vae, FakePromptEncoder(), None)
    dataset[3].preferred.write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="trainer.reward.encoded"):
        result = encode(dataset, vae, FakePromptEncoder(), tmp_path / "cache", on_bad_image="skip")
    assert len(result) == 5 and result.skipped == 1
    kept = [0, 1, 2, 4, 5]
    assert torch.allclose(result.preferred, full.preferred[kept], atol=1e-5)
    assert torch.allclose(result.rejected, full.rejected[kept], atol=1e-5)
    assert [result.prompts[i] for i in result.prompt_index] == [dataset[i].prompt for i in kept]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "line 4" in warnings[0] and dataset[3].preferred.name in warnings[0]


def test_encoded_pairs_file_round_trip_after_encoding(vae, dataset, tmp_path):
    result = encode(dataset, vae, FakePromptEncoder(), None)
    result.save(tmp_path / "pairs.safetensors")
    loaded = EncodedPairs.load(tmp_path / "pairs.safetensors")
    assert torch.equal(loaded.preferred, result.preferred) and loaded.prompts == result.prompts


def test_a_write_that_dies_halfway_leaves_no_cache_file(vae, dataset, tmp_path, monkeypatch):
    import drm.files

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a safetensors header")
        raise OSError("disk full")

    monkeypatch.setattr(drm.files, "save_file", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        encode(dataset, vae, FakePromptEncoder(), tmp_path / "cache")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []

