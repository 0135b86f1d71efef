"""Deterministic generated text: the tokenizer's training corpus and test/bench prompts.

Everything here is a pure function of its seed (``random.Random`` with an integer seed
gives the same stream on every Python 3 version), so the tokenizer trained on it and the
prompts built from it are reproducible on any machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_COMMON = _words(
    "the of and to in is that it was for on are as with his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could no make "
    "than first been its who now people my made over did down only way find use may water long little "
    "very after words called just where most know get through back much before go good new write our "
    "used me man too any day same right look think also around another came come work three word must "
    "because does part even place well such here take why things help put years different away again "
    "off went old number great tell men say small every found still between name should home big give "
    "air line set own under read last never us left end along while might next sound below saw something "
    "thought both few those always looked show large often together asked house world going want school "
    "important until form food keep children feet land side without boy once animals life enough took "
    "sometimes four head above kind began almost live page got earth need far hand high year mother light "
    "parts country father let night following picture being study second eyes soon times story boys since "
    "white days ever paper hard near sentence better best across during today others however sure means "
    "knew its try told young miles sun ways thing whole hear example heard several change answer room sea "
    "against top turned learn point city play toward five using himself usually cache block token prefill "
    "decode server request model layer memory transfer chunk store agent store network latency"
)

_SYLLABLES = _words(
    "ka lo mi ne ru sa ti vo ba de fi go hu ja ke li mo nu pa qi ro su ta ve wa xi yo ze "
    "an en in on un ar er ir or ur al el il ol ul ing ter tion ment ness able"
)

_PUNCT = (".", ".", ".", ",", "!", "?", ";", ":")


def _vocabulary(rng: random.Random, n_invented: int) -> list[str]:
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(n_invented)]
    return list(_COMMON) + invented


def sentences(seed: int, count: int) -> Iterator[str]:
    """``count`` generated sentences: common words, invented words, numbers, punctuation."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng, 4000)
    for _ in range(count):
        words = []
        for _ in range(rng.randint(4, 24)):
            r = rng.random()
            if r < 0.04:
                words.append(str(rng.randint(0, 99999)))
            elif r < 0.55:
                words.append(rng.choice(_COMMON))
            else:
                words.append(rng.choice(vocab))
        text = " ".join(words)
        yield text[0].upper() + text[1:] + rng.choice(_PUNCT)


def paragraph(seed: int, num_words: int) -> str:
    """About ``num_words`` words of generated prose, for prompts. Deterministic in ``seed``."""
    out: list[str] = []
    n = 0
    for s in sentences(seed, 10**9):
        out.append(s)
        n += s.count(" ") + 1
        if n >= num_words:
            break
    return " ".join(out)
