"""Prompt banks for GRPO training and evaluation: prompt texts with their SD3 conditioning.

Accepted files:
- `.txt`: one prompt per line (blank lines and lines starting with # are skipped);
- `.jsonl`: one object per line with a "prompt" key;
- `.safetensors`: pre-encoded, with `context` [P, T, 4096], `pooled` [P, 2048], optionally
  `negative_context` [1, T', 4096] and `negative_pooled` [1, 2048] (default: zeros), and the prompt
  texts as a JSON list in the metadata key `prompts`.
Text files are UTF-8 (a BOM is allowed) and are encoded with the base model's text encoders (cached,
like the DRM trainer's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from drm.checkpoint import atomic_save, read_safetensors

from .config import read_utf8_text
from .data import DatasetError, encode_prompts


@dataclass
class PromptBank:
    texts: list[str]
    context: torch.Tensor  # [P, T, C], right-padded with zeros to the longest prompt
    pooled: torch.Tensor  # [P, D]
    negative_context: torch.Tensor  # [1, T', C]: CFG's unconditional prompt
    negative_pooled: torch.Tensor  # [1, D]
    context_length: torch.Tensor | None = None  # [P] tokens each prompt really has (None: all T)

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self, index) -> PromptBank:
        """The prompts at `index` (a list or LongTensor), with the same negative prompt."""
        index = torch.as_tensor(index, dtype=torch.long)
        return PromptBank([self.texts[i] for i in index.tolist()], self.context[index], self.pooled[index],
                          self.negative_context, self.negative_pooled,
                          None if self.context_length is None else self.context_length[index])

    def save(self, path) -> None:
        tensors = {"context": self.context, "pooled": self.pooled, "negative_context": self.negative_context,
                   "negative_pooled": self.negative_pooled}
        if self.context_length is not None:
            tensors["context_length"] = self.context_length
        atomic_save(tensors, path, {"prompts": json.dumps(self.texts)})


def read_prompt_texts(path: str | Path) -> list[str]:
    """The prompts of a UTF-8 .txt or .jsonl file; a DatasetError naming the file (and line) when it cannot be used."""
    path = Path(path)
    texts = []
    for number, line in enumerate(read_utf8_text(path, "prompts file", DatasetError).splitlines(), start=1):
        if not line.strip() or (path.suffix == ".txt" and line.lstrip().startswith("#")):
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"prompts file {path}, line {number}: malformed JSON ({e.msg}).") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise DatasetError(f"prompts file {path}, line {number}: expected an object with a \"prompt\" string.")
            line = item["prompt"]
        texts.append(line.strip())
    if not texts:
        raise DatasetError(f"prompts file {path} holds no prompts; write one prompt per line.")
    return texts


def load_prompt_bank(path: str | Path, clip=None, cache_dir: Path | None = None,
                     text_encoder_id: str = "", t5_length: int = 77) -> PromptBank:
    """A prompt bank from a text file (encoded with `clip`, T5 padded to at least `t5_length` tokens) or a
    pre-encoded .safetensors file (optionally with `context_length` [P])."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, "prompts file", "Check the --prompts path.")
        if not {"context", "pooled"} <= set(tensors):
            raise DatasetError(f"prompts file {path.name} lacks `context` and `pooled` tensors.")
        context, pooled = tensors["context"].float(), tensors["pooled"].float()
        texts = json.loads(metadata.get("prompts", "[]")) or [f"prompt {i}" for i in range(len(context))]
        lengths = tensors.get("context_length")
        return PromptBank(texts, context, pooled,
                          tensors.get("negative_context", torch.zeros(1, 1, context.shape[-1])).float(),
                          tensors.get("negative_pooled", torch.zeros(1, pooled.shape[-1])).float(),
                          None if lengths is None else lengths.long())
    if clip is None:
        raise DatasetError(f"prompts file {path.name} is text, and the base model has no text encoders: "
                           "pass --clip files, a full checkpoint, or a pre-encoded .safetensors prompt bank.")
    from .data import clip_prompt_encoder

    texts = read_prompt_texts(path)
    encoder = clip_prompt_encoder(clip, t5_length)
    text_encoder_id = f"{text_encoder_id}:t5xxl_min_length={t5_length}"
    context, pooled, lengths = encode_prompts(texts, encoder, cache_dir, text_encoder_id, progress=True)
    negative_context, negative_pooled, _ = encode_prompts([""], encoder, cache_dir, text_encoder_id, progress=False)
    return PromptBank(texts, context, pooled, negative_context, negative_pooled, lengths)
