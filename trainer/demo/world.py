"""A procedural world of coloured shapes, and an oracle that judges a picture from its pixels alone.

The world gives the pack a ground truth. Every picture is one shape (circle, square or triangle) in a
named colour, at a position and size, on a background of another named colour, and its prompt comes
from one grammar: "a red circle on a blue background". The oracle reads decoded RGB pixels, with no
network, and answers two questions a person would:

- does the picture show what the prompt says (the shape, its colour and the background)? and
- how good is it, a graded stand-in for aesthetics: a large shape, centred, clear of the edges, drawn
  with clean edges and flat colours.

Its score is `matches + quality` in [0, 2], so a picture that shows the prompt always beats one that
does not. The DRM learns from pairs the oracle labels; every claim about the DRM, the step-wise
sampler and Step-GRPO is then measured by the oracle, a judge independent of the DRM they optimise,
as the paper judges with HPSv3.

Images are float tensors [B, 3, H, W] in [0, 1] (ComfyUI's IMAGE is [B, H, W, 3]; permute it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name: RGB in [0, 1]; far apart, so a pixel's nearest name is unambiguous
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.15, 0.3, 0.85),
    "yellow": (0.95, 0.85, 0.15),
    "white": (0.95, 0.95, 0.95),
}
SIZE = 64  # pixels per side
MIN_HALF_SIZE, MAX_HALF_SIZE = 0.12, 0.42  # a shape's half-extent, as a fraction of the image side
SUPERSAMPLE = 4  # rendering at 4x and averaging gives anti-aliased edges


@dataclass(frozen=True)
class Scene:
    """One picture of the world. Positions are fractions of the image side, (0, 0) the top left."""

    shape: str
    colour: str
    background: str
    cx: float = 0.5
    cy: float = 0.5
    half_size: float = 0.3

    @property
    def prompt(self) -> str:
        return prompt_for(self.shape, self.colour, self.background)


def prompt_for(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """(shape, colour, background) of a prompt of the grammar.

    Raises ValueError naming the prompt when it is not "a <colour> <shape> on a <colour> background"
    with the shapes and colours of this world.
    """
    words = prompt.strip().lower().split()
    if (len(words) == 7 and words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background"
            and words[1] in COLOURS and words[2] in SHAPES and words[5] in COLOURS and words[1] != words[5]):
        return words[2], words[1], words[5]
    raise ValueError(f"prompt {prompt!r} is not of this world's grammar: expected \"a <colour> <shape> on a "
                     f"<other colour> background\" with a shape of {', '.join(SHAPES)} and colours of "
                     f"{', '.join(COLOURS)}.")


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order (3 shapes x 5 colours x 4 backgrounds = 60)."""
    return [prompt_for(s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b]


def random_scene(gen: torch.Generator, prompt: str | None = None) -> Scene:
    """A scene of the world's prior: any prompt (or the one given), any size, anywhere fully in view."""
    if prompt is None:
        prompts = all_prompts()
        prompt = prompts[int(torch.randint(len(prompts), (1,), generator=gen))]
    shape, colour, background = parse_prompt(prompt)
    u = torch.rand(3, generator=gen).tolist()
    half = MIN_HALF_SIZE + (MAX_HALF_SIZE - MIN_HALF_SIZE) * u[0]
    margin = half + 1 / SIZE
    cx, cy = (margin + (1 - 2 * margin) * v for v in u[1:])
    return Scene(shape, colour, background, cx, cy, half)


def shape_mask(shape: str, cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor, size: int,
               half_y: torch.Tensor | None = None) -> torch.Tensor:
    """Coverage of each pixel by the shape, [B, size, size] in [0, 1] (anti-aliased by supersampling).

    cx, cy, half: [B] fractions of the side; half_y (default: half) stretches the shape vertically,
    which the oracle uses to fit a drawn shape's bounding box. The square is axis-aligned; the
    triangle points up, with its base 2*half wide and its height 2*half_y, so a shape fills pi/4
    (circle), 1 (square) or 1/2 (triangle) of its bounding box.
    """
    fine = size * SUPERSAMPLE
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine
    y, x = coords.view(1, fine, 1), coords.view(1, 1, fine)
    half_y = half if half_y is None else half_y
    cx, cy, hx, hy = (v.float().view(-1, 1, 1) for v in (cx, cy, half, half_y))
    u, v = (x - cx) / hx, (y - cy) / hy  # the shape's own frame: its bounding box is [-1, 1]^2
    if shape == "circle":
        inside = u ** 2 + v ** 2 <= 1
    elif shape == "square":
        inside = (u.abs() <= 1) & (v.abs() <= 1)
    elif shape == "triangle":
        inside = (v <= 1) & (u.abs() <= (v + 1) / 2)
    else:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}.")
    return torch.nn.functional.avg_pool2d(inside.float().unsqueeze(1), SUPERSAMPLE).squeeze(1)


def render(scenes: list[Scene], size: int = SIZE) -> torch.Tensor:
    """Pictures of the scenes, [B, 3, size, size] float32 in [0, 1]."""
    out = torch.empty(len(scenes), 3, size, size)
    for i, s in enumerate(scenes):
        cover = shape_mask(s.shape, torch.tensor([s.cx]), torch.tensor([s.cy]), torch.tensor([s.half_size]), size)
        fg, bg = torch.tensor(COLOURS[s.colour]).view(3, 1, 1), torch.tensor(COLOURS[s.background]).view(3, 1, 1)
        out[i] = bg + (fg - bg) * cover
    return out


@dataclass
class Judgement:
    """What the oracle saw in each picture; every field has one entry per picture."""

    shape: list[str | None]  # the shape it recognised, None when there is no foreground
    colour: list[str | None]
    background: list[str]
    matches: torch.Tensor  # [B] bool: shape, colour and background are the prompt's, and the shape is clear
    quality: torch.Tensor  # [B] in [0, 1]: size, centring, clearance from the edges, clean edges
    score: torch.Tensor  # [B] in [0, 2]: matches + quality

    def prefers(self, a: int, b: int, margin: float = 0.05) -> bool | None:
        """True when picture a is better than b by more than margin, False when b is, None on a tie."""
        d = float(self.score[a] - self.score[b])
        return None if abs(d) <= margin else d > 0


PALETTE = torch.tensor(list(COLOURS.values()))  # [N, 3]
PURE = 0.15  # a pixel within this RGB distance of a named colour is drawn in that colour
MIN_AREA = 0.02  # a foreground smaller than this fraction of the picture is not a shape
MIN_FIT = 0.6  # intersection over union with the best ideal shape, below which no shape is recognised


def judge(images: torch.Tensor, prompts: list[str]) -> Judgement:
    """The oracle: what each picture shows, whether that is its prompt, and how good it is.

    images: [B, 3, H, H] floats in [0, 1] (decoded pixels; values outside are clamped). prompts: B
    prompts of the grammar (see `parse_prompt`). Pure arithmetic on pixels; deterministic. Raises
    ValueError for another shape, non-square or non-finite images, or a prompt outside the grammar.

    Steps, per picture: name each pixel by its nearest palette colour; the background is the most
    common name on the border; the foreground colour is the most common other name among pure pixels;
    each ideal shape is stretched to its pixels' bounding box, and the best intersection over union
    (at least MIN_FIT) names the shape, so a drawn square that came out a little oblong is still a
    square. Quality is the mean of four terms in [0, 1]: size (the larger half-extent over 0.35),
    centring (of the bounding box: 1 at the centre, 0 at 0.35 away), clearance (the bounding box at
    least 3 pixels from every edge) and cleanliness (the fit's IoU, times the share of pure pixels,
    times the box's aspect ratio, short side over long).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images have shape {tuple(images.shape)}; expected [B, 3, H, W] RGB in [0, 1].")
    if images.shape[2] != images.shape[3] or images.shape[2] < 8:
        raise ValueError(f"images are {images.shape[2]}x{images.shape[3]} pixels; the oracle judges square pictures "
                         "of at least 8x8, as the world draws them. Crop or resize them first.")
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values; decode the latents again (in fp32 or bf16 if the VAE "
                         "overflowed in fp16).")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images; give one prompt per image.")
    wanted = [parse_prompt(p) for p in prompts]
    images = images.detach().float().cpu().clamp(0, 1)
    b, _, h, w = images.shape
    names = list(COLOURS)
    dist = torch.cdist(images.permute(0, 2, 3, 1).reshape(b, h * w, 3), PALETTE.expand(b, -1, -1))
    nearest_dist, nearest = dist.min(-1)  # [B, HW]
    pure = nearest_dist <= PURE
    border = torch.zeros(h, w, dtype=torch.bool)
    border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
    border = border.flatten()

    shapes, colours, backgrounds, matches, quality = [], [], [], [], []
    for i in range(b):
        bg = int(torch.bincount(nearest[i][border], minlength=len(names)).argmax())
        counts = torch.bincount(nearest[i][pure[i] & (nearest[i] != bg)], minlength=len(names))
        fg = int(counts.argmax())
        backgrounds.append(names[bg])
        if counts[fg] < MIN_AREA * h * w:
            shapes.append(None), colours.append(None), matches.append(False), quality.append(0.0)
            continue
        mask = (nearest[i] == fg).view(h, w)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        half_x, half_y = (x1 - x0) / 2 / w, (y1 - y0) / 2 / h
        fits = {}
        for shape in SHAPES:  # each ideal shape stretched to the bounding box: the form names the shape
            ideal = shape_mask(shape, torch.tensor([cx]), torch.tensor([cy]), torch.tensor([half_x]), h,
                               torch.tensor([half_y]))[0] >= 0.5
            fits[shape] = float((ideal & mask).sum() / (ideal | mask).sum())
        shape = max(fits, key=fits.get)
        fit = fits[shape]
        shapes.append(shape if fit >= MIN_FIT else None)
        colours.append(names[fg])
        matches.append((shapes[-1], colours[-1], backgrounds[-1]) == wanted[i])
        size = min(1.0, max(half_x, half_y) / 0.35)
        centring = max(0.0, 1 - math.hypot(cx - 0.5, cy - 0.5) / 0.35)
        clearance = min(1.0, min(x0, y0, w - x1, h - y1) / 3)
        clean = fit * float(pure[i].float().mean()) * min(half_x, half_y) / max(half_x, half_y)
        quality.append((size + centring + clearance + clean) / 4)
    matches_t = torch.tensor(matches)
    quality_t = torch.tensor(quality)
    return Judgement(shapes, colours, backgrounds, matches_t, quality_t, matches_t.float() + quality_t)


TEXT_SEED = 20260101  # fixes the text encoder: the same prompt always gives the same conditioning


def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The world's text encoder: fixed random token embeddings, in SD3's conditioning shapes.

    Returns context [B, 3, 4096] and pooled [B, 2048], float32. The three tokens are the prompt's
    colour, shape and background colour; the grammar's other words carry nothing, so they are
    dropped. Each token is its word's embedding plus its position's, so "a red circle on a blue
    background" and "a blue circle on a red background" differ. Entries are N(0, 1), drawn once from
    TEXT_SEED; nothing is learned, so cached conditioning never goes stale. Raises ValueError for a
    prompt outside the grammar.
    """
    from drm.conditioning import CONTEXT_WIDTH, POOLED_WIDTH

    vocabulary = list(COLOURS) + list(SHAPES)
    gen = torch.Generator().manual_seed(TEXT_SEED)
    words = torch.randn(len(vocabulary), CONTEXT_WIDTH, generator=gen)
    positions = torch.randn(3, CONTEXT_WIDTH, generator=gen)
    pooled_words = torch.randn(len(vocabulary), POOLED_WIDTH, generator=gen)
    pooled_positions = torch.randn(3, POOLED_WIDTH, generator=gen)
    ids = torch.tensor([[vocabulary.index(w) for w in (c, s, b)] for s, c, b in map(parse_prompt, prompts)])
    context = (words[ids] + positions) / math.sqrt(2)  # unit variance
    pooled = (pooled_words[ids] + pooled_positions).mean(1) * math.sqrt(1.5)  # unit variance
    return context, pooled


def conditioning_file_name(prompt: str) -> str:
    """The cached-conditioning file of a prompt: "a red circle on a blue background" -> world-red-circle-on-blue.safetensors."""
    shape, colour, background = parse_prompt(prompt)
    return f"world-{colour}-{shape}-on-{background}.safetensors"
