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

from drm.checkpoint import read_safetensors
from drm.conditioning import CONTEXT_WIDTH, POOLED_WIDTH
from drm.files import atomic_save, read_utf8_text

from .reward.encoded import encode_prompts
from .reward.pairs import DatasetError


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


def _checked_bank(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> PromptBank:
    """A pre-encoded bank, after checking every tensor's kind and shape and the texts against them."""
    def bad(problem: str) -> DatasetError:
        return DatasetError(f"prompts file {path.name}: {problem}. Expected context [P, T, 4096], pooled [P, 2048], "
                            "optionally negative_context [1, T', 4096], negative_pooled [1, 2048], context_length [P] "
                            "(1..T), and metadata `prompts`: a JSON list of P texts (PromptBank.save writes these).")

    context, pooled = tensors["context"], tensors["pooled"]
    negative_context = tensors.get("negative_context", torch.zeros(1, 1, CONTEXT_WIDTH))
    negative_pooled = tensors.get("negative_pooled", torch.zeros(1, POOLED_WIDTH))
    for name, t, ndim, width in (("context", context, 3, CONTEXT_WIDTH), ("pooled", pooled, 2, POOLED_WIDTH),
                                 ("negative_context", negative_context, 3, CONTEXT_WIDTH),
                                 ("negative_pooled", negative_pooled, 2, POOLED_WIDTH)):
        if not t.is_floating_point() or t.ndim != ndim or t.shape[-1] != width or 0 in t.shape:
            raise bad(f"{name} is {t.dtype} {list(t.shape)}")
        if not torch.isfinite(t).all():
            raise bad(f"{name} holds NaN or infinite values")
    if pooled.shape[0] != context.shape[0] or negative_context.shape[0] != 1 or negative_pooled.shape[0] != 1:
        raise bad(f"context has {context.shape[0]} rows, pooled {pooled.shape[0]}, the negatives "
                  f"{negative_context.shape[0]} and {negative_pooled.shape[0]}")
    lengths = tensors.get("context_length")
    if lengths is not None and (lengths.is_floating_point() or list(lengths.shape) != [context.shape[0]]
                                or not bool(((lengths >= 1) & (lengths <= context.shape[1])).all())):
        raise bad(f"context_length is {lengths.dtype} {list(lengths.shape)} with values outside 1..{context.shape[1]}")
    try:
        texts = json.loads(metadata.get("prompts", "[]"))
    except json.JSONDecodeError as e:
        raise bad(f"its metadata `prompts` is not JSON ({e.msg})") from None
    if texts == []:
        texts = [f"prompt {i}" for i in range(len(context))]
    if not isinstance(texts, list) or len(texts) != len(context) or not all(isinstance(t, str) for t in texts):
        raise bad(f"its metadata `prompts` is not a list of {len(context)} texts, one per context row")
    return PromptBank(texts, context.float(), pooled.float(), negative_context.float(), negative_pooled.float(),
                      None if lengths is None else lengths.long())


def load_prompt_bank(path: str | Path, clip=None, cache_dir: Path | None = None,
                     text_encoder_id: str = "", t5_length: int = 77) -> PromptBank:
    """A prompt bank from a text file (encoded with `clip`, T5 padded to at least `t5_length` tokens) or a
    pre-encoded .safetensors file (optionally with `context_length` [P])."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, "prompts file", "Check the --prompts path.")
        if not {"context", "pooled"} <= set(tensors):
            raise DatasetError(f"prompts file {path.name} lacks `context` and `pooled` tensors.")
        return _checked_bank(path, tensors, metadata)
    if clip is None:
        raise DatasetError(f"prompts file {path.name} is text, and the base model has no text encoders: "
                           "pass --clip files, a full checkpoint, or a pre-encoded .safetensors prompt bank.")
    from .reward.encoders import clip_prompt_encoder

    texts = read_prompt_texts(path)
    encoder = clip_prompt_encoder(clip, t5_length)
    text_encoder_id = f"{text_encoder_id}:t5xxl_min_length={t5_length}"
    context, pooled, lengths = encode_prompts(texts, encoder, cache_dir, text_encoder_id, progress=True)
    negative_context, negative_pooled, _ = encode_prompts([""], encoder, cache_dir, text_encoder_id, progress=False)
    return PromptBank(texts, context, pooled, negative_context, negative_pooled, lengths)
