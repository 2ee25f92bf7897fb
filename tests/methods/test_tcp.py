"""TCP against a reference written from the released formulas (``trainers/tcp.py``
``PromptLearner``/``CustomCLIP``, ``clip_text/model.py ResidualAttentionBlock_MaPLe``): logits,
loss and the gradients of the context and the meta-net, on shared weights; the packaged configs
reproduce the released per-dataset prompt tables and optimiser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.templates import dataset_template
from vlprompt.clip.tokenizer import tokenize
from vlprompt.config import TrainConfig, resolve_config
from vlprompt.engine.optim import build_optimizer
from vlprompt.methods import build_method, make_config
from vlprompt.methods.tcp import TCP

from .conftest import CLASSNAMES, NEW_CLASSNAMES, colour_batch

#: the released prompt table ``CUSTOM_TEMPLATES`` (4 context words, "X X X X" or "a photo of a")
RELEASED = {
    "oxford_pets": "X X X X {}, a type of pet.",
    "oxford_flowers": "X X X X {}, a type of flower.",
    "fgvc_aircraft": "X X X X {}, a type of aircraft.",
    "dtd": "X X X X {} texture.",
    "eurosat": "X X X X {}.",
    "stanford_cars": "X X X X {}, a type of car",
    "food101": "X X X X {}, a type of food.",
    "sun397": "X X X X {}.",
    "caltech101": "X X X X {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}
#: the released class-embedding table ``CUSTOM_TEMPLATES_ori``
RELEASED_ORI = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of an aircraft {}.",
    "dtd": "a photo of a {}, a type of texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of a {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def reference_text(clip, x, tokens, layer=None, class_tokens=None, weight=1.0):
    """The released text encoder: 77 positions, positions 1..n <- w W + (1-w) x before block
    ``layer`` (the ``counter in layers`` branch)."""
    x = x + clip.positional_embedding
    for i, block in enumerate(clip.transformer.resblocks):
        if i == layer:
            n = class_tokens.shape[1]
            x = torch.cat([x[:, :1], weight * class_tokens + (1 - weight) * x[:, 1: 1 + n],
                           x[:, 1 + n:]], dim=1)
        x = block(x, causal=True)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection


def reference(method, prompt_template, ori_template, images, labels, layer, weight=1.0,
              names=CLASSNAMES):
    """Released TCP forward + loss on the method's own tensors: (logits, loss)."""
    clip, ctx, n = method.clip, method.ctx, method.ctx.shape[0]
    with torch.no_grad():
        ori = tokenize([ori_template.format(c) for c in names])
        t_old = F.normalize(reference_text(clip, clip.token_embedding(ori), ori), dim=-1)
    W = method.meta_net(t_old).reshape(len(names), -1, clip.text_width)  # [C, 4, D]
    tokens = tokenize([prompt_template.format(c) for c in names])
    emb = clip.token_embedding(tokens)
    prompts = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1),
                         emb[:, 1 + n:]], dim=1)
    text = F.normalize(reference_text(clip, prompts, tokens, layer, W, weight), dim=-1)
    image = F.normalize(clip.encode_image(images), dim=-1)
    logits = clip.logit_scale.exp() * image @ text.t()
    score = 1.0 - torch.mean(torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text, t_old))
    return logits, F.cross_entropy(logits, labels) + 8.0 * score


def build(clip, template="a photo of a {}, a type of pet.", **kw):
    torch.manual_seed(0)
    return build_method("tcp", clip, CLASSNAMES, template=template, layer=1, **kw)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_matches_the_released_formulas(tiny_clip, weight):
    """Pets prompts; the class-aware tokens enter before block 1 of the 2-block tiny tower."""
    method = build(tiny_clip, mix_weight=weight)
    method.train()
    images, labels = colour_batch(8, torch.Generator().manual_seed(2))
    logits, loss = reference(method, RELEASED["oxford_pets"], RELEASED_ORI["oxford_pets"],
                             images, labels, layer=1, weight=weight)
    got, _ = method.loss(images, labels)
    torch.testing.assert_close(method(images), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    params = list(method.named_trainable_parameters().values())
    assert len(params) == 5  # ctx + two Linear layers
    ours = torch.autograd.grad(got, params)
    theirs = torch.autograd.grad(loss, params)
    for a, b in zip(ours, theirs):  # fp32 rounding: measured <= 9e-6 (1e-6 in fp64)
        assert rel_err(a, b) < 2e-5


def test_class_tokens_change_the_features_and_follow_new_classes(tiny_clip):
    method = build(tiny_clip)
    method.eval()
    images, _ = colour_batch(3, torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = method(images)
        assert torch.equal(method(images), before)  # cached
        method.meta_net[2].weight.mul_(2.0)  # the cache follows the meta-net, not only ctx
        moved = method(images)
        assert not torch.allclose(moved, before)
        method.set_classnames(NEW_CLASSNAMES)
        new = method(images)
    names = [c.replace("_", " ") for c in NEW_CLASSNAMES]
    with torch.no_grad():
        logits, _ = reference(method, RELEASED["oxford_pets"], RELEASED_ORI["oxford_pets"],
                              images, torch.zeros(3, dtype=torch.long), layer=1, names=names)
    torch.testing.assert_close(new, logits, rtol=1e-5, atol=1e-5)


def test_packaged_configs_give_the_released_prompt_tables(tiny_clip):
    for dataset, prompt in RELEASED.items():
        for protocol in ("base2new", "fewshot"):
            cfg = resolve_config("tcp", protocol, dataset=dataset)["method"]
            method = TCP(tiny_clip, CLASSNAMES, make_config(TCP, cfg),
                         template=dataset_template(dataset, "kgcoop"))
            assert method.teacher_template == RELEASED_ORI[dataset], (dataset, protocol)
            released = tokenize([prompt.format(c) for c in CLASSNAMES])
            ours = method.prompts.tokens
            # identical but for positions 1..4, which the context replaces
            assert torch.equal(ours[:, :1], released[:, :1]), dataset
            assert torch.equal(ours[:, 5:], released[:, 5:]), dataset


def test_packaged_optimiser_and_epochs():
    for protocol in ("base2new", "fewshot", "xd"):
        train = resolve_config("tcp", protocol, shots=16, dataset="caltech101")["train"]
        opt = build_optimizer(build_method("tcp", _clip(), ["a", "b"]), TrainConfig(**train))
        group = opt.param_groups[0]
        assert isinstance(opt, torch.optim.Adam) and group["eps"] == 1e-3
        assert group["lr"] == 0.002 and group["weight_decay"] == 5e-4
        assert train["batch_size"] == 32 and train["warmup_epoch"] == 1
    b2n = resolve_config("tcp", "base2new", shots=16, dataset="oxford_pets")["train"]
    assert b2n["max_epoch"] == 50
    for dataset in ("imagenet", "sun397"):  # train.py: MAX_EPOCH = 25 for ImageNet and SUN397
        assert resolve_config("tcp", "base2new", dataset=dataset)["train"]["max_epoch"] == 25


_CLIP = []


def _clip():
    from .conftest import make_tiny_clip

    if not _CLIP:
        _CLIP.append(make_tiny_clip(0))
    return _CLIP[0]


def test_config_errors_and_layer_cap(tiny_clip, caplog):
    with pytest.raises(ValueError, match="one shared context at the end"):
        TCP.Config(csc=True)
    with pytest.raises(ValueError, match="prompt_suffix must contain"):
        TCP.Config(prompt_suffix="a type of pet")
    with pytest.raises(ValueError, match="mix_weight must be in"):
        TCP.Config(mix_weight=1.5)
    method = build_method("tcp", tiny_clip, CLASSNAMES)  # layer 8 on a 2-block tower
    assert method.layer == 1 and "layer 8 exceeds the 2 text blocks" in caplog.text
