"""The DRM authors' choices (jjaxonx/DRM at 5c3c101) as `trainer drm` options, where no ComfyUI is needed: training
images squashed as their dataset.py reads them, latents drawn from a stored posterior, and the settings' names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import ConfigError
from trainer.reward.config import DRMTrainConfig
from trainer.reward.encoded import EncodedPairs
from trainer.reward.images import load_image
from trainer.reward.pairs import DatasetError, UnreadableImage

SIZE = 16


def authors_read(path, size: int = SIZE) -> np.ndarray:
    """The authors' dataset.py:79-80 reading of an image file, then ToTensor's / 255: Pillow's RGB conversion and
    its bicubic resize straight to the square, in 8 bits."""
    return np.asarray(Image.open(path).convert("RGB").resize((size, size), resample=Image.BICUBIC), np.float32) / 255


@pytest.fixture
def transparent_png(tmp_path):
    """A 40 x 24 RGBA image: random colours, and a left half that is fully transparent over pure red."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0, 0)
    pixels[:, 20:, 3] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def test_squash_reads_an_image_as_the_authors_dataset_does(transparent_png):
    squashed = load_image(transparent_png, SIZE, "squash")
    assert squashed.dtype == torch.float32 and squashed.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(squashed.numpy(), authors_read(transparent_png))
    # the alpha is dropped: the transparent half shows the red stored under it, where crop composites over white
    assert squashed[:, 0].tolist() == [[1.0, 0.0, 0.0]] * SIZE
    assert load_image(transparent_png, SIZE)[:, 0].tolist() == [[1.0, 1.0, 1.0]] * SIZE


def test_squash_keeps_the_whole_picture_where_crop_cuts_its_sides(tmp_path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :16] = 255  # a white left quarter, which a centre crop of the 32 x 32 middle loses
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    assert load_image(tmp_path / "wide.png", SIZE, "squash")[:, 0].min() > 0.99
    assert load_image(tmp_path / "wide.png", SIZE)[:, 0].max() < 0.1  # black, but for the filter's overshoot


def test_squash_ignores_the_exif_rotation_as_the_authors_do(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to show"
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    np.testing.assert_array_equal(load_image(tmp_path / "rotated.jpg", SIZE, "squash").numpy(),
                                  authors_read(tmp_path / "rotated.jpg"))


def test_squash_refuses_16_bit_grey_which_the_8_bit_conversion_would_clip(tmp_path):
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(UnreadableImage, match=r"deep\.png is I;16.*clips such values to white.*image_resize = crop"):
        load_image(tmp_path / "deep.png", SIZE, "squash")
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(tmp_path / "deep.png", SIZE, "stretch")


def pairs(with_std: bool = True) -> EncodedPairs:
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(3, 16, 4, 4, generator=gen) for _ in range(2)]
    stds = [torch.rand(3, 16, 4, 4, generator=gen) + 0.1 for _ in range(2)] if with_std else [None, None]
    return EncodedPairs(*latents, torch.randn(2, 5, 4096, generator=gen), torch.randn(2, 2048, generator=gen),
                        torch.tensor([0, 1, 0]), ["a", "b"], preferred_std=stds[0], rejected_std=stds[1])


def test_latents_are_the_mean_or_a_draw_from_the_stored_posterior(tmp_path):
    data = pairs()
    index, noise = torch.tensor([1, 2]), torch.randn(2, 2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = torch.cat([data.preferred[index] + data.preferred_std[index] * noise[0],
                          data.rejected[index] + data.rejected_std[index] * noise[1]])
    assert torch.equal(data.latents(index, noise), expected)
    assert torch.equal(data.latents(index), torch.cat([data.preferred[index], data.rejected[index]]))
    data.save(tmp_path / "pairs.safetensors")
    loaded = EncodedPairs.load(tmp_path / "pairs.safetensors")
    assert torch.equal(loaded.preferred_std, data.preferred_std) and torch.equal(loaded.rejected_std, data.rejected_std)
    train, held = loaded.split(0.3)
    assert torch.equal(held.latents(torch.arange(len(held)), torch.zeros(2, len(held), 16, 4, 4)),
                       held.latents(torch.arange(len(held))))


def test_a_draw_needs_a_std_and_both_stds_go_together():
    without = pairs(with_std=False)  # the layout from before: no std at all
    with pytest.raises(DatasetError, match="vae_latent = sample needs each latent's posterior std"):
        without.latents(torch.tensor([0]), torch.zeros(2, 1, 16, 4, 4))
    data = pairs()
    with pytest.raises(DatasetError, match="preferred_std and rejected_std must both be given"):
        EncodedPairs(data.preferred, data.rejected, data.context, data.pooled, data.prompt_index, data.prompts,
                     preferred_std=data.preferred_std)


@pytest.mark.parametrize(("key", "authors"), [("image_resize", "squash"), ("vae_latent", "sample"),
                                              ("prompt_text", "plain")])
def test_each_authors_choice_is_a_named_setting_off_by_default(key, authors):
    defaults = {"image_resize": "crop", "vae_latent": "mean", "prompt_text": "comfyui"}
    assert getattr(DRMTrainConfig(), key) == defaults[key]
    assert getattr(DRMTrainConfig(**{key: authors}), key) == authors
    with pytest.raises(ConfigError, match=rf"^{key}: expected one of \('{defaults[key]}', '{authors}'\)"):
        DRMTrainConfig(**{key: "bogus"})


def test_a_run_saved_before_these_settings_existed_resumes(tmp_path):
    """run.json of an older run lacks image_resize, vae_latent and prompt_text: it ran with their defaults."""
    from trainer.config import to_dict
    from trainer.reward.config import RESUMABLE
    from trainer.runs import check_out_dir

    cfg = DRMTrainConfig(out=str(tmp_path), resume=True)
    older = {k: v for k, v in to_dict(cfg).items() if k not in ("image_resize", "vae_latent", "prompt_text")}
    (tmp_path / "run.json").write_text(json.dumps(older))
    check_out_dir(cfg, RESUMABLE)
    with pytest.raises(ConfigError, match=r"different settings for \['image_resize'\]"):
        check_out_dir(DRMTrainConfig(out=str(tmp_path), resume=True, image_resize="squash"), RESUMABLE)
