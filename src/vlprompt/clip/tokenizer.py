"""Tokenizers of the CLIP families.

OpenAI CLIP byte-pair tokenizer, through ``instant-clip-tokenizer`` (exact BPE, vocabulary
bundled, so nothing is downloaded): the module functions ``encode`` / ``tokenize`` and the
default model tokenizer ``OpenAITokenizer``.

OpenAI's tokenizer also runs ``ftfy.fix_text`` and ``html.unescape`` and collapses whitespace
before BPE. We reproduce the parts that matter for ordinary text (HTML entities, Unicode NFC
composition, whitespace) without depending on ftfy.

SigLIP's SentencePiece tokenizer (``SentencePieceTokenizer``, ``spiece.model`` of a Hugging Face
SigLIP folder, read with ``sentencepiece``, offline): text canonicalised as Hugging Face's
``SiglipTokenizer`` does (lower case, ASCII punctuation removed, whitespace collapsed), the
pieces, then EOS, padded with the pad id (``</s>``, the EOS itself) to the context length (64);
longer texts keep their first L-1 pieces and the EOS. ``TokenizersTokenizer`` reads a folder's
``tokenizer.json`` with the ``tokenizers`` library (SigLIP 2's Gemma tokenizer), with the
special tokens its post-processor adds (Gemma's BOS: ``prompt_start`` 1), lower-cased, padded
on the side its ``tokenizer_config.json`` names.

Every model tokenizer has ``encode(text) -> ids`` (no special tokens), ``tokenize(texts,
context_length) -> [N, L]`` and ``prompt_start``: where learned prompt context starts in a
tokenized prompt — 1, after SOT, for OpenAI; 0 for SigLIP, which has no start token, so a CoOp
prompt there is ``[ctx_1..ctx_M][class words][EOS][pad...]``. A CLIP carries its own as
``clip.tokenizer`` (set by ``load_clip``); prompt code tokenizes with it.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import string
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

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


# --------------------------------------------------------------------------- model tokenizers
class OpenAITokenizer:
    """OpenAI's BPE (SOT, text, EOT, zero padding): the tokenizer of every OpenAI / open_clip
    ViT and ResNet CLIP, and the default ``clip.tokenizer``."""

    name = "openai-bpe"
    #: learned context starts after SOT
    prompt_start = 1

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def tokenize(self, texts: Union[str, Sequence[str]], context_length: int = 77
                 ) -> torch.LongTensor:
        return tokenize(texts, context_length)

    def __repr__(self) -> str:
        return "OpenAITokenizer()"


_DEFAULT = OpenAITokenizer()


def default_tokenizer() -> OpenAITokenizer:
    """The tokenizer a CLIP has unless its loader sets another: OpenAI's BPE."""
    return _DEFAULT


def _pad(rows: list[list[int]], texts: Sequence[str], context_length: int, eos: int, pad: int
         ) -> torch.LongTensor:
    """Each row's ids + EOS, truncated to keep the EOS (with a warning naming the text), padded
    with ``pad`` on the right to ``context_length``: [N, L]."""
    out = torch.full((len(rows), context_length), pad, dtype=torch.long)
    for i, (ids, text) in enumerate(zip(rows, texts)):
        if len(ids) > context_length - 1:
            logger.warning("text truncated to %d tokens (EOS kept): %r", context_length, text)
            ids = ids[: context_length - 1]
        ids = list(ids) + [eos]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def canonicalize_siglip(text: str, lower: bool = True) -> str:
    """SigLIP's text canonicalisation (big_vision's, as Hugging Face's ``SiglipTokenizer`` applies
    it): lower case, ASCII punctuation removed, runs of whitespace made one space, stripped."""
    if lower:
        text = text.lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


_SPIECE_UNDERLINE = "\u2581"


class SentencePieceTokenizer:
    """SigLIP's SentencePiece tokenizer from a ``spiece.model`` file (no start token; EOS
    appended; padded with ``pad_id``). Equal to Hugging Face's ``SiglipTokenizer`` with
    ``padding="max_length", truncation=True`` (tested)."""

    name = "sentencepiece"
    prompt_start = 0

    def __init__(self, model_file: Union[str, os.PathLike], eos_token: str = "</s>",
                 pad_token: str = "</s>", unk_token: str = "<unk>", lower: bool = True):
        self.model_file = str(model_file)
        self.eos_token, self.pad_token, self.unk_token = eos_token, pad_token, unk_token
        self.lower = lower
        self._load(Path(model_file).read_bytes())

    def _load(self, proto: bytes) -> None:
        try:
            import sentencepiece
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise ImportError("SigLIP's tokenizer needs the sentencepiece package "
                              "(pip install sentencepiece)") from err
        self._proto = proto
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        ids = {name: self.sp.piece_to_id(name) for name in (self.eos_token, self.pad_token)}
        self.eos_id, self.pad_id = ids[self.eos_token], ids[self.pad_token]
        # Hugging Face encodes "<unk>" + text and drops the unk pieces, so that SentencePiece's
        # dummy prefix never splits the leading word differently
        self._unk_len = len(self.sp.encode(self.unk_token, out_type=str))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("sp")
        return state

    def __setstate__(self, state: dict) -> None:
        proto = state.pop("_proto")
        self.__dict__.update(state)
        self._load(proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Piece ids of one text, without EOS."""
        text = canonicalize_siglip(_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "),
                                   self.lower)
        pieces = self.sp.encode(self.unk_token + text, out_type=str)
        if len(pieces) >= self._unk_len:
            pieces = pieces[self._unk_len:]
        return [self.sp.piece_to_id(p) for p in pieces]

    def tokenize(self, texts: Union[str, Sequence[str]], context_length: int = 64
                 ) -> torch.LongTensor:
        """Texts -> [N, context_length]: pieces, EOS, pad."""
        if isinstance(texts, str):
            texts = [texts]
        return _pad([self.encode(t) for t in texts], texts, context_length, self.eos_id,
                    self.pad_id)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file!r})"


class TokenizersTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library (SigLIP 2's Gemma
    tokenizer): the file's normaliser and pre-tokeniser, optionally lower-cased first (SigLIP 2
    was trained on lower-cased text), the special tokens its post-processor adds, then EOS if the
    folder's config asks for it (``add_eos_token``) and right padding with the pad id.
    ``prompt_start`` is the number of special tokens the post-processor puts before the text
    (Gemma's BOS: 1)."""

    name = "tokenizers"

    def __init__(self, tokenizer_file: Union[str, os.PathLike], pad_token: str = "<pad>",
                 eos_token: Optional[str] = None, lower: bool = False,
                 padding_side: str = "right"):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # pragma: no cover - a declared dependency
            raise ImportError(f"{tokenizer_file}: reading a tokenizer.json needs the tokenizers "
                              f"package (pip install tokenizers)") from err

        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.tokenizer_file = str(tokenizer_file)
        self.lower = lower
        #: "left" puts the pads first (Hugging Face's Gemma default): the text then ends at the
        #: pooled last position, and prompt context has no fixed position (``TextPrompts``
        #: refuses it)
        self.padding_side = padding_side
        self.tok = Tokenizer.from_file(self.tokenizer_file)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.pad_id = self.tok.token_to_id(pad_token)
        if self.pad_id is None:
            raise ValueError(f"{tokenizer_file}: no pad token {pad_token!r} in the vocabulary")
        self.eos_id = None if eos_token is None else self.tok.token_to_id(eos_token)
        probe = self.tok.encode("x", add_special_tokens=True)
        bare = self.tok.encode("x", add_special_tokens=False)
        self._specials = probe.ids
        self.prompt_start = next(i for i, t in enumerate(probe.ids) if t == bare.ids[0])

    def _prep(self, text: str) -> str:
        return text.lower() if self.lower else text

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(self._prep(text), add_special_tokens=False).ids)

    def tokenize(self, texts: Union[str, Sequence[str]], context_length: int = 64
                 ) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = list(self.tok.encode(self._prep(text), add_special_tokens=True).ids)
            if self.eos_id is not None:
                ids.append(self.eos_id)
            if len(ids) > context_length:
                logger.warning("text truncated to %d tokens: %r", context_length, text)
                ids = ids[:context_length - 1] + ids[-1:] if self.eos_id is not None \
                    else ids[:context_length]
            row = torch.tensor(ids, dtype=torch.long)
            if self.padding_side == "left":
                out[i, context_length - len(ids):] = row
            else:
                out[i, : len(ids)] = row
        return out

    def __repr__(self) -> str:
        return f"TokenizersTokenizer({self.tokenizer_file!r})"


def _token_string(value, default: Optional[str]) -> Optional[str]:
    """A special token as tokenizer_config.json / special_tokens_map.json spell it (a string or
    an AddedToken dict)."""
    if isinstance(value, dict):
        return value.get("content", default)
    return value if isinstance(value, str) else default


def folder_tokenizer(folder: Union[str, os.PathLike], model_type: str = "siglip"):
    """The tokenizer of a Hugging Face SigLIP folder: ``spiece.model`` (SigLIP) through
    ``sentencepiece``, else ``tokenizer.json`` (SigLIP 2's Gemma tokenizer) through
    ``tokenizers``. Raises ``FileNotFoundError`` naming the files when it has neither."""
    folder = Path(folder)
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            config.update(json.loads((folder / name).read_text()))
        except (OSError, ValueError):
            pass
    if (folder / "spiece.model").exists():
        return SentencePieceTokenizer(
            folder / "spiece.model", eos_token=_token_string(config.get("eos_token"), "</s>"),
            pad_token=_token_string(config.get("pad_token"), "</s>"),
            unk_token=_token_string(config.get("unk_token"), "<unk>"),
            lower=bool(config.get("do_lower_case", True)))
    if (folder / "tokenizer.json").exists():
        # SigLIP 2 was trained on lower-cased text (Hugging Face's docs ask callers to
        # lower-case; its Siglip2Tokenizer does): lower-cased unless the folder says otherwise
        lower = bool(config.get("do_lower_case", True))
        eos = _token_string(config.get("eos_token"), None) if config.get("add_eos_token") else None
        return TokenizersTokenizer(folder / "tokenizer.json",
                                   pad_token=_token_string(config.get("pad_token"), "<pad>"),
                                   eos_token=eos, lower=lower,
                                   padding_side=config.get("padding_side", "right"))
    raise FileNotFoundError(f"{folder}: a {model_type} folder needs its tokenizer: spiece.model "
                            f"(SigLIP) or tokenizer.json (SigLIP 2)")
