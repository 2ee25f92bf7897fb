"""The ResNet image tower (CLIP's ModifiedResNet, Radford et al. 2021 §2.4): the core's forward
against an independent functional re-implementation written here from the published structure,
RN50-shaped OpenAI-layout weights (state dict and TorchScript) loading with the architecture
inferred, capabilities, and the CLI: ``coop`` trains on a tiny ResNet CLIP, ``maple`` is refused
in one line."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from vlprompt import tokenize
from vlprompt.clip.fingerprint import backbone_fingerprint
from vlprompt.clip.load import (OPENAI_MODELS, canonical_backbone_name, infer_config, load_clip,
                                read_checkpoint, save_clip)
from vlprompt.clip.model import CLIP, CLIPConfig, build_clip

TINY_RN = dict(embed_dim=32, image_size=64, vision_kind="resnet", vision_stage_layers=(1, 2, 1, 1),
               vision_width=16, vision_heads=8, text_width=64, text_layers=2, text_heads=1)
RN50 = dict(embed_dim=1024, image_size=224, vision_kind="resnet",
            vision_stage_layers=(3, 4, 6, 3), vision_width=64, vision_heads=32, text_width=512,
            text_layers=12, text_heads=8)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Random BN statistics and affine terms (fresh BNs are the identity, which would hide a
    wrong normalisation), and non-zero bn3 scales (OpenAI's init zeroes them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            is_bn = ".bn" in name or ".downsample.1." in name
            if not name.startswith("visual.") or not is_bn:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


# --------------------------------------------------------------------------- the reference
def _bn(s: dict, prefix: str, x: Tensor) -> Tensor:
    """Inference batch norm from the raw statistics, written out."""
    mean, var = s[f"{prefix}.running_mean"], s[f"{prefix}.running_var"]
    scale = s[f"{prefix}.weight"] / torch.sqrt(var + 1e-5)
    return (x - mean[None, :, None, None]) * scale[None, :, None, None] \
        + s[f"{prefix}.bias"][None, :, None, None]


def _conv(s: dict, key: str, x: Tensor, stride: int = 1) -> Tensor:
    w = s[key]
    return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)


def _block(s: dict, p: str, x: Tensor, stride: int) -> Tensor:
    """Bottleneck: 1x1, 3x3, then (when strided) average pool, then 1x1; the shortcut pools
    first and projects with a 1x1 conv + BN when the shape changes."""
    y = F.relu(_bn(s, f"{p}.bn1", _conv(s, f"{p}.conv1.weight", x)))
    y = F.relu(_bn(s, f"{p}.bn2", _conv(s, f"{p}.conv2.weight", y)))
    if stride > 1:
        y = F.avg_pool2d(y, stride)
    y = _bn(s, f"{p}.bn3", _conv(s, f"{p}.conv3.weight", y))
    if f"{p}.downsample.0.weight" in s:
        short = F.avg_pool2d(x, stride) if stride > 1 else x
        short = _bn(s, f"{p}.downsample.1", _conv(s, f"{p}.downsample.0.weight", short))
    else:
        short = x
    return F.relu(y + short)


def _attention_pool(s: dict, x: Tensor, heads: int) -> Tensor:
    """Mean token + grid, positional embedding, one multi-head attention of the mean token over
    all tokens (softmax(q k^T / sqrt(d)) v per head, written out), output projection."""
    p = "visual.attnpool"
    B, C, H, W = x.shape
    tokens = x.reshape(B, C, H * W).permute(0, 2, 1)  # [B, HW, C]
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + s[f"{p}.positional_embedding"]
    q = tokens[:, :1] @ s[f"{p}.q_proj.weight"].T + s[f"{p}.q_proj.bias"]
    k = tokens @ s[f"{p}.k_proj.weight"].T + s[f"{p}.k_proj.bias"]
    v = tokens @ s[f"{p}.v_proj.weight"].T + s[f"{p}.v_proj.bias"]
    d = C // heads
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / d ** 0.5, dim=-1)
        out.append(weights @ v[..., sl])  # [B, 1, d]
    out = torch.cat(out, -1)[:, 0]  # [B, C]
    return out @ s[f"{p}.c_proj.weight"].T + s[f"{p}.c_proj.bias"]


def reference_encode_image(state: dict, images: Tensor, stages: tuple, heads: int) -> Tensor:
    s = {k: v.double() for k, v in state.items() if k.startswith("visual.")}
    x = images.double()
    x = F.relu(_bn(s, "visual.bn1", _conv(s, "visual.conv1.weight", x, stride=2)))
    x = F.relu(_bn(s, "visual.bn2", _conv(s, "visual.conv2.weight", x)))
    x = F.relu(_bn(s, "visual.bn3", _conv(s, "visual.conv3.weight", x)))
    x = F.avg_pool2d(x, 2)
    for i, blocks in enumerate(stages):
        for j in range(blocks):
            x = _block(s, f"visual.layer{i + 1}.{j}", x, 2 if i > 0 and j == 0 else 1)
    return _attention_pool(s, x, heads)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_rn() -> CLIP:
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig(**TINY_RN)).eval().requires_grad_(False)
    _randomise_batch_norms(clip)
    return clip


@pytest.fixture(scope="module")
def rn50_files(tmp_path_factory):
    """An RN50-shaped random CLIP, its OpenAI-layout state dict (fp16 as OpenAI ships, with the
    ``num_batches_tracked`` counters nn.BatchNorm2d writes) and a TorchScript archive."""
    tmp = tmp_path_factory.mktemp("rn50")
    torch.manual_seed(0)
    model = CLIP(CLIPConfig(**RN50)).eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    for key in [k for k in state if k.endswith(".running_mean")]:
        state[key.replace("running_mean", "num_batches_tracked")] = torch.tensor(0)
    torch.save(state, tmp / "rn50_state.pt")
    # OpenAI's archives are traced; tracing the text method keeps every parameter of the module
    traced = torch.jit.trace_module(model, {"encode_text": tokenize(["a"])}, check_trace=False)
    traced.save(str(tmp / "RN50-jit.pt"))
    return types.SimpleNamespace(model=model, state=tmp / "rn50_state.pt",
                                 jit=tmp / "RN50-jit.pt")


# --------------------------------------------------------------------------- the tower
def test_forward_matches_independent_reference(tiny_rn):
    torch.manual_seed(1)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ours = tiny_rn.encode_image(images)
    ref = reference_encode_image(tiny_rn.state_dict(), images, TINY_RN["vision_stage_layers"],
                                 TINY_RN["vision_heads"])
    assert ours.shape == (3, 32)
    assert _rel(ours.double(), ref) <= 1e-5


def test_parameter_names_are_openai_layout(tiny_rn):
    keys = set(tiny_rn.state_dict())
    for key in ["visual.conv1.weight", "visual.bn1.running_var", "visual.conv3.weight",
                "visual.layer1.0.conv1.weight", "visual.layer1.0.downsample.0.weight",
                "visual.layer1.0.downsample.1.running_mean", "visual.layer2.1.bn3.weight",
                "visual.attnpool.positional_embedding", "visual.attnpool.q_proj.weight",
                "visual.attnpool.k_proj.bias", "visual.attnpool.v_proj.weight",
                "visual.attnpool.c_proj.weight", "text_projection", "logit_scale"]:
        assert key in keys, key
    assert "visual.layer2.1.downsample.0.weight" not in keys  # same shape: identity shortcut
    assert not any(k.endswith("num_batches_tracked") for k in keys)


def test_batch_norm_is_frozen_in_train_mode(tiny_rn):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = tiny_rn.encode_image(images)
        tiny_rn.train()
        after = tiny_rn.encode_image(images)
        tiny_rn.eval()
    assert torch.equal(before, after)


def test_initialisation_follows_openai():
    torch.manual_seed(0)
    clip = build_clip(CLIPConfig(**TINY_RN))
    for stage in clip.visual.stages:
        for block in stage:
            assert torch.count_nonzero(block.bn3.weight) == 0
    std = float(clip.visual.attnpool.q_proj.weight.detach().std())
    assert abs(std - (16 * 32) ** -0.5) < 0.2 * (16 * 32) ** -0.5


def test_token_arguments_are_refused(tiny_rn):
    images = torch.randn(1, 3, 64, 64)
    assert "visual_prompts" not in tiny_rn.capabilities
    assert tiny_rn.visual.capabilities == frozenset()
    with torch.no_grad():  # empty / absent arguments are accepted
        tiny_rn.encode_image(images, prompts=None, deep_prompts={}, return_tokens=False)
    for kwargs in [{"prompts": torch.zeros(2, 16)}, {"deep_prompts": {1: torch.zeros(2, 16)}},
                   {"hook": lambda i, x: x}, {"return_tokens": True}, {"hidden_states": []},
                   {"attn_deltas": {0: object()}}]:
        with pytest.raises(ValueError, match="no tokens"):
            tiny_rn.encode_image(images, **kwargs)
    with pytest.raises(TypeError, match="unexpected"):
        tiny_rn.encode_image(images, promts=None)  # a typo is not silently accepted


def test_config_round_trips_through_json():
    cfg = CLIPConfig(**TINY_RN)
    again = CLIPConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.vision_stage_layers == (1, 2, 1, 1)
    with pytest.raises(ValueError, match="four"):
        CLIPConfig(vision_kind="resnet", vision_stage_layers=(1, 1))
    assert CLIPConfig().vision_kind == "vit" and "visual_prompts" in build_clip(
        CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=64, vision_layers=1,
                   vision_heads=1, text_width=64, text_layers=1, text_heads=1)).capabilities


# --------------------------------------------------------------------------- RN50-shaped loading
def test_rn50_parameter_count(rn50_files):
    # OpenAI's RN50 CLIP: 102,007,137 parameters (38,316,896 in the image tower)
    model = rn50_files.model
    assert sum(p.numel() for p in model.parameters()) == 102_007_137
    assert sum(p.numel() for p in model.visual.parameters()) == 38_316_896


@pytest.fixture(scope="module")
def rn50_loaded(rn50_files):
    return {fmt: load_clip(getattr(rn50_files, fmt)) for fmt in ("state", "jit")}


@pytest.mark.parametrize("fmt", ["state", "jit"])
def test_rn50_loads_with_architecture_inferred(rn50_files, rn50_loaded, fmt):
    clip = rn50_loaded[fmt]
    assert clip.config == CLIPConfig(**RN50)
    cfg = clip.config
    assert (cfg.vision_stage_layers, cfg.vision_width, cfg.vision_heads, cfg.image_size,
            cfg.embed_dim) == ((3, 4, 6, 3), 64, 32, 224, 1024)
    ref = rn50_files.model.state_dict()
    got = clip.state_dict()
    assert set(got) == set(ref)
    for key in ("visual.layer3.5.bn2.running_var", "visual.attnpool.c_proj.weight",
                "visual.layer4.0.downsample.0.weight", "transformer.resblocks.11.mlp.c_fc.weight"):
        expected = ref[key].half().float() if fmt == "state" else ref[key]
        assert torch.equal(got[key], expected), key
    assert clip.source_dtype == ("float16" if fmt == "state" else "float32")


def test_rn50_fingerprint_covers_batch_norm_statistics(rn50_loaded):
    clip = rn50_loaded["jit"]
    before = backbone_fingerprint(clip, recompute=True)
    stats = clip.visual.layer1[0].bn1.running_mean  # a buffer, not a parameter
    saved = stats.clone()
    with torch.no_grad():
        stats.add_(1.0)
        changed = backbone_fingerprint(clip)
        stats.copy_(saved)
    assert changed != before
    assert backbone_fingerprint(clip, recompute=True) == before
    assert "visual.layer1.0.bn1.running_mean" in clip.state_dict()


def test_named_resnets():
    assert canonical_backbone_name("rn50") == "RN50"
    assert canonical_backbone_name("RN50x16") == "RN50x16"
    assert canonical_backbone_name("openai:RN101") == "RN101"
    assert OPENAI_MODELS["RN50"] == (
        "RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762")
    assert {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"} <= set(OPENAI_MODELS)


@pytest.mark.parametrize("stages,width,image,embed,text", [
    ((3, 4, 23, 3), 64, 224, 512, 512),  # RN101
    ((4, 6, 10, 6), 80, 288, 640, 640),  # RN50x4
])
def test_larger_resnets_inferred_from_shapes(stages, width, image, embed, text):
    """Shapes only (meta tensors): no weights are allocated."""
    cfg = CLIPConfig(embed_dim=embed, image_size=image, vision_kind="resnet",
                     vision_stage_layers=stages, vision_width=width, vision_heads=width // 2,
                     text_width=text, text_heads=text // 64)
    with torch.device("meta"):
        state = CLIP(cfg).state_dict()
    assert infer_config(state) == cfg


def test_tiny_resnet_formats_round_trip(tiny_rn, tmp_path):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tiny_rn.encode_image(images)
    paths = [save_clip(tiny_rn, tmp_path / name) for name in ("rn.safetensors", "rn.pt")]
    nested = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in tiny_rn.state_dict().items()}}
    torch.save(nested, tmp_path / "nested.pth")
    traced = torch.jit.trace(tiny_rn, (images[:1], tokenize(["a"])), check_trace=False)
    traced.save(str(tmp_path / "RN-tiny.pt"))
    paths += [tmp_path / "nested.pth", tmp_path / "RN-tiny.pt"]
    for path in paths:
        clip = load_clip(path)
        assert clip.config == tiny_rn.config
        with torch.no_grad():
            assert torch.equal(clip.encode_image(images), ref), path
    state, _ = read_checkpoint(tmp_path / "rn.pt")
    assert "visual.attnpool.positional_embedding" in state


# --------------------------------------------------------------------------- methods and CLI
@pytest.fixture(scope="module")
def rn_world(tmp_path_factory):
    from vlprompt.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("rn_cli")
    torch.manual_seed(0)
    cfg = dict(TINY_RN, image_size=32)
    clip_path = save_clip(build_clip(CLIPConfig(**cfg)), root / "tiny_rn.safetensors")
    write_dataset(root / "data", "eurosat", images_per_class=8, image_size=32, seed=0)
    return types.SimpleNamespace(root=root, clip_path=clip_path, data=root / "data")


def _train(world, method: str, run: str) -> int:
    from vlprompt.cli import main

    return main(["--threads", "1", "train", "--method", method, "--dataset", "eurosat",
                 "--root", str(world.data), "--backbone", str(world.clip_path), "--shots", "1",
                 "--run-dir", str(world.root / run), "--device", "cpu",
                 "train.max_epoch=1", "train.batch_size=4", "train.num_workers=0"])


def test_cli_coop_trains_on_a_resnet_clip(rn_world, capsys):
    assert _train(rn_world, "coop", "coop") == 0
    results = json.loads((rn_world.root / "coop" / "results.json").read_text())
    assert results["num_trainable_params"] == 16 * 64  # 16 context vectors of text width 64
    assert results["train"]["finished"]
    assert results["evaluations"]["eurosat/all"]["num_images"] == 20


def test_cli_maple_is_refused_in_one_line(rn_world, capsys):
    capsys.readouterr()
    assert _train(rn_world, "maple", "maple") != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "maple" in lines[0] and "needs a ViT backbone" in lines[0] and "ResNet" in lines[0]
    assert "coop" in lines[0]  # and says which methods run on it
