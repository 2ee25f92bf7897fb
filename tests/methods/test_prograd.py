"""ProGrad against a reference written from the released formulas (``ProGrad.public/trainers/
prograd.py`` ``PromptLearner``/``ProGradLoss``, Dassl ``prograd_backward_and_update``): initial
context and prompt tokens, logits and both losses, and the projected gradient the engine steps on.
With the projection off, ProGrad is CoOp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from vlprompt.clip.templates import dataset_template
from vlprompt.clip.tokenizer import tokenize
from vlprompt.config import TrainConfig, resolve_config
from vlprompt.engine import train_method
from vlprompt.methods import build_method, make_config
from vlprompt.methods.coop import CoOp
from vlprompt.methods.prograd import ProGrad, project_gradient

from .conftest import CLASSNAMES, colour_batch

PETS = "a type of pet, a photo of a {}."  # ProGrad's OxfordPets template: 8 words, 9 tokens

#: ProGrad's own template table (``CUSTOM_TEMPLATES`` of trainers/prograd.py), vlprompt names
RELEASED = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
}


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def reference_text(clip, embeddings, tokens):
    """The released TextEncoder: all 77 positions, every block, EOT row, projection."""
    x = embeddings + clip.positional_embedding
    for block in clip.transformer.resblocks:
        x = block(x, causal=True)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ clip.text_projection


def reference(clip, template, ctx, images, labels, lam=1.0, T=1.0):
    """Released ProGrad on ``ctx``: (logits, L_ce, L_kd, projected gradient, conflict?)."""
    n = ctx.shape[0]
    words = template.replace(" {}.", "")
    prefix = " ".join(["X"] * (n - len(words.split(" ")))) + " " + words
    tokens = tokenize([prefix + " " + c + "." for c in CLASSNAMES])
    emb = clip.token_embedding(tokens)
    prompts = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(CLASSNAMES), -1, -1),
                         emb[:, 1 + n:]], dim=1)
    text = F.normalize(reference_text(clip, prompts, tokens), dim=-1)
    image = F.normalize(clip.encode_image(images), dim=-1)
    logits = clip.logit_scale.exp() * image @ text.t()
    with torch.no_grad():
        zs_tokens = tokenize([template.format(c) for c in CLASSNAMES])
        zs_text = reference_text(clip, clip.token_embedding(zs_tokens), zs_tokens)
        zs_text = F.normalize(zs_text, dim=-1)
        zs = clip.logit_scale.exp() * image @ zs_text.t()
    xe = F.cross_entropy(logits, labels)
    kl = (-F.softmax(zs / T, dim=-1) * F.log_softmax(logits / T, -1) * T * T).sum(1).mean()
    b = torch.autograd.grad(kl, [ctx], retain_graph=True)[0]
    a = torch.autograd.grad(xe, [ctx], retain_graph=True)[0]
    b_norm, a_norm = b / torch.linalg.norm(b), a / torch.linalg.norm(a)
    conflict = bool(torch.dot(a_norm.flatten(), b_norm.flatten()) < 0)
    g = a - lam * torch.dot(a.flatten(), b_norm.flatten()) * b_norm if conflict else a
    return logits, xe, kl, g, conflict, tokens, zs


def initial_context(clip, template, n):
    """The released CTX_INIT=True initialisation: zeros, then the template words' embeddings."""
    words = template.replace(" {}.", "")
    w = len(words.split(" "))
    ctx = torch.zeros(n, clip.text_width)
    ctx[n - w:] = clip.token_embedding(tokenize(words))[0, 1: 1 + w]
    return ctx


def one_step(method, images, labels, **kw):
    """One engine step of plain gradient descent (lr 1): returns the gradient it applied."""
    start = method.ctx.detach().clone()
    config = TrainConfig(max_epoch=1, batch_size=images.shape[0], lr=1.0, momentum=0.0,
                         weight_decay=0.0, warmup_epoch=0, lr_scheduler="constant",
                         num_workers=0, **kw)
    train_method(method, TensorDataset(images, labels), config, show_progress=False)
    return start - method.ctx.detach()


@pytest.mark.parametrize("case", ["conflict", "aligned"])
@pytest.mark.parametrize("accum", [1, 2])
def test_matches_the_released_formulas(tiny_clip, case, accum):
    torch.manual_seed(0)
    method = build_method("prograd", tiny_clip, CLASSNAMES, template=PETS)
    images, _ = colour_batch(8, torch.Generator().manual_seed(3))
    ctx = initial_context(tiny_clip, PETS, 16).requires_grad_(True)
    assert torch.equal(method.ctx.detach(), ctx.detach())
    zs = reference(tiny_clip, PETS, ctx, images, torch.zeros(8, dtype=torch.long))[-1]
    # labels the zero-shot teacher finds least (most) likely: the gradients conflict (agree)
    labels = zs.argmin(-1) if case == "conflict" else zs.argmax(-1)
    logits, xe, kl, g, conflict, tokens, _ = reference(tiny_clip, PETS, ctx, images, labels)
    assert conflict == (case == "conflict")
    assert torch.equal(method.prompts.tokens, tokens)
    torch.testing.assert_close(method(images), logits, rtol=1e-5, atol=1e-5)
    terms, parts = method.loss_terms(images, labels)
    torch.testing.assert_close(terms["ce"], xe, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd"], kl, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"ce", "kd", "acc"}
    applied = one_step(method, images, labels, grad_accum=accum)
    assert rel_err(applied, g) < 1e-5
    if conflict:  # the projection acted: far from the plain CE gradient
        ce_grad = torch.autograd.grad(xe, [ctx])[0]
        assert rel_err(applied, ce_grad) > 1e-2


def test_projection_rule():
    g_g = torch.tensor([1.0, 0.0, 0.0])
    conflicting = torch.tensor([-1.0, 2.0, 0.5])
    full = project_gradient(conflicting, g_g, 1.0)
    assert torch.equal(full, torch.tensor([0.0, 2.0, 0.5]))  # orthogonal to g_g
    torch.testing.assert_close(project_gradient(conflicting, g_g, 0.8),
                               torch.tensor([-0.2, 2.0, 0.5]))
    aligned = torch.tensor([1.0, -3.0, 2.0])
    assert torch.equal(project_gradient(aligned, g_g, 1.0), aligned)
    assert torch.equal(project_gradient(conflicting, torch.zeros(3), 1.0), conflicting)
    assert torch.equal(project_gradient(torch.zeros(3), g_g, 1.0), torch.zeros(3))


def _coop_twin(method):
    """CoOp with ProGrad's prompt and initial context."""
    coop = CoOp(method.clip, CLASSNAMES, CoOp.Config(n_ctx=16, ctx_init=method.prompts.ctx_init))
    with torch.no_grad():
        coop.ctx.copy_(method.ctx)
    return coop


@pytest.mark.parametrize("how", [{"projection": False}, {"prograd_lambda": 0.0}])
def test_without_projection_it_is_coop(tiny_clip, how):
    """Same logits, gradients and trained weights: ``projection: false`` takes the default
    backward, lambda 0 the engine's combined path with a null projection."""
    torch.manual_seed(0)
    method = build_method("prograd", tiny_clip, CLASSNAMES, template=PETS, **how)
    coop = _coop_twin(method)
    assert torch.equal(method.prompts.tokens, coop.prompts.tokens)
    start = coop.ctx.detach().clone()
    images, labels = colour_batch(8, torch.Generator().manual_seed(4))
    assert torch.equal(method(images), coop(images))
    grads = [torch.autograd.grad(m.loss(images, labels)[0], [m.ctx])[0] for m in (method, coop)]
    assert torch.equal(*grads)
    config = TrainConfig(max_epoch=3, batch_size=4, lr=0.01, num_workers=0, grad_accum=2)
    data = TensorDataset(*colour_batch(12, torch.Generator().manual_seed(5)))
    for m in (method, coop):
        train_method(m, data, config, show_progress=False)
    assert torch.equal(method.ctx.detach(), coop.ctx.detach())
    assert not torch.equal(method.ctx.detach(), start)  # it trained


def test_packaged_configs_give_the_released_templates_and_prompts(tiny_clip):
    for dataset, released in RELEASED.items():
        for protocol in ("base2new", "fewshot"):
            cfg = resolve_config("prograd", protocol, dataset=dataset)["method"]
            method = ProGrad(tiny_clip, CLASSNAMES, make_config(ProGrad, cfg),
                             template=dataset_template(dataset))
            assert method.prograd_template == released, (dataset, protocol)
        ctx = initial_context(tiny_clip, released, 16)
        assert torch.equal(method.ctx.detach(), ctx), dataset
        words = released.replace(" {}.", "")
        prefix = " ".join(["X"] * (16 - len(words.split(" ")))) + " " + words
        expected = tokenize([prefix + " " + c + "." for c in CLASSNAMES])
        assert torch.equal(method.prompts.tokens, expected), dataset


def test_config_errors():
    with pytest.raises(ValueError, match="set ctx_init only with ctx_from_template=false"):
        ProGrad.Config(ctx_init="a photo of a")
    with pytest.raises(ValueError, match="template must contain"):
        ProGrad.Config(template="a photo")
    with pytest.raises(ValueError, match="prograd_lambda must be >= 0"):
        ProGrad.Config(prograd_lambda=-1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ProGrad.Config(temperature=0.0)


def test_more_template_words_than_context_is_refused(tiny_clip):
    with pytest.raises(ValueError, match="8 words before '{}', more than n_ctx=4"):
        build_method("prograd", tiny_clip, CLASSNAMES, template=PETS, n_ctx=4)
    # CoOp's initialisation instead (the third-party ViT-B/16 config: 4 vectors, "a photo of a")
    method = build_method("prograd", tiny_clip, CLASSNAMES, template=PETS, n_ctx=4,
                          ctx_from_template=False, ctx_init="a photo of a")
    assert method.num_trainable_parameters() == 4 * tiny_clip.text_width
