"""SigLIP (Zhai et al., 2023) on the one CLIP core: a random Hugging Face ``SiglipModel`` saved as
a folder loads with ``load_clip`` and gives HF's image and text features and sigmoid-head logits
(bias included); its SentencePiece tokenizer, read from the folder, tokenizes as HF's
``SiglipTokenizer`` does."""

from __future__ import annotations

import json

import pytest
import torch

from vlprompt.clip.load import load_clip
from vlprompt.clip.model import PIPELINE_MEAN, PIPELINE_STD, CLIPConfig, build_clip
from vlprompt.clip.tokenizer import SentencePieceTokenizer, folder_tokenizer

from ..siglip_tiny import train_spiece

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

def siglip_hf_config(vocab_size: int, **text):
    return transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                         projection_size=64, **text),
        vision_config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8))


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    train_spiece(folder / "spiece.model")
    vocab = SentencePieceTokenizer(folder / "spiece.model").vocab_size
    torch.manual_seed(0)
    hf = transformers.SiglipModel(siglip_hf_config(vocab)).eval()
    with torch.no_grad():  # non-trivial head and norms, so every tensor matters
        for name, p in hf.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        hf.logit_scale.fill_(2.1)
        hf.logit_bias.fill_(-3.7)
    hf.save_pretrained(folder)
    try:  # its tokenizer files as Hugging Face writes them (needs protobuf)
        transformers.SiglipTokenizer(str(folder / "spiece.model")).save_pretrained(folder)
    except ImportError:
        pass
    return folder, hf


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_siglip_folder_loads_with_its_architecture(siglip_folder):
    folder, _ = siglip_folder
    clip = load_clip(folder)
    cfg = clip.config
    assert (cfg.text_causal, cfg.text_pool, cfg.vision_pool) == (False, "last", "map")
    assert not cfg.vision_class_token and not cfg.vision_ln_pre and not cfg.vision_proj
    assert cfg.patch_bias and cfg.text_proj_bias and cfg.logit_bias
    assert (cfg.text_heads, cfg.vision_heads, cfg.layer_norm_eps) == (2, 2, 1e-6)
    assert (cfg.vision_mlp_width, cfg.text_mlp_width, cfg.activation) == (160, 80, "gelu_tanh")
    assert (cfg.embed_dim, cfg.context_length, cfg.image_size) == (64, 16, 32)
    assert cfg.image_mean == cfg.image_std == (0.5, 0.5, 0.5)  # SigLIP's pixel normalisation
    assert isinstance(clip.tokenizer, SentencePieceTokenizer) and clip.prompt_start == 0
    assert "class_token" not in clip.capabilities and "causal_text" not in clip.capabilities
    assert "visual_prompts" in clip.capabilities


def test_siglip_features_and_logits_match_transformers(siglip_folder):
    folder, hf = siglip_folder
    clip = load_clip(folder)
    # images as vlprompt's pipeline normalises them (OpenAI's mean/std); HF gets SigLIP's
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (PIPELINE_MEAN, PIPELINE_STD))
    pixels = (images * std + mean - 0.5) / 0.5
    texts = ["a photo of a red thing.", "A bright, flat BLUE object!", "purple"]
    tokens = clip.tokenizer.tokenize(texts, clip.context_length)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels)
        ref_img = hf.get_image_features(pixel_values=pixels)
        ref_txt = hf.get_text_features(input_ids=tokens)
        ref_img = getattr(ref_img, "pooler_output", ref_img)
        ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
        img, txt = clip.encode_image(images), clip.encode_text(tokens)
        logits, logits_t = clip(images, tokens)
        logits_fn = clip.logits(img, txt)
    assert _rel(img, ref_img) < 1e-4
    assert _rel(txt, ref_txt) < 1e-4
    assert _rel(logits, ref.logits_per_image) < 1e-4
    assert _rel(logits_fn, ref.logits_per_image) < 1e-4
    torch.testing.assert_close(logits_t, logits.t())


def test_siglip_text_is_bidirectional_and_never_truncated(siglip_folder):
    """Every position reaches the pooled one (the last): a change after EOS changes the feature,
    so the causal tower's truncation must stay off."""
    folder, _ = siglip_folder
    clip = load_clip(folder)
    tokens = clip.tokenizer.tokenize(["a red thing"], clip.context_length)
    emb = clip.embed_tokens(tokens)
    with torch.no_grad():
        base = clip.encode_text_embeddings(emb, clip.text_pool_indices(tokens))
        early = clip.encode_text_embeddings(emb, torch.tensor([3]))  # ignored: last-token pool
        changed = emb.clone()
        changed[0, 10] = 100 * torch.randn(emb.shape[-1])  # a pad position, far after EOS
        moved = clip.encode_text_embeddings(changed, clip.text_pool_indices(tokens))
    torch.testing.assert_close(early, base, rtol=0, atol=0)
    assert (moved - base).abs().max() > 1e-3


def test_sentencepiece_tokenizer_matches_hf_siglip_tokenizer(siglip_folder):
    pytest.importorskip("google.protobuf")  # Hugging Face's SiglipTokenizer needs it
    folder, _ = siglip_folder
    ours = folder_tokenizer(folder)
    hf = transformers.SiglipTokenizer(str(folder / "spiece.model"))
    texts = ["a photo of a red thing.", "A Photo, of  a BLUE thing!", " grey (cyan) object",
             "x x x x purple.", "the colour yellow, bright and flat " * 4, "", "itap of a ö"]
    for length in (16, 64):
        expected = hf(texts, padding="max_length", max_length=length, truncation=True)["input_ids"]
        got = ours.tokenize(texts, length)
        assert got.tolist() == expected
    # EOS ends the text, pad (= EOS, "</s>") fills the rest; no start token
    row = ours.tokenize("a red thing", 16)[0].tolist()
    n = len(ours.encode("a red thing"))
    assert row[n] == ours.eos_id == 1 and row[n + 1:] == [ours.pad_id] * (15 - n)
    assert ours.prompt_start == 0


def test_siglip2_naflex_folders_are_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="NaFlex") as err:
        load_clip(tmp_path)
    assert "\n" not in str(err.value)


def test_default_options_keep_the_openai_structure():
    """The SigLIP options are off by default: same parameter names and the OpenAI tokenizer."""
    cfg = CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                     vision_heads=2, text_width=64, text_layers=1, text_heads=2)
    names = set(build_clip(cfg).state_dict())
    assert {"visual.class_embedding", "visual.ln_pre.weight", "visual.proj"} <= names
    assert not any("map_head" in n or "bias" == n.split(".")[-1] and n.startswith("visual.conv1")
                   for n in names)
    assert "logit_bias" not in names and "text_projection_bias" not in names
    clip = build_clip(cfg)
    assert clip.prompt_start == 1 and clip.logit_bias is None
    assert {"class_token", "causal_text", "text_start_token"} <= clip.capabilities


def test_tokenizer_json_matches_hf_gemma_style_tokenizer(tmp_path):
    """A SigLIP 2 folder's ``tokenizer.json`` (a Gemma-style BPE with a BOS post-processor,
    trained here) tokenizes as Hugging Face's tokenizer for it does on lower-cased text, padded
    on the right to the context length; the context starts after BOS."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

    from ..siglip_tiny import CORPUS

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.train_from_iterator([c.replace(" ", "\u2581") for c in CORPUS], trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 2)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "pad_token": "<pad>", "eos_token": "<eos>",
         "bos_token": "<bos>", "unk_token": "<unk>", "padding_side": "right"}))
    ours = folder_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = ["a photo of a red thing.", "A Photo of a BLUE thing!", "x x x x purple."]
    expected = hf([t.lower() for t in texts], padding="max_length", max_length=16,
                  truncation=True)["input_ids"]
    assert ours.tokenize(texts, 16).tolist() == expected
    assert ours.prompt_start == 1 and ours.padding_side == "right"


def test_siglip_saved_as_one_file_is_refused_without_its_tokenizer(siglip_folder, tmp_path):
    from vlprompt.clip.load import save_clip

    folder, _ = siglip_folder
    path = save_clip(load_clip(folder), tmp_path / "siglip.safetensors")
    with pytest.raises(ValueError, match="needs its own tokenizer"):
        load_clip(path)


def test_pipeline_normalisation_constants_are_the_data_pipelines():
    from vlprompt.data.transforms import CLIP_MEAN, CLIP_STD

    assert (PIPELINE_MEAN, PIPELINE_STD) == (CLIP_MEAN, CLIP_STD)
