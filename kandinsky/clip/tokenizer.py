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

    def dropped_text(self, prompt: str) -> tuple[str, str] | None:
        """What of ``prompt`` does not fit in the context, in whole words: ``(dropped, cut)`` with ``dropped``
        the words from the first one not wholly kept to the end, and ``cut`` the kept beginning of that
        first word when the limit falls inside it (else ""); None if the prompt fits."""
        ids = self.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids  # (no length warning)
        tokens = self.tokenizer.convert_ids_to_tokens(ids)  # BPE tokens; a word's last one ends with "</w>"
        keep = self.max_length - 2  # <|startoftext|> and <|endoftext|> take two places
        if len(tokens) <= keep:
            return None
        start = keep
        while start > 0 and not tokens[start - 1].endswith("</w>"):  # back to the start of the word cut
            start -= 1
        cut = self.tokenizer.decode(ids[start:keep]).strip() if start < keep else ""
        return self.tokenizer.decode(ids[start:]).strip(), cut

    def warn_truncated(self, prompts: list[str]) -> None:
        """One warning per prompt longer than the context, quoting the words dropped (whole). A prompt is named
        by its beginning when several are too long (an index would not be the caller's: the prior encodes
        the distinct strings of its prompts and negative prompts in one batch)."""
        long = {prompt: truncated for prompt in dict.fromkeys(prompts)
                if (truncated := self.dropped_text(prompt)) is not None}
        for prompt, (dropped, cut) in long.items():
            which = "the prompt" if len(long) == 1 else f"the prompt starting {prompt[:20] + '...'!r}"
            first = f" (of {dropped.split()[0]!r}, only {cut!r} is kept)" if cut else ""
            warnings.warn(
                f"{which} is longer than CLIP's {self.max_length - 2} tokens; these words are dropped: "
                f"{dropped!r}{first}. Shorten it, or put what matters first.",
                stacklevel=user_stacklevel(),
            )
