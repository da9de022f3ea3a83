"""Unit tests for drm/fit.py: the sizes read from state-dict shapes and data, and where two sources differ."""

from __future__ import annotations

import torch

from drm.fit import INPUTS, Shapes, shape_differences

# SD3.5-Medium's MMDiT: hidden 1536, patch 2, 16 latent channels, position table 384 x 384 patches.
SD35M = {"x_embedder.proj.weight": [1536, 16, 2, 2], "context_embedder.weight": [1536, 4096],
         "y_embedder.mlp.0.weight": [1536, 2048], "final_layer.linear.weight": [64, 1536],
         "pos_embed": [1, 384 * 384, 1536], "joint_blocks.0.x_block.attn.qkv.weight": [4608, 1536]}


def test_state_dict_shapes_give_every_size_and_where_it_was_read():
    shapes = Shapes.of_state_dict(SD35M)
    assert shapes == Shapes(latent_channels=16, patch=2, width=1536, context=4096, pooled=2048,
                            max_latent_size=768)
    assert shapes.sources["context"] == "context_embedder.weight"
    assert shapes.sources["width"] == shapes.sources["latent_channels"] == "x_embedder.proj.weight"
    # a checkpoint's keys under a prefix give the same sizes; without the prefix nothing is found
    prefixed = {"model.diffusion_model." + k: v for k, v in SD35M.items()}
    assert Shapes.of_state_dict(prefixed, "model.diffusion_model.") == shapes
    assert Shapes.of_state_dict(prefixed) == Shapes()


def test_an_adapter_file_gives_only_the_width_of_its_final_layer():
    adapter = Shapes.of_state_dict({"final_layer.linear.weight": [64, 1536], "reward_output.w": [1, 4]})
    assert adapter == Shapes(width=1536) and adapter.sources == {"width": "final_layer.linear.weight"}
    assert shape_differences(adapter, Shapes.of_state_dict(SD35M)) == []
    narrow = shape_differences(Shapes.of_state_dict({"final_layer.linear.weight": [64, 128]}),
                               Shapes.of_state_dict(SD35M), ("the DRM", "the base"))
    assert [(d.name, d.first, d.second) for d in narrow] == [("width", 128, 1536)]


def test_differences_name_both_sources_in_field_order():
    other = dict(SD35M, **{"context_embedder.weight": [1536, 2048], "y_embedder.mlp.0.weight": [1536, 768]})
    found = shape_differences(Shapes.of_state_dict(SD35M), Shapes.of_state_dict(other), ("the MODEL", "the DRM"))
    assert [str(d) for d in found] == ["the MODEL's text context is 4096 wide but the DRM's is 2048",
                                       "the MODEL's pooled text embedding is 2048 wide but the DRM's is 768"]
    assert [(d.what, d.first, d.second) for d in found] == [("text context", 4096, 2048), ("pooled text", 2048, 768)]


def test_only_the_inputs_leaves_a_drm_of_another_width_fitting():
    # SD3.5-Large's width, reading the same latents and text
    wider = {"x_embedder.proj.weight": [2432, 16, 2, 2], "context_embedder.weight": [2432, 4096],
             "y_embedder.mlp.0.weight": [2432, 2048], "pos_embed": [1, 192 * 192, 2432]}
    a, b = Shapes.of_state_dict(SD35M), Shapes.of_state_dict(wider)
    assert [d.name for d in shape_differences(a, b)] == ["width"]
    assert shape_differences(a, b, only=INPUTS) == []


def test_latents_larger_than_the_position_embedding_are_found_from_either_side():
    model = Shapes(latent_channels=16, max_latent_size=64)
    fits = Shapes.of_data(torch.zeros(2, 16, 64, 40))
    too_tall = Shapes.of_data(torch.zeros(2, 16, 72, 40))
    assert shape_differences(fits, model) == [] and shape_differences(model, fits) == []
    for found in (shape_differences(too_tall, model, ("the latent", "the DRM")),
                  shape_differences(model, too_tall, ("the DRM", "the latent"))):
        assert [(d.name, d.first, d.second) for d in found] == [("latent_size", 72, 64)]
        assert str(found[0]).startswith("the latent's latents are 72 latent pixels on their longer side but the DRM's")
    # two models covering different sizes both fit: each takes latents up to its own size
    assert shape_differences(model, Shapes(max_latent_size=128)) == []


def test_data_of_another_rank_says_nothing_about_latents():
    shapes = Shapes.of_data(torch.zeros(16, 8, 8), torch.zeros(1, 5, 4096), torch.zeros(1, 2048))
    assert shapes == Shapes(context=4096, pooled=2048)
    wrong_channels = Shapes.of_data(torch.zeros(1, 4, 8, 8))
    assert [d.name for d in shape_differences(wrong_channels, Shapes.of_state_dict(SD35M))] == ["latent_channels"]
