"""Whether two SD3-family sources fit each other: the sizes a model fixes or data has, and where two differ.

A source is an MMDiT, the tensor shapes of a comfy-named state dict (a file's header will do), or
data (latents and text conditioning). It imports neither torch nor ComfyUI, so the trainer checks
files with it before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# The sizes a model and what it reads must share, whatever the model's own size.
INPUTS = ("latent_channels", "context", "pooled")

_SAME = {  # field -> (what it is, how a difference reads: {a}/{b} are the names, {x}/{y} the values)
    "latent_channels": ("latent channels", "{a}'s latents have {x} channels but {b}'s have {y}"),
    "patch": ("patch size", "{a}'s patch is {x}x{x} but {b}'s is {y}x{y}"),
    "width": ("width", "{a} is {x} wide (hidden size) but {b} is {y}"),
    "context": ("text context", "{a}'s text context is {x} wide but {b}'s is {y}"),
    "pooled": ("pooled text", "{a}'s pooled text embedding is {x} wide but {b}'s is {y}"),
}
ALL = (*_SAME, "latent_size")


@dataclass(frozen=True)
class Shapes:
    """The sizes one source fixes; None where it does not say.

    latent_channels: C of latents [B, C, H, W]. patch: the MMDiT's patch side. width: its hidden size.
    context, pooled: the widths of the text context [B, T, context] and pooled text [B, pooled].
    max_latent_size: a model's largest latent side its position embedding covers (None: unbounded).
    latent_size: data's largest latent side. `sources`: for a state dict, the key each field was read from.
    """

    latent_channels: int | None = None
    patch: int | None = None
    width: int | None = None
    context: int | None = None
    pooled: int | None = None
    max_latent_size: int | None = None
    latent_size: int | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of_mmdit(cls, mmdit) -> Shapes:
        """Of a ComfyUI MMDiT module (a generator's, or a DRM's backbone)."""
        patch = mmdit.patch_size
        return cls(latent_channels=mmdit.in_channels, patch=patch, width=mmdit.hidden_size,
                   context=getattr(mmdit.context_embedder, "in_features", None),
                   pooled=None if mmdit.y_embedder is None else mmdit.y_embedder.mlp[0].in_features,
                   max_latent_size=None if mmdit.pos_embed_max_size is None else mmdit.pos_embed_max_size * patch)

    @classmethod
    def of_state_dict(cls, shapes: Mapping[str, Sequence[int]], prefix: str = "") -> Shapes:
        """Of comfy-named MMDiT keys under `prefix` ("model.diffusion_model." in a checkpoint), given each
        tensor's shape (tensors or a safetensors header's shapes). Keys a file lacks (an adapter DRM has
        no embedders) leave their fields None."""
        values, sources = {}, {}

        def read(name: str, key: str, dim: int) -> None:
            shape = shapes.get(prefix + key)
            if name not in values and shape is not None and len(shape) > dim:
                values[name], sources[name] = int(shape[dim]), key

        # x_embedder.proj.weight [width, C, p, p]; context_embedder [width, context]; y_embedder [width, pooled];
        # final_layer.linear [p * p * C_out, width]
        for name, dim in (("width", 0), ("latent_channels", 1), ("patch", 2)):
            read(name, "x_embedder.proj.weight", dim)
        read("context", "context_embedder.weight", 1)
        read("pooled", "y_embedder.mlp.0.weight", 1)
        read("width", "context_embedder.weight", 0)
        read("width", "final_layer.linear.weight", 1)
        pos_embed = shapes.get(prefix + "pos_embed")  # [1, side * side, width]
        if pos_embed is not None and "patch" in values:
            values["max_latent_size"] = math.isqrt(int(pos_embed[1])) * values["patch"]
            sources["max_latent_size"] = "pos_embed"
        return cls(**values, sources=sources)

    @classmethod
    def of_data(cls, latent=None, context=None, pooled=None) -> Shapes:
        """Of latents [B, C, H, W] and text conditioning (context [..., T, C'], pooled [..., P]); any may be None.
        Latents of another rank say nothing: the caller names the rank it expects."""
        four_d = latent is not None and latent.ndim == 4
        return cls(latent_channels=latent.shape[1] if four_d else None,
                   latent_size=max(latent.shape[-2:]) if four_d else None,
                   context=None if context is None else context.shape[-1],
                   pooled=None if pooled is None else pooled.shape[-1])


@dataclass(frozen=True)
class Difference:
    """One way two sources do not fit. `first` and `second` are the two sources' values of field `name`
    (for "latent_size": one's latent side and the other's largest covered side); str() reads it out."""

    name: str
    what: str
    first: int
    second: int
    text: str

    def __str__(self) -> str:
        return self.text


def shape_differences(a: Shapes, b: Shapes, names: tuple[str, str] = ("the first", "the second"),
                      only: Sequence[str] = ALL) -> list[Difference]:
    """Where `a` and `b` do not fit, in field order; empty when they do. `names` name them in the texts
    (as "the MODEL", "the DRM": "the MODEL's text context is 4096 wide but the DRM's is 2048").

    A field counts only where both sources give it. Sizes in _SAME must be equal; data's latent_size
    must not exceed the other source's max_latent_size. Two models' position embeddings are not
    compared: either takes latents up to its own size. `only`: compare just these fields (INPUTS: what a
    model reads, so that a DRM of another size still fits); "latent_size" names the size check.
    """
    out = []
    for name in only:
        if name in _SAME:
            x, y = getattr(a, name), getattr(b, name)
            if x is not None and y is not None and x != y:
                what, text = _SAME[name]
                out.append(Difference(name, what, x, y, text.format(a=names[0], b=names[1], x=x, y=y)))
        elif name == "latent_size":
            for data, model, (data_name, model_name) in ((a, b, names), (b, a, names[::-1])):
                size, limit = data.latent_size, model.max_latent_size
                if size is not None and limit is not None and size > limit:
                    out.append(Difference(name, "latent size", size, limit,
                                          f"{data_name}'s latents are {size} latent pixels on their longer side but "
                                          f"{model_name}'s position embedding covers at most {limit}x{limit} "
                                          f"({limit * 8}x{limit * 8} image pixels)"))
    return out
