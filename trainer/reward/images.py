"""Reading training images into RGB tensors at the training resolution (any mode, size and bit depth)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageOps

from drm.official import squash_8bit

from .pairs import UnreadableImage


def check_resolution(resolution: int) -> None:
    """Raise ValueError unless `resolution` is a positive multiple of 16 (VAE /8, then MMDiT patch 2)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % 16:
        raise ValueError(f"resolution must be a positive multiple of 16 (the VAE downsamples by 8 and the "
                         f"MMDiT patches 2x2 latents), got {resolution!r}. SD3.5-Medium is trained at 512 or 1024.")


MAX_ASPECT = 8  # longest side / shortest side an image may have


IMAGE_RESIZES = ("crop", "squash")


def load_image(path: str | os.PathLike, resolution: int, resize: str = "crop") -> torch.Tensor:
    """An image file as float32 [resolution, resolution, 3] (rows, columns, RGB), values in [0, 1].

    `resize` "squash" reads it as the DRM authors do (drm.official.squash_8bit: Pillow's 8-bit RGB, alpha
    dropped, no EXIF rotation, bicubic straight to the square); 16-bit and float grey images, which that
    conversion would clip to white, are refused. The rest of this docstring is "crop", the default:

    The EXIF orientation is applied, the pixels become RGB floats by the rule for their Pillow mode
    (below), then the shorter side is resized to `resolution` and the center is cropped. The resize
    runs in float (`_resize`), so 16-bit precision survives it.

    Rules, by mode:
    - 1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV (8 bits per channel; Pillow itself opens 16-bit
      colour PNGs as 8-bit RGB or RGBA): Pillow's conversion to 8-bit RGB (no ICC colour management), / 255.
    - I;16, I;16L, I;16B, I;16N (16-bit grey): / 65535, the same value in all three channels.
    - I (32-bit integer grey): what Pillow opens 16-bit PGM/PPM files as (and, in older Pillow
      versions, 16-bit PNGs), so / 65535; values outside 0..65535 are refused, not guessed at.
    - F (32-bit float grey, e.g. float TIFF or PFM): taken as is; values outside [0, 1], NaN or
      infinite ones are refused.
    - Transparency (LA, PA, RGBA, RGBa, or a colour key in any mode, as PNG and GIF store): composited
      over white. The colours stored under transparent pixels are arbitrary (often black), so dropping
      the alpha would train on whatever the saving program left there; white is how a page shows it.
    - A mode Pillow cannot convert to RGB (La, premultiplied grey, which no file opens as) is refused.

    Raises UnreadableImage, naming the file, for a missing or undecodable file, a refused mode or
    values, or a shape longer than MAX_ASPECT:1.
    """
    check_resolution(resolution)
    if resize not in IMAGE_RESIZES:
        raise ValueError(f"resize must be one of {IMAGE_RESIZES}, got {resize!r}.")
    try:
        with Image.open(path) as image:
            # a decoded copy: upright, or as stored for the authors' reading
            image = ImageOps.exif_transpose(image) if resize == "crop" else image.copy()
    except FileNotFoundError:
        raise UnreadableImage(f"image {path} does not exist") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"image {path} cannot be decoded ({e})") from None
    if resize == "squash":
        return _squash(image, path, resolution)
    if max(image.size) > MAX_ASPECT * min(image.size):
        # the shorter side is scaled to `resolution`, so a 2 x 10000 strip would become 512 x 2.56 million
        raise UnreadableImage(f"image {path} is {image.size[0]}x{image.size[1]} pixels, more than {MAX_ASPECT}:1; "
                              "a center crop of it would show almost nothing. Crop or pad it to a usual shape.")
    pixels = image_to_rgb(image, path)
    height, width = pixels.shape[:2]
    scale = resolution / min(width, height)
    # max(): rounding must never make the longer side shorter than the crop
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != (width, height):
        pixels = _resize(pixels, size)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return torch.from_numpy(np.ascontiguousarray(pixels[top:top + resolution, left:left + resolution]))


def _squash(image: Image.Image, path, resolution: int) -> torch.Tensor:
    """load_image's "squash": the authors' reading of an opened Pillow image (drm.official.squash_8bit)."""
    if image.mode in HIGH_DEPTH_MODES:
        raise UnreadableImage(f"image {path} is {image.mode} (16-bit, 32-bit or float grey); image_resize = squash "
                              "reads images through Pillow's 8-bit RGB conversion, as the DRM authors do, which clips "
                              "such values to white. Use image_resize = crop, or re-save the image as 8-bit.")
    try:
        return torch.from_numpy(squash_8bit(image, resolution))
    except ValueError as e:
        raise UnreadableImage(f"image {path} has the Pillow mode {image.mode}, which cannot be converted to RGB "
                              f"({e}). Re-save it as an 8-bit RGB PNG.") from None


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> [size[1], size[0], 3]: Pillow's bicubic filter on one 32-bit float
    image per channel, so nothing is rounded to 8 bits; overshoot at hard edges is clipped to [0, 1]."""
    channels = [Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(size, Image.Resampling.BICUBIC)
                for c in range(pixels.shape[-1])]
    return np.stack([np.asarray(channel) for channel in channels], axis=-1).clip(0.0, 1.0)


# Modes with an alpha band; any mode may also carry a colour-key transparency (PNG tRNS, GIF) in info.
ALPHA_MODES = ("LA", "PA", "RGBA", "RGBa")
# 16-bit, 32-bit integer and 32-bit float grey, which Pillow's conversion to RGB clips at 255.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def image_to_rgb(image: Image.Image, source: object) -> np.ndarray:
    """The pixels of a Pillow image of any mode as float32 [height, width, 3] RGB in [0, 1], by the rules
    in `load_image`'s docstring; `source` names the image in the UnreadableImage raised for a refused mode
    or values."""
    if image.mode in HIGH_DEPTH_MODES:
        values = np.asarray(image)
        low, high = values.min(), values.max()
        if image.mode == "F" and not (np.isfinite(values).all() and 0.0 <= low and high <= 1.0):
            raise UnreadableImage(f"image {source} holds 32-bit float grey values (Pillow mode F) from {low:g} to "
                                  f"{high:g}; such images are read only when they lie in [0, 1]. Re-save it scaled "
                                  "to 0..1, or as an 8- or 16-bit PNG.")
        if image.mode == "I" and not (0 <= low and high <= 65535):
            raise UnreadableImage(f"image {source} holds 32-bit integer grey values (Pillow mode I) from {low} to "
                                  f"{high}; they are read as 16-bit (0..65535). Re-save it as a 16- or 8-bit PNG.")
        grey = values.astype(np.float32) / (1.0 if image.mode == "F" else 65535.0)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        key = image.info.get("transparency")  # a PNG's 16-bit grey colour key
        alpha = None if key is None else (values != key)[..., None].astype(np.float32)
    else:
        with_alpha = image.mode in ALPHA_MODES or "transparency" in image.info
        try:
            pixels = np.asarray(image.convert("RGBA" if with_alpha else "RGB"), dtype=np.float32) / 255.0
        except ValueError as e:
            raise UnreadableImage(f"image {source} has the Pillow mode {image.mode}, which cannot be converted to "
                                  f"RGB ({e}). Re-save it as an 8-bit RGB PNG.") from None
        rgb, alpha = pixels[..., :3], (pixels[..., 3:] if with_alpha else None)
    return rgb if alpha is None else rgb * alpha + (1.0 - alpha)
