"""trainer.demo.world_demo.demo_folder: which folders a demo may empty, and what it refuses before changing anything;
and which finished demo `--install` reuses instead of running the demo again."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import trainer.demo.world_demo as world_demo
from trainer.demo.world_demo import FINISHED, MARKER, demo_folder, finish, run_demo


def earlier_demo(root: Path) -> Path:
    """A folder as a finished demo leaves it."""
    with demo_folder(root):
        (root / "drm").mkdir()
        (root / "drm" / "drm-x.safetensors").write_bytes(b"x")
        (root / "demo.json").write_text("{}")
    return root


def test_an_earlier_demo_is_emptied_and_marked(tmp_path):
    root = earlier_demo(tmp_path / "demo")
    with demo_folder(root) as held:
        assert held == root and sorted(p.name for p in root.iterdir()) == [MARKER, ".lock"]


def test_a_users_folder_with_a_demo_json_is_refused_and_kept(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    (root / "demo.json").write_text('{"name": "my project"}')
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="is not a demo folder; choose another --out"):
        with demo_folder(root):
            pass
    assert (root / "thesis.tex").read_text() == "precious"


def test_a_file_put_into_an_earlier_demo_stops_the_rerun(tmp_path):
    root = earlier_demo(tmp_path / "demo")
    (root / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds notes.txt, which no demo writes; move it out"):
        with demo_folder(root):
            pass
    assert (root / "notes.txt").read_text() == "mine" and (root / "drm" / "drm-x.safetensors").is_file()


def test_a_folder_that_cannot_be_written_is_refused_by_name(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ValueError, match=r"out: cannot write into .*ro \(Read-only file system\); choose a folder"):
        with demo_folder(tmp_path / "ro"):
            pass


def test_a_link_to_an_earlier_demo_empties_the_folder_it_names(tmp_path):
    target = earlier_demo(tmp_path / "demo")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    with demo_folder(link):
        assert link.is_symlink() and not (target / "drm").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    root = earlier_demo(tmp_path / "demo")
    with demo_folder(root):
        (root / "grpo").mkdir()
        with pytest.raises(ValueError, match="another run is writing into"):
            with demo_folder(root):
                pass
        assert (root / "grpo").is_dir()  # the refused run deleted nothing


def test_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file; choose another --out"):
        with demo_folder(tmp_path / "afile" / "sub"):
            pass


SETTINGS = {"seed": 0, "samples_per_prompt": 8, "drm_steps": 300, "grpo_iterations": 50}  # run_demo's defaults
DRM, LORA = "drm/drm-x.safetensors", "grpo/sd35-world-step-grpo.safetensors"


def finished_demo(root: Path) -> Path:
    """A folder as a finished world demo leaves it, with stand-in bytes for its DRM and LoRA."""
    with demo_folder(root):
        for name, content in ((DRM, b"drm bytes"), (LORA, b"lora bytes")):
            (root / name).parent.mkdir()
            (root / name).write_bytes(content)
        (root / "demo.json").write_text(json.dumps({"seconds": 123.4}))
        finish(root, SETTINGS, root / DRM, root / LORA, [root / "demo.json"])
    return root


def test_install_copies_a_finished_demo_without_running_it(tmp_path, monkeypatch, capsys):
    from trainer.demo.world_data import GENERATOR, PROMPTS, VAE, WORLD_DIR
    from trainer.prompts import load_prompt_bank

    def retrain(*args):
        raise AssertionError("the finished demo was run again")

    monkeypatch.setattr(world_demo, "world_demo", retrain)
    root, models = finished_demo(tmp_path / "demo"), tmp_path / "models"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert run_demo(out=str(root), install_into=models, **SETTINGS) == {"seconds": 123.4}
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"--install: the demo's files go into {models}, ComfyUI's models folder."
    assert f"Reusing the demo that finished in {root}" in out
    assert (models / "drm" / "drm-x.safetensors").read_bytes() == b"drm bytes"
    assert (models / "loras" / "sd35-world-step-grpo.safetensors").read_bytes() == b"lora bytes"
    assert (models / "diffusion_models" / GENERATOR).read_bytes() == (WORLD_DIR / GENERATOR).read_bytes()
    assert (models / "vae" / VAE).read_bytes() == (WORLD_DIR / VAE).read_bytes()
    prompts = load_prompt_bank(WORLD_DIR / PROMPTS)
    assert len(list((models / "drm_conditioning").iterdir())) == len(prompts) + 1  # and the empty negative
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # the demo folder is left as it was


def test_install_says_how_to_put_the_pack_in_custom_nodes_until_it_is_there(tmp_path, monkeypatch, capsys):
    """Step 1 of the README clones ComfyUI beside the pack; ComfyUI only loads nodes from its custom_nodes."""
    pack = Path(world_demo.__file__).resolve().parents[2]
    comfyui = tmp_path / "ComfyUI"
    root, models = finished_demo(tmp_path / "demo"), comfyui / "models"
    hint = f"ln -s {pack} {comfyui / 'custom_nodes' / pack.name}"
    run_demo(out=str(root), install_into=models, **SETTINGS)
    assert capsys.readouterr().out.splitlines()[-1].endswith(hint)
    (comfyui / "custom_nodes").mkdir()
    (comfyui / "custom_nodes" / "comfyui-drm").symlink_to(pack)
    run_demo(out=str(root), install_into=models, **SETTINGS)
    assert "custom_nodes" not in capsys.readouterr().out


# how the folder is damaged (after finishing), the run_demo settings that differ, and the reason printed
DAMAGE = {
    "never finished": (lambda root: (root / FINISHED).unlink(), {}, "no demo finished there"),
    "record garbled": (lambda root: (root / FINISHED).write_text('{"demo": "wor'), {}, f"its {FINISHED} cannot be read"),
    "record not a record": (lambda root: (root / FINISHED).write_text("[]"), {}, f"its {FINISHED} is damaged"),
    "LoRA missing": (lambda root: (root / LORA).unlink(), {}, f"{LORA} is missing or changed"),
    "DRM changed": (lambda root: (root / DRM).write_bytes(b"other bytes"), {}, f"{DRM} is missing or changed"),
    "another seed": (lambda root: None, {"seed": 1}, "it ran with seed 0, not 1"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_install_runs_the_demo_again_unless_the_one_there_finished_intact(tmp_path, monkeypatch, capsys, case):
    damage, changed, reason = DAMAGE[case]
    calls = []

    def demo(root, seed, *args):
        calls.append((seed, sorted(p.name for p in root.iterdir())))
        return {"ran": True}

    monkeypatch.setattr(world_demo, "world_demo", demo)
    root, models = finished_demo(tmp_path / "demo"), tmp_path / "models"
    damage(root)
    settings = {**SETTINGS, **changed}

    assert run_demo(out=str(root), install_into=models, **settings) == {"ran": True}
    assert calls == [(settings["seed"], sorted([MARKER, ".lock"]))]  # run once, into the emptied folder
    assert f"No finished demo to reuse in {root} ({reason}): running it first" in capsys.readouterr().out
    assert not models.exists()  # nothing was copied from the damaged demo


def test_a_demo_made_from_other_world_files_is_not_reused(tmp_path, monkeypatch, capsys):
    root = finished_demo(tmp_path / "demo")
    monkeypatch.setattr(world_demo, "world_digests", lambda: {"sd35-world.safetensors": "0" * 64})
    monkeypatch.setattr(world_demo, "world_demo", lambda *args: {"ran": True})
    assert run_demo(out=str(root), install_into=tmp_path / "models", **SETTINGS) == {"ran": True}
    assert "(world/ has changed since it ran)" in capsys.readouterr().out
