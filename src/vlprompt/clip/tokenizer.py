"""OpenAI CLIP byte-pair tokenizer, through ``instant-clip-tokenizer`` (exact BPE, vocabulary
bundled, so nothing is downloaded).

OpenAI's tokenizer also runs ``ftfy.fix_text`` and ``html.unescape`` and collapses whitespace
before BPE. We reproduce the parts that matter for ordinary text (HTML entities, Unicode NFC
composition, whitespace) without depending on ftfy.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOT_TOKEN = 49406
EOT_TOKEN = 49407


@lru_cache(maxsize=1)
def _tokenizer():
    import instant_clip_tokenizer

    return instant_clip_tokenizer.Tokenizer()


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip()


def encode(text: str) -> list[int]:
    """BPE ids of one text, without SOT/EOT."""
    return list(_tokenizer().encode(_clean(text)))


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.LongTensor:
    """Texts -> token ids ``[N, context_length]`` with SOT and EOT, zero-padded.

    A text longer than the context is truncated with its EOT kept, and a warning names it.
    """
    if isinstance(texts, str):
        texts = [texts]
    cleaned = [_clean(t) for t in texts]
    ids = _tokenizer().tokenize_batch(cleaned, context_length).astype(np.int64)
    out = torch.from_numpy(ids)
    for text, row in zip(texts, out):
        if row[-1] == EOT_TOKEN and len(_tokenizer().encode(_clean(text))) > context_length - 2:
            logger.warning("text truncated to %d tokens (EOT kept): %r", context_length, text)
    return out


def eot_indices(tokens: torch.Tensor) -> torch.Tensor:
    """Position of EOT in each row of ``tokens`` [N, L] (EOT has the largest id)."""
    return tokens.argmax(dim=-1)
