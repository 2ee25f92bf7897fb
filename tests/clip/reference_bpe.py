"""An independent, in-test implementation of OpenAI CLIP's byte-level BPE (the algorithm of
Radford et al.'s ``simple_tokenizer``), written here from its description, used only as a
reference for ``vlprompt.tokenize``.

The merge table is an excerpt of OpenAI's published ``bpe_simple_vocab_16e6.txt.gz`` holding
every merge that can act on the test strings, with its original rank (see ``make_bpe_excerpt.py``).
BPE only ever merges adjacent pairs whose concatenation occurs in the word, so the excerpt gives
the same ids as the full table on those strings.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path

import regex

EXCERPT = Path(__file__).parent / "data" / "bpe_excerpt.json"
PATTERN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                        regex.IGNORECASE)
SOT, EOT = 49406, 49407


@lru_cache()
def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache()
def tables() -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """(merge ranks, token ids). Ids: 256 byte chars, 256 byte chars + '</w>', then merges."""
    data = json.loads(EXCERPT.read_text())
    chars = list(byte_to_char().values())
    ids = {c: i for i, c in enumerate(chars)}
    ids.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    ranks = {}
    for rank, a, b in data["merges"]:
        ranks[(a, b)] = rank
        ids[a + b] = 512 + rank
    return ranks, ids


def bpe(word: str) -> list[str]:
    ranks, _ = tables()
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, _ = min(pairs)
        if best == float("inf"):
            break
        a, b = min((p for p in zip(parts, parts[1:]) if ranks.get(p) == best))
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def words(text: str) -> list[str]:
    text = " ".join(html.unescape(html.unescape(text)).split()).lower()
    mapping = byte_to_char()
    return ["".join(mapping[b] for b in w.encode("utf-8")) for w in PATTERN.findall(text)]


def encode(text: str) -> list[int]:
    _, ids = tables()
    return [ids[t] for w in words(text) for t in bpe(w)]
