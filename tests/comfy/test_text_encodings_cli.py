"""`python -m trainer drm` with a pairs file in another encoding: exit code 2, one line naming the file.

The DRM trainer reads its pairs file after ComfyUI is imported (GRPO's prompt files are checked
before; tests/unit/test_text_encodings.py covers those), so this runs in the comfy tier.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_drm_with_a_gbk_pairs_file_exits_2_naming_it_before_any_model_loads(comfyui, tmp_path, capsys, suffix):
    from trainer.__main__ import main

    save_file({"x": torch.zeros(1)}, str(tmp_path / "base.safetensors"))  # never loaded: the pairs fail first
    pair = json.dumps({"prompt": "红色的狐狸", "path1": "a.png", "path2": "b.png"}, ensure_ascii=False)
    data = (f"[{pair}]" if suffix == ".json" else pair).encode("gbk")
    (tmp_path / f"pairs{suffix}").write_bytes(data)
    offset = data.index("红".encode("gbk"))

    code = main(["drm", "--base", str(tmp_path / "base.safetensors"), "--data", str(tmp_path / f"pairs{suffix}"),
                 "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err + captured.out
    assert captured.err.startswith(f"error: pairs file {tmp_path / f'pairs{suffix}'} is not UTF-8: byte 0xba at "
                                   f"byte offset {offset} (line 1)"), captured.err
    assert "iconv -f GBK -t UTF-8" in captured.err and captured.err.count("\n") == 1
    assert not (tmp_path / "run").exists()
