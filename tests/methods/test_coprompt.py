"""CoPrompt (METHODS-SOTA.md §3): logits, loss and gradients against a reference written from the
formulas on the same tensors; the MaPLe relation; the description draw; views; configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.tokenizer import tokenize
from vlprompt.config import resolve_config
from vlprompt.methods import build_method

from .conftest import CLASSNAMES, DESCRIPTION_DATASET, colour_batch, colour_descriptions

TEMPLATE_WORDS = "a photo of a"


def _coprompt(clip, folder, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_method("coprompt", clip, CLASSNAMES, descriptions=str(folder),
                        description_dataset=DESCRIPTION_DATASET, **overrides)


def _two_views(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, labels = colour_batch(n, g)
    x2, _ = colour_batch(n, g)
    return torch.stack([x1, x2], dim=1), labels  # [B, 2, 3, S, S]


# ---------------------------------------------------------------------------- the reference
def _ref_text(clip, m):
    """MaPLe text features from the formula: "a photo of a {c}." with positions 1..n = ctx,
    positions 1..n before block i = text_deep[i-1]."""
    p = m.prompts
    tokens = tokenize([f"{TEMPLATE_WORDS} {c}." for c in CLASSNAMES], clip.context_length)
    emb = clip.embed_tokens(tokens).clone()
    n = p.ctx.shape[0]
    emb = torch.cat([emb[:, :1], p.ctx.expand(len(CLASSNAMES), -1, -1), emb[:, 1 + n:]], dim=1)
    deep = {i + 1: p.text_deep.prompts[i] for i in range(p.text_deep.prompts.shape[0])}
    return clip.encode_text_embeddings(emb, tokens.argmax(-1), deep_prompts=deep)


def _ref_image(clip, m, images):
    """Vision prompts = Linear(ctx), deep ones = a separate Linear of each deep text prompt."""
    p = m.prompts
    shallow = p.ctx @ p.proj.weight.t() + p.proj.bias
    deep = {i + 1: p.text_deep.prompts[i] @ layer.weight.t() + layer.bias
            for i, layer in enumerate(p.couplings)}
    return clip.encode_image(images, prompts=shallow, deep_prompts=deep)


def _ref_adapt(adapter, x, mix):
    w1, w2 = adapter.fc[0].weight, adapter.fc[2].weight
    a = torch.relu(torch.relu(x @ w1.t()) @ w2.t())
    y = mix * a + (1 - mix) * x
    return y / y.norm(dim=-1, keepdim=True)


def _ref_descriptions(clip):
    texts = colour_descriptions(CLASSNAMES)
    rows = []
    for c in CLASSNAMES:
        f = clip.encode_text(tokenize(texts[c], clip.context_length))
        rows.append(f / f.norm(dim=-1, keepdim=True))
    return torch.stack(rows, dim=1)  # [n_desc, C, E]


def _ref_loss(clip, m, views, labels, index, distill):
    cfg = m.config
    v = _ref_adapt(m.image_adapter, _ref_image(clip, m, views[:, 0]), cfg.image_adapter_mix)
    t = _ref_adapt(m.text_adapter, _ref_text(clip, m), cfg.text_adapter_mix)
    logits = clip.logit_scale.exp() * v @ t.t()
    ce = F.cross_entropy(logits, labels)
    d = _ref_descriptions(clip)[index]
    z = clip.encode_image(views[:, 1])
    z = z / z.norm(dim=-1, keepdim=True)
    if distill == "cosine":
        extra = (1 - (t * d).sum(-1).mean()) + (1 - (v * z).sum(-1).mean())
    else:
        extra = ((t - d) ** 2).mean() + ((v - z) ** 2).mean()
    return logits, ce + cfg.consistency_weight * extra


@pytest.mark.parametrize("distill", ["cosine", "mse"])
def test_logits_loss_and_gradients_match_the_formulas(tiny_clip, description_files, distill):
    m = _coprompt(tiny_clip, description_files, consistency_weight=2.5, distill=distill)
    m.train()
    views, labels = _two_views()
    # the step's description row, from the documented draw (seed, draws so far)
    seed, draws = (int(v) for v in m._draws)
    key = (seed * 6364136223846793005 + draws * 1442695040888963407 + 1) % (2 ** 63 - 1)
    index = int(torch.randint(3, (), generator=torch.Generator().manual_seed(key)))
    loss, parts = m.loss(views, labels)
    assert m.last_description_index == index and int(m._draws[1]) == draws + 1
    params = m.named_trainable_parameters()
    grads = torch.autograd.grad(loss, list(params.values()))
    ref_logits, ref_loss = _ref_loss(tiny_clip, m, views, labels, index, distill)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(views[:, 0]), ref_logits.detach(), rtol=1e-5, atol=1e-5)
    for name, g, r in zip(params, grads, ref_grads):
        scale = r.abs().max().clamp_min(1e-12)
        assert ((g - r).abs().max() / scale) < 1e-5, name
        assert g.abs().sum() > 0, name
    assert set(parts) == {"ce", "text", "image"}


def test_raw_features_are_maples_and_the_lambda0_no_adapter_reduction(tiny_clip,
                                                                      description_files):
    """Shared prompt tensors: CoPrompt's prompted features are MaPLe's bit for bit. With λ = 0
    and the adapters switched off (mix 0), logits, loss and prompt gradients are MaPLe's. With
    the released adapter init and λ = 0 the logits differ from MaPLe's only by the adapters:
    zeroing their second layers (A(x) = ReLU(0) = 0) gives MaPLe's logits again."""
    torch.manual_seed(0)
    maple = build_method("maple", tiny_clip, CLASSNAMES)
    co = _coprompt(tiny_clip, description_files, consistency_weight=0.0)
    co.prompts.load_state_dict(maple.prompts.state_dict())
    x, y = colour_batch(4, torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(co.prompts.encode_text(tiny_clip), maple.prompts.encode_text(tiny_clip))
        assert torch.equal(co.prompts.encode_image(tiny_clip, x),
                           maple.prompts.encode_image(tiny_clip, x))
        assert not torch.allclose(co(x), maple(x), atol=1e-3)  # released init: adapters act
        for adapter in (co.image_adapter, co.text_adapter):
            adapter.fc[2].weight.zero_()
        torch.testing.assert_close(co(x), maple(x), rtol=1e-5, atol=1e-5)

    off = _coprompt(tiny_clip, description_files, consistency_weight=0.0, image_adapter_mix=0.0,
                    text_adapter_mix=0.0)
    off.prompts.load_state_dict(maple.prompts.state_dict())
    loss_c, parts = off.loss(x, y)
    loss_m, _ = maple.loss(x, y)
    torch.testing.assert_close(loss_c, loss_m, rtol=1e-6, atol=1e-6)
    assert loss_c.item() == pytest.approx(parts["ce"], rel=1e-6)
    gc = torch.autograd.grad(loss_c, list(off.prompts.parameters()))
    gm = torch.autograd.grad(loss_m, list(maple.prompts.parameters()))
    for a, b in zip(gc, gm):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_description_draw_is_seeded_counted_and_checkpointed(tiny_clip, description_files):
    a = _coprompt(tiny_clip, description_files, seed=0)
    b = _coprompt(tiny_clip, description_files, seed=0)
    other = _coprompt(tiny_clip, description_files, seed=7)
    a.train()
    b.train()
    other.train()
    seq_a = [a.description_index(50) for _ in range(40)]
    assert seq_a == [b.description_index(50) for _ in range(40)]  # same run seed, same draws
    assert seq_a != [other.description_index(50) for _ in range(40)]
    assert len(set(seq_a)) > 10 and all(0 <= i < 50 for i in seq_a)
    # evaluation and no-grad passes do not advance the draw
    state = a.extra_state_tensors()["description_draws"]
    a.eval()
    first = a.description_index(50)
    assert a.description_index(50) == first and torch.equal(a._draws, state)
    # a checkpoint carries the draw: a fresh model continues the same sequence
    a.train()
    expected = [a.description_index(50) for _ in range(5)]
    fresh = _coprompt(tiny_clip, description_files, seed=3)
    fresh.load_trainable_state_dict({**b.trainable_state_dict(), "description_draws": state})
    fresh.train()
    assert [fresh.description_index(50) for _ in range(5)] == expected


def test_views_student_sees_view0_teacher_view1(tiny_clip, description_files):
    m = _coprompt(tiny_clip, description_files)
    m.eval()
    views, labels = _two_views()
    changed = views.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1])
    with torch.no_grad():
        _, p1 = m.loss(views, labels)
        _, p2 = m.loss(changed, labels)
        _, single = m.loss(views[:, 0], labels)
        _, same = m.loss(torch.stack([views[:, 0], views[:, 0]], dim=1), labels)
        torch.testing.assert_close(m(views), m(views[:, 0]))
    assert p1["ce"] == p2["ce"] and p1["text"] == p2["text"] and p1["image"] != p2["image"]
    assert single == same  # one view: the teacher sees the training view
    with pytest.raises(ValueError, match=r"\[B, V, 3, S, S\]"):
        m.loss(views[0, 0], labels)
    assert (m.train_views, m.train_augment) == (2, "resize_randaugment")
    assert build_method("coprompt", tiny_clip, CLASSNAMES, views=1,
                        augment="standard").train_augment == "standard"


def test_descriptions_follow_the_dataset_and_errors_are_clear(tiny_clip, tmp_path,
                                                              description_files, monkeypatch):
    monkeypatch.delenv("VLPROMPT_DESCRIPTIONS", raising=False)
    x, y = colour_batch(4, torch.Generator().manual_seed(0))
    m = build_method("coprompt", tiny_clip, CLASSNAMES)
    with pytest.raises(ValueError, match="description_dataset"):
        m.loss(x, y)
    m.set_dataset("eurosat")
    with pytest.raises(FileNotFoundError, match="VLPROMPT_DESCRIPTIONS"):
        m.loss(x, y)
    monkeypatch.setenv("VLPROMPT_DESCRIPTIONS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"eurosat_prompt\.json.*ShuvenduRoy/CoPrompt"):
        m.loss(x, y)
    monkeypatch.setenv("VLPROMPT_DESCRIPTIONS", str(description_files))
    m.set_dataset(DESCRIPTION_DATASET)  # the engine names the run's dataset
    loss, _ = m.loss(x, y)
    assert torch.isfinite(loss) and m.description_bank.shape == (3, 4, tiny_clip.embed_dim)
    m.set_classnames(["red", "green"])
    assert m.description_bank is None  # recomputed for the new classes
    m.loss(x[:2], y[:2])
    assert m.description_bank.shape == (3, 2, tiny_clip.embed_dim)
    # evaluation needs no descriptions at all
    monkeypatch.delenv("VLPROMPT_DESCRIPTIONS")
    m.set_dataset("dtd")
    with torch.no_grad():
        assert m(x).shape == (4, 2)


@pytest.mark.parametrize("bad, match", [({"distill": "kl"}, "distill"),
                                        ({"augment": "crop"}, "augment"),
                                        ({"views": 3}, "views"),
                                        ({"consistency_weight": -1.0}, "consistency_weight"),
                                        ({"image_adapter_mix": 1.5}, "image_adapter_mix")])
def test_bad_configs_raise(tiny_clip, bad, match):
    with pytest.raises(ValueError, match=match):
        build_method("coprompt", tiny_clip, CLASSNAMES, **bad)


# trainers/constants.py of the official repo: dataset -> (depth, n_ctx, λ)
TABLE = {"imagenet": (12, 4, 8.0), "caltech101": (12, 4, 4.0), "oxford_pets": (12, 2, 0.1),
         "stanford_cars": (12, 4, 4.0), "oxford_flowers": (9, 4, 8.0), "food101": (9, 4, 0.5),
         "fgvc_aircraft": (9, 4, 2.0), "sun397": (12, 4, 8.0), "dtd": (12, 2, 8.0),
         "eurosat": (12, 2, 0.1), "ucf101": (12, 4, 2.0)}


@pytest.mark.parametrize("protocol", ["base2new", "fewshot"])
def test_packaged_configs_hold_the_per_dataset_table(protocol):
    for dataset, (depth, n_ctx, lam) in TABLE.items():
        cfg = resolve_config("coprompt", protocol, dataset=dataset, shots=16)
        method, train = cfg["method"], cfg["train"]
        assert (method["depth"], method["n_ctx"], method["consistency_weight"]) == \
            (depth, n_ctx, lam), dataset
        assert train["max_epoch"] == (5 if dataset == "food101" else 8)
        assert (train["lr"], train["batch_size"], train["warmup_epoch"]) == (0.0035, 4, 1)
        assert (method["views"], method["augment"]) == (2, "resize_randaugment")
    other = resolve_config("coprompt", protocol, dataset="toyworld", shots=16)["method"]
    assert (other["depth"], other["n_ctx"], other["consistency_weight"]) == (9, 2, 1.0)
    assert other["augment"] == "standard"  # the toy world's classes are colours (see the yaml)
    xd = resolve_config("coprompt", "xd", dataset="imagenet", shots=16)["method"]
    assert (xd["depth"], xd["n_ctx"], xd["consistency_weight"]) == (12, 4, 8.0)
