"""A tiny SigLIP for the tests (Zhai et al., 2023): the core's SigLIP options on a random model
with a SentencePiece tokenizer trained here, offline, on the tests' words (``sentencepiece``)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from vlprompt.clip.model import CLIP, CLIPConfig, build_clip

#: what the tiny SentencePiece model is trained on: the colour task's words and templates
CORPUS = ["a photo of a red thing.", "a photo of a green thing!", "a blue object, bright and flat",
          "the colour yellow", "purple cyan grey", "a photo of something", "x x x x x x x x",
          "a photo of a x, a type of colour.", "itap of a grey object", "a bad photo of the cyan",
          "a photo of the large purple thing", "art of the small cyan", "a origami grey"]


def train_spiece(path: Path, vocab_size: int = 96) -> Path:
    """A unigram SentencePiece model in SigLIP's layout (``</s>`` = 1 is EOS and pad, ``<unk>``
    = 2, no BOS) written to ``path``; deterministic, one thread."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", pad_id=-1, bos_id=-1, eos_id=1, unk_id=2, eos_piece="</s>",
        unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2, num_threads=1)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


def tiny_siglip_config(vocab_size: int, context_length: int = 32) -> CLIPConfig:
    """SigLIP's structure at the method tests' tiny sizes (width 64, 2 layers, image 32)."""
    return CLIPConfig(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                      vision_heads=2, text_width=64, text_layers=2, text_heads=2,
                      context_length=context_length, vocab_size=vocab_size,
                      activation="gelu_tanh", layer_norm_eps=1e-6, text_causal=False,
                      text_pool="last", text_proj_bias=True, vision_class_token=False,
                      vision_ln_pre=False, vision_pool="map", vision_proj=False, patch_bias=True,
                      logit_bias=True, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def make_tiny_siglip(folder: Path, seed: int = 0) -> CLIP:
    """A frozen random tiny SigLIP with its SentencePiece tokenizer (trained into ``folder``);
    logit scale 100 and bias -10, SigLIP's trained magnitudes."""
    from vlprompt.clip.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(train_spiece(Path(folder) / "spiece.model"))
    torch.manual_seed(seed)
    clip = build_clip(tiny_siglip_config(tokenizer.vocab_size))
    clip.tokenizer = tokenizer
    with torch.no_grad():
        clip.logit_scale.fill_(4.6052)
    clip.backbone_name = "tiny-siglip"
    clip.requires_grad_(False)
    return clip.eval()
