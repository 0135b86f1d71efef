"""Checks of hostile client bodies, before the proxy routes or forwards anything.

``app.validate_body`` calls ``check_generate`` for every generate request, after
``check_depth``: what reaches the routing code (tokenizing, chunk keys) and the
workers has a bounded shape, and anything else is a ``BadRequest`` (400) whose
``param`` names the field, never an exception that becomes a 500. The workers still
validate everything else (sampling parameters, vocabulary ids): their 4xx answers go
back to the client as they are.

Limits (module constants, documented in docs/proxy.md): JSON nesting at most
``MAX_JSON_DEPTH`` levels; token ids in ``0 .. MAX_TOKEN_ID``; ``n`` and ``best_of``
at most ``MAX_N``; ``max_tokens``, ``max_completion_tokens`` and ``min_tokens`` at most
``MAX_GENERATED_TOKENS``. Pure functions; no I/O.
"""

from __future__ import annotations

from typing import Any

from pdx.errors import BadRequest

MAX_JSON_DEPTH = 64
#: vLLM's token ids are int32
MAX_TOKEN_ID = 2**31 - 1
MAX_N = 128
MAX_GENERATED_TOKENS = 1 << 24
_COUNTS = {"n": (1, MAX_N), "best_of": (1, MAX_N), "max_tokens": (1, MAX_GENERATED_TOKENS),
           "max_completion_tokens": (1, MAX_GENERATED_TOKENS), "min_tokens": (0, MAX_GENERATED_TOKENS)}


def _bad(param: str, message: str, code: str = "invalid_value") -> BadRequest:
    return BadRequest(message, param=param, code=code)


def check_depth(raw: bytes, body: Any) -> None:
    """Refuse JSON nested deeper than ``MAX_JSON_DEPTH``. Cheap for ordinary bodies: the
    walk runs only when the raw bytes hold more brackets than the limit."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        node, depth, top = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _bad(top or "body", f"'{top or 'body'}' is nested more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json")
        if isinstance(node, dict):
            stack.extend((v, depth + 1, top or str(k)) for k, v in node.items() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1, top) for v in node if isinstance(v, (dict, list)))


def _token_ids(ids: list[Any], where: str) -> bool:
    """True when ``ids`` is a list of token ids (raises when one is out of range)."""
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return False
    for i, t in enumerate(ids):
        if not 0 <= t <= MAX_TOKEN_ID:
            raise _bad("prompt", f"'{where}[{i}]': token id {t} is out of range 0..{MAX_TOKEN_ID}")
    return True


def check_prompt(prompt: Any) -> None:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if _token_ids(prompt, "prompt"):
            return
        if all(isinstance(p, list) and p and _token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)):
            return
    raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of token ids or a list of "
               "token-id lists", code="invalid_type")


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Each message's ``content``: a string, null, or a list of parts (objects with a string
    ``type``; a text part's ``text`` a string)."""
    for i, m in enumerate(messages):
        content = m.get("content")
        where = f"messages[{i}].content"
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(where, f"'{where}' must be a string, null or a list of content parts", code="invalid_type")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{where}[{j}]", f"'{where}[{j}]' must be an object with a string 'type'",
                           code="invalid_type")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise _bad(f"{where}[{j}].text", f"'{where}[{j}].text' must be a string", code="invalid_type")


def check_counts(body: dict[str, Any]) -> None:
    for name, (low, high) in _COUNTS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, f"'{name}' must be an integer", code="invalid_type")
        if not low <= value <= high:
            raise _bad(name, f"'{name}' must be between {low} and {high}, got {value}")


def check_generate(chat: bool, body: dict[str, Any]) -> None:
    """The checks of one completions (``chat`` False) or chat body; raises ``BadRequest``."""
    if chat:
        check_messages(body["messages"])
    else:
        check_prompt(body["prompt"])
    check_counts(body)
