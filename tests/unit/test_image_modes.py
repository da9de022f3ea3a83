"""load_image reads every Pillow mode at the right values, or refuses it naming the file.

Each case writes one small file in a format that stores the mode, checks that Pillow opens it in that
mode, and compares the loaded floats with the values the rule in `image_to_rgb` gives. Modes that
no writable format opens as (I;16L, I;16N, RGBX, RGBa, HSV, La) go through `image_to_rgb`, the
conversion load_image uses, as in-memory images.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image, features

from trainer.reward.images import image_to_rgb, load_image
from trainer.reward.pairs import UnreadableImage

SIZE = 16  # the files are loaded at their own size, so no resize blurs the values
A = 128 / 255  # the alpha used in the translucent cases


def grey(mode: str, value: float, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    # Image.new, not paste: Pillow's paste of a number into a 16-bit image repeats its low byte
    return Image.new(mode, size, value)


def palette(mode: str, fill, colours: list[int]) -> Image.Image:
    image = Image.new(mode, (SIZE, SIZE), fill)
    image.putpalette(colours)
    return image


def pgm(maxval: int, value: int) -> bytes:
    """A 16-bit binary PGM (Pillow opens these as mode I), every pixel `value` out of `maxval`."""
    return f"P5\n{SIZE} {SIZE}\n{maxval}\n".encode() + value.to_bytes(2, "big") * SIZE * SIZE


# (case, image or raw file bytes, file suffix, save options, mode Pillow opens it as, expected RGB, tolerance)
FILES = [
    ("1 white", Image.new("1", (SIZE, SIZE), 1), ".png", {}, "1", (1, 1, 1), 0),
    ("L mid-grey", Image.new("L", (SIZE, SIZE), 128), ".png", {}, "L", (A, A, A), 1e-6),
    ("L colour key", Image.new("L", (SIZE, SIZE), 9), ".png", {"transparency": 9}, "L", (1, 1, 1), 0),
    ("LA transparent black", Image.new("LA", (SIZE, SIZE), (0, 0)), ".png", {}, "LA", (1, 1, 1), 0),
    ("LA opaque grey", Image.new("LA", (SIZE, SIZE), (128, 255)), ".png", {}, "LA", (A, A, A), 1e-6),
    ("LA translucent black", Image.new("LA", (SIZE, SIZE), (0, 128)), ".png", {}, "LA", (1 - A,) * 3, 1e-6),
    ("P orange", palette("P", 1, [0, 0, 0, 255, 128, 0]), ".png", {}, "P", (1, A, 0), 1e-6),
    ("P transparent index", palette("P", 0, [0, 0, 0, 255, 128, 0]), ".png", {"transparency": 0}, "P", (1, 1, 1), 0),
    ("P gif transparent index", palette("P", 0, [0, 0, 0, 255, 128, 0]), ".gif", {"transparency": 0}, "P",
     (1, 1, 1), 0),
    ("PA translucent red", palette("PA", (1, 128), [0, 0, 0, 255, 0, 0]), ".tiff", {}, "PA", (1, 1 - A, 1 - A), 1e-6),
    ("RGB orange", Image.new("RGB", (SIZE, SIZE), (255, 128, 0)), ".png", {}, "RGB", (1, A, 0), 1e-6),
    ("RGB colour key", Image.new("RGB", (SIZE, SIZE), (1, 2, 3)), ".png", {"transparency": (1, 2, 3)}, "RGB",
     (1, 1, 1), 0),
    ("RGB jpeg", Image.new("RGB", (SIZE, SIZE), (255, 128, 0)), ".jpg", {"quality": 100}, "RGB", (1, A, 0), 3 / 255),
    ("RGBA translucent red", Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 128)), ".png", {}, "RGBA",
     (1, 1 - A, 1 - A), 1e-6),
    ("RGBA transparent black", Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0)), ".png", {}, "RGBA", (1, 1, 1), 0),
    ("CMYK cyan", Image.new("CMYK", (SIZE, SIZE), (255, 0, 0, 0)), ".tiff", {}, "CMYK", (0, 1, 1), 0),
    ("CMYK half black", Image.new("CMYK", (SIZE, SIZE), (0, 0, 0, 128)), ".tiff", {}, "CMYK", (127 / 255,) * 3, 1e-6),
    ("CMYK jpeg cyan", Image.new("CMYK", (SIZE, SIZE), (255, 0, 0, 0)), ".jpg", {"quality": 100}, "CMYK",
     (0, 1, 1), 3 / 255),
    ("YCbCr red", Image.new("YCbCr", (SIZE, SIZE), (76, 85, 255)), ".tiff", {}, "YCbCr", (1, 0, 0), 2 / 255),
    ("YCbCr mid-grey", Image.new("YCbCr", (SIZE, SIZE), (128, 128, 128)), ".tiff", {}, "YCbCr", (A, A, A), 1e-6),
    ("LAB white", Image.new("LAB", (SIZE, SIZE), (255, 128, 128)), ".tiff", {}, "LAB", (1, 1, 1), 2 / 255),
    # the reported fault: 16-bit mid-grey read as 1.0 (8-bit RGB conversion clips at 255)
    ("I;16 png mid-grey", grey("I;16", 32768), ".png", {}, "I;16", (32768 / 65535,) * 3, 1e-6),
    ("I;16 png white", grey("I;16", 65535), ".png", {}, "I;16", (1, 1, 1), 0),
    ("I;16 png dark", grey("I;16", 1000), ".png", {}, "I;16", (1000 / 65535,) * 3, 1e-6),
    ("I;16 png colour key", grey("I;16", 1000), ".png", {"transparency": 1000}, "I;16", (1, 1, 1), 0),
    ("I;16 tiff mid-grey", grey("I;16", 32768), ".tiff", {}, "I;16", (32768 / 65535,) * 3, 1e-6),
    ("I;16B tiff mid-grey", grey("I;16B", 32768), ".tiff", {}, "I;16B", (32768 / 65535,) * 3, 1e-6),
    ("I tiff mid-grey", grey("I", 32768), ".tiff", {}, "I", (32768 / 65535,) * 3, 1e-6),
    ("I pgm mid-grey", pgm(65535, 32768), ".pgm", {}, "I", (32768 / 65535,) * 3, 1e-6),
    # Pillow scales a PGM's maxval to 65535 itself: 512 of 1023 is 32800 of 65535
    ("I pgm 10-bit", pgm(1023, 512), ".pgm", {}, "I", (512 / 1023,) * 3, 1e-3),
    ("F tiff mid-grey", grey("F", 0.5), ".tiff", {}, "F", (0.5, 0.5, 0.5), 0),
    ("F tiff white", grey("F", 1.0), ".tiff", {}, "F", (1, 1, 1), 0),
    ("F pfm quarter", grey("F", 0.25), ".pfm", {}, "F", (0.25, 0.25, 0.25), 0),
]
if features.check("webp"):
    FILES.append(("RGBA webp translucent red", Image.new("RGBA", (SIZE, SIZE), (255, 0, 0, 128)), ".webp",
                  {"lossless": True}, "RGBA", (1, 1 - A, 1 - A), 1e-6))


def write(tmp_path, image: Image.Image | bytes, suffix: str, options: dict):
    path = tmp_path / f"image{suffix}"
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path, **options)
    return path


@pytest.mark.parametrize(("image", "suffix", "options", "mode", "rgb", "tolerance"),
                         [case[1:] for case in FILES], ids=[case[0] for case in FILES])
def test_every_mode_loads_at_the_right_values(tmp_path, image, suffix, options, mode, rgb, tolerance):
    path = write(tmp_path, image, suffix, options)
    with Image.open(path) as opened:
        assert opened.mode == mode  # the file really holds the mode under test
    loaded = load_image(path, SIZE)
    assert loaded.shape == (SIZE, SIZE, 3) and loaded.dtype == torch.float32
    expected = torch.tensor(rgb, dtype=torch.float32).expand(SIZE, SIZE, 3)
    assert torch.allclose(loaded, expected, rtol=0, atol=tolerance), (loaded[0, 0].tolist(), rgb)


# Pillow writes I;16L as I;16 (the same little-endian bytes) and no format opens as the others.
IN_MEMORY = [
    ("I;16L", grey("I;16L", 32768), (32768 / 65535,) * 3),
    ("I;16N", grey("I;16N", 32768), (32768 / 65535,) * 3),
    ("RGBX", Image.new("RGBX", (SIZE, SIZE), (255, 128, 0, 7)), (1, A, 0)),
    ("RGBa", Image.new("RGBa", (SIZE, SIZE), (100, 0, 0, 200)), (1 - (200 - 100) / 255, 1 - 200 / 255, 1 - 200 / 255)),
    ("HSV", Image.new("HSV", (SIZE, SIZE), (0, 255, 255)), (1, 0, 0)),
]


@pytest.mark.parametrize(("image", "rgb"), [case[1:] for case in IN_MEMORY], ids=[case[0] for case in IN_MEMORY])
def test_modes_no_file_opens_as_convert_at_the_right_values(image, rgb):
    pixels = image_to_rgb(image, "in-memory")
    assert pixels.shape == (SIZE, SIZE, 3) and str(pixels.dtype) == "float32"
    # RGBa is premultiplied: (100, 0, 0) at alpha 200 is red 125 (+-1 from Pillow's rounding) over white
    tolerance = 2 / 255 if image.mode == "RGBa" else 1e-6
    assert torch.allclose(torch.from_numpy(pixels), torch.tensor(rgb, dtype=torch.float32), rtol=0, atol=tolerance)


def test_premultiplied_grey_which_pillow_cannot_convert_is_refused_naming_it():
    with pytest.raises(UnreadableImage, match="image in-memory has the Pillow mode La, which cannot be converted"):
        image_to_rgb(Image.new("La", (SIZE, SIZE)), "in-memory")


@pytest.mark.parametrize(("mode", "value", "shown"), [
    ("F", 1.5, "from 0 to 1.5"),
    ("F", -0.25, "from -0.25 to 0.5"),
    ("F", float("nan"), "nan"),
    ("F", float("inf"), "inf"),
    ("I", 70000, "from 0 to 70000"),
    ("I", -1, "from -1 to 0"),
])
def test_values_outside_the_modes_range_are_refused_naming_the_file_and_range(tmp_path, mode, value, shown):
    image = Image.new(mode, (SIZE, SIZE), 0.5 if value == -0.25 else 0)
    image.putpixel((3, 5), value)
    path = write(tmp_path, image, ".tiff", {})
    with pytest.raises(UnreadableImage) as info:
        load_image(path, SIZE)
    message = str(info.value)
    assert str(path) in message and f"(Pillow mode {mode})" in message and shown in message, message
    assert "Re-save it" in message


def test_high_depth_values_survive_resizing(tmp_path):
    # 1000/65535 = 0.01526 lies between the 8-bit steps 3/255 and 4/255: any rounding to 8 bits shows
    path = write(tmp_path, grey("I;16", 1000, (48, 32)), ".png", {})
    loaded = load_image(path, SIZE)
    assert loaded.shape == (SIZE, SIZE, 3)
    assert torch.allclose(loaded, torch.full((SIZE, SIZE, 3), 1000 / 65535), rtol=0, atol=1e-6)


def test_exif_orientation_is_applied_to_high_depth_images(tmp_path):
    # 32 wide x 16 high, left half black, right half white; orientation 6 shows it turned a quarter
    # clockwise: 16 wide x 32 high, black on top. The center crop then holds 8 black rows over 8 white.
    image = grey("I;16", 0, (32, 16))
    image.paste(grey("I;16", 65535), (16, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write(tmp_path, image, ".png", {"exif": exif})
    loaded = load_image(path, SIZE)
    assert torch.equal(loaded[:8], torch.zeros(8, SIZE, 3)) and torch.equal(loaded[8:], torch.ones(8, SIZE, 3))


def test_a_very_thin_image_is_refused_instead_of_resized_to_millions_of_pixels(tmp_path):
    from PIL import Image

    from trainer.reward.images import load_image
    from trainer.reward.pairs import UnreadableImage

    Image.new("RGB", (2, 10000), "red").save(tmp_path / "thin.png")
    with pytest.raises(UnreadableImage, match=r"thin.png is 2x10000 pixels, more than 8:1"):
        load_image(tmp_path / "thin.png", 512)
