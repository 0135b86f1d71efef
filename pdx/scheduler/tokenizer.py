"""Text -> token ids for cache-aware routing, behind a two-method interface.

The ``cache_aware`` policy needs a prompt's token ids to compute the same chunk
keys the workers' agents hold (``pdx.keys.chunk_keys``). Tokenizing exactly as
the engine does matters only for routing quality: a mismatch makes the proxy miss
a cached prefix, never return a wrong answer.

* ``encode(text)``: what vLLM does for ``/v1/completions`` (special tokens added).
* ``encode_chat(messages)``: what vLLM does for ``/v1/chat/completions``: render the
  model's chat template with the generation prompt, then encode without adding
  special tokens (the template carries them).

``load_tokenizer("")`` gives ``ByteTokenizer`` (UTF-8 bytes as ids: consistent
with itself, so the proxy's own routing hints work, but not comparable with
agents' keys). A folder loads the model's Hugging Face tokenizer: through
``transformers`` when installed (chat templates need it), else ``tokenizers``.
Both are imported only here, only when asked for.

Implementations must be safe to call from a worker thread (the proxy tokenizes
long prompts off its event loop); the Hugging Face fast tokenizers are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pdx.errors import BackendUnavailable, ConfigError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]: ...


def _flatten_content(content: Any) -> str:
    """OpenAI message content: a string or a list of parts; only text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content, sort_keys=True)


def render_plain_chat(messages: Sequence[dict[str, Any]]) -> str:
    """A template-free rendering, for tokenizers without a chat template."""
    return "".join(f"<|{m.get('role', '')}|>\n{_flatten_content(m.get('content'))}\n"
                   for m in messages) + "<|assistant|>\n"


class ByteTokenizer:
    """UTF-8 bytes as token ids: no model needed. Used in tests and without a configured tokenizer."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.encode(render_plain_chat(messages))


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local folder (never downloads)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        folder = path.parent if path.is_file() else path
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise ConfigError(f"tokenizer: no tokenizer.json or tokenizer_config.json in {folder}")
        self._hf: Any = None
        self._raw: Any = None
        try:
            import transformers

            self._hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except ImportError:
            try:
                import tokenizers
            except ImportError as exc:
                raise BackendUnavailable(
                    "tokenizer: needs 'tokenizers' or 'transformers'; install it with: "
                    "pip install tokenizers") from exc
            self._raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer: cannot load {folder}: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=True))
        return list(self._raw.encode(text, add_special_tokens=True).ids)

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        if self._hf is not None and getattr(self._hf, "chat_template", None):
            text = self._hf.apply_chat_template(list(messages), tokenize=False,
                                                add_generation_prompt=True)
            return list(self._hf.encode(text, add_special_tokens=False))
        text = render_plain_chat(messages)
        if self._hf is not None:
            return list(self._hf.encode(text, add_special_tokens=False))
        return list(self._raw.encode(text, add_special_tokens=False).ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """``""`` -> ``ByteTokenizer``; a folder or a ``tokenizer.json`` path -> ``HFTokenizer``."""
    if not spec:
        return ByteTokenizer()
    return HFTokenizer(spec)
