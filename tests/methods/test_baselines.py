"""Method-specific checks of the baselines: identities with zero-shot CLIP, CoCoOp chunking,
MaPLe couplings, PromptSRC losses and GPA, config validation and the shipped YAML configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlprompt
from vlprompt.clip.templates import PROMPTSRC_TEMPLATES
from vlprompt.clip.tokenizer import tokenize
from vlprompt.methods import build_method, get_method, make_config
from vlprompt.methods.prompts import hand_crafted_text_features
from vlprompt.methods.promptsrc import gpa_weights

from .conftest import CLASSNAMES, colour_batch

TEMPLATES = ["a photo of a {}.", "a drawing of a {}.", "a bad photo of the {}."]


def zero_shot_text(clip, template="a photo of a {}.", names=CLASSNAMES):
    with torch.no_grad():
        return clip.encode_text(tokenize([template.format(n) for n in names]))


def images(n=3, seed=0):
    return colour_batch(n, torch.Generator().manual_seed(seed))[0]


# ---------------------------------------------------------------------------- KgCoOp
def test_kgcoop_init_equals_zero_shot_and_regulariser_is_zero(tiny_clip):
    method = build_method("kgcoop", tiny_clip, CLASSNAMES, template="a photo of a {}.")
    with torch.no_grad():
        text = method.text_features()
        torch.testing.assert_close(text, zero_shot_text(tiny_clip), rtol=1e-5, atol=1e-5)
        _, parts = method.loss(images(4), torch.arange(4))
    assert abs(parts["kg"]) < 1e-5


def test_kgcoop_teacher_is_the_dataset_template(tiny_clip):
    template = "a photo of a {}, a type of texture."
    method = build_method("kgcoop", tiny_clip, CLASSNAMES, template=template)
    with torch.no_grad():
        total, parts = method.loss(images(4), torch.arange(4))
    expected = F.normalize(zero_shot_text(tiny_clip, template), dim=-1)
    torch.testing.assert_close(method.teacher_features, expected, rtol=1e-5, atol=1e-6)
    cos = (F.normalize(zero_shot_text(tiny_clip), dim=-1) * expected).sum(-1).mean()
    assert parts["kg"] == pytest.approx(1 - float(cos), abs=1e-5)
    assert float(total) == pytest.approx(parts["ce"] + 8.0 * parts["kg"], rel=1e-5)
    method.set_classnames(["cyan", "grey"])
    assert method.teacher_features is None  # recomputed for the new class list on next use


# ---------------------------------------------------------------------------- CoCoOp
def test_cocoop_meta_net_shapes_follow_the_backbone(tiny_clip):
    method = build_method("cocoop", tiny_clip, CLASSNAMES)
    lin1, lin2 = method.meta_net.linear1, method.meta_net.linear2
    assert (lin1.in_features, lin1.out_features) == (32, 2)  # E -> E // 16
    assert (lin2.in_features, lin2.out_features) == (2, 64)  # -> text width


def test_cocoop_meta_net_sees_the_normalised_feature(tiny_clip):
    method = build_method("cocoop", tiny_clip, CLASSNAMES)
    feats = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(method.conditional_context(feats),
                                   method.conditional_context(7.0 * feats))


def test_cocoop_with_zero_meta_net_equals_zero_shot(tiny_clip):
    method = build_method("cocoop", tiny_clip, CLASSNAMES)
    with torch.no_grad():
        method.meta_net.linear2.weight.zero_()
        method.meta_net.linear2.bias.zero_()
        x = images(2)
        logits = method(x)
        img = F.normalize(tiny_clip.encode_image(x), dim=-1)
        txt = F.normalize(zero_shot_text(tiny_clip), dim=-1)
        expected = tiny_clip.logit_scale.exp() * img @ txt.t()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 5, 7, 12])
def test_cocoop_chunked_equals_unchunked(tiny_clip, chunk):
    """B x C = 3 x 4 prompts: chunk sizes that do and do not divide C or B*C give the same
    logits (<= 1e-5 relative) and the same gradients as one text-tower call."""
    x = images(3)
    results = []
    for size, ckpt in ((0, False), (chunk, False), (chunk, True)):
        torch.manual_seed(0)
        method = build_method("cocoop", tiny_clip, CLASSNAMES, text_chunk_size=size,
                              checkpoint_chunks=ckpt)
        logits = method(x)
        logits.square().mean().backward()
        results.append((logits.detach(), method.ctx.grad.clone(),
                        method.meta_net.linear1.weight.grad.clone()))
    ref = results[0]
    for got in results[1:]:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_cocoop_auto_chunks_fit_the_free_memory_and_equal_one_call(tiny_clip, monkeypatch):
    """``text_chunk_size: auto``: the largest power of two of prompts that fits a quarter of the
    free memory (at least 1, at most B x C), giving the logits and gradients of one call."""
    import vlprompt.runtime as runtime
    from vlprompt.methods import prompts as P

    per_prompt = (5 * tiny_clip.text_width + tiny_clip.config.text_heads * 9) * 9 * 4
    calls = []
    real = tiny_clip.encode_text_embeddings

    def counted(emb, *args, **kwargs):
        calls.append(emb.shape[0])
        return real(emb, *args, **kwargs)

    for free_prompts, expected in ((2.5, 2), (5, 4), (1000, 12), (0.1, 1)):
        monkeypatch.setattr(runtime, "free_memory_bytes",
                            lambda device, n=free_prompts: int(4 * n * per_prompt))
        assert P.auto_chunk_size(tiny_clip, 9, 12, torch.device("cpu"), False) == expected
    monkeypatch.setattr(runtime, "free_memory_bytes", lambda device: int(4 * 5.5 * per_prompt))
    x = images(3)
    results = []
    for size in (0, "auto"):
        torch.manual_seed(0)
        method = build_method("cocoop", tiny_clip, CLASSNAMES, text_chunk_size=size)
        calls.clear()
        monkeypatch.setattr(tiny_clip, "encode_text_embeddings", counted)
        logits = method(x)
        logits.square().mean().backward()
        results.append((logits.detach(), method.ctx.grad.clone(), list(calls)))
    assert results[0][2] == [12] and max(results[1][2]) <= 8 and sum(results[1][2]) == 12
    for a, b in zip(results[1][:2], results[0][:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    with pytest.raises(ValueError, match="integer >= 0 .* or auto"):
        build_method("cocoop", tiny_clip, CLASSNAMES, text_chunk_size="big")


def test_cocoop_chunk_assembly_matches_assemble_per_sample(tiny_clip):
    method = build_method("cocoop", tiny_clip, CLASSNAMES, text_chunk_size=5)
    ctx = torch.randn(3, 4, 64)
    with torch.no_grad():
        chunked = method.text_features(ctx)
        emb = method.prompts.assemble_per_sample(ctx).flatten(0, 1)
        eot = method.prompts.eot_indices.repeat(3)
        ref = tiny_clip.encode_text_embeddings(emb, eot).view(3, 4, -1)
    torch.testing.assert_close(chunked, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- VPT
def test_vpt_classifier_is_fixed_a_photo_of_a(tiny_clip):
    method = build_method("vpt", tiny_clip, CLASSNAMES, template="{} texture.")
    expected = F.normalize(zero_shot_text(tiny_clip), dim=-1)
    torch.testing.assert_close(method.text_features, expected, rtol=1e-5, atol=1e-6)
    x = images(2)
    with torch.no_grad():
        prompted = method.vision.encode(tiny_clip, x)
        plain = tiny_clip.encode_image(x)
    assert not torch.allclose(prompted, plain)
    assert method.vision.shallow.shape == (8, 64)
    assert method.vision.deep.prompts.shape == (1, 8, 64)  # blocks 1..L-1 of the 2-layer tower


def test_vpt_depth_one_has_only_shallow_prompts(tiny_clip):
    method = build_method("vpt", tiny_clip, CLASSNAMES, depth=1)
    assert set(method.named_trainable_parameters()) == {"vision.shallow"}


# ---------------------------------------------------------------------------- MaPLe / IVLP
def _carry_positions(clip, n):
    """Block outputs at text positions 1..n for "a photo of a {}." — class-independent under the
    causal mask, so feeding them back as deep prompts must reproduce zero-shot CLIP."""
    tokens = tokenize(["a photo of a cat."])
    hidden = []
    with torch.no_grad():
        clip.encode_text_embeddings(clip.embed_tokens(tokens), tokens.argmax(-1),
                                    hidden_states=hidden)
    return torch.stack([h[0, 1: 1 + n] for h in hidden[:-1]])  # [layers-1, n, D]


def test_maple_with_carried_prompts_reproduces_zero_shot_text(tiny_clip):
    method = build_method("maple", tiny_clip, CLASSNAMES)
    p = method.prompts
    with torch.no_grad():
        p.text_deep.prompts.copy_(_carry_positions(tiny_clip, 2))
        text = p.encode_text(tiny_clip)
    torch.testing.assert_close(text, zero_shot_text(tiny_clip), rtol=1e-5, atol=1e-5)
    # the context is initialised from "a photo" and "of a" stays in the fixed tokens
    words = tiny_clip.embed_tokens(tokenize(["a photo of a"]))[0, 1:3]
    torch.testing.assert_close(p.ctx.detach(), words)


@pytest.mark.parametrize("name", ["ivlp", "promptsrc"])
def test_independent_prompts_reproduce_zero_shot_text(tiny_clip, name):
    method = build_method(name, tiny_clip, CLASSNAMES, teacher_templates=TEMPLATES) \
        if name == "promptsrc" else build_method(name, tiny_clip, CLASSNAMES)
    n = method.config.n_ctx_text
    with torch.no_grad():
        method.text.deep.prompts.copy_(_carry_positions(tiny_clip, n))
        text = method.text_features()
    torch.testing.assert_close(text, zero_shot_text(tiny_clip), rtol=1e-5, atol=1e-5)


def test_maple_vision_prompts_are_coupled_to_text_prompts(tiny_clip):
    """A loss on image features alone trains the text prompts through the couplings."""
    method = build_method("maple", tiny_clip, CLASSNAMES)
    p = method.prompts
    shallow, deep = p.vision_prompts()
    assert shallow.shape == (2, 64) and set(deep) == {1} and deep[1].shape == (2, 64)
    torch.testing.assert_close(deep[1], p.couplings[0](p.text_deep.prompts[0]))
    p.encode_image(tiny_clip, images(2)).square().sum().backward()
    for name in ("ctx", "proj.weight", "text_deep.prompts", "couplings.0.weight"):
        grad = dict(p.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_ivlp_without_vision_prompts_keeps_the_image_tower(tiny_clip):
    method = build_method("ivlp", tiny_clip, CLASSNAMES, n_ctx_vision=0, depth_vision=0)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(method.image_features(x), tiny_clip.encode_image(x))
    assert not any(n.startswith("vision") for n in method.named_trainable_parameters())


# ---------------------------------------------------------------------------- PromptSRC
def _promptsrc(clip, **kw):
    torch.manual_seed(0)
    return build_method("promptsrc", clip, CLASSNAMES, teacher_templates=TEMPLATES, **kw)


def test_promptsrc_teacher_is_normalised_unnormalised_mean(tiny_clip):
    method = _promptsrc(tiny_clip)
    mean = torch.stack([zero_shot_text(tiny_clip, t) for t in TEMPLATES]).mean(0)
    torch.testing.assert_close(method.teacher_text_features(), F.normalize(mean, dim=-1),
                               rtol=1e-5, atol=1e-6)


def test_promptsrc_loss_terms(tiny_clip):
    method = _promptsrc(tiny_clip)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    total, parts = method.loss(x, y)
    with torch.no_grad():
        text = F.normalize(method.text_features(), dim=-1)
        img = F.normalize(method.image_features(x), dim=-1)
        scale = tiny_clip.logit_scale.exp()
        logits = scale * img @ text.t()
        teacher = method.teacher_text_features()
        zs_img = F.normalize(tiny_clip.encode_image(x), dim=-1)
        zs = scale * zs_img @ teacher.t()
        p_zs = zs.softmax(1)
        kl = (p_zs * (p_zs.log() - logits.log_softmax(1))).sum() / logits.numel()
    assert parts["ce"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert parts["l1_text"] == pytest.approx(float((text - teacher).abs().mean()), rel=1e-5)
    assert parts["l1_image"] == pytest.approx(float((img - zs_img).abs().mean()), rel=1e-5)
    assert parts["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
    expected = parts["ce"] + 25 * parts["l1_text"] + 10 * parts["l1_image"] + parts["kl"]
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)


def test_promptsrc_default_teacher_uses_the_60_templates(tiny_clip):
    assert get_method("promptsrc").Config().teacher_templates is None
    method = build_method("promptsrc", tiny_clip, CLASSNAMES)
    assert method.teacher_templates() == PROMPTSRC_TEMPLATES and len(PROMPTSRC_TEMPLATES) == 60
    expected = hand_crafted_text_features(tiny_clip, CLASSNAMES, PROMPTSRC_TEMPLATES,
                                          normalize_each=False)
    torch.testing.assert_close(method.teacher_text_features(), expected)


def test_gpa_weights():
    w = gpa_weights(20, 15, 1)
    assert sum(w) == pytest.approx(1.0) and max(range(20), key=w.__getitem__) == 14  # epoch 15
    far = gpa_weights(2, 15, 1)  # mean far beyond the run: still finite and normalised
    assert sum(far) == pytest.approx(1.0) and far[1] > far[0] > 0
    flat = gpa_weights(4, 6, 1e6)
    assert flat == pytest.approx([0.25] * 4)


def _set_all(method, value):
    with torch.no_grad():
        for p in method.named_trainable_parameters().values():
            p.fill_(value)


def test_promptsrc_gpa_aggregates_and_resumes(tiny_clip):
    epochs, values = 4, [1.0, 2.0, 3.0, 4.0]
    w = gpa_weights(epochs, 2.5, 1.0)
    expected = sum(wi * v for wi, v in zip(w, values))

    straight = _promptsrc(tiny_clip, gpa_mean=2.5, gpa_std=1.0)
    for e, v in enumerate(values):
        _set_all(straight, v)
        straight.on_epoch_end(e, epochs)
    straight.on_train_end()
    for p in straight.named_trainable_parameters().values():
        torch.testing.assert_close(p.detach(), torch.full_like(p, expected))

    # interrupted after epoch 2, checkpointed, resumed in a fresh method
    first = _promptsrc(tiny_clip, gpa_mean=2.5, gpa_std=1.0)
    for e, v in enumerate(values[:2]):
        _set_all(first, v)
        first.on_epoch_end(e, epochs)
    state = first.trainable_state_dict()
    assert int(state["gpa.epochs"]) == 2
    resumed = _promptsrc(tiny_clip, gpa_mean=2.5, gpa_std=1.0)
    resumed.load_trainable_state_dict(state)
    for e, v in enumerate(values[2:], start=2):
        _set_all(resumed, v)
        resumed.on_epoch_end(e, epochs)
    resumed.on_train_end()
    for n, p in resumed.named_trainable_parameters().items():
        assert torch.equal(p, straight.named_trainable_parameters()[n])


def test_promptsrc_train_end_without_epochs_keeps_prompts(tiny_clip):
    method = _promptsrc(tiny_clip)
    before = {n: p.detach().clone() for n, p in method.named_trainable_parameters().items()}
    method.on_train_end()
    for n, p in method.named_trainable_parameters().items():
        assert torch.equal(p, before[n])


# ---------------------------------------------------------------------------- configs
BAD_CONFIGS = [
    ("cocoop", {"n_ctx": 0}), ("cocoop", {"text_chunk_size": -1}),
    ("cocoop", {"meta_reduction": 0}),
    ("kgcoop", {"kg_weight": -1.0}), ("kgcoop", {"n_ctx": 0}),
    ("vpt", {"depth": 0}), ("vpt", {"n_ctx_vision": 0}), ("vpt", {"text_template": "a photo"}),
    ("maple", {"depth": 0}), ("maple", {"n_ctx": 0}),
    ("ivlp", {"depth_text": 0}), ("ivlp", {"n_ctx_vision": 0}),
    ("promptsrc", {"gpa_std": 0.0}), ("promptsrc", {"text_loss_weight": -1.0}),
    ("promptsrc", {"teacher_templates": "a photo of a {}."}),
    ("promptsrc", {"teacher_templates": ["a photo"]}),
    ("promptsrc", {"depth_vision": 0, "n_ctx_vision": 0}),
]


@pytest.mark.parametrize("name,overrides", BAD_CONFIGS)
def test_bad_configs_raise(name, overrides):
    with pytest.raises(ValueError):
        make_config(get_method(name), overrides)


def test_ctx_init_shorter_than_n_ctx_is_an_error(tiny_clip):
    with pytest.raises(ValueError, match="fewer than n_ctx"):
        build_method("kgcoop", tiny_clip, CLASSNAMES, n_ctx=6)


CONFIG_DIR = Path(vlprompt.__file__).parent / "configs"
BASELINES = ["cocoop", "kgcoop", "vpt", "maple", "ivlp", "promptsrc"]


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("protocol", ["base2new", "fewshot", "xd"])
def test_shipped_configs_load_and_validate(name, protocol):
    data = yaml.safe_load((CONFIG_DIR / name / f"{protocol}.yaml").read_text())
    assert {"method", "train"} <= set(data) <= {"method", "train", "datasets", "backbones"}
    cfg = make_config(get_method(name), data["method"])
    blocks = [*(data.get("datasets") or {}).values(), *(data.get("backbones") or {}).values()]
    for block in blocks:  # per-dataset and per-backbone settings validate too
        make_config(get_method(name), {**data["method"], **block.get("method", {})})
    assert dataclasses.is_dataclass(cfg)
    train = data["train"]
    assert {"max_epoch", "lr", "batch_size", "warmup_epoch", "warmup_lr"} <= set(train)
    assert train["max_epoch"] >= 1 and train["lr"] > 0 and train["batch_size"] >= 1


def test_config_values_match_the_papers():
    def load(name, protocol):
        return yaml.safe_load((CONFIG_DIR / name / f"{protocol}.yaml").read_text())

    kg = load("kgcoop", "base2new")["train"]
    assert (kg["batch_size"], kg["lr"], kg["max_epoch"]) == (128, 0.002, 100)
    vpt = load("vpt", "base2new")["train"]
    assert (vpt["batch_size"], vpt["lr"], vpt["max_epoch"]) == (4, 0.0025, 5)
    maple, maple_xd = load("maple", "base2new"), load("maple", "xd")
    assert (maple["train"]["lr"], maple["train"]["max_epoch"], maple["method"]["depth"]) == \
        (0.0035, 5, 9)
    assert (maple_xd["train"]["lr"], maple_xd["train"]["max_epoch"],
            maple_xd["method"]["depth"]) == (0.0026, 2, 3)
    src, src_fs, src_xd = (load("promptsrc", p) for p in ("base2new", "fewshot", "xd"))
    assert (src["train"]["lr"], src["train"]["batch_size"], src["train"]["max_epoch"]) == \
        (0.0025, 4, 20)
    assert src_fs["train"]["max_epoch"] == 50
    assert (src_xd["method"]["depth_text"], src_xd["method"]["gpa_mean"],
            src_xd["method"]["gpa_std"]) == (3, 6, 10)
    cocoop = load("cocoop", "base2new")["train"]
    assert (cocoop["lr"], cocoop["max_epoch"], cocoop["batch_size"]) == (0.002, 10, 1)
