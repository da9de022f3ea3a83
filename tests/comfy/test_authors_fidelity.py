"""What the DRM authors' code does (jjaxonx/DRM at 5c3c101), where ComfyUI does otherwise: T5 at 512 tokens for
their files, images squashed to 512x512, the VAE posterior sampled, prompts as plain text cut at 77 CLIP tokens.

Expected values come from the tools the authors use (Pillow, Hugging Face's tokenizers) or from the VAE's own
layers, not from the pack's code under test.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

OFFICIAL_FILE = "authors-official.safetensors"


@pytest.fixture(scope="module")
def official(nodes_mod, models_dir, to_official):
    """A tiny DRM in the authors' file layout (no metadata at all), loaded by DRM Loader."""
    from safetensors.torch import save_file

    from trainer.demo.tiny import tiny_drm_state_dict, tiny_generator_state_dict

    path = models_dir / "drm" / OFFICIAL_FILE
    save_file(to_official(tiny_drm_state_dict(tiny_generator_state_dict(), blocks=1), depth=2), str(path))
    try:
        yield nodes_mod.loader.DRMLoader.execute(OFFICIAL_FILE, "fp32").args[0]
    finally:
        path.unlink()


def conditioning(tokens: int, seed: int = 0) -> list:
    from trainer.demo.tiny import tiny_conditioning

    return tiny_conditioning(seed=seed, tokens=tokens)


def score_latent(nodes_mod, drm, samples, positive):
    return nodes_mod.score.DRMScoreLatent.execute(drm, {"samples": samples}, positive, "sigma", 0.0, 20, "simple",
                                                  20).args[0]


# ---- item 1: an official file is scored on prompts whose T5 part is 512 tokens ----

def test_an_official_file_refuses_comfyuis_77_token_t5_and_names_the_fix(nodes_mod, official):
    latent = torch.zeros(1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"154 tokens, but DRM authors-official.safetensors was trained on prompts "
                                         r"whose T5 part was padded to 512 tokens \(589 with CLIP's 77\)\. Pass the "
                                         r"CLIP through ComfyUI's T5TokenizerOptions node with min_length 512"):
        score_latent(nodes_mod, official, latent, conditioning(77 + 77))  # CLIPTextEncode's default
    (value,) = score_latent(nodes_mod, official, latent, conditioning(77 + 512))
    assert math.isfinite(value)


def test_an_official_file_warns_about_prompts_longer_than_the_authors_cut(nodes_mod, official, caplog):
    latent = torch.zeros(1, 16, 16, 16)
    with caplog.at_level(logging.WARNING):
        score_latent(nodes_mod, official, latent, conditioning(77 + 512))
    assert "trained on prompts cut" not in caplog.text
    with caplog.at_level(logging.WARNING):
        score_latent(nodes_mod, official, latent, conditioning(2 * 77 + 512))  # a second CLIP chunk
    assert "has 666 tokens; DRM authors-official.safetensors was trained on prompts cut at 77 CLIP and 512 T5" \
           in caplog.text


def test_grpo_refuses_a_77_token_prompt_bank_for_an_official_drm(official):
    from types import SimpleNamespace

    from trainer.grpo.evaluate import check_prompt_padding

    bank = SimpleNamespace(context=torch.zeros(2, 154, 4096), context_length=None)
    with pytest.raises(ValueError, match=r"prompts prompts\.txt has 154 tokens.*Pass --t5-length 512"):
        check_prompt_padding(official, [("prompts.txt", bank)])


def test_an_official_file_that_records_its_own_t5_length_keeps_it(models_dir, to_official):
    from safetensors.torch import save_file

    from drm.checkpoint import load_checkpoint
    from trainer.demo.tiny import tiny_drm_state_dict, tiny_generator_state_dict

    path = models_dir / "official-256.safetensors"
    save_file(to_official(tiny_drm_state_dict(tiny_generator_state_dict(), blocks=1), depth=2), str(path),
              {"drm.t5_length": "256"})
    try:
        assert load_checkpoint(path).metadata["drm.t5_length"] == "256"
    finally:
        path.unlink()


# ---- item 2: DRM Score Image squashes images to 512x512 for the authors' files ----

def authors_square(images: torch.Tensor, size: int = 512) -> torch.Tensor:
    """Each 8-bit image through Pillow's bicubic resize straight to size x size, as the authors' pipeline.py:204."""
    out = []
    for image in images:
        pil = Image.fromarray((image[..., :3] * 255).round().byte().numpy(), "RGB")
        out.append(torch.from_numpy(np.asarray(pil.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255))
    return torch.stack(out)


@pytest.fixture(scope="module")
def photos():
    """Two 8-bit RGBA images, 96 x 160 (not square), as Load Image gives them: values n / 255."""
    return torch.randint(0, 256, (2, 96, 160, 4), generator=torch.Generator().manual_seed(3)).float() / 255


def test_score_image_squashes_to_512_for_an_official_drm(nodes_mod, official, photos):
    from trainer.demo.synthetic import tiny_vae

    vae, positive = tiny_vae(), conditioning(77 + 512)
    scores = nodes_mod.score.DRMScoreImage.execute(official, photos, vae, positive).args[0]
    squashed = score_latent(nodes_mod, official, vae.encode(authors_square(photos)), positive)
    native = score_latent(nodes_mod, official, vae.encode(photos[..., :3]), positive)
    assert scores == pytest.approx(squashed, abs=1e-5)
    assert min(abs(a - b) for a, b in zip(squashed, native)) > 1e-4  # the resize changes the scores
    kept = nodes_mod.score.DRMScoreImage.execute(official, photos, vae, positive, resize="none").args[0]
    assert kept == pytest.approx(native, abs=1e-5)


def test_score_image_keeps_the_size_for_other_drms_unless_asked(nodes_mod, drm, photos):
    from trainer.demo.synthetic import tiny_vae

    vae, positive = tiny_vae(), conditioning(8)
    execute = nodes_mod.score.DRMScoreImage.execute
    native = score_latent(nodes_mod, drm, vae.encode(photos[..., :3]), positive)
    assert execute(drm, photos, vae, positive).args[0] == pytest.approx(native, abs=1e-5)
    scores, _, best_first, _ = execute(drm, photos, vae, positive, resize="512 square").args
    assert scores == pytest.approx(score_latent(nodes_mod, drm, vae.encode(authors_square(photos)), positive), abs=1e-5)
    assert best_first.shape == photos.shape  # the outputs are the images as they came in
    assert nodes_mod.score.DRMScoreImage.validate_inputs(resize="bogus").startswith("resize: 'bogus'")


# ---- item 4: the VAE posterior's std is kept, and latents can be drawn from it ----

def tiny_kl_vae(seed: int = 0):
    """A random-weight KL autoencoder with 16 latent channels (SD3's VAE in miniature) as a comfy.sd.VAE."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    model = AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".weight") and tensor.ndim > 1:
            state[name] = torch.randn(tensor.shape, generator=gen) / math.sqrt(math.prod(tensor.shape[1:]))
        elif name.endswith(".weight"):
            state[name] = torch.ones(tensor.shape)  # group-norm scales
        else:
            state[name] = torch.zeros(tensor.shape)
    return comfy.sd.VAE(sd=state, config={"params": {"ddconfig": ddconfig, "embed_dim": 16}}, dtype=torch.float32)


@pytest.fixture(scope="module")
def kl_vae(comfyui):
    return tiny_kl_vae()


@pytest.fixture
def records(tmp_path):
    from trainer.demo.synthetic import make_synthetic_dataset
    from trainer.reward.pairs import load_pairs

    return load_pairs(make_synthetic_dataset(tmp_path / "data", n_pairs=3, resolution=64, seed=0))


def fake_prompt(prompt):
    return torch.zeros(1, 8, 4096), torch.zeros(1, 2048)


def encode(records, vae, cache, **options):
    from trainer.reward.encoded import encode_pairs

    return encode_pairs(records, vae, fake_prompt, 64, cache, vae_id="tiny-kl", text_encoder_id="fake",
                        progress=False, **options)


@torch.no_grad()
def moments(vae, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [16, 8, 8] of the image's posterior, from the autoencoder's own encoder and quant_conv."""
    from trainer.reward.images import load_image

    model = vae.first_stage_model
    pixels = load_image(path, 64).permute(2, 0, 1)[None] * 2 - 1
    mean, logvar = model.quant_conv(model.encoder(pixels)).chunk(2, dim=1)
    return mean[0], torch.exp(0.5 * logvar.clamp(-30, 20))[0]


def test_encoding_keeps_the_posterior_std_and_latents_are_drawn_from_it(kl_vae, records, tmp_path):
    pairs = encode(records, kl_vae, tmp_path / "cache", vae_latent="sample")
    for i, record in enumerate(records):
        mean, std = moments(kl_vae, record.preferred)
        torch.testing.assert_close(pairs.preferred[i], mean, rtol=1e-4, atol=1e-5)  # ComfyUI's encode is the mean
        torch.testing.assert_close(pairs.preferred_std[i], std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pairs.rejected_std[i], moments(kl_vae, record.rejected)[1], rtol=1e-4, atol=1e-6)
    assert (pairs.preferred_std > 0).all() and pairs.preferred_std.std() > 0  # a real, varying std

    index = torch.tensor([2, 0])
    noise = torch.randn(2, 2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    drawn = pairs.latents(index, noise)
    expected = torch.cat([pairs.preferred[index] + pairs.preferred_std[index] * noise[0],
                          pairs.rejected[index] + pairs.rejected_std[index] * noise[1]])
    torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    assert torch.equal(pairs.latents(index), torch.cat([pairs.preferred[index], pairs.rejected[index]]))

    pairs.save(tmp_path / "pairs.safetensors")  # the std survives the file and subsets
    from trainer.reward.encoded import EncodedPairs

    again = EncodedPairs.load(tmp_path / "pairs.safetensors").subset([1])
    assert torch.equal(again.rejected_std[0], pairs.rejected_std[1])


def test_the_cache_serves_the_std_and_a_mean_only_entry_is_encoded_again(kl_vae, records, tmp_path):
    class Counting:
        def __init__(self, vae):
            self.vae, self.first_stage_model, self.images = vae, vae.first_stage_model, 0

        def encode(self, pixels):
            self.images += len(pixels)
            return self.vae.encode(pixels)

    vae = Counting(kl_vae)
    mean_only = encode(records, vae, tmp_path / "cache")
    assert mean_only.preferred_std is None and vae.images == 6
    sampled = encode(records, vae, tmp_path / "cache", vae_latent="sample")
    assert vae.images == 12  # the cache had no std: encoded again
    again = encode(records, vae, tmp_path / "cache", vae_latent="sample")
    assert vae.images == 12 and torch.equal(again.preferred_std, sampled.preferred_std)
    assert torch.equal(encode(records, vae, tmp_path / "cache").preferred, mean_only.preferred)


def test_sampling_refuses_a_vae_without_a_posterior_before_reading_images(records, tmp_path, comfyui):
    from trainer.demo.synthetic import tiny_vae

    with pytest.raises(ValueError, match=r"vae_latent: sample draws from the VAE's Gaussian posterior, and this VAE "
                                         r"\(TAESD\) has none"):
        encode(records, tiny_vae(), tmp_path / "cache", vae_latent="sample")
    assert not (tmp_path / "cache").exists()


# ---- item 5: prompts as plain text, CLIP cut at 77 tokens, T5 cut at t5_length ----

PROMPT = ("a (red:1.3) fox in (deep) snow, [masterpiece], " + "highly detailed fur and soft morning light, " * 80).strip()


class TokenOnlyCLIP:
    """ComfyUI's own SD3 tokenizer inside a comfy.sd.CLIP without text encoders; encode_from_tokens keeps the tokens."""

    def __init__(self):
        import comfy.sd
        from comfy.text_encoders.sd3_clip import SD3Tokenizer

        self.clip = comfy.sd.CLIP(no_init=True)
        self.clip.tokenizer, self.clip.tokenizer_options = SD3Tokenizer(), {}
        self.tokens = None

    def tokenize(self, text, **kwargs):
        return self.clip.tokenize(text, **kwargs)

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.tokens = tokens
        return torch.zeros(1, 8, 4096), torch.zeros(1, 2048)


def hf_ids(comfyui: Path, kind: str, text: str, length: int | None) -> list[int]:
    """The authors' tokenisation: Hugging Face's tokenizer padded and truncated to `length` (train.py:166-188;
    None: neither). ComfyUI ships the same vocabularies; CLIP-G pads with "!" (id 0), as SD3.5's tokenizer_2."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    if kind == "t5xxl":
        tokenizer = T5TokenizerFast.from_pretrained(comfyui / "comfy" / "text_encoders" / "t5_tokenizer")
    else:
        tokenizer = CLIPTokenizer.from_pretrained(comfyui / "comfy" / "sd1_tokenizer",
                                                  **({"pad_token": "!"} if kind == "g" else {}))
    if length is None:
        return tokenizer(text)["input_ids"]
    return tokenizer(text, padding="max_length", max_length=length, truncation=True)["input_ids"]


@pytest.mark.parametrize("t5_length", [512, 48])
def test_plain_prompts_are_tokenised_as_the_authors_tokenise_them(comfyui, t5_length):
    from trainer.reward.encoders import clip_prompt_encoder

    clip = TokenOnlyCLIP()
    clip_prompt_encoder(clip, t5_length, "plain")(PROMPT)
    tokens = clip.tokens
    assert len(hf_ids(comfyui, "t5xxl", PROMPT, None)) > 512  # the prompt is longer than every cut
    for kind, length in (("l", 77), ("g", 77), ("t5xxl", t5_length)):
        assert len(tokens[kind]) == 1, kind  # one chunk: nothing spills over
        assert [t for t, _ in tokens[kind][0]] == hf_ids(comfyui, kind, PROMPT, length), kind
        assert {w for _, w in tokens[kind][0]} == {1.0}, kind  # "(red:1.3)" is text, not a weight

    short = "a (red) fox"
    clip_prompt_encoder(clip, t5_length, "plain")(short)
    for kind, length in (("l", 77), ("g", 77), ("t5xxl", t5_length)):
        assert [t for t, _ in clip.tokens[kind][0]] == hf_ids(comfyui, kind, short, length), kind


def test_comfyui_prompts_stay_as_clip_text_encode_makes_them(comfyui):
    from trainer.reward.encoders import clip_prompt_encoder

    clip = TokenOnlyCLIP()
    clip_prompt_encoder(clip, 77)(PROMPT)
    assert clip.tokens == clip.clip.tokenize(PROMPT, tokenizer_options={"t5xxl_min_length": 77})
    assert len(clip.tokens["l"]) > 1 and 1.3 in {w for _, w in clip.tokens["l"][0]}  # what plain text avoids


def test_plain_prompts_have_their_own_cache_key():
    from trainer.reward.encoders import prompt_cache_id

    assert prompt_cache_id("sd35", 77) == "sd35:t5xxl_min_length=77"  # the key ComfyUI-parsed prompts always had
    assert prompt_cache_id("sd35", 512, "plain") != prompt_cache_id("sd35", 512)


# ---- the trainer's loop and its DRM file (trainer/reward/train.py) ----

def test_training_scores_latents_drawn_from_their_posterior(comfyui, tiny_generator):
    import comfy.latent_formats

    from drm.model import build_drm
    from trainer.demo.tiny import tiny_drm_state_dict
    from trainer.reward.encoded import EncodedPairs
    from trainer.reward.scoring import pair_scores

    gen = torch.Generator().manual_seed(4)
    mean = [torch.randn(3, 16, 8, 8, generator=gen) for _ in range(2)]
    std = [torch.rand(3, 16, 8, 8, generator=gen) for _ in range(2)]
    context, pooled = torch.randn(1, 8, 4096, generator=gen), torch.randn(1, 2048, generator=gen)
    stored = EncodedPairs(*mean, context, pooled, torch.zeros(3, dtype=torch.long), ["p"],
                          preferred_std=std[0], rejected_std=std[1])
    index, sigmas = torch.tensor([2, 0]), torch.tensor([0.3, 0.6])
    noise, posterior = torch.randn(2, 2, 16, 8, 8, generator=gen), torch.randn(2, 2, 16, 8, 8, generator=gen)
    drawn = EncodedPairs(*(m[index] + s[index] * p for m, s, p in zip(mean, std, posterior)), context, pooled,
                         torch.zeros(2, dtype=torch.long), ["p"])  # the samples, written out by hand
    drm = build_drm(tiny_drm_state_dict(tiny_generator[0]), blocks=1).eval()
    args = comfy.latent_formats.SD3(), torch.device("cpu"), False
    with torch.no_grad():
        sampled = pair_scores(drm, stored, index, sigmas, noise, *args, posterior)
        by_hand = pair_scores(drm, drawn, torch.arange(2), sigmas, noise, *args)
        at_mean = pair_scores(drm, stored, index, sigmas, noise, *args)
    for got, want, mean_score in zip(sampled, by_hand, at_mean):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - mean_score).abs().min() > 1e-4


def test_trainer_samples_the_posterior_only_with_a_std_to_sample_from(comfyui, tmp_path):
    from drm.files import atomic_save
    from trainer.__main__ import main
    from trainer.demo.synthetic import synthetic_latent_pairs
    from trainer.demo.tiny import tiny_generator_state_dict

    atomic_save(tiny_generator_state_dict(), tmp_path / "tiny-sd35.safetensors", {})
    pairs = synthetic_latent_pairs(12, seed=0)
    pairs.save(tmp_path / "mean.safetensors")
    pairs.preferred_std = torch.full_like(pairs.preferred, 0.05)
    pairs.rejected_std = torch.full_like(pairs.rejected, 0.05)
    pairs.save(tmp_path / "posterior.safetensors")

    def run(data: str, out: str) -> int:
        return main(["drm", "--base", str(tmp_path / "tiny-sd35.safetensors"), "--data", str(tmp_path / data),
                     "--out", str(tmp_path / out), "--precision", "fp32", "--batch-size", "4", "--max-steps", "2",
                     "--vae-latent", "sample"])

    assert run("mean.safetensors", "refused") == 2
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    assert run("posterior.safetensors", "sampled") == 0


def test_the_drm_file_says_how_its_prompts_and_images_were_read(comfyui, tiny_generator, tmp_path, caplog):
    from drm.model import build_drm
    from drm.runtime import load_drm
    from trainer.demo.tiny import tiny_drm_state_dict
    from trainer.reward.config import DRMTrainConfig
    from trainer.reward.train import write_drm

    drm = build_drm(tiny_drm_state_dict(tiny_generator[0]), blocks=1).eval()
    authors = DRMTrainConfig(data="pairs.jsonl", out=str(tmp_path / "a"), mode="full", resolution=64, t5_length=128,
                             prompt_text="plain", image_resize="squash")
    loaded = load_drm(write_drm(authors, drm, "tiny", 1, {}))
    assert loaded.image_size() == 64 and loaded.metadata["drm.t5_length"] == "128"
    with caplog.at_level(logging.WARNING):
        loaded.check_text_length(torch.zeros(1, 2 * 77 + 128, 4096))
    assert "was trained on prompts cut at 77 CLIP and 128 T5 tokens" in caplog.text

    ours = DRMTrainConfig(data="pairs.jsonl", out=str(tmp_path / "b"), mode="full", resolution=64)
    loaded = load_drm(write_drm(ours, drm, "tiny", 1, {}))
    assert loaded.image_size() is None and "drm.prompt_text" not in loaded.metadata
