"""Every text input is read as UTF-8 (a BOM allowed); other encodings get a message naming the file.

Readers: prompt files (.txt, .jsonl), pairs files (.json, .jsonl), TOML configs, and the text kept in
safetensors metadata (cached conditioning, pre-encoded pairs, pre-encoded prompt banks). The
safetensors library refuses a header that is not UTF-8 as a whole, so those files must be refused
saying so, not called truncated.
"""

from __future__ import annotations

import argparse
import codecs
import json

import pytest
import torch
from safetensors.torch import save_file

from drm.checkpoint import DRMCheckpointError
from drm.conditioning import load_conditioning, save_conditioning
from trainer.__main__ import main
from trainer.config import ConfigError, Settings, field, load_config
from trainer.prompts import PromptBank, load_prompt_bank, read_prompt_texts
from trainer.reward.encoded import EncodedPairs
from trainer.reward.pairs import DatasetError, load_pairs

PROMPT = "红色的狐狸"  # its GBK bytes start with 0xba, which UTF-8 never starts a character with
ENCODINGS = ["gbk", "latin-1"]
FOREIGN = {"gbk": PROMPT, "latin-1": "café crème"}


def write_foreign(path, lines: list[str], encoding: str) -> int:
    """Write `lines` in `encoding`; the byte offset of the first byte that is not UTF-8."""
    data = "\n".join(lines).encode(encoding) + b"\n"
    path.write_bytes(data)
    for offset in range(len(data)):
        try:
            data[:offset + 1].decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":
                return e.start
    raise AssertionError(f"{lines} in {encoding} is valid UTF-8")


def assert_explains(message: str, path, offset: int, line: int) -> None:
    assert str(path) in message, message
    assert "is not UTF-8" in message and f"byte offset {offset} (line {line})" in message, message
    assert "Re-save it as UTF-8" in message and f"iconv -f GBK -t UTF-8 {path.name}" in message, message


def pair_line(prompt: str) -> str:
    return json.dumps({"prompt": prompt, "path1": "a.png", "path2": "b.png"}, ensure_ascii=False)


# --- prompt files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompt_file_in_another_encoding_is_named_and_explained(tmp_path, encoding, suffix):
    path = tmp_path / f"prompts{suffix}"
    lines = ["a red fox", FOREIGN[encoding]]
    offset = write_foreign(path, [json.dumps({"prompt": p}, ensure_ascii=False) for p in lines] if suffix == ".jsonl"
                           else lines, encoding)
    with pytest.raises(DatasetError) as info:
        read_prompt_texts(path)
    assert_explains(str(info.value), path, offset, line=2)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_prompt_file_with_a_bom_reads_like_one_without(tmp_path, suffix):
    path = tmp_path / f"prompts{suffix}"
    lines = ["# a comment first, which the BOM must not hide", PROMPT, "a red fox"] if suffix == ".txt" else \
        [json.dumps({"prompt": PROMPT}, ensure_ascii=False), json.dumps({"prompt": "a red fox"})]
    path.write_bytes(codecs.BOM_UTF8 + "\r\n".join(lines).encode("utf-8"))
    assert read_prompt_texts(path) == [PROMPT, "a red fox"]


# --- pairs files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_pairs_file_in_another_encoding_is_named_and_explained(tmp_path, encoding, suffix):
    path = tmp_path / f"pairs{suffix}"
    lines = [pair_line("a red fox"), pair_line(FOREIGN[encoding])]
    if suffix == ".json":
        lines = ["[", lines[0] + ",", lines[1], "]"]
    offset = write_foreign(path, lines, encoding)
    with pytest.raises(DatasetError) as info:
        load_pairs(path)
    assert_explains(str(info.value), path, offset, line=2 if suffix == ".jsonl" else 3)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_pairs_file_with_a_bom_reads_like_one_without(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    text = f"[{pair_line(PROMPT)}]" if suffix == ".json" else pair_line(PROMPT)
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    (record,) = load_pairs(path)
    assert record.prompt == PROMPT and record.preferred == tmp_path / "a.png"


# --- TOML configs ---------------------------------------------------------------------------------


class NameConfig(Settings):
    name: str = field("", "a name")

    def validate(self) -> None:
        pass


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_config_in_another_encoding_is_named_and_explained(tmp_path, encoding):
    path = tmp_path / "run.toml"
    offset = write_foreign(path, ["# a run", f'name = "{FOREIGN[encoding]}"'], encoding)
    with pytest.raises(ConfigError) as info:
        load_config(NameConfig, argparse.Namespace(config=str(path)))
    message = str(info.value)
    assert message.startswith("config: file"), message
    assert_explains(message, path, offset, line=2)


def test_config_with_a_bom_reads_like_one_without(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(codecs.BOM_UTF8 + f'# a run\r\nname = "{PROMPT}"\r\n'.encode())
    assert load_config(NameConfig, argparse.Namespace(config=str(path))).name == PROMPT


# --- text in safetensors metadata -----------------------------------------------------------------


def corrupt_metadata(path, marker: str, encoding: str) -> int:
    """Replace `marker` in the file's header by FOREIGN[encoding] in `encoding`, keeping the header's
    length; the byte offset of the first byte that is not UTF-8."""
    data = path.read_bytes()
    foreign = FOREIGN[encoding].encode(encoding)
    assert len(marker) == len(foreign)
    at = data.index(marker.encode())
    path.write_bytes(data[:at] + foreign + data[at + len(foreign):])
    return at + next(i for i, byte in enumerate(foreign) if byte >= 0x80)


def assert_says_not_utf8(message: str, path, offset: int) -> None:
    assert path.name in message and "is not UTF-8" in message and f"byte offset {offset} of the file" in message
    assert "truncated" not in message and "Write the file again with its text as UTF-8" in message, message


def marker_for(encoding: str) -> str:
    return "x" * len(FOREIGN[encoding].encode(encoding))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_conditioning_whose_prompt_metadata_is_not_utf8_says_so(tmp_path, encoding):
    path = tmp_path / "cond.safetensors"
    save_conditioning(path, torch.zeros(1, 3, 8), torch.zeros(1, 4), prompt=marker_for(encoding))
    offset = corrupt_metadata(path, marker_for(encoding), encoding)
    with pytest.raises(DRMCheckpointError) as info:
        load_conditioning(path)
    assert info.value.args[0].startswith("conditioning file cond.safetensors: its header")
    assert_says_not_utf8(str(info.value), path, offset)


def test_conditioning_with_utf8_prompt_metadata_loads_and_a_cut_file_is_still_called_truncated(tmp_path):
    path = tmp_path / "cond.safetensors"
    save_conditioning(path, torch.ones(1, 3, 4096), torch.ones(1, 2048), prompt=PROMPT)
    ((context, extra),) = load_conditioning(path)
    assert torch.equal(context, torch.ones(1, 3, 4096)) and torch.equal(extra["pooled_output"], torch.ones(1, 2048))
    # cut inside the prompt's first character: an incomplete header, not a wrong encoding
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:data.index(PROMPT.encode()) + 1])
    with pytest.raises(DRMCheckpointError, match="cut.safetensors is not a readable safetensors file.*truncated"):
        load_conditioning(tmp_path / "cut.safetensors")


def test_encoded_pairs_whose_prompts_metadata_is_not_utf8_say_so(tmp_path):
    path = tmp_path / "pairs.safetensors"
    EncodedPairs(torch.zeros(1, 16, 2, 2), torch.zeros(1, 16, 2, 2), torch.zeros(1, 3, 8), torch.zeros(1, 4),
                 torch.zeros(1, dtype=torch.long), [marker_for("gbk")]).save(path)
    offset = corrupt_metadata(path, marker_for("gbk"), "gbk")
    with pytest.raises(DatasetError) as info:
        EncodedPairs.load(path)
    assert_says_not_utf8(str(info.value), path, offset)
    assert "EncodedPairs.save" in str(info.value)


def test_prompt_bank_whose_prompts_metadata_is_not_utf8_says_so(tmp_path):
    path = tmp_path / "bank.safetensors"
    PromptBank([marker_for("latin-1")], torch.zeros(1, 3, 8), torch.zeros(1, 4), torch.zeros(1, 3, 8),
               torch.zeros(1, 4)).save(path)
    offset = corrupt_metadata(path, marker_for("latin-1"), "latin-1")
    with pytest.raises(DRMCheckpointError) as info:
        load_prompt_bank(path)
    assert_says_not_utf8(str(info.value), path, offset)


# --- the command line: exit code 2, one clear line, before any model loads -------------------------


@pytest.fixture
def grpo_files(tmp_path) -> dict[str, str]:
    shapes = {"x_embedder.proj.weight": (128, 16, 2, 2), "context_embedder.weight": (128, 4096)}
    for name in ("base", "drm"):
        save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / "prompts.txt").write_text("a red cube\n", encoding="utf-8")
    return {"base": str(tmp_path / "base.safetensors"), "drm": str(tmp_path / "drm.safetensors"),
            "prompts": str(tmp_path / "prompts.txt"), "out": str(tmp_path / "run")}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


@pytest.mark.parametrize(("flag", "suffix"), [("prompts", ".txt"), ("eval_prompts", ".jsonl")])
def test_grpo_with_a_gbk_prompt_file_exits_2_naming_it(grpo_files, tmp_path, capsys, flag, suffix):
    path = tmp_path / f"gbk{suffix}"
    offset = write_foreign(path, [PROMPT if suffix == ".txt" else json.dumps({"prompt": PROMPT}, ensure_ascii=False)],
                           "gbk")
    files = {**grpo_files, flag: str(path)}
    code, err = run_cli(["grpo", *(a for k, v in files.items() for a in (f"--{k.replace('_', '-')}", v))], capsys)
    assert code == 2
    assert err.startswith(f"error: {flag}: prompts file {path} is not UTF-8: ") and err.count("\n") == 1, err
    assert_explains(err, path, offset, line=1)
    assert not (tmp_path / "run").exists()


def test_grpo_with_a_gbk_config_exits_2_naming_it(grpo_files, tmp_path, capsys):
    path = tmp_path / "grpo.toml"
    offset = write_foreign(path, [f'{k} = "{v}"' for k, v in grpo_files.items()] + [f"# {PROMPT}"], "gbk")
    code, err = run_cli(["grpo", "--config", str(path)], capsys)
    assert code == 2 and err.startswith(f"error: config: file {path} is not UTF-8: "), err
    assert_explains(err, path, offset, line=len(grpo_files) + 1)


@pytest.mark.parametrize(("line", "message"), [
    ("lr = nan", "lr: expected a finite number"),
    ("grad_clip = inf", "grad_clip: expected a finite number"),
    ("max_steps = true", "max_steps: expected int, got True"),
    ("lr = true", "lr: expected float, got True"),
    ('out = ["a", "b"]', "out: expected str"),
    ("data = {x = 1}", "data: expected str"),
    ("seed = 99999999999999999999999", "seed: .* too large"),
    ("lr = -1", r"lr: expected > 0"),
    ("head_dropout = 2", r"head_dropout: expected a probability in \[0, 1\)"),
    ("weight_decay = -1", "weight_decay: expected >= 0"),
])
def test_config_values_of_the_wrong_kind_or_range_are_refused_by_name(tmp_path, line, message):
    """TOML gives typed values: each must be the field's kind, finite and in range, or the run is refused."""
    from trainer.reward.config import DRMTrainConfig

    (tmp_path / "base.safetensors").write_bytes(b"x")
    (tmp_path / "pairs.json").write_text("[]", encoding="utf-8")
    lines = {"base": f'base = "{tmp_path / "base.safetensors"}"', "data": f'data = "{tmp_path / "pairs.json"}"',
             "out": f'out = "{tmp_path / "out"}"'}
    lines[line.split("=")[0].strip()] = line
    config = tmp_path / "drm.toml"
    config.write_text("\n".join(lines.values()) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_config(DRMTrainConfig, argparse.Namespace(config=str(config)))
    assert not (tmp_path / "out").exists() and not (tmp_path / "['a', 'b']").exists()
