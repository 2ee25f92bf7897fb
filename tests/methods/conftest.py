"""Shared fixtures for the method tests: a tiny random CLIP and a learnable synthetic task."""

from __future__ import annotations

import contextlib

import pytest
import torch

from vlprompt.clip.model import CLIP, CLIPConfig, build_clip


TINY = CLIPConfig(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                  vision_heads=2, text_width=64, text_layers=2, text_heads=2)

#: config overrides a method needs on the tiny CLIP (depths are capped at the tower depth and
#: PromptSRC's 60-template teacher is cheap on it, so most need none)
TINY_OVERRIDES: dict[str, dict] = {
    # LoRA's B starts at zero, so A's gradient is exactly zero at step 0; a non-zero B lets the
    # contract check that A is wired (the zero-B reduction is tested in test_clip_lora.py)
    "clip_lora": {"init_b": "kaiming"},
}

CLASSNAMES = ["red", "green", "blue", "yellow"]
NEW_CLASSNAMES = ["purple_thing", "cyan", "grey"]
_COLOURS = torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0], [-1.0, -1.0, 1.5], [1.5, 1.5, -1.0]])


def colour_batch(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 3, 32, 32] whose class is their colour (plus noise), labels cycling 0..3."""
    labels = torch.arange(n) % len(CLASSNAMES)
    images = _COLOURS[labels][:, :, None, None] + 0.3 * torch.randn(n, 3, 32, 32,
                                                                    generator=generator)
    return images, labels


@contextlib.contextmanager
def counting_text_tower(clip: CLIP):
    """Count the calls of ``clip.encode_text_embeddings`` (a list, one entry per call) while
    active, e.g. to check that a method's evaluation text cache is reused and invalidated."""
    calls: list = []
    original = clip.encode_text_embeddings

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    clip.encode_text_embeddings = counting
    try:
        yield calls
    finally:
        del clip.encode_text_embeddings


def make_tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    clip = build_clip(TINY)
    clip.requires_grad_(False)
    return clip.eval()


@pytest.fixture(scope="session")
def tiny_clip() -> CLIP:
    return make_tiny_clip(0)


#: the dataset name the tests' LLM-description file is written under (CoPrompt, HiCroPL)
DESCRIPTION_DATASET = "colours"


def colour_descriptions(names=CLASSNAMES + NEW_CLASSNAMES) -> dict[str, list[str]]:
    """Three short descriptions per class, in the official ``gpt_file`` format's content."""
    return {n: [f"a photo of something {n.replace('_', ' ')}.", f"a {n.replace('_', ' ')} object.",
                f"the colour {n.replace('_', ' ')}, bright and flat."] for n in names}


@pytest.fixture(scope="session", autouse=True)
def description_files(tmp_path_factory):
    """A folder of LLM class descriptions for the tiny task (the official files are not ours to
    bundle), wired into TINY_OVERRIDES for the methods that read descriptions."""
    from vlprompt.data.descriptions import write_descriptions

    folder = tmp_path_factory.mktemp("descriptions")
    write_descriptions(folder, DESCRIPTION_DATASET, colour_descriptions())
    TINY_OVERRIDES["coprompt"] = {"descriptions": str(folder),
                                  "description_dataset": DESCRIPTION_DATASET}
    TINY_OVERRIDES["hicropl"] = {"descriptions": str(folder),
                                 "description_dataset": DESCRIPTION_DATASET}
    return folder


#: the PromptKD teacher's tiny CLIP: its own embedding width, so the projector's widths are
#: derived from the two backbones
TEACHER_TINY = CLIPConfig(embed_dim=48, image_size=32, patch_size=8, vision_width=64,
                          vision_layers=2, vision_heads=2, text_width=64, text_layers=2,
                          text_heads=2)


def write_teacher_run(folder, steps: int = 150, seed: int = 3, config: CLIPConfig = TEACHER_TINY,
                      image_size: int = 32):
    """A finished vlprompt run folder of PromptSRC on its own tiny CLIP, trained ``steps`` SGD
    steps on the colour task at ``image_size`` (a distillation student can only learn what its
    teacher knows)."""
    from vlprompt.clip.load import load_clip, save_clip
    from vlprompt.engine import checkpoint as ckpt
    from vlprompt.methods import build_method

    torch.manual_seed(seed)
    path = save_clip(build_clip(config), folder / "teacher_clip.safetensors")
    clip = load_clip(path)
    teacher = build_method("promptsrc", clip, CLASSNAMES + NEW_CLASSNAMES)
    teacher.set_classnames(CLASSNAMES)
    opt = torch.optim.SGD(teacher.param_groups(0.01), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    teacher.train()
    for step in range(steps):
        x, y = colour_batch(8, gen)
        if image_size != 32:
            x = torch.nn.functional.interpolate(x, size=image_size)
        loss, _ = teacher.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    run = folder / "teacher_run"
    header = ckpt.make_header(teacher, str(path), 1, {"finished": True, "max_epoch": 1})
    ckpt.save_checkpoint(run, teacher, header)
    return run


@pytest.fixture(scope="session", autouse=True)
def promptkd_teacher(tmp_path_factory):
    """A trained PromptSRC teacher run, wired into TINY_OVERRIDES for ``promptkd``."""
    run = write_teacher_run(tmp_path_factory.mktemp("promptkd_teacher"))
    TINY_OVERRIDES["promptkd"] = {"teacher": str(run)}
    return run


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    """A tiny random SigLIP (no CLS token, attention-pooling head, bidirectional text pooled at
    the last position, sigmoid head with a bias) with its SentencePiece tokenizer."""
    from ..siglip_tiny import make_tiny_siglip

    return make_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"))
