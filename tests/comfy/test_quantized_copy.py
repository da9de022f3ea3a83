"""DRM Loader's backbone = copy on every weight format a MODEL is loaded in (issue 24, kind 1).

An adapter DRM with backbone = copy must score as it does with backbone = shared on the same MODEL: its
copied blocks are each layer's weights as the MODEL computes with them (fp8 cast, scaled fp8 times its
scale, ComfyUI 0.26's comfy_quant layers, GGUF blocks dequantized), with the DRM's LoRA merged in float32.
What cannot be read is refused with a message that names the layer, its storage and the fix.

GGUF models come from ComfyUI-GGUF, which is not installed here; `gguf_like` stands in for its pattern:
Linear layers whose weight is a tensor subclass holding a gguf file's uint8 blocks (made and read by the
gguf package), dequantized at every forward, and shown as meta tensors in the state dict.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

SIGMA = 0.3
LORA_BOOST = 8.0  # a strong LoRA, so how much of it the copy keeps is measurable


@pytest.fixture(scope="module")
def world(comfyui, tmp_path_factory):
    """The tiny generator's weights, an adapter DRM with a strong LoRA, the same DRM without its LoRA, inputs."""
    from drm.files import atomic_save
    from trainer.demo.tiny import tiny_adapter_drm_state_dict, tiny_conditioning, tiny_generator_state_dict

    generator = tiny_generator_state_dict()
    adapter = {k: v * LORA_BOOST if k.endswith("lora_up.weight") else v
               for k, v in tiny_adapter_drm_state_dict(generator).items()}
    root = tmp_path_factory.mktemp("quantized-copy")
    meta = {"drm.format": "adapter", "drm.blocks": "1"}
    atomic_save(adapter, root / "adapter.safetensors", meta)
    atomic_save({k: v for k, v in adapter.items() if ".lora_" not in k and not k.endswith(".alpha")},
                root / "no-lora.safetensors", meta)
    x = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    return dict(generator=generator, adapter=adapter, path=root / "adapter.safetensors",
                no_lora=root / "no-lora.safetensors", cond=tiny_conditioning(seed=0), x=x)


# ---- the MODEL in each weight format ----

def is_026() -> bool:
    import comfy.ops

    return hasattr(comfy.ops, "mixed_precision_ops")


def load_model(sd: dict, **options):
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=options)


def linear_keys(sd: dict) -> list[str]:
    """The 2-D weights of the joint blocks' Linear layers (what fp8_scaled files store scaled)."""
    return [k for k, v in sd.items() if k.startswith("joint_blocks.") and k.endswith(".weight") and v.ndim == 2]


def per_layer_scale(weight: torch.Tensor) -> torch.Tensor:
    return (weight.abs().max() / 448.0).float().reshape(())  # float8_e4m3fn's largest value is 448


def scaled_fp8(sd: dict) -> dict:
    """The sd3.5_*_fp8_scaled layout: fp8 weights, a `.scale_weight` per layer, a `scaled_fp8` marker key."""
    out = dict(sd)
    for key in linear_keys(sd):
        scale = per_layer_scale(sd[key])
        out[key] = (sd[key] / scale).to(torch.float8_e4m3fn)
        out[key[:-len("weight")] + "scale_weight"] = scale
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def comfy_quant(sd: dict) -> dict:
    """ComfyUI 0.26's own quantized layout: per layer fp8 weight, `.weight_scale` and `.comfy_quant` (JSON)."""
    out = dict(sd)
    conf = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for key in linear_keys(sd):
        layer, scale = key[:-len(".weight")], per_layer_scale(sd[key])
        out[key] = (sd[key] / scale).to(torch.float8_e4m3fn)
        out[layer + ".weight_scale"] = scale
        out[layer + ".comfy_quant"] = conf.clone()
    return out


def dequantized_file_weight(fmt: str, sd: dict, key: str) -> torch.Tensor:
    """What the file says a layer's weight is, float32, computed from its own tensors."""
    if fmt in ("scaled_fp8", "comfy_quant"):
        scale = per_layer_scale(sd[key])
        return (sd[key] / scale).to(torch.float8_e4m3fn).float() * scale
    if fmt.startswith("fp8"):
        return sd[key].to(getattr(torch, fmt.replace("fp8", "float8"))).float()
    if fmt.startswith("gguf"):
        return gguf_values(quantize(sd[key], QTYPES[fmt]))
    return sd[key]


# ---- a stand-in for ComfyUI-GGUF ----

QTYPES = {"gguf_q8_0": "Q8_0", "gguf_q4_0": "Q4_0"}


class GGUFLikeTensor(torch.Tensor):
    """A gguf file's blocks (uint8) that report the shape of the weight they encode, as GGUF's GGMLTensor does."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of ops on it are plain tensors

    @staticmethod
    def __new__(cls, blocks: torch.Tensor, shape, tensor_type):
        t = torch.Tensor._make_subclass(cls, blocks)
        t.tensor_shape, t.tensor_type = torch.Size(shape), tensor_type
        return t

    @property
    def shape(self):
        return self.tensor_shape

    def detach(self, *args, **kwargs):  # nn.Parameter(t) keeps t itself, with its shape and type
        return self


def quantize(weight: torch.Tensor, qtype: str) -> GGUFLikeTensor:
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(weight.reshape(weight.shape[0], -1).float().numpy(), kind)
    return GGUFLikeTensor(torch.from_numpy(blocks), weight.shape, kind)


def gguf_values(t: GGUFLikeTensor) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(t.as_subclass(torch.Tensor).numpy(), t.tensor_type)).reshape(t.shape)


def gguf_like(model, qtype: str, quantize_conv: bool = False):
    """`model` (a ModelPatcher) with its MMDiT in GGUF's pattern: Linear weights in `qtype` blocks dequantized
    at forward, other float tensors as F32 GGUFLikeTensors (their storage is their values). With
    `quantize_conv`, the patch embedding's convolution is stored in blocks too."""
    import comfy.ops
    import gguf

    class GGUFLikeLinear(comfy.ops.manual_cast.Linear):
        def forward(self, x):
            bias = None if self.bias is None else self.bias.to(x)
            return nn.functional.linear(x, gguf_values(self.weight).to(x), bias)

        def _save_to_state_dict(self, destination, prefix, keep_vars):  # GGUF's stand-ins, for memory estimates
            for name, t in (("weight", self.weight), ("bias", self.bias)):
                if t is not None:
                    destination[prefix + name] = torch.zeros(t.shape, device="meta")

    class GGUFLikeConv2d(comfy.ops.manual_cast.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, gguf_values(self.weight).to(x), self.bias.to(x))

    f32 = gguf.GGMLQuantizationType.F32
    mmdit = model.model.diffusion_model
    for path, module in list(mmdit.named_modules()):
        if isinstance(module, nn.Linear) or (quantize_conv and isinstance(module, nn.Conv2d)):
            packed = type(module).__new__(GGUFLikeLinear if isinstance(module, nn.Linear) else GGUFLikeConv2d)
            packed.__dict__.update(module.__dict__)
            packed._parameters = {"weight": nn.Parameter(quantize(module.weight.data, qtype), requires_grad=False),
                                  "bias": None if module.bias is None else
                                  nn.Parameter(GGUFLikeTensor(module.bias.data.float(), module.bias.shape, f32),
                                               requires_grad=False)}
            parent, _, name = path.rpartition(".")
            setattr(mmdit.get_submodule(parent) if parent else mmdit, name, packed)
        else:
            for name, t in list(module._parameters.items()):
                if t is not None:
                    module._parameters[name] = nn.Parameter(GGUFLikeTensor(t.data.float(), t.shape, f32),
                                                            requires_grad=False)
    return model


FORMATS = ["fp32", "fp8_e4m3fn", "fp8_e5m2", "scaled_fp8", "comfy_quant", "gguf_q8_0", "gguf_q4_0"]


def model_in(fmt: str, world):
    sd = world["generator"]
    if fmt == "fp32":
        return load_model(sd)
    if fmt.startswith("fp8"):
        return load_model(sd, dtype=getattr(torch, fmt.replace("fp8", "float8")))
    if fmt == "scaled_fp8":
        return load_model(scaled_fp8(sd))
    if fmt == "comfy_quant":
        if not is_026():
            pytest.skip("ComfyUI 0.3.64 has no comfy_quant layers (0.26 reads them; its scaled-fp8 case covers 0.3.64)")
        return load_model(comfy_quant(sd))
    pytest.importorskip("gguf", reason="the GGUF stand-in quantizes with the gguf package: pip install gguf")
    return gguf_like(load_model(sd), QTYPES[fmt])


def scores(world, path, model, copy: bool) -> torch.Tensor:
    from drm.runtime import load_drm

    return load_drm(path, base_model=model, own_backbone=copy).score_latents(world["x"], SIGMA, world["cond"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_copy_scores_as_shared_does_on_the_same_model(world, fmt):
    """The assertion of the issue: copy = shared on every format, and so is the LoRA's effect on the scores."""
    model = model_in(fmt, world)
    shared, copy = scores(world, world["path"], model, False), scores(world, world["path"], model, True)
    without_lora = scores(world, world["no_lora"], model, False)
    assert torch.allclose(copy, shared, atol=2e-5, rtol=0), (copy, shared)
    effect_shared, effect_copy = shared - without_lora, copy - without_lora
    assert effect_shared.abs().min() > 1e-3  # the LoRA matters, so losing part of it would show
    assert torch.allclose(effect_copy, effect_shared, rtol=0.01, atol=2e-5), (effect_copy, effect_shared)


@pytest.mark.parametrize("fmt", FORMATS)
def test_copied_weights_are_the_files_dequantized_values_plus_the_lora(world, fmt):
    """Each copied LoRA target equals its weight dequantized from the file's own tensors plus alpha / rank * up @ down."""
    from drm.runtime import load_drm

    sd = world["generator"]
    copy = load_drm(world["path"], base_model=model_in(fmt, world), own_backbone=True)
    assert copy.dtype == torch.float32  # ComfyUI computes fp8 and quantized models in float32 on the CPU
    lora = world["adapter"]
    checked = 0
    for key in linear_keys(sd):
        layer = key[:-len(".weight")]
        if not key.startswith("joint_blocks.0."):
            continue
        down = lora.get(f"diffusion_model.{layer}.lora_down.weight")
        expected = dequantized_file_weight(fmt, sd, key)
        if down is not None:
            up, alpha = lora[f"diffusion_model.{layer}.lora_up.weight"], lora[f"diffusion_model.{layer}.alpha"]
            expected = expected + float(alpha) / down.shape[0] * (up @ down)
            checked += 1
        got = copy.model.backbone.get_submodule(layer).weight
        assert torch.allclose(got, expected, atol=1e-6, rtol=1e-6), (layer, (got - expected).abs().max())
    assert checked >= 4


def test_shared_still_scores_every_format_close_to_full_precision(world):
    """shared keeps working on all of them: each format scores within its rounding of the fp32 MODEL's scores."""
    pytest.importorskip("gguf", reason="pip install gguf")
    reference = scores(world, world["path"], model_in("fp32", world), False)
    for fmt in FORMATS[1:]:
        if fmt == "comfy_quant" and not is_026():
            continue
        got = scores(world, world["path"], model_in(fmt, world), False)
        assert torch.allclose(got, reference, atol=0.05), (fmt, got, reference)


def test_a_layer_copy_cannot_read_is_refused_with_its_format_and_the_fix(world):
    """A quantized convolution (a GGUF file could hold one) has no reading rule: refused, shared still works."""
    pytest.importorskip("gguf", reason="pip install gguf")
    from drm.checkpoint import DRMCheckpointError
    from drm.runtime import load_drm

    model = gguf_like(load_model(world["generator"]), "Q8_0", quantize_conv=True)
    with pytest.raises(DRMCheckpointError) as caught:
        load_drm(world["path"], base_model=model, own_backbone=True)
    message = str(caught.value)
    for part in ("adapter.safetensors", "backbone = copy", "x_embedder.proj.weight", "uint8 in Q8_0 blocks",
                 "Set backbone to shared", "fp16, bf16 or fp8 safetensors"):
        assert part in message, (part, message)
    assert torch.isfinite(scores(world, world["path"], model, False)).all()


def test_reading_rules_for_plain_float8_and_dataless_tensors():
    """backbone_weights keeps 16/32-bit tensors as they are, casts unscaled float8 to float32, and names a
    tensor with no data outside a linear layer (nothing it could run to read it)."""
    from drm.checkpoint import UnreadableWeights, backbone_weights

    root = nn.Module()
    root.norm = nn.LayerNorm(4, dtype=torch.bfloat16)
    root.proj = nn.Linear(4, 3)
    root.proj.weight.data = root.proj.weight.data.to(torch.float8_e4m3fn)
    got = backbone_weights(root)
    assert got["norm.weight"].dtype == torch.bfloat16 and torch.equal(got["norm.weight"], root.norm.weight)
    assert got["proj.weight"].dtype == torch.float32
    assert torch.equal(got["proj.weight"], root.proj.weight.float())
    assert set(backbone_weights(root, keep=lambda path: path != "norm")) == {"proj.weight", "proj.bias"}
    root.pos = nn.Parameter(torch.empty(2, 4, device="meta"))
    with pytest.raises(UnreadableWeights, match=r"layer pos is stored as a meta tensor \(no data\), not as its values"):
        backbone_weights(root)
