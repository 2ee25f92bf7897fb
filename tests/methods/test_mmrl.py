"""MMRL (METHODS-SOTA.md §5): logits, loss and gradients against a formula reference on shared
weights, the zero-token reduction to zero-shot CLIP, the released test-head rule and its switch,
initialisation, insertion points at ViT-B/16 shapes, the evaluation text cache, and the shipped
configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

import vlprompt
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.clip.tokenizer import tokenize
from vlprompt.config import resolve_config
from vlprompt.methods import build_method, get_method, make_config

from ..clip import reference_towers as ref
from .conftest import CLASSNAMES, NEW_CLASSNAMES, colour_batch, counting_text_tower

TEMPLATE = "a photo of a {}, a type of colour."
#: relative tolerance of the formula checks: float64 shows the implementations agree to
#: rounding; float32 is the precision runs use
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def _mmrl(clip, seed=0, classnames=CLASSNAMES, **overrides):
    torch.manual_seed(seed)
    return build_method("mmrl", clip, classnames, template=TEMPLATE, **overrides)


@pytest.fixture(scope="module")
def three_block_clip():
    """Three blocks per tower: block 0 plain, insertion before 1, replacement before 2."""
    torch.manual_seed(0)
    cfg = CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=3,
                     vision_heads=2, text_width=64, text_layers=3, text_heads=2)
    return build_clip(cfg).requires_grad_(False).eval()


def _reference(method, images, labels):
    """(l_c, l_r, l_f, loss) from the formulas on the reference towers (all 77 + K text tokens)."""
    cfg, clip = method.config, method.clip
    k, R = cfg.n_rep_tokens, method.rep_tokens

    def projected(tower):
        return {i: R @ tower[j].weight.t() + tower[j].bias for j, i in enumerate(method.layers)}
    tokens = tokenize([TEMPLATE.format(c) for c in method.classnames])
    text = ref.encode_text(clip, tokens, before=ref.inserting(projected(method.to_text)),
                           eot_offset=k)
    last = []
    f_c = ref.encode_image(clip, images, before=ref.inserting(projected(method.to_vision)),
                           tokens_out=last)
    f_r = ref.layer_norm(clip.visual.ln_post, last[0][:, 1:1 + k]).mean(1) @ method.rep_proj
    t, f_c, f_r = (F.normalize(x, dim=-1) for x in (text, f_c, f_r))
    l_c, l_r = 100 * f_c @ t.t(), 100 * f_r @ t.t()
    l_f = cfg.alpha * l_c + (1 - cfg.alpha) * l_r
    z = F.normalize(ref.encode_image(clip, images), dim=-1)
    t_zs = F.normalize(ref.encode_text(clip, tokens), dim=-1)
    lam, a = cfg.reg_weight, cfg.alpha
    loss = (a * F.cross_entropy(l_c, labels) + (1 - a) * F.cross_entropy(l_r, labels)
            + lam * (1 - (f_c * z).sum(-1).mean()) + lam * (1 - (t * t_zs).sum(-1).mean()))
    return l_c, l_r, l_f, loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_loss_and_gradients_match_the_formulas(three_block_clip, dtype):
    clip = copy.deepcopy(three_block_clip).to(dtype)
    method = _mmrl(clip, rep_layers=[1, 2], n_rep_tokens=3, rep_dim=16, reg_weight=2.0).to(dtype)
    method.train()
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    images = images.to(dtype)
    params = list(method.named_trainable_parameters().items())
    out = method.outputs(images)
    loss, parts = method.loss(images, labels)
    assert set(parts) == {"ce_class", "ce_rep", "reg_image", "reg_text"}
    grads = torch.autograd.grad(loss, [p for _, p in params])
    l_c, l_r, l_f, ref_loss = _reference(method, images, labels)
    ref_grads = torch.autograd.grad(ref_loss, [p for _, p in params])
    tol = TOLERANCE[dtype]
    for got, want in ((out.class_logits, l_c), (out.rep_logits, l_r), (out.fused_logits, l_f),
                      (loss, ref_loss)):
        assert ref.rel(got, want) <= tol
    assert torch.equal(method(images), out.fused_logits)  # training classes: the fused head
    plain = build_method("zeroshot", clip, CLASSNAMES, template=TEMPLATE)(images)
    assert ref.rel(plain, l_c) > 1e-3  # the tokens acted
    for (name, _), g, r in zip(params, grads, ref_grads, strict=True):
        grad_tol = tol if dtype == torch.float64 else 5 * tol
        assert r.abs().sum() > 0 and ref.rel(g, r) <= grad_tol, name


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_representation_tokens_equal_zero_shot_clip(tiny_clip, mode):
    """K = 0: nothing is inserted, every head is l_c = zero-shot CLIP with the template (with
    CLIP's stored logit scale), and the loss is its cross-entropy (the consistency terms vanish)."""
    method = _mmrl(tiny_clip, n_rep_tokens=0, logit_scale=None)
    zs = build_method("zeroshot", tiny_clip, CLASSNAMES, template=TEMPLATE)
    method.train(mode == "train")
    images, labels = colour_batch(5, torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = zs(images)
        torch.testing.assert_close(method(images), expected, rtol=1e-6, atol=1e-5)
        loss, parts = method.loss(images, labels)
        assert abs(float(loss) - float(F.cross_entropy(expected, labels))) <= 1e-5
        assert abs(parts["reg_image"]) <= 1e-6 and abs(parts["reg_text"]) <= 1e-6
        method.set_classnames(NEW_CLASSNAMES)
        zs_new = build_method("zeroshot", tiny_clip, NEW_CLASSNAMES, template=TEMPLATE)
        torch.testing.assert_close(method(images), zs_new(images), rtol=1e-6, atol=1e-5)


def test_blocks_before_the_representation_blocks_are_plain_clip(three_block_clip):
    method = _mmrl(three_block_clip, rep_layers=[1, 2])
    images, _ = colour_batch(2, torch.Generator().manual_seed(0))
    prompted, plain = [], []
    three_block_clip.encode_image(images, inserted_prompts=method.representation_prompts(
        method.to_vision), hidden_states=prompted)
    three_block_clip.encode_image(images, hidden_states=plain)
    assert torch.equal(prompted[0], plain[0])
    assert prompted[1].shape[1] == plain[1].shape[1] + method.config.n_rep_tokens


def _round_trip(method, tiny_clip, tmp_path, **overrides):
    """A fresh method loaded from ``method``'s checkpoint tensors (as the engine does)."""
    path = tmp_path / "mmrl.safetensors"
    save_file({k: v.contiguous() for k, v in method.trainable_state_dict().items()}, str(path))
    fresh = _mmrl(tiny_clip, seed=1, **overrides)
    fresh.load_trainable_state_dict(load_file(str(path)))
    return fresh


def test_released_test_head_rule_and_its_switch(tiny_clip, tmp_path):
    images, _ = colour_batch(3, torch.Generator().manual_seed(0))
    method = _mmrl(tiny_clip)
    method.set_dataset("colours")  # as the engine does after building the training method
    method.eval()

    def head(m):
        with torch.no_grad():
            out, got = m.outputs(images), m(images)
        if torch.equal(got, out.fused_logits):
            return "fused"
        assert torch.equal(got, out.class_logits)
        return "class"
    assert head(method) == "fused"  # B2N base / few-shot / the cross-dataset source
    method.set_classnames(NEW_CLASSNAMES)
    assert head(method) == "class"  # B2N new
    method.set_classnames(CLASSNAMES)
    assert head(method) == "fused"

    for fusion_on_dg, expected in ((False, "class"), (True, "fused")):
        fresh = _round_trip(method, tiny_clip, tmp_path, fusion_on_dg=fusion_on_dg)
        assert fresh.source_dataset == "colours"  # checkpointed with the tensors
        fresh.eval()
        fresh.set_dataset("colours")
        assert head(fresh) == "fused"  # the source dataset evaluated from its checkpoint
        fresh.set_dataset("colours_v2")  # a DG variant: the same classes, another dataset
        assert head(fresh) == expected
        fresh.set_classnames(CLASSNAMES[:2])  # a subset (ImageNet-A/R)
        assert head(fresh) == expected
        fresh.set_classnames(NEW_CLASSNAMES)  # another dataset's classes
        assert head(fresh) == "class"


def test_initialisation(tiny_clip):
    method = _mmrl(tiny_clip, rep_layers=[0, 1])
    assert abs(float(method.rep_tokens.detach().std()) - 0.02) < 0.002
    dv = tiny_clip.vision_width
    assert abs(float(method.rep_proj.detach().std()) - dv ** -0.5) < 0.2 * dv ** -0.5
    for tower in (method.to_vision, method.to_text):  # one Linear cloned per block, as released
        assert torch.equal(tower[0].weight, tower[1].weight)
        assert torch.equal(tower[0].bias, tower[1].bias)
        bound = method.config.rep_dim ** -0.5  # nn.Linear's default: U(+-1/sqrt(fan_in))
        assert float(tower[0].weight.detach().abs().max()) <= bound
    copied = _mmrl(tiny_clip, rep_proj_init="copy_proj")
    assert torch.equal(copied.rep_proj, tiny_clip.visual.proj)
    assert copied.rep_proj.data_ptr() != tiny_clip.visual.proj.data_ptr()


@pytest.fixture(scope="module")
def vit_b16_mmrl():
    clip = build_clip(CLIPConfig()).requires_grad_(False).eval()
    torch.manual_seed(0)
    return build_method("mmrl", clip, CLASSNAMES)


def test_insertion_points_and_lengths_at_vit_b16_shapes(vit_b16_mmrl):
    """202 image tokens and 82 text tokens from block 5 on (METHODS-SOTA.md §5)."""
    method, clip = vit_b16_mmrl, vit_b16_mmrl.clip
    assert method.layers == list(range(5, 12))
    assert len(method.to_vision) == len(method.to_text) == 7  # one per block, in block order
    assert method.to_vision[0].weight.shape == (768, 512)
    assert method.to_text[6].weight.shape == (512, 512)
    assert method.rep_proj.shape == (768, 512) and method.rep_tokens.shape == (5, 512)
    lengths = []

    def record(i, x):
        lengths.append(x.shape[1])
        return x
    with torch.no_grad():
        clip.encode_image(torch.zeros(1, 3, 224, 224), hook=record,
                          inserted_prompts=method.representation_prompts(method.to_vision))
        tp = method.prompts
        clip.encode_text_embeddings(tp.embeddings[:1], tp.tokens[:1].argmax(-1), truncate=False,
                                    hook=record,
                                    inserted_prompts=method.representation_prompts(method.to_text))
    assert lengths == [197] * 5 + [202] * 7 + [77] * 5 + [82] * 7


def test_layers_are_capped_on_shallow_towers(tiny_clip, caplog):
    method = build_method("mmrl", tiny_clip, CLASSNAMES)
    assert method.layers == [1] and len(method.to_text) == len(method.to_vision) == 1
    assert "exceed" in caplog.text


@pytest.mark.parametrize("overrides", [{"n_rep_tokens": -1}, {"rep_dim": 0},
                                       {"rep_layers": []}, {"rep_layers": [3, 3]},
                                       {"rep_layers": [-1]}, {"alpha": 1.5},
                                       {"reg_weight": -1.0}, {"rep_proj_init": "zeros"},
                                       {"logit_scale": 0.0}])
def test_bad_configs_raise(overrides):
    with pytest.raises(ValueError):
        make_config(get_method("mmrl"), overrides)


def test_evaluation_text_cache_follows_steps_and_classes(tiny_clip):
    method = _mmrl(tiny_clip)
    images, _ = colour_batch(3, torch.Generator().manual_seed(0))
    method.eval()
    with counting_text_tower(tiny_clip) as calls:
        with torch.no_grad():
            a = method(images)
            assert torch.equal(a, method(images)) and len(calls) == 1
            method.rep_tokens.add_(0.5)  # an in-place change (as an optimiser step)
            assert not torch.equal(a, method(images)) and len(calls) == 2
            method.set_classnames(NEW_CLASSNAMES)
            assert method(images).shape == (3, len(NEW_CLASSNAMES)) and len(calls) == 3
        method.train()
        method(images)
        method(images)
        assert len(calls) == 5  # training recomputes every step


CONFIG_DIR = Path(vlprompt.__file__).parent / "configs" / "mmrl"
REG_WEIGHTS = {"stanford_cars": 7.0, "fgvc_aircraft": 6.0, "sun397": 6.0, "dtd": 6.0,
               "food101": 5.0, "oxford_flowers": 4.0, "ucf101": 3.0, "imagenet": 0.5,
               "caltech101": 0.5, "oxford_pets": 0.2, "eurosat": 0.01}


def test_shipped_configs_match_the_official_settings():
    for protocol in ("base2new", "fewshot", "xd"):
        data = yaml.safe_load((CONFIG_DIR / f"{protocol}.yaml").read_text())
        make_config(get_method("mmrl"), data["method"])
    for protocol, batch, epochs, warmup in (("base2new", 4, 10, 1), ("fewshot", 32, 50, 1)):
        for dataset, lam in REG_WEIGHTS.items():
            c = resolve_config("mmrl", protocol, dataset=dataset, shots=16)
            t, m = c["train"], c["method"]
            assert m["reg_weight"] == lam and m["rep_dim"] == (2048 if dataset == "eurosat"
                                                               else 512)
            assert (t["optimizer"], t["lr"], t["weight_decay"], t["warmup_epoch"],
                    t["warmup_lr"], t["lr_scheduler"]) == ("adamw", 0.001, 5e-4, warmup, 1e-5,
                                                           "cosine")
            if dataset == "imagenet":
                assert (t["batch_size"], t["max_epoch"]) == (32, 5)
            else:
                assert (t["batch_size"], t["max_epoch"]) == (batch, epochs)
        m = resolve_config("mmrl", protocol, dataset="custom")["method"]
        assert (m["n_rep_tokens"], m["rep_dim"], m["rep_layers"], m["alpha"],
                m["rep_proj_init"], m["fusion_on_dg"], m["logit_scale"]) == \
            (5, 512, list(range(5, 12)), 0.7, "random", False, 100.0)
    xd = resolve_config("mmrl", "xd", dataset="imagenet", shots=16)
    t = xd["train"]
    assert xd["method"]["reg_weight"] == 0.2 and xd["method"]["rep_dim"] == 512
    assert (t["optimizer"], t["lr"], t["batch_size"], t["max_epoch"], t["warmup_epoch"]) == \
        ("adamw", 0.001, 32, 1, 0)
