"""Tokenizers: Hugging Face `tokenizer.json` through the `tokenizers` library, or a built-in byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 is BOS, 257 is EOS. Lossless for any text."""

    BOS = 256
    EOS = 257
    vocab_size = 258

    def __init__(self) -> None:
        self.eos_token_ids = (self.EOS,)
        self.bos_token_id: int | None = self.BOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if 0 <= t < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` (fast tokenizer) with EOS/BOS taken from tokenizer_config.json when present."""

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        self._tok = FastTokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = None
        self.eos_token_ids: tuple[int, ...] = ()
        config_path = model_dir / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text())
            self.bos_token_id = self._token_id(config.get("bos_token"))
            eos = self._token_id(config.get("eos_token"))
            self.eos_token_ids = () if eos is None else (eos,)

    def _token_id(self, token: object) -> int | None:
        if isinstance(token, dict):  # {"content": "</s>", ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str) -> list[int]:
        # add_special_tokens: the tokenizer's own post-processor adds BOS where the model expects it,
        # as transformers' tokenizer(text) does by default
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


def load_tokenizer(model_dir: Path | None) -> Tokenizer:
    if model_dir is not None and (model_dir / "tokenizer.json").exists():
        return HFTokenizer(model_dir)
    return ByteTokenizer()
