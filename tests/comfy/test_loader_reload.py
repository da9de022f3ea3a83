"""A file replaced under the same name is read again (issue 24, kind 5).

ComfyUI reuses a node's cached output while its inputs and its fingerprint (V3 `fingerprint_inputs`, V1's
IS_CHANGED) stay the same. The loaders' fingerprints are the file's path, size and modification time, so a
retrained DRM or re-cached prompt copied over the old file is loaded again. tests/server/test_server.py
shows the whole round trip through a real server.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture()
def files(models_dir):
    """A DRM and a cached prompt under fresh names in the test models folder; removed afterwards."""
    from drm.conditioning import save_conditioning
    from drm.files import atomic_save
    from trainer.demo.tiny import tiny_conditioning, tiny_drm_state_dict, tiny_generator_state_dict

    generator = tiny_generator_state_dict()
    drm, prompt = models_dir / "drm" / "reload-drm.safetensors", models_dir / "drm_conditioning" / "reload.safetensors"

    def write_drm(seed: int):
        atomic_save(tiny_drm_state_dict(generator, seed=seed), drm, {"drm.format": "full", "drm.blocks": "1"})

    def write_prompt(seed: int):
        cond = tiny_conditioning(seed=seed)
        save_conditioning(prompt, cond[0][0], cond[0][1]["pooled_output"], prompt=f"prompt {seed}")

    write_drm(1)
    write_prompt(0)
    yield dict(write_drm=write_drm, write_prompt=write_prompt, drm=drm, prompt=prompt)
    drm.unlink(missing_ok=True)
    prompt.unlink(missing_ok=True)


@pytest.mark.parametrize("node, folder, field", [("DRMLoader", "drm", "drm_name"),
                                                 ("DRMLoadConditioning", "drm_conditioning", "conditioning_name")])
def test_the_fingerprint_is_one_comfyui_reads_and_follows_the_file(pack, files, node, folder, field):
    from comfy_api.internal import first_real_override

    cls = getattr(pack.nodes.loader, node)
    assert first_real_override(cls, "fingerprint_inputs") is not None  # how ComfyUI decides to call it
    path = files["drm"] if folder == "drm" else files["prompt"]
    name = path.name
    before = cls.fingerprint_inputs(**{field: name}, weight_dtype="fp32")
    assert cls.fingerprint_inputs(**{field: name}, weight_dtype="fp32") == before  # untouched: stays cached
    size = path.stat().st_size
    (files["write_drm"] if folder == "drm" else files["write_prompt"])(7)  # replaced, same name, same size
    assert path.stat().st_size == size
    replaced = cls.fingerprint_inputs(**{field: name}, weight_dtype="fp32")
    assert replaced != before
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # rewritten in place
    assert cls.fingerprint_inputs(**{field: name}) != replaced
    path.unlink()
    assert cls.fingerprint_inputs(**{field: name}) == "missing"  # no error: validation names the missing file


def test_the_loaders_read_the_replaced_files(pack, files):
    """What running the nodes again gives: the new file's DRM and prompt, not the old ones."""
    from drm.conditioning import load_conditioning

    loader, cached = pack.nodes.loader.DRMLoader, pack.nodes.loader.DRMLoadConditioning
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))

    def scores():
        drm = loader.execute(files["drm"].name, "fp32").args[0]
        return drm.score_latents(x, 0.5, cached.execute(files["prompt"].name).args[0])

    first = scores()
    files["write_drm"](7)
    files["write_prompt"](5)
    again = scores()
    assert not torch.allclose(first, again)
    assert torch.equal(cached.execute(files["prompt"].name).args[0][0][0], load_conditioning(files["prompt"])[0][0])
