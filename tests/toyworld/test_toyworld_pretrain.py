"""Pretraining the tiny CLIP: determinism, learning, caching and the OpenAI-layout checkpoint."""

import json

import torch

from vlprompt import load_clip, tokenize
from vlprompt.clip.fingerprint import backbone_fingerprint
from vlprompt.toyworld import pretrain as pt

TINY = dict(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1,
            text_heads=2, embed_dim=16, batch_size=32, pool_size=256, warmup_steps=2)


def test_same_seed_same_weights_other_seed_other_weights():
    a, _ = pt.pretrain(pt.PretrainConfig(steps=4, seed=3, **TINY))
    b, _ = pt.pretrain(pt.PretrainConfig(steps=4, seed=3, **TINY))
    c, _ = pt.pretrain(pt.PretrainConfig(steps=4, seed=4, **TINY))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], c.state_dict()["visual.conv1.weight"])


def test_contrastive_loss_falls_and_only_caption_tokens_train():
    config = pt.PretrainConfig(steps=60, lr=3e-3, seed=0, **TINY)
    torch.manual_seed(config.seed)
    fresh = pt.build_clip(config.clip_config())  # the same initialisation pretrain() starts from
    model, log = pt.pretrain(config)
    losses = log["loss_every_50"]
    assert log["final_loss"] < 0.8 * losses[0]
    used = tokenize(["a red star.", "a photo of a blue circle."]).unique()
    unused = torch.tensor([1000, 20000, 40000])  # never in a caption
    emb = model.token_embedding.weight
    assert not torch.equal(emb[used], fresh.token_embedding.weight[used])
    assert torch.equal(emb[unused], fresh.token_embedding.weight[unused])


def test_load_or_pretrain_caches_in_openai_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    config = pt.PretrainConfig(steps=2, **TINY)
    model, path = pt.load_or_pretrain(config)
    assert path == tmp_path / "toyworld" / f"toyclip-{config.key()}.safetensors"
    assert path.is_file()
    assert json.loads(path.with_suffix(".json").read_text())["config"]["steps"] == 2
    again = load_clip(path)
    assert backbone_fingerprint(again) == backbone_fingerprint(model, recompute=True)
    assert "visual.conv1.weight" in again.state_dict() and "text_projection" in again.state_dict()
    mtime = path.stat().st_mtime_ns
    _, same = pt.load_or_pretrain(config)  # reused, not retrained
    assert same == path and path.stat().st_mtime_ns == mtime
    assert pt.PretrainConfig(steps=2, seed=1, **TINY).key() != config.key()
