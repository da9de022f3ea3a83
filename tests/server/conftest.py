"""Server tier: one real ComfyUI server (from COMFYUI_PATH) for the whole session, with this pack
installed as a custom node, and the shapes world's and the tiny models in its model folders.

Tests here talk to the server over HTTP only (standard library, no `requests`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui-drm"  # the folder name a user would clone this pack into
STARTUP_TIMEOUT = 120.0
LOG_TAIL_LINES = 60


class PromptRejected(AssertionError):
    """POST /prompt answered an error (the graph failed validation); `body` is the server's JSON."""

    def __init__(self, status: int, body):
        super().__init__(f"POST /prompt answered HTTP {status}: {json.dumps(body, indent=1)[:4000]}")
        self.status = status
        self.body = body


class ComfyServer:
    """A running ComfyUI server and small HTTP helpers for tests."""

    PromptRejected = PromptRejected
    pack_folder = PACK_FOLDER

    def __init__(self, process: subprocess.Popen, base_url: str, root: Path, log_path: Path):
        self.process = process
        self.base_url = base_url
        self.root = root
        self.log_path = log_path
        self.output_dir = root / "output"

    # ---- HTTP ----

    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0):
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.base_url + path, data=body,
                                         headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode() or "null")

    def get(self, path: str, timeout: float = 30.0):
        """GET `path` (e.g. "/object_info") and decode its JSON answer."""
        return self._request(path, timeout=timeout)

    def post(self, path: str, data: dict, timeout: float = 30.0):
        return self._request(path, data, timeout=timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def post_prompt(self, workflow: dict) -> str:
        """Queue an API-format workflow; returns its prompt id. Raises PromptRejected on a validation error."""
        prompt_id = str(uuid.uuid4())  # newer servers validate prompt ids as UUIDs
        payload = {"prompt": workflow, "client_id": str(uuid.uuid4()), "prompt_id": prompt_id}
        try:
            answer = self.post("/prompt", payload)
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
            raise PromptRejected(e.code, body) from None
        assert answer["prompt_id"] == prompt_id, answer
        return prompt_id

    def wait_for(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """The /history entry of a finished prompt (success or error), polling until it appears."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                return entry
            if not self.alive():
                raise AssertionError(f"the ComfyUI server died while running prompt {prompt_id}.\n"
                                     f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; queue: "
                                     f"{self.get('/queue')}\n{self.log_tail()}")
            time.sleep(0.1)

    # ---- diagnostics ----

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def describe_failure(self, entry: dict) -> str:
        """A history entry's status messages (errors in full, others by name) and the server log tail."""
        status = entry.get("status") or {}
        parts = [f"status: {status.get('status_str')} (completed={status.get('completed')})"]
        for event, data in status.get("messages", []):
            if event in ("execution_error", "execution_interrupted"):
                parts.append(f"{event}: node {data.get('node_id')} ({data.get('node_type')}): "
                             f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                             + "".join(data.get("traceback") or []))
            else:
                parts.append(event)
        parts.append(f"outputs: {json.dumps(entry.get('outputs'))[:2000]}")
        parts.append(self.log_tail())
        return "\n".join(parts)


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            last = deque(f, maxlen=lines)
    except OSError as e:
        return f"(no server log: {e})"
    # A progress bar is one line redrawn after carriage returns: keep what a terminal would show.
    return f"--- last {len(last)} lines of {path} ---\n" + "".join(line.rsplit("\r", 1)[-1] for line in last)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_models(models: Path) -> None:
    """The files the example workflows name, in about a second: no training, no progress bars.

    The shapes world's model, VAE and cached prompts as `python -m trainer demo --install` installs them,
    with an untrained DRM and LoRA for it under the names the demo gives its trained ones; and the tiny
    random-weight files that stand in for real SD3.5 weights (tools.build_workflows.with_tiny_stand_ins)
    and that the other server tests name."""
    from safetensors.torch import load_file

    from drm.conditioning import save_conditioning
    from drm.dina import import_dina
    from drm.files import atomic_save
    from tools.build_workflows import WORLD_DRM, WORLD_LORA
    from trainer.demo.synthetic import tiny_dina_snapshot, tiny_vae_state_dict
    from trainer.demo.tiny import (
        tiny_adapter_drm_state_dict,
        tiny_conditioning,
        tiny_generator_state_dict,
        tiny_lora_state_dict,
    )
    from trainer.demo.world_data import GENERATOR, PROMPTS, VAE, WORLD_DIR, save_conditioning_files
    from trainer.prompts import load_prompt_bank

    world = load_file(str(WORLD_DIR / GENERATOR))
    shutil.copyfile(WORLD_DIR / GENERATOR, models / "diffusion_models" / GENERATOR)
    shutil.copyfile(WORLD_DIR / VAE, models / "vae" / VAE)
    atomic_save(tiny_adapter_drm_state_dict(world, blocks=2), models / "drm" / WORLD_DRM,
                {"drm.format": "adapter", "drm.blocks": "2"})
    atomic_save(tiny_lora_state_dict(world), models / "loras" / WORLD_LORA, {})
    save_conditioning_files(load_prompt_bank(WORLD_DIR / PROMPTS), models / "drm_conditioning")

    generator = tiny_generator_state_dict()
    atomic_save(generator, models / "diffusion_models" / "tiny-sd35.safetensors", {})
    atomic_save(tiny_vae_state_dict(), models / "vae" / "tiny-vae.safetensors", {})
    atomic_save(tiny_adapter_drm_state_dict(generator), models / "drm" / "tiny-drm.safetensors",
                {"drm.format": "adapter", "drm.blocks": "1"})
    atomic_save(tiny_lora_state_dict(generator), models / "loras" / "tiny-sd35-step-grpo.safetensors", {})
    import_dina(tiny_dina_snapshot(models.parent / "dina-snapshot", generator), models / "drm" / "tiny-dina.safetensors")
    for name, seed, tokens in (("tiny-prompt-0", 0, 8), ("tiny-prompt-1", 1, 8), ("tiny-negative", 2, 8),
                               ("tiny-prompt-t5-128", 0, 77 + 128)):
        cond = tiny_conditioning(seed=seed, tokens=tokens)
        save_conditioning(models / "drm_conditioning" / f"{name}.safetensors", cond[0][0],
                          cond[0][1]["pooled_output"], prompt=name)


def _write_extra_paths(path: Path, models: Path, custom_nodes: Path) -> None:
    # ComfyUI 0.3.64's utils/extra_config.py: every key but base_path / is_default is a folder name
    # passed to folder_paths.add_model_folder_path, custom_nodes included; relative paths join base_path.
    # JSON is valid YAML, so no YAML writer is needed.
    config = {"drm_server_tests": {
        "base_path": str(models.parent),
        "is_default": True,
        "diffusion_models": "models/diffusion_models",
        "vae": "models/vae",
        "loras": "models/loras",
        "drm": "models/drm",
        "drm_conditioning": "models/drm_conditioning",
        "custom_nodes": custom_nodes.name,
    }}
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


@pytest.fixture(scope="session")
def server(comfyui, tmp_path_factory) -> Iterator[ComfyServer]:
    """A ComfyUI server on a free port, loading this repository as custom node `comfyui-drm`.

    The server starts first, so a server that cannot start fails this fixture at once, with the fix;
    the tiny model files are written once it answers (ComfyUI lists model folders on every request).
    """
    root = tmp_path_factory.mktemp("comfyui-server")
    models = root / "models"
    for name in ("diffusion_models", "vae", "loras", "drm", "drm_conditioning"):
        (models / name).mkdir(parents=True)
    custom_nodes = root / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)

    extra_paths = root / "extra_model_paths.yaml"
    _write_extra_paths(extra_paths, models, custom_nodes)
    for name in ("output", "input", "temp"):
        (root / name).mkdir()

    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    command = [
        sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--extra-model-paths-config", str(extra_paths),
        "--database-url", "sqlite:///:memory:",
        "--output-directory", str(root / "output"),
        "--input-directory", str(root / "input"),
        "--temp-directory", str(root / "temp"),
        "--disable-auto-launch",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=str(comfyui), env=env, stdin=subprocess.DEVNULL,
                                   stdout=log, stderr=subprocess.STDOUT)
    server = ComfyServer(process, base_url, root, log_path)
    try:
        _wait_until_ready(server, comfyui)
        _build_models(models)
        yield server
    finally:
        _stop(process)


def _wait_until_ready(server: ComfyServer, comfyui: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if not server.alive():
            pytest.fail(f"the ComfyUI server exited with code {server.process.returncode} during startup."
                        f"{_missing_module_hint(server.log_text(), comfyui)}\n{server.log_tail()}", pytrace=False)
        try:
            server.get("/system_stats", timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the ComfyUI server did not answer {server.base_url}/system_stats within "
                        f"{STARTUP_TIMEOUT:.0f} s.\n{server.log_tail()}", pytrace=False)
        time.sleep(0.25)


def _missing_module_hint(log: str, comfyui: Path) -> str:
    """' It needs the package X: pip install ...' when the log shows a missing module, else ''."""
    found = re.findall(r"No module named '([^'.]+)", log)
    if not found:
        return ""
    return (f" It needs the module {found[-1]!r}, which this environment lacks: pip install {found[-1]} "
            f"(ComfyUI's own packages: pip install -r {comfyui / 'requirements.txt'}).")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)
