"""`python -m trainer import-dina`: a DiNa-LRM snapshot to one DRM file, and every bad snapshot refused clearly.

The conversion needs no ComfyUI. Its scores are checked against the architecture's reference forward in
tests/comfy/test_dina_scoring.py.
"""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch

from drm.checkpoint import read_safetensors
from drm.dina import SnapshotError, import_dina
from drm.lora import LoRA
from trainer.__main__ import main
from trainer.demo import synthetic

WIDTH, BLOCKS, DUAL, RANK, ALPHA = 64, 3, 2, 4, 8.0
IMAGE_TAPS, TEXT_TAPS = [1, 3], [2, 3]


@pytest.fixture()
def snapshot(tmp_path):
    head = synthetic.random_dina_head(WIDTH, IMAGE_TAPS, TEXT_TAPS)
    model = synthetic.dina_model_section(BLOCKS, IMAGE_TAPS, TEXT_TAPS, RANK, ALPHA)
    return synthetic.write_dina_snapshot(tmp_path / "snap", synthetic.random_peft_lora(WIDTH, BLOCKS, DUAL, RANK), head.state_dict(),
                               model, RANK, ALPHA)


def edit_config(snapshot, **model_changes):
    path = snapshot / "config.json"
    config = json.loads(path.read_text())
    config["model"].update(model_changes)
    path.write_text(json.dumps(config))


def test_converts_to_an_adapter_drm_with_fused_qkv(snapshot, tmp_path):
    out = tmp_path / "dina.safetensors"
    metadata = import_dina(snapshot, out)
    tensors, stored = read_safetensors(out)
    assert stored == metadata
    assert (stored["drm.format"], stored["drm.head"], stored["drm.blocks"]) == ("adapter", "dina", str(BLOCKS))
    assert json.loads(stored["drm.head_config"])["image_taps"] == IMAGE_TAPS
    assert not any(k.startswith("joint_blocks.") for k in tensors), "no backbone copy: it runs on the generator's weights"
    lora = LoRA.from_state_dict_comfy({k: v for k, v in tensors.items() if k.startswith("diffusion_model.")})
    # per block: x qkv + proj, context qkv + proj, and attn2 qkv + proj in the dual-attention blocks
    assert len(lora.paths) == BLOCKS * 4 + DUAL * 2
    peft = read_safetensors(snapshot / "checkpoint" / "backbone_lora" / "adapter_model.safetensors")[0]

    def peft_delta(block, layer):
        a, b = (peft[f"base_model.model.transformer_blocks.{block}.{layer}.lora_{x}.weight"] for x in "AB")
        return ALPHA / RANK * b @ a

    def delta(path):
        return lora.merged_delta(lora.paths.index(path)).detach()

    # three adapters on one fused qkv layer add up to exactly the three peft deltas, stacked q, k, v
    assert torch.allclose(delta("joint_blocks.1.x_block.attn2.qkv"),
                          torch.cat([peft_delta(1, f"attn2.to_{x}") for x in "qkv"]), atol=1e-6)
    assert torch.allclose(delta("joint_blocks.1.context_block.attn.qkv"),
                          torch.cat([peft_delta(1, f"attn.add_{x}_proj") for x in "qkv"]), atol=1e-6)
    assert torch.allclose(delta("joint_blocks.2.context_block.attn.proj"), peft_delta(2, "attn.to_add_out"), atol=1e-6)
    assert torch.allclose(delta("joint_blocks.0.x_block.attn.proj"), peft_delta(0, "attn.to_out.0"), atol=1e-6)


def test_cli_writes_the_file_and_says_how_to_use_it(snapshot, tmp_path, capsys):
    out = tmp_path / "models" / "drm" / "dina.safetensors"
    assert main(["import-dina", str(snapshot), "--out", str(out)]) == 0
    assert out.is_file()
    assert "connect the SD3.5-Medium MODEL" in capsys.readouterr().out


class NotATensor:
    """Stands in for any pickled object other than tensors (which could run code when unpickled)."""


BAD_SNAPSHOTS = {
    "flux backbone": (lambda s: edit_config(s, backbone_model_id="black-forest-labs/FLUX.1-dev"), "backbone_model_id"),
    "z-image backbone": (lambda s: edit_config(s, backbone_model_id="Tongyi-MAI/Z-Image-Turbo"), "backbone_model_id"),
    "unknown head option": (lambda s: edit_config(s, reward_head={"width": -1, "gate_override": 1}), "gate_override"),
    "logistic": (lambda s: edit_config(s, use_logistic=True), "use_logistic"),
    "taps past the blocks": (lambda s: edit_config(s, visual_head_idx=[1, 9]), "visual_head_idx"),
    "no LoRA": (lambda s: edit_config(s, use_lora=False), "use_lora"),
    "missing config": (lambda s: (s / "config.json").unlink(), "config.json is missing"),
    "missing head": (lambda s: (s / "checkpoint" / "rm_head.pt").unlink(), "rm_head.pt is missing"),
    "missing LoRA": (lambda s: (s / "checkpoint" / "backbone_lora" / "adapter_model.safetensors").unlink(),
                     "adapter_model.safetensors is missing"),
    "DoRA": (lambda s: (s / "checkpoint" / "backbone_lora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_dora": True})), "use_dora"),
    "pickled object in the head": (lambda s: torch.save({"w": NotATensor()}, s / "checkpoint" / "rm_head.pt"),
                                   "needs full unpickling"),
    "head of another size": (lambda s: torch.save(collections.OrderedDict(
        (k, torch.zeros(3)) for k in torch.load(s / "checkpoint" / "rm_head.pt", weights_only=True)),
        s / "checkpoint" / "rm_head.pt"), "does not fit"),
    "config not UTF-8": (lambda s: (s / "config.json").write_bytes('{"model": "\u4e2d"}'.encode("gbk")), "not UTF-8"),
    "empty head file": (lambda s: (s / "checkpoint" / "rm_head.pt").write_bytes(b""), "not a PyTorch file (it is empty); download it again"),
    "junk head file": (lambda s: (s / "checkpoint" / "rm_head.pt").write_bytes(b"junk bytes"),
                       "not a PyTorch file (it starts with b'junk bytes'); download it again"),
    "HTML page as the head": (lambda s: (s / "checkpoint" / "rm_head.pt").write_bytes(HTML), "an HTML page"),
    "Git LFS pointer as the head": (lambda s: (s / "checkpoint" / "rm_head.pt").write_bytes(LFS_POINTER),
                                    "a Git LFS pointer"),
    "truncated head file": (lambda s: truncate(s / "checkpoint" / "rm_head.pt"), "not a readable torch file"),
    "NaN in the head": (lambda s: nan_head(s), "not finite float tensors"),
    "head width a string": (lambda s: edit_config(s, reward_head={"width": "abc"}), "reward_head.width = 'abc'"),
    "zero attention heads": (lambda s: edit_config(s, reward_head={"num_attn_heads": 0}), "num_attn_heads = 0"),
    "proj_in as a string": (lambda s: edit_config(s, reward_head={"use_proj_in": "false"}), "use_proj_in = 'false'"),
    "blocks as true": (lambda s: edit_config(s, num_transformer_layers=True), "num_transformer_layers = True"),
    "flag as a string": (lambda s: edit_config(s, use_text_features="false"), "use_text_features = 'false'"),
    "NaN alpha": (lambda s: edit_lora_config(s, lora_alpha=float("nan")), "lora_alpha = nan"),
    "NaN in the LoRA": (lambda s: edit_lora(s, "attn.to_q.lora_A.weight", lambda t: t * float("nan")), "NaN or infinite"),
    "1-D LoRA weight": (lambda s: edit_lora(s, "attn.to_out.0.lora_B.weight", lambda t: t[:, 0]), "2-D matrix"),
    "LoRA of another width": (lambda s: edit_lora(s, "attn.to_k.lora_A.weight", lambda t: t[:, :32]), "not one SD3 model"),
    # adapter_config.json against the tensors: every field that says something about them
    "config r above the tensors' rank": (lambda s: edit_lora_config(s, r=2 * RANK),
                                         f"has rank {RANK}, but adapter_config.json says r = {2 * RANK}"),
    "config r below the tensors' rank": (lambda s: edit_lora_config(s, r=RANK // 2),
                                         f"has rank {RANK}, but adapter_config.json says r = {RANK // 2}"),
    "a LoRA on a layer not targeted": (lambda s: edit_lora_config(s, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                       "transformer_blocks.0.attn.add_k_proj, which adapter_config.json does not target"),
    "a LoRA on an excluded layer": (lambda s: edit_lora_config(s, exclude_modules=["transformer_blocks.1.attn.to_v"]),
                                    "transformer_blocks.1.attn.to_v, which adapter_config.json does not target"),
    "a regex that leaves a layer out": (lambda s: edit_lora_config(s, target_modules=r".*\.to_[qkv]"),
                                        "transformer_blocks.0.attn.add_k_proj, which adapter_config.json does not target"),
    "a block layers_to_transform leaves out": (lambda s: edit_lora_config(s, layers_to_transform=[0, 1]),
                                               "LoRA on block 2, which adapter_config.json's layers_to_transform"),
    "layers_to_transform past the blocks": (lambda s: edit_lora_config(s, layers_to_transform=[0, 5]),
                                            f"but config.json keeps {BLOCKS} blocks"),
    "a targeted layer without its LoRA": (lambda s: drop_lora(s, "transformer_blocks.1.attn.to_k."),
                                          "has no LoRA on transformer_blocks.1.attn.to_k, which adapter_config.json targets"),
    "a block without its LoRA": (lambda s: drop_lora(s, "transformer_blocks.2."),
                                 "has no LoRA on transformer_blocks.2.attn.to_q"),
    "a second attention half missing": (lambda s: drop_lora(s, "transformer_blocks.0.attn2.to_out.0."),
                                        "has no LoRA on transformer_blocks.0.attn2.to_out.0"),
    "target_modules not a regex": (lambda s: edit_lora_config(s, target_modules="(["),
                                   "expected a list of module names or a regular expression"),
    "the run's r differs": (lambda s: edit_config(s, lora_config={"r": 2 * RANK, "lora_alpha": ALPHA}),
                            f"config.json's model.lora_config.r = {2 * RANK}: the two files are not from one training run"),
    "the run's alpha differs": (lambda s: edit_config(s, lora_config={"r": RANK, "lora_alpha": 2 * ALPHA}),
                                "model.lora_config.lora_alpha = 16.0"),
}
HTML = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>\n"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 10433\n"


def truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def drop_lora(snapshot, module: str):
    """Remove the LoRA tensors of every module whose peft name starts with `module` (after base_model.model.)."""
    from safetensors.torch import save_file

    path = snapshot / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"
    tensors = read_safetensors(path)[0]
    kept = {k: v for k, v in tensors.items() if not k.startswith("base_model.model." + module)}
    assert len(kept) < len(tensors)
    save_file(kept, str(path))


def nan_head(snapshot):
    path = snapshot / "checkpoint" / "rm_head.pt"
    state = torch.load(path, weights_only=True)
    state["head.bias"] = state["head.bias"] * float("nan")
    torch.save(state, path)


def edit_lora_config(snapshot, **changes):
    path = snapshot / "checkpoint" / "backbone_lora" / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_lora(snapshot, layer: str, change):
    from safetensors.torch import save_file

    path = snapshot / "checkpoint" / "backbone_lora" / "adapter_model.safetensors"
    tensors = read_safetensors(path)[0]
    key = f"base_model.model.transformer_blocks.0.{layer}"
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(path))


@pytest.mark.parametrize("case", list(BAD_SNAPSHOTS))
def test_bad_snapshots_are_refused_and_nothing_is_written(snapshot, tmp_path, case, capsys):
    break_it, message = BAD_SNAPSHOTS[case]
    break_it(snapshot)
    out = tmp_path / "out" / "dina.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"an earlier file")
    with pytest.raises(SnapshotError, match=re.escape(message)):
        import_dina(snapshot, out)
    assert main(["import-dina", str(snapshot), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier file"
    assert [p.name for p in out.parent.iterdir()] == ["dina.safetensors"]


def test_an_out_that_cannot_be_written_is_one_error_line(snapshot, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder.safetensors").mkdir()
    for out in (tmp_path / "a-file" / "dina.safetensors", tmp_path / "a-folder.safetensors"):
        assert main(["import-dina", str(snapshot), "--out", str(out)]) == 2
        assert "cannot be written" in capsys.readouterr().err
    assert not list((tmp_path / "a-folder.safetensors").iterdir())


def test_not_a_folder_and_wrong_suffix(tmp_path, capsys):
    assert main(["import-dina", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(["import-dina", str(tmp_path), "--out", str(tmp_path / "x.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_same_snapshot_converts_to_the_same_file(snapshot, tmp_path):
    # (not byte-equal: safetensors writes its metadata in hash-map order)
    (a, meta_a), (b, meta_b) = (read_safetensors(import_dina(snapshot, tmp_path / n) and tmp_path / n) for n in "ab")
    assert meta_a == meta_b and list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_html_page_saved_as_the_head_is_named_so_with_the_fix(snapshot, tmp_path):
    (snapshot / "checkpoint" / "rm_head.pt").write_bytes(HTML)
    with pytest.raises(SnapshotError) as caught:
        import_dina(snapshot, tmp_path / "dina.safetensors")
    assert str(caught.value) == (f"{snapshot / 'checkpoint' / 'rm_head.pt'} is not a PyTorch file (it starts with "
                                 f"{HTML[:24]!r}: an HTML page, such as a download site's error or sign-in page); "
                                 "download it again.")
    assert "unpickling" not in str(caught.value)


@pytest.mark.parametrize("changes", [
    {"target_modules": r".*\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"},  # peft's regex form
    {"target_modules": ["to_q", "attn.to_k", "attn2.to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                        "add_v_proj", "to_add_out", "unused_name"]},  # name endings; one that matches nothing adapts nothing
    {"layers_to_transform": list(range(BLOCKS))},
    {"exclude_modules": ["ff.net.0.proj"]},
    {"target_modules": None},  # not stated: only the rank and the blocks are checked
])
def test_configs_that_agree_with_the_tensors_convert_to_the_same_file(snapshot, tmp_path, changes):
    """Every form peft writes these fields in is read as peft reads it: the files agree, so nothing changes."""
    import_dina(snapshot, tmp_path / "before.safetensors")
    edit_lora_config(snapshot, **changes)
    edit_config(snapshot, lora_config={"r": RANK, "lora_alpha": ALPHA, "init_lora_weights": "gaussian"})
    import_dina(snapshot, tmp_path / "after.safetensors")
    assert_same_drm(tmp_path / "before.safetensors", tmp_path / "after.safetensors")


def assert_same_drm(first, second):
    """Same tensors and metadata (not byte-equal: safetensors writes its metadata in hash-map order)."""
    (a, meta_a), (b, meta_b) = read_safetensors(first), read_safetensors(second)
    assert meta_a == meta_b and list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_legacy_torch_save_head_still_reads(snapshot, tmp_path):
    """torch.save's pre-zip format starts with a pickle opcode, not the zip magic: it is a PyTorch file too."""
    path = snapshot / "checkpoint" / "rm_head.pt"
    import_dina(snapshot, tmp_path / "zip.safetensors")
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    import_dina(snapshot, tmp_path / "legacy.safetensors")
    assert_same_drm(tmp_path / "zip.safetensors", tmp_path / "legacy.safetensors")
