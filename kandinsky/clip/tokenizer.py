"""CLIP tokenizer: prompts -> (input_ids, attention_mask), padded to 77 tokens.

The byte-pair encoding itself is transformers' ``CLIPTokenizer`` (vocab.json +
merges.txt of the checkpoint's ``tokenizer/`` folder). This wrapper calls it exactly as
diffusers' Kandinsky 2.2 prior pipeline does: ``padding="max_length"``,
``max_length=model_max_length`` (77), ``truncation=True``. A prompt is
``<|startoftext|> tokens <|endoftext|>`` followed by ``<|endoftext|>`` padding.

The limit: CLIP reads 77 tokens, so a prompt keeps its first 75 BPE tokens (about 55-60
English words; punctuation and rare words take several tokens) and still ends with
``<|endoftext|>``; the rest is dropped, as in diffusers and the original Kandinsky, with a
warning that names the dropped words.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kandinsky.callsite import user_stacklevel

CONTEXT_LENGTH = 77  # CLIP's text context (positions of the text encoder)


class Tokenizer:
    """Wraps a transformers CLIPTokenizer; ``__call__(prompts) -> (ids (B, 77) long, mask (B, 77) bool)``."""

    def __init__(self, tokenizer, max_length: int = CONTEXT_LENGTH):
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """Load the checkpoint's ``tokenizer/`` folder (vocab.json, merges.txt, tokenizer_config.json)."""
        from transformers import CLIPTokenizer

        folder = Path(folder)
        missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        if missing and not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (a CLIP tokenizer folder).")
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        # model_max_length is 77 in the checkpoint's tokenizer_config.json; a folder
        # without it reports a huge sentinel, so fall back to CLIP's context length.
        max_length = tokenizer.model_max_length
        if not isinstance(max_length, int) or max_length > CONTEXT_LENGTH:
            max_length = CONTEXT_LENGTH
        return cls(tokenizer, max_length)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> input_ids (B, 77) long, attention_mask (B, 77) bool (True = real token)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}.")
        if not prompts:
            raise ValueError("no prompts given (empty list).")
        out = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        self.warn_truncated(prompts)
        return out.input_ids.long(), out.attention_mask.bool()

    def dropped_text(self, prompt: str) -> str | None:
        """The end of ``prompt`` that does not fit in the context (None if it all fits)."""
        tokens = self.tokenizer.tokenize(prompt)  # BPE tokens, without <|startoftext|> / <|endoftext|>
        keep = self.max_length - 2
        if len(tokens) <= keep:
            return None
        return self.tokenizer.decode(self.tokenizer.convert_tokens_to_ids(tokens[keep:])).strip()

    def warn_truncated(self, prompts: list[str]) -> None:
        """One warning per prompt longer than the context, naming the words that are dropped."""
        for i, prompt in enumerate(prompts):
            dropped = self.dropped_text(prompt)
            if dropped is None:
                continue
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            warnings.warn(
                f"{which} is longer than CLIP's {self.max_length - 2} tokens; these words are dropped: "
                f"{dropped!r}. Shorten it, or put what matters first.",
                stacklevel=user_stacklevel(),
            )


