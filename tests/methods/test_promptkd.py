"""PromptKD: the distillation loss from its formula, labels unused, BatchNorm modes, the
parameter count at ViT-B/16 with a 768-wide teacher, and the teacher -> student chain of one
``vlprompt run base2new`` (transductive training set, report apart)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.methods import build_method, get_method

from .conftest import CLASSNAMES, NEW_CLASSNAMES, TINY_OVERRIDES, colour_batch, write_teacher_run


def _promptkd(clip, **overrides):
    torch.manual_seed(0)
    return build_method("promptkd", clip, CLASSNAMES,
                        **{**TINY_OVERRIDES["promptkd"], **overrides})


def test_loss_is_the_scaled_kl_of_teacher_and_student(tiny_clip):
    method = _promptkd(tiny_clip, kd_weight=7.0, temperature=2.0)
    method.train()
    images, labels = colour_batch(6, torch.Generator().manual_seed(0))
    loss, parts = method.loss(images, labels)
    teacher = method.teacher
    with torch.no_grad():
        t = F.normalize(teacher.text_features(), dim=-1)  # [C, E_T]
        z_t = 100 * F.normalize(teacher.image_features(images), dim=-1) @ t.t()
    feats = tiny_clip.encode_image(images, prompts=method.vision.shallow,
                                   deep_prompts=method.vision.deep.as_dict())
    z_s = 100 * F.normalize(method.project(feats), dim=-1) @ t.t()
    p_t = F.softmax(z_t / 2, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(z_s / 2, dim=1))).sum() * 4 / z_s.numel()
    torch.testing.assert_close(loss, 7.0 * kl, rtol=1e-5, atol=1e-6)
    assert parts == {"kd": pytest.approx(float(kl.detach()), rel=1e-5)}
    # the training images are unlabeled: other labels, the same loss
    again, _ = method.loss(images, torch.zeros_like(labels))
    torch.testing.assert_close(again, loss, rtol=0, atol=0)
    # the teacher is frozen and outside the trained tensors
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not any(n.startswith(("teacher", "_teacher")) for n in method.trainable_state_dict())


def test_projector_batchnorm_uses_batch_statistics_only_in_training(tiny_clip):
    method = _promptkd(tiny_clip)
    images, _ = colour_batch(4, torch.Generator().manual_seed(1))
    bn = method.project[1]
    method.train()
    method(images)
    assert int(bn.num_batches_tracked) == 1 and not method.teacher.training
    method.eval()
    with torch.no_grad():
        a = method(images)
        b = method(images[:1])
    torch.testing.assert_close(a[:1], b)  # eval: per-image, running statistics
    assert set(method.extra_state_tensors()) == {"project.1.running_mean", "project.1.running_var",
                                                 "project.1.num_batches_tracked"}


def test_trainable_count_at_vit_b16_with_a_768_wide_teacher(tmp_path):
    """27,648 prompt values (4 tokens, depth 9, width 768) + the 512 -> 768 projector 986,112
    = 1,013,760 (METHODS-SOTA.md §9); the teacher's width is what matters, so a small 224px
    teacher with embed_dim 768 stands in for ViT-L/14."""
    teacher_cfg = CLIPConfig(embed_dim=768, image_size=224, patch_size=32, vision_width=64,
                             vision_layers=1, vision_heads=1, text_width=64, text_layers=1,
                             text_heads=1)
    run = write_teacher_run(tmp_path, steps=0, config=teacher_cfg, image_size=224)
    clip = build_clip(CLIPConfig()).requires_grad_(False).eval()
    method = build_method("promptkd", clip, CLASSNAMES, teacher=str(run))
    counts = {n: p.numel() for n, p in method.named_trainable_parameters().items()}
    assert sum(v for n, v in counts.items() if n.startswith("vision.")) == 27_648
    assert sum(v for n, v in counts.items() if n.startswith("project.")) == 986_112
    assert method.num_trainable_parameters() == 1_013_760


def test_set_classnames_reaches_the_teacher(tiny_clip):
    method = _promptkd(tiny_clip)
    method.eval()
    method.set_classnames(NEW_CLASSNAMES)
    assert method.teacher.classnames == [c.replace("_", " ") for c in NEW_CLASSNAMES]
    assert method.teacher_text_features().shape[0] == len(NEW_CLASSNAMES)


def test_bad_teacher_settings_are_one_line_errors(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="resolved by the engine"):
        build_method("promptkd", tiny_clip, CLASSNAMES)  # teacher: auto outside the engine
    with pytest.raises(FileNotFoundError, match="not a vlprompt run folder"):
        build_method("promptkd", tiny_clip, CLASSNAMES, teacher=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="key=value"):
        build_method("promptkd", tiny_clip, CLASSNAMES, teacher_overrides=["max_epoch"])


def test_methods_command_says_transductive(capsys):
    from vlprompt.cli import main

    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["promptkd"]["transductive"] is True
    assert not any(r["transductive"] for n, r in rows.items() if n != "promptkd")
    assert main(["methods"]) == 0
    assert "transductive: trains on the unlabeled train images" in capsys.readouterr().out
    assert get_method("promptkd").transductive and not get_method("coop").transductive
