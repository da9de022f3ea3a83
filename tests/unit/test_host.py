"""Finding and importing ComfyUI (drm.host), on stand-in trees: no real ComfyUI needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fake_tree(root: Path, model_management: str) -> Path:
    """The files import_comfy touches, with `model_management` as comfy/model_management.py."""
    files = {
        "comfyui_version.py": '__version__ = "9.9.9"\n',
        "folder_paths.py": "",
        "comfy/__init__.py": "",
        "comfy/cli_args.py": "class _Args:\n    cpu = False\n\nargs = _Args()\n",
        "comfy/model_management.py": model_management,
        "comfy/sd.py": "", "comfy/samplers.py": "", "comfy/sample.py": "",
        "utils/__init__.py": "", "utils/extra_config.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def import_in_subprocess(tree: Path) -> subprocess.CompletedProcess:
    code = (f"from drm.host import ComfyUIImportFailed, import_comfy\n"
            f"try:\n    import_comfy(r'{tree}', cpu=True)\n"
            f"except ComfyUIImportFailed as e:\n    print(e)\n    raise SystemExit(3)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_missing_package_names_the_tree_the_module_and_the_fix(tmp_path):
    tree = fake_tree(tmp_path / "ComfyUI", "import comfy_aimdo_that_is_not_installed\n")
    result = import_in_subprocess(tree)
    assert result.returncode == 3, result.stderr
    message = result.stdout
    assert f"ComfyUI 9.9.9 at {tree}" in message
    assert "'comfy_aimdo_that_is_not_installed' is missing" in message
    assert f"pip install -r {tree / 'requirements.txt'}" in message


def test_a_complete_tree_imports(tmp_path):
    tree = fake_tree(tmp_path / "ComfyUI", "")
    result = import_in_subprocess(tree)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_trainer_reports_it_with_exit_code_2(tmp_path):
    tree = fake_tree(tmp_path / "ComfyUI", "import torchaudio_that_is_not_installed\n")
    result = subprocess.run([sys.executable, "-m", "trainer", "--comfyui", str(tree), "demo", "--out",
                             str(tmp_path / "demo")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "'torchaudio_that_is_not_installed' is missing" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "demo").exists()
