"""Loading CLIP weights from every format users have, into the one OpenAI key layout.

Accepted: OpenAI TorchScript archives (``ViT-B-16.pt`` as OpenAI ships it), plain state dicts in
``.pt/.pth/.bin/.safetensors`` (also nested under ``state_dict`` / ``model``, with or without a
``module.`` prefix), open_clip checkpoints, Hugging Face ``CLIPModel`` folders and Hugging Face
``SiglipModel`` folders (SigLIP, and the fixed-resolution SigLIP 2 checkpoints, which are
``model_type: siglip``; their tokenizer is read from the folder too). Named
backbones resolve to the cache folder (``$VLPROMPT_CACHE``, default ``~/.cache/vlprompt``) and are
downloaded only when the network is there; otherwise the error names the file and where to put it.

Image towers: ViTs and the ResNets (RN50, RN101, RN50x4/x16/x64; ``clip/resnet.py``), told apart
and sized from the tensors. What tensors cannot show (heads that are not width // 64, the
activation) comes from an explicit architecture: ``open_clip:<architecture>[:<file>]`` specs
(``clip/open_clip_architectures.json``) or ``load_clip(..., config=...)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ..fileio import atomic_write, atomic_write_json, file_lock
# re-exported: ``from vlprompt.clip.load import state_checksum`` keeps working
from .fingerprint import (attach_fingerprint, backbone_fingerprint,  # noqa: F401
                          fingerprint_matches, legacy_state_checksum, source_dtype,
                          state_checksum, weights_fingerprint)
from .model import CLIP, CLIPConfig
from .tokenizer import folder_tokenizer

logger = logging.getLogger(__name__)

_OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/{sha}/{file}"
#: canonical name -> (file name in the cache, sha256 of the file as OpenAI publishes it)
OPENAI_MODELS = {
    "ViT-B/32": ("ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L/14": ("ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L/14@336px": ("ViT-L-14-336px.pt",
                       "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"),
    # the ResNet CLIPs (openai/CLIP clip/clip.py _MODELS: the URL's path component is the sha256)
    "RN50": ("RN50.pt", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"),
    "RN101": ("RN101.pt", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"),
    "RN50x4": ("RN50x4.pt", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd"),
    "RN50x16": ("RN50x16.pt", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa"),
    "RN50x64": ("RN50x64.pt", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c"),
}
#: other spellings users type (open_clip, Hugging Face) -> canonical name
_ALIASES = {
    "vit-b-32": "ViT-B/32", "vit-b/32": "ViT-B/32", "openai/clip-vit-base-patch32": "ViT-B/32",
    "vit-b-16": "ViT-B/16", "vit-b/16": "ViT-B/16", "openai/clip-vit-base-patch16": "ViT-B/16",
    "vit-l-14": "ViT-L/14", "vit-l/14": "ViT-L/14", "openai/clip-vit-large-patch14": "ViT-L/14",
    "vit-l-14-336": "ViT-L/14@336px", "vit-l/14@336px": "ViT-L/14@336px",
    "vit-l-14@336px": "ViT-L/14@336px", "openai/clip-vit-large-patch14-336": "ViT-L/14@336px",
    "rn50": "RN50", "rn101": "RN101", "rn50x4": "RN50x4", "rn50x16": "RN50x16",
    "rn50x64": "RN50x64", "rn-50": "RN50", "rn-101": "RN101",
}
# Keys some formats carry that are not weights (OpenAI JIT scalars, open_clip's mask buffer).
_IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}


def cache_dir() -> Path:
    """The vlprompt cache folder: ``$VLPROMPT_CACHE`` or ``~/.cache/vlprompt``."""
    return Path(os.environ.get("VLPROMPT_CACHE", Path.home() / ".cache" / "vlprompt")).expanduser()


def canonical_backbone_name(name: str) -> Optional[str]:
    """``ViT-B-16`` / ``openai/clip-vit-base-patch16`` / ``vit-b/16`` -> ``ViT-B/16``; else None."""
    if name in OPENAI_MODELS:
        return name
    key = name.lower().strip()
    key = re.sub(r"^openai[:/]", "", key) if not key.startswith("openai/clip") else key
    return _ALIASES.get(key)


def resolve_backbone(name_or_path: Union[str, os.PathLike], download: bool = True) -> Path:
    """A local file or folder for a backbone name or path.

    Paths are used as they are. Named backbones are looked up in the cache folder and, if absent,
    downloaded (SHA-256 checked) when ``download`` and the network allow; otherwise a
    ``FileNotFoundError`` names the URL and the exact place to put the file.
    """
    open_clip = parse_open_clip_spec(name_or_path)
    if open_clip is not None:
        return _resolve_open_clip(*open_clip)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = canonical_backbone_name(str(name_or_path))
    if name is None:
        known = ", ".join(OPENAI_MODELS) + ", open_clip:<architecture>[:<file>]"
        raise FileNotFoundError(f"backbone {str(name_or_path)!r} is neither an existing file or "
                                f"folder nor a known name ({known})")
    filename, sha = OPENAI_MODELS[name]
    target = cache_dir() / filename
    if target.exists():
        return target
    url = _OPENAI_URL.format(sha=sha, file=filename)
    if download:
        try:
            # processes sharing the cache (a sweep's jobs) take turns: one downloads, the
            # others find the file when they get the lock
            with file_lock(target.parent / f".{filename}.lock"):
                if not target.exists():
                    _download(url, target, sha)
            return target
        except OSError as err:
            reason = f"download failed ({err})"
    else:
        reason = "downloads are disabled"
    raise FileNotFoundError(
        f"{name} weights are not in the cache and {reason}. Fetch {url} on a machine with "
        f"network access and put it at {target} (or set VLPROMPT_CACHE, or pass the file path).")


def _download(url: str, target: Path, sha256: str) -> None:
    """Download to a temporary file, check SHA-256, then move into place (atomic)."""
    logger.info("downloading %s -> %s", url, target)

    def fetch(tmp: str) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=30) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise OSError(f"SHA-256 mismatch for {url}: got {digest.hexdigest()}")

    atomic_write(target, fetch)


# --------------------------------------------------------------------------- reading formats
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())


def _unwrap(obj) -> dict:
    """Find the state dict inside a training checkpoint and strip DDP's ``module.`` prefix."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("no tensor state dict found (expected a dict of tensors, possibly under "
                         "'state_dict' or 'model')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(path: Union[str, os.PathLike]) -> tuple[dict[str, Tensor], dict]:
    """Read weights from any supported format: (OpenAI-layout state dict, metadata)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    state, meta = _read_weights_file(path)
    if "vlprompt_config" in meta:
        try:
            meta = json.loads(meta["vlprompt_config"])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: its vlprompt_config metadata is not valid JSON ({err}); "
                             f"re-save the model with save_clip") from err
    if any(k.startswith(("text_model.", "vision_model.")) for k in state):
        state = convert_hf_state_dict(state)
    # BatchNorm's step counter is training state, not a weight (the frozen ResNet has none)
    return {k: v for k, v in state.items()
            if k not in _IGNORED_KEYS and not k.endswith(".num_batches_tracked")}, meta


def _read_raw(path: Path) -> tuple[object, dict]:
    """(loaded object, safetensors metadata) with the reader the file's format needs."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    if _is_torchscript(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), {}
    return torch.load(str(path), map_location="cpu", weights_only=True), {}


def _read_weights_file(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata of one weights file. Whatever a reader raises on a damaged file
    (SafetensorError, IndexError, RuntimeError, UnpicklingError, ...) becomes one ValueError that
    names the file and the fix; KeyboardInterrupt and MemoryError pass through."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise _unreadable(path, "is empty (0 bytes)")
    try:
        obj, meta = _read_raw(path)
    except (MemoryError, PermissionError):
        raise
    except Exception as err:  # noqa: BLE001 - readers raise anything on damaged bytes
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if pickled:
            raise ValueError(f"{path}: holds pickled Python objects ({pickled.group(1)}), not only "
                             f"tensors, and vlprompt never unpickles code. Save the weights with "
                             f"torch.save(model.state_dict(), path) instead") from err
        raise _unreadable(path, _diagnose(path), err) from err
    try:
        return _unwrap(obj), meta
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _unreadable(path: Path, problem: str, err: Optional[BaseException] = None) -> ValueError:
    """The one-line error for a damaged weights file: what is wrong, the reader's words, the fix."""
    detail = ""
    if err is not None:
        words = str(err).split("WeightsUnpickler error:")[-1]  # past torch's weights_only advice
        words = " ".join(words.split("Check the documentation")[0].split())
        detail = f" ({type(err).__name__}: {words[:120]}{'...' if len(words) > 120 else ''})"
    return ValueError(f"{path}: cannot read CLIP weights: the file {problem}{detail}. "
                      f"{_fix(path)}")


def _fix(path: Path) -> str:
    """How to get a good copy: the cache file of a named backbone can simply be deleted."""
    name = _cached_backbone(path)
    if name is None:
        return ("Re-download or re-copy it (a copy interrupted midway is the usual cause); "
                "accepted formats: OpenAI TorchScript archives, state dicts "
                "(.pt/.pth/.bin/.safetensors), Hugging Face CLIPModel folders.")
    filename, sha = OPENAI_MODELS[name]
    url = _OPENAI_URL.format(sha=sha, file=filename)
    return (f"It is vlprompt's cached copy of {name}: delete {path} and vlprompt downloads it "
            f"again when online, or put a good copy of {url} there (SHA-256 {sha}).")


def _cached_backbone(path: Path) -> Optional[str]:
    """The canonical name if ``path`` is a named backbone's file in the cache folder."""
    for name, (filename, _) in OPENAI_MODELS.items():
        if path.name == filename and path.resolve().parent == cache_dir().resolve():
            return name
    return None


def _diagnose(path: Path) -> str:
    """Truncated (a zip without its end, a safetensors file shorter than its header says) or
    simply not a weights file: told apart from the first bytes, without reading the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        return f"is truncated ({size} bytes: a zip archive cut before its end)"
    if path.suffix == ".safetensors":
        declared = _safetensors_size(path)
        if declared is not None and declared > size:
            return f"is truncated ({size} bytes; its header describes at least {declared})"
        return "is corrupt or not a safetensors file"
    return "is truncated, corrupt, or not a weights file"


def _safetensors_size(path: Path) -> Optional[int]:
    """The size a safetensors header implies (8 + header + data); None if there is no header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n >= 100 << 20:  # safetensors caps headers at 100 MB: random bytes
            return None
        text = f.read(n)
    if not text.startswith(b"{"):
        return None
    if 8 + n > size:
        return 8 + n  # the header itself is cut
    try:
        header = json.loads(text)
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    return 8 + n + max(ends, default=0)


def _read_hf_folder(folder: Path) -> tuple[dict[str, Tensor], dict]:
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{folder}: a Hugging Face CLIPModel folder needs config.json")
    try:
        hf = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({' '.join(str(err).split())}); the file "
                         f"is truncated or corrupt. Re-download or re-copy the folder") from err
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            weights = folder / name
            break
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    model_type = hf.get("model_type", "clip")
    if model_type == "siglip2":
        raise ValueError(f"{folder}: SigLIP 2 NaFlex (model_type 'siglip2', variable resolution "
                         f"and aspect ratio) is not supported; the fixed-resolution SigLIP 2 "
                         f"checkpoints (model_type 'siglip') are")
    state, _ = _read_weights_file(weights)
    text, vision = hf.get("text_config", {}), hf.get("vision_config", {})
    if model_type == "siglip":  # Hugging Face's SiglipConfig defaults where config.json omits
        act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
               "quick_gelu": "quick_gelu"}
        hidden_act = text.get("hidden_act", "gelu_pytorch_tanh")
        if hidden_act not in act or vision.get("hidden_act", hidden_act) != hidden_act:
            raise ValueError(f"{folder}: SigLIP activation {hidden_act!r} / "
                             f"{vision.get('hidden_act')!r} is not supported")
        meta = {"text_heads": text.get("num_attention_heads", 12),
                "vision_heads": vision.get("num_attention_heads", 12),
                "activation": act[hidden_act],
                "layer_norm_eps": text.get("layer_norm_eps", 1e-6),
                "text_causal": False, "text_pool": "last", "hf_model_type": "siglip"}
        # the pixel normalisation it was trained with (SiglipImageProcessor: mean = std = 0.5);
        # the tower converts vlprompt's pipeline normalisation to it
        try:
            pre = json.loads((folder / "preprocessor_config.json").read_text())
        except (OSError, ValueError):
            pre = {}
        meta["image_mean"] = tuple(pre.get("image_mean") or (0.5, 0.5, 0.5))
        meta["image_std"] = tuple(pre.get("image_std") or (0.5, 0.5, 0.5))
        if vision.get("layer_norm_eps", meta["layer_norm_eps"]) != meta["layer_norm_eps"]:
            raise ValueError(f"{folder}: the SigLIP towers' layer_norm_eps differ")
        if not vision.get("vision_use_head", True):
            raise ValueError(f"{folder}: a SigLIP vision tower without its pooling head "
                             f"(vision_use_head false) has no image feature")
        return convert_hf_state_dict(state), meta
    meta = {"text_heads": text.get("num_attention_heads", 8),
            "vision_heads": vision.get("num_attention_heads", 12),
            "activation": "quick_gelu" if text.get("hidden_act", "quick_gelu") == "quick_gelu" else "gelu"}
    return convert_hf_state_dict(state), meta


def convert_hf_state_dict(hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face ``CLIPModel`` / ``SiglipModel`` keys -> OpenAI keys (q/k/v fused, projections
    transposed). SigLIP's own tensors: ``text_model.head`` -> ``text_projection`` (transposed) and
    ``text_projection_bias``, the patch embedding's bias -> ``visual.conv1.bias``,
    ``vision_model.head.*`` (attention pooling) -> ``visual.map_head.*``, ``logit_bias``; its
    ``[1]``-shaped logit scale and bias become scalars."""
    out: dict[str, Tensor] = {}
    towers = {"text_model.encoder.layers.": "transformer.resblocks.",
              "vision_model.encoder.layers.": "visual.transformer.resblocks."}
    direct = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "logit_scale": "logit_scale",
        # SigLIP
        "vision_model.embeddings.patch_embedding.bias": "visual.conv1.bias",
        "text_model.head.bias": "text_projection_bias",
        "vision_model.head.probe": "visual.map_head.probe",
        "logit_bias": "logit_bias",
    }
    map_head = {"vision_model.head.attention.": "visual.map_head.attn.",
                "vision_model.head.layernorm.": "visual.map_head.ln.",
                "vision_model.head.mlp.fc1.": "visual.map_head.mlp.c_fc.",
                "vision_model.head.mlp.fc2.": "visual.map_head.mlp.c_proj."}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
             "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in hf.items():
        head = next((p for p in map_head if key.startswith(p)), None)
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.reshape(())
        elif key in direct:
            out[direct[key]] = value
        elif head is not None:
            out[map_head[head] + key[len(head):]] = value
        elif key in ("text_projection.weight", "text_model.head.weight"):
            out["text_projection"] = value.t().contiguous()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key.endswith("position_ids"):
            continue
        else:
            for hf_prefix, prefix in towers.items():
                if key.startswith(hf_prefix):
                    index, rest = key[len(hf_prefix):].split(".", 1)
                    m = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", rest)
                    if m:
                        qkv.setdefault(f"{prefix}{index}.attn.in_proj_{m.group(2)}", {})[m.group(1)] = value
                    else:
                        for a, b in block.items():
                            if rest.startswith(a + "."):
                                out[f"{prefix}{index}.{b}{rest[len(a):]}"] = value
                                break
                        else:
                            out[key] = value  # reported as unexpected later
                    break
            else:
                out[key] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _siglip_options(state: dict[str, Tensor]) -> dict:
    """The SigLIP options the tensors show (absent tensors: OpenAI's structure). Text attention,
    pooling, layer-norm eps and activation are not visible in tensors: they come from the
    folder's config.json or the file's metadata."""
    return dict(vision_class_token="visual.class_embedding" in state,
                vision_ln_pre="visual.ln_pre.weight" in state,
                vision_pool="map" if "visual.map_head.probe" in state else "cls",
                vision_proj="visual.proj" in state,
                patch_bias="visual.conv1.bias" in state,
                text_proj_bias="text_projection_bias" in state,
                logit_bias="logit_bias" in state)


def infer_config(state: dict[str, Tensor], meta: Optional[dict] = None) -> CLIPConfig:
    """Architecture from tensor shapes (the OpenAI rule: heads = width // 64), overridden by
    metadata when the file carries it. ViT and ResNet image towers (a ResNet is recognised by
    ``visual.layer1.0.conv1.weight``, its architecture read as OpenAI's ``build_model`` does).
    Head counts that are not width // 64 (open_clip ViT-H/g/bigG) cannot be seen in tensors:
    load those by name (``open_clip:ViT-H-14:<file>``) or with an explicit config."""
    meta = dict(meta or {})
    resnet = "visual.layer1.0.conv1.weight" in state
    vision_keys = (["visual.attnpool.positional_embedding"] if resnet
                   else ["visual.conv1.weight", "visual.positional_embedding"])
    required = vision_keys + ["text_projection", "token_embedding.weight", "positional_embedding",
                              "ln_final.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        family = "ResNet" if resnet else "ViT"
        raise ValueError(f"not a CLIP {family} checkpoint: missing {', '.join(missing)}")

    def count(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return len({m.group(1) for k in state if (m := pattern.match(k))})

    def mlp_width(prefix: str, width: int) -> int:  # 0: the default 4 x width
        weight = state.get(f"{prefix}0.mlp.c_fc.weight")
        return 0 if weight is None or weight.shape[0] == 4 * width else int(weight.shape[0])

    text_width = state["ln_final.weight"].shape[0]
    if resnet:
        # stem width = layer1's planes; attention pool over 32 x width channels on an S/32 grid
        vision_width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_kind="resnet", image_size=grid * 32, vision_width=vision_width,
                      vision_heads=vision_width * 32 // 64,
                      vision_stage_layers=tuple(count(f"visual.layer{b}.") for b in (1, 2, 3, 4)))
    else:
        vision_width, _, patch, _ = state["visual.conv1.weight"].shape
        cls = "visual.class_embedding" in state  # SigLIP's tower has no class token
        grid = round((state["visual.positional_embedding"].shape[0] - int(cls)) ** 0.5)
        vision = dict(image_size=patch * grid, patch_size=patch, vision_width=vision_width,
                      vision_layers=count("visual.transformer.resblocks."),
                      vision_heads=max(1, vision_width // 64),
                      vision_mlp_width=mlp_width("visual.transformer.resblocks.", vision_width),
                      **_siglip_options(state))
    config = CLIPConfig(
        embed_dim=state["text_projection"].shape[1],
        **vision,
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=count("transformer.resblocks."),
        text_heads=max(1, text_width // 64),
        text_mlp_width=mlp_width("transformer.resblocks.", text_width),
    )
    fields = set(config.to_dict())
    for key, value in meta.items():
        if key in fields:
            setattr(config, key, type(getattr(config, key))(value))
    return config


def load_clip(name_or_path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
              dtype: Optional[torch.dtype] = None, activation: Optional[str] = None,
              download: bool = True,
              config: Union[CLIPConfig, dict, str, os.PathLike, None] = None) -> CLIP:
    """Load a CLIP from a name (``ViT-B/16``, ``RN50``), a file, a Hugging Face folder, or an
    open_clip spec ``open_clip:<architecture>[:<file>]`` (``open_clip:ViT-H-14:/models/
    open_clip_pytorch_model.bin``: the architecture from ``open_clip_architectures.json``).

    The architecture is inferred from the tensors unless ``config`` (or an open_clip spec) gives
    it: a ``CLIPConfig``, a dict of its fields or an open_clip model config, an open_clip table
    name, or the path of an open_clip model-config ``.json``. An explicit architecture is checked
    against the tensors (keys and shapes; one-line ``ValueError`` on a mismatch) and is needed
    where the tensors cannot tell, e.g. heads that are not width // 64 (ViT-H-14: 16 of 80).

    The model is returned frozen (``requires_grad=False``) and in eval mode. Weights are kept in
    fp32 unless ``dtype`` says otherwise (OpenAI archives are fp16; vlprompt's reference semantics
    are fp32, and GPU runs use autocast). A file that is not a CLIP, or that lacks tensors, raises
    ``ValueError`` listing the missing and unexpected keys: never a silent half-load.
    """
    path = resolve_backbone(name_or_path, download=download)
    state, meta = read_checkpoint(path)
    open_clip = parse_open_clip_spec(name_or_path)
    if config is None and open_clip is not None:
        config = open_clip[0]
    if activation:
        meta["activation"] = activation
    try:
        if config is None:
            config, source = infer_config(state, meta), "the inferred architecture"
        else:
            config, source = explicit_config(config), f"the given architecture ({config})"
            if activation:
                config.activation = activation
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    try:
        model = CLIP(config)
    except ValueError as err:  # e.g. a width the given heads do not divide
        raise ValueError(f"{path}: {source} cannot be built: {err}") from err
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a CLIP of {source} "
                         f"({config}). Missing keys ({len(missing)}): {missing[:10]}; unexpected "
                         f"keys ({len(unexpected)}): {unexpected[:10]}")
    for key, tensor in state.items():
        target = model.state_dict()[key]
        if tensor.shape != target.shape:
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(target.shape)} for {source}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    if meta.get("hf_model_type") == "siglip":  # the folder's own SentencePiece / Gemma tokenizer
        model.tokenizer = folder_tokenizer(path)
    elif model.config.vision_pool == "map" and model.config.logit_bias:
        # a SigLIP saved as one file: its weights without its tokenizer (OpenAI's BPE ids would
        # index another vocabulary)
        raise ValueError(f"{path}: a SigLIP model needs its own tokenizer, which only its Hugging "
                         f"Face folder (spiece.model / tokenizer.json) holds; load the folder")
    model.source = str(path)  # recorded in checkpoints / results
    model.source_dtype = source_dtype(state.values())  # "float16" for OpenAI archives
    model.backbone_name = canonical_backbone_name(str(name_or_path)) or str(name_or_path)
    model.requires_grad_(False).eval()
    known = known_fingerprint(path)
    if known is not None:
        attach_fingerprint(model, known)
    model = _move_fingerprinted(model, device, dtype or torch.float32)
    if known is None:
        remember_fingerprint(path, backbone_fingerprint(model))
    return model


# --------------------------------------------------------------------------- explicit architectures
OPEN_CLIP_PREFIX = "open_clip:"
#: the file names open_clip checkpoints have on the Hugging Face hub, looked for in the cache
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def parse_open_clip_spec(spec: Union[str, os.PathLike]) -> Optional[tuple[str, Optional[str]]]:
    """``open_clip:ViT-H-14:/path/file.bin`` -> ("ViT-H-14", "/path/file.bin");
    ``open_clip:ViT-H-14`` -> ("ViT-H-14", None); any other spec -> None."""
    text = str(spec)
    if not text.startswith(OPEN_CLIP_PREFIX):
        return None
    arch, _, file = text[len(OPEN_CLIP_PREFIX):].partition(":")
    if not arch:
        raise ValueError(f"backbone {text!r}: expected open_clip:<architecture>[:<file>], e.g. "
                         f"open_clip:ViT-H-14:/models/open_clip_pytorch_model.bin")
    return arch, file or None


def map_open_clip_paths(spec: Union[str, os.PathLike], resolve: Callable[[str], str]
                        ) -> Optional[str]:
    """An open_clip spec with its file (and an architecture given as a ``.json`` path) passed
    through ``resolve`` (e.g. made absolute for a run record); None for other specs."""
    parsed = parse_open_clip_spec(spec)
    if parsed is None:
        return None
    arch, file = parsed
    arch = resolve(arch) if arch.endswith(".json") else arch
    return f"{OPEN_CLIP_PREFIX}{arch}" + (f":{resolve(file)}" if file is not None else "")


def _resolve_open_clip(arch: str, file: Optional[str]) -> Path:
    """The weights file of an open_clip spec: the given file, else the cache folder's
    ``open_clip/<architecture>/`` (offline: open_clip names no single download per architecture,
    so the error says where to put the file)."""
    from .open_clip_archs import config_from_open_clip

    config_from_open_clip(arch)  # an unknown or unsupported architecture fails first
    if file is not None:
        path = Path(file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"backbone open_clip:{arch}: {path} does not exist")
        return path
    folder = cache_dir() / "open_clip" / Path(arch).stem
    for name in OPEN_CLIP_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"open_clip:{arch} weights are not in the cache: put the checkpoint "
        f"({' or '.join(OPEN_CLIP_FILES)} from the model's Hugging Face repository, e.g. "
        f"laion/CLIP-{arch}-...) in {folder}/, or "
        f"pass the file: open_clip:{arch}:/path/to/open_clip_pytorch_model.bin")


def explicit_config(config: Union[CLIPConfig, dict, str, os.PathLike]) -> CLIPConfig:
    """A ``CLIPConfig`` from what ``load_clip(config=...)`` accepts: a ``CLIPConfig`` (copied), a
    dict of its fields, an open_clip model-config dict, an open_clip architecture name
    (``ViT-H-14``) or the path of an open_clip model-config ``.json``."""
    from .open_clip_archs import config_from_open_clip

    if isinstance(config, CLIPConfig):
        return dataclasses.replace(config)
    if isinstance(config, dict) and not {"vision_cfg", "vision"} & set(config):
        names = {f.name for f in dataclasses.fields(CLIPConfig)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown CLIPConfig field(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(names))}")
        return CLIPConfig(**config)
    return config_from_open_clip(config)


# --------------------------------------------------------------------------- fingerprint cache
def _fingerprint_key(path: Path) -> Optional[str]:
    """A weights file's identity for the cache: resolved path, size and modification time (a
    rewritten file gets a new key). Folders are not cached (their files change separately)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}" if path.is_file() else None


def _fingerprints_file() -> Path:
    return cache_dir() / "fingerprints.json"


def known_fingerprint(path: Union[str, os.PathLike]) -> Optional[str]:
    """The fingerprint recorded for this exact file by an earlier ``load_clip`` (a sweep hashes
    a backbone once, before its jobs start), else None."""
    key = _fingerprint_key(Path(path))
    if key is None:
        return None
    try:
        return json.loads(_fingerprints_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def remember_fingerprint(path: Union[str, os.PathLike], fingerprint: str) -> None:
    """Record a file's fingerprint in the cache folder (best effort: a read-only cache folder
    only costs the next load a re-hash)."""
    key = _fingerprint_key(Path(path))
    if key is None:
        return
    target = _fingerprints_file()
    try:
        with file_lock(target.parent / ".fingerprints.lock"):
            try:
                table = json.loads(target.read_text())
            except (OSError, ValueError):
                table = {}
            if not isinstance(table, dict):
                table = {}
            table[key] = fingerprint
            atomic_write_json(target, table)
    except OSError as err:
        logger.debug("could not record the fingerprint of %s: %s", path, err)


def _move_fingerprinted(model: CLIP, device: Union[str, torch.device], dtype: torch.dtype) -> CLIP:
    """Fingerprint the fp32 file weights, then move: a bf16 GPU copy keeps its file's identity."""
    fingerprint = backbone_fingerprint(model)
    model.to(device=device, dtype=dtype)
    anchor = fingerprint if dtype == torch.float32 else backbone_fingerprint(model, recompute=True)
    attach_fingerprint(model, fingerprint, anchor)
    return model


def save_clip(model: CLIP, path: Union[str, os.PathLike]) -> Path:
    """Save in the OpenAI key layout: ``.safetensors`` (architecture in the metadata, so
    non-standard head counts or GELU load back exactly) or a ``.pt`` state dict. Atomic."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"vlprompt_config": json.dumps(model.config.to_dict())}
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return atomic_write(path, lambda tmp: torch.save(state, tmp))
