"""HiCroPL (METHODS-SOTA.md §6): a formula reference for logits, loss and gradients (functional
mappers) on shared weights, the released initialisation, and the released ``.data.copy_()``
semantics (``mapper: released_inplace``): frozen mappers, prompts overwritten at every forward,
evaluation that depends on the batch order, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.clip.tokenizer import tokenize
from vlprompt.methods import build_method, make_config
from vlprompt.methods.hicropl import HiCroPL

from .conftest import CLASSNAMES, DESCRIPTION_DATASET, colour_batch, colour_descriptions

#: four blocks per tower, so depth 4 with cross layer 2 has several layers on each side
DEEP = CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=4,
                  vision_heads=2, text_width=64, text_layers=4, text_heads=2)


@pytest.fixture(scope="module")
def deep_clip():
    torch.manual_seed(0)
    clip = build_clip(DEEP)
    clip.requires_grad_(False)
    return clip.eval()


def _build(clip, folder, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"n_ctx": 5, "depth": 4, "cross_layer": 2, **kw}  # 5 > 4: random ctx, as n 16
    return build_method("hicropl", clip, CLASSNAMES, descriptions=str(folder),
                        description_dataset=DESCRIPTION_DATASET, **kw)


# --------------------------------------------------------------------------- reference
def _ln(mod, x):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _linear(mod, x):
    return x @ mod.weight.t() + mod.bias


def _mha(mha, q, k, v):
    """Multi-head attention written out from the module's packed weights: q [m, E], k/v [s, E]."""
    E, h = q.shape[-1], mha.num_heads
    d = E // h
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    Q = (q @ wq.t() + bq).view(-1, h, d).transpose(0, 1)  # [h, m, d]
    K = (k @ wk.t() + bk).view(-1, h, d).transpose(0, 1)
    V = (v @ wv.t() + bv).view(-1, h, d).transpose(0, 1)
    attn = torch.softmax(Q @ K.transpose(1, 2) / d ** 0.5, dim=-1)
    return _linear(mha.out_proj, (attn @ V).transpose(0, 1).reshape(-1, E))


def _proxy(net, query, prompts):
    kv = _ln(net.ln_1, prompts)
    return _ln(net.ln_2, query + _mha(net.attn, _ln(net.ln_1, query), kv, kv))


def _mapper(m, x, p):
    q, k, v = _linear(m.linear_q, x), _linear(m.linear_k, p), _linear(m.linear_v, p)
    q = q + _mha(m.attn, _ln(m.ln_1, q), _ln(m.ln_1, k), _ln(m.ln_1, v))
    hidden = _linear(m.ffn.c_fc, _ln(m.ln_2, q))
    return q + _linear(m.ffn.c_proj, hidden * torch.sigmoid(1.702 * hidden))


def _reference_g(clip):
    feats = []
    for name in CLASSNAMES:
        texts = colour_descriptions()[name]
        f = F.normalize(clip.encode_text(tokenize(texts, clip.context_length)), dim=-1)
        feats.append(F.normalize(f.mean(0), dim=-1))
    return torch.stack(feats)


def reference(method, images, labels):
    """(logits, loss) of METHODS-SOTA.md §6 from the method's tensors, written out."""
    clip, n, k = method.clip, method.config.n_ctx, method.cross_layer
    T = [method.text.ctx] + list(method.text.deep.prompts)
    V = [method.vision.shallow] + list(method.vision.deep.prompts)
    L = len(T)
    pt = torch.cat([_proxy(method.text_proxy_nets[l], method.text_proxies[l: l + 1], T[l])
                    for l in range(k)])
    V2 = list(_mapper(method.text_to_vision, torch.cat(V[:k]), pt).split(n)) + V[k:]
    pv = torch.cat([_proxy(method.vision_proxy_nets[l - k], method.vision_proxies[l - k: l - k + 1],
                           V[l]) for l in range(k, L)])
    T2 = T[:k] + list(_mapper(method.vision_to_text, torch.cat(T[k:]), pv).split(n))
    tokens = tokenize([" ".join(["X"] * n) + f" {c}." for c in CLASSNAMES], clip.context_length)
    emb = clip.embed_tokens(tokens)
    emb = torch.cat([emb[:, :1], T2[0].expand(len(CLASSNAMES), -1, -1), emb[:, 1 + n:]], dim=1)
    text = clip.encode_text_embeddings(emb, tokens.argmax(-1),
                                       deep_prompts={i: T2[i] for i in range(1, L)})
    image = clip.encode_image(images, prompts=V2[0], deep_prompts={i: V2[i] for i in range(1, L)})
    z = F.normalize(clip.encode_image(images), dim=-1)
    g = _reference_g(clip)
    v = F.normalize(F.normalize(image, dim=-1) + z, dim=-1)
    t = F.normalize(F.normalize(text, dim=-1) + g, dim=-1)
    logits = clip.logit_scale.exp() * v @ t.t()
    loss = F.cross_entropy(logits, labels) + 12.0 * (
        (1 - (t * g).sum(-1).mean()) + (1 - (v * z).sum(-1).mean()))
    return logits, loss


def _close(actual, expected, what, rtol=1e-6):
    """Relative error in norm (float32 rounding of tiny elements is not an error)."""
    error = float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
    assert error <= rtol, f"{what}: relative error {error:.2e}"
    return error


def test_logits_loss_and_gradients_match_the_formula(deep_clip, description_files):
    """In float64 (a float32 gradient that nearly cancels, e.g. a key bias before a LayerNorm,
    differs by rounding alone); the description features stay float32 (their cache)."""
    clip = build_clip(DEEP)
    clip.load_state_dict(deep_clip.state_dict())
    clip = clip.double().requires_grad_(False).eval()
    method = _build(clip, description_files).double()
    assert (method.depth, method.cross_layer) == (4, 2)
    method.train()
    images, labels = colour_batch(4, torch.Generator().manual_seed(3))
    images = images.double()
    loss, parts = method.loss(images, labels)
    params = method.named_trainable_parameters()
    grads = torch.autograd.grad(loss, list(params.values()))
    ref_logits, ref_loss = reference(method, images, labels)
    ref_grads = torch.autograd.grad(ref_loss, list(params.values()))
    _close(loss.detach(), ref_loss.detach(), "loss")
    with torch.no_grad():
        _close(method(images), ref_logits.detach(), "logits")
    for (name, _), a, b in zip(params.items(), grads, ref_grads):
        if not b.abs().sum() > 0:
            # the released init gives every V_l (so every visual proxy) the same value: the
            # vision->text keys are all equal, and so are its values, so its key projection has
            # no gradient until the prompts differ (below)
            assert name.startswith("vision_to_text.linear_k"), f"{name}: no gradient"
            assert float(a.abs().max()) < 1e-12
            continue
        _close(a, b, f"grad {name}")
    opt = torch.optim.SGD(method.param_groups(0.01), lr=0.01)
    for p, g in zip(params.values(), grads):
        p.grad = g
    opt.step()
    opt.zero_grad()
    method.loss(images, labels)[0].backward()
    assert method.vision_to_text.linear_k.weight.grad.abs().sum() > 1e-6
    # every mapping network and proxy is trained in functional mode
    assert any(n.startswith("text_to_vision") for n in params) and "vision_proxies" in params
    assert set(parts) == {"ce", "text", "image"}


def test_released_initialisation(deep_clip, description_files):
    method = _build(deep_clip, description_files)
    V = method.vision.deep.prompts
    assert all(torch.equal(V[i], method.vision.shallow) for i in range(V.shape[0]))
    assert not torch.equal(method.text.deep.prompts[0], method.text.deep.prompts[1])
    for nets in (method.text_proxy_nets, method.vision_proxy_nets):
        first = dict(nets[0].named_parameters())
        for net in nets[1:]:
            assert all(torch.equal(p, first[n]) for n, p in net.named_parameters())
    for proxies in (method.text_proxies, method.vision_proxies):
        assert all(torch.equal(row, proxies[0]) for row in proxies)
    # 16 > 4 tokens: CTX_INIT ignored (random ctx, "X ... X {class}."); <= 4: its first words
    assert method.text.text.prompt_text("red") == "X X X X X red."
    short = _build(deep_clip, description_files, n_ctx=2)
    words = deep_clip.embed_tokens(tokenize(["a photo of a"], deep_clip.context_length))[0, 1:3]
    assert torch.equal(short.text.ctx.detach(), words)
    assert short.text.text.prompt_text("red") == "a photo of a red."


def test_released_mode_freezes_the_mappers_and_overwrites_the_prompts(deep_clip,
                                                                      description_files):
    method = _build(deep_clip, description_files, mapper="released_inplace")
    mapping = {n: p.detach().clone() for n, p in method._mapping_parameters().items()}
    trainable = method.named_trainable_parameters()
    assert set(trainable) == {"text.ctx", "text.deep.prompts", "vision.shallow",
                              "vision.deep.prompts"}
    assert method.num_registered_parameters() == _build(deep_clip, description_files) \
        .num_trainable_parameters()
    opt = torch.optim.Adam(method.param_groups(0.01), lr=0.01, eps=1e-3)
    gen = torch.Generator().manual_seed(1)
    method.train()
    k = method.cross_layer
    for _ in range(3):
        text0, vision0 = (x.detach().clone() for x in method.stored_prompts())
        with torch.no_grad():
            text1, vision1 = method.map_prompts(text0, vision0)
        loss, _ = method.loss(*colour_batch(4, gen))
        # the forward wrote the mapped prompts into the stored ones, and used those
        text2, vision2 = (x.detach() for x in method.stored_prompts())
        assert torch.equal(vision2[:k], vision1[:k]) and torch.equal(text2[k:], text1[k:])
        assert torch.equal(vision2[k:], vision0[k:]) and torch.equal(text2[:k], text0[:k])
        assert not torch.equal(vision2[:k], vision0[:k])
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
        assert all(p.grad is None for p in method._mapping_parameters().values())
        opt.step()
    for n, p in method._mapping_parameters().items():
        assert torch.equal(p.detach(), mapping[n]), f"{n} moved"


def test_released_evaluation_depends_on_the_batch_order(deep_clip, description_files):
    images, _ = colour_batch(4, torch.Generator().manual_seed(4))
    for mapper in ("functional", "released_inplace"):
        method = _build(deep_clip, description_files, mapper=mapper)
        state = method.trainable_state_dict()
        method.eval()
        with torch.no_grad():
            whole = method(images)
            again = method(images)
            method.load_trainable_state_dict(state)
            first, second = method(images[:2]), method(images[2:])
            method.load_trainable_state_dict(state)
            second_first, first_second = method(images[2:]), method(images[:2])
        if mapper == "functional":
            assert torch.equal(whole, again)
            torch.testing.assert_close(torch.cat([first, second]), whole)
            torch.testing.assert_close(torch.cat([first_second, second_first]), whole)
            continue
        assert not torch.allclose(whole, again)  # each forward maps the prompts again
        torch.testing.assert_close(first, whole[:2])  # the first batch sees the stored prompts
        torch.testing.assert_close(second_first, whole[2:])
        assert not torch.allclose(second, whole[2:], atol=1e-4)  # later batches do not
        assert not torch.allclose(first_second, whole[:2], atol=1e-4)


def test_released_checkpoint_holds_the_frozen_mappers(deep_clip, description_files):
    method = _build(deep_clip, description_files, mapper="released_inplace")
    functional = _build(deep_clip, description_files)
    state = method.trainable_state_dict()
    assert set(state) == set(functional.trainable_state_dict())  # same keys in both modes
    fresh = _build(deep_clip, description_files, seed=1, mapper="released_inplace")
    fresh.load_trainable_state_dict(state)
    images, _ = colour_batch(2, torch.Generator().manual_seed(5))
    method.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(method(images), fresh(images))
        assert torch.equal(method(images), fresh(images))  # both rewrote the same way


def test_functional_forward_leaves_the_stored_prompts(deep_clip, description_files):
    method = _build(deep_clip, description_files)
    before = [x.detach().clone() for x in method.stored_prompts()]
    method.train()
    method.loss(*colour_batch(4, torch.Generator().manual_seed(6)))[0].backward()
    after = method.stored_prompts()
    assert all(torch.equal(a.detach(), b) for a, b in zip(after, before))


def test_descriptions_and_config_errors(deep_clip, description_files, monkeypatch):
    from vlprompt.data.descriptions import ENV_VAR

    torch.manual_seed(0)
    method = HiCroPL(deep_clip, CLASSNAMES, make_config(HiCroPL, {"depth": 2, "cross_layer": 1}))
    images, _ = colour_batch(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="which dataset's LLM descriptions"):
        method(images)
    monkeypatch.delenv(ENV_VAR, raising=False)
    method.set_dataset(DESCRIPTION_DATASET)
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        method(images)
    monkeypatch.setenv(ENV_VAR, str(description_files))
    assert method(images).shape == (2, len(CLASSNAMES))
    for bad in ({"cross_layer": 12}, {"cross_layer": 0}, {"depth": 1}, {"mapper": "inplace"},
                {"consistency_weight": -1.0}):
        with pytest.raises(ValueError, match="hicropl"):
            make_config(HiCroPL, bad)
    # depths above the backbone's are capped, then the cross layer below them
    capped = _build(deep_clip, description_files, depth=12, cross_layer=6)
    assert (capped.depth, capped.cross_layer) == (4, 3)
