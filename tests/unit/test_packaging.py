"""Packaging: Comfy Registry metadata, and the pack importing safely outside ComfyUI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the pack itself runs on 3.10

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_registry_metadata_is_complete():
    project = PYPROJECT["project"]
    for key in ("name", "version", "description", "license", "requires-python", "dependencies"):
        assert project.get(key), key
    assert project["urls"]["Repository"].startswith("https://")
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    # The icon URL points into this repository's main branch, at a file that exists.
    prefix = project["urls"]["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy["Icon"].startswith(prefix) and (REPO / comfy["Icon"][len(prefix):]).is_file()


def test_requirements_match_the_declared_dependencies():
    declared = {d.split(">")[0].split("=")[0].strip() for d in PYPROJECT["project"]["dependencies"]}
    listed = {line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()}
    assert declared == {name for name in listed if name}


def test_pack_imports_outside_comfyui_without_registering_nodes():
    """Tools and tests import the folder as a package; with no comfy_api it must not fail."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', r'{REPO / '__init__.py'}', "
        f"submodule_search_locations=[r'{REPO}'])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert module.comfy_entrypoint is None\n"
        "assert 'comfy' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


COMPILED = re.compile(r"(^|/)__pycache__(/|$)|\.py[cod]$|\.so$")


def test_no_compiled_files_are_tracked_or_packed():
    """Governed ComfyUI installs refuse packs with compiled files; the registry packer follows the ignore files."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout, so there is no tracked file list to check")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert listed and not [p for p in listed if COMPILED.search(p)]
    for ignore_file in (".gitignore", ".comfyignore"):
        patterns = (REPO / ignore_file).read_text(encoding="utf-8").splitlines()
        assert {"__pycache__/", "*.py[cod]"} <= set(patterns), ignore_file


def test_the_entry_file_imported_alone_registers_nothing_even_beside_comfyui(tmp_path):
    """pytest imports a rootdir's __init__.py as a plain module when the folder's name is no Python identifier
    (a clone into `comfyui-drm`): with ComfyUI importable, the relative import must not be tried then."""
    (tmp_path / "comfy_api").mkdir()
    (tmp_path / "comfy_api" / "__init__.py").write_text("")
    (tmp_path / "comfy_api" / "latest.py").write_text("")
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, r'{tmp_path}')\n"
        f"spec = importlib.util.spec_from_file_location('__init__', r'{REPO / '__init__.py'}')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "assert module.comfy_entrypoint is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
