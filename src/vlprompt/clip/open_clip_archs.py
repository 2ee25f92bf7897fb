"""The open_clip architecture table (``open_clip_architectures.json``): what a checkpoint's
tensors cannot say.

A state dict shows widths, depths, patch and image size, but not the head count (ViT-H-14 has
16 heads of 80 at width 1280, not width // 64 = 20), nor the activation (GELU, or QuickGELU for
the ``-quickgelu`` variants). The table records, for each open_clip model config
(Cherti et al., 2023, "Reproducible scaling laws for contrastive language-image learning";
``mlfoundations/open_clip`` ``src/open_clip/model_configs``), the facts needed to build it:
embed_dim, image and patch size, tower widths / layers / head widths or heads, MLP ratio,
activation, text context and vocabulary, pooling, norm placement, causal mask and projection
bias, with open_clip's defaults written out.

``config_from_open_clip`` turns an entry (or an open_clip model-config JSON file, the format
open_clip ships, for architectures not in the table) into a ``CLIPConfig``, and refuses, in one
line, an architecture with a structure vlprompt's core does not have (e.g. CLIPA's average
pooling, no ``ln_pre``, bidirectional text with last-token pooling and a BERT tokenizer).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Union

from .model import CLIPConfig

TABLE_FILE = Path(__file__).with_name("open_clip_architectures.json")

#: the structural options of the table and the one value vlprompt's core implements for each
#: (the same structure as OpenAI's CLIP); "final_ln_after_pool" is equivalent for "tok" pooling
_CORE = {"vision.pool": "tok", "vision.ln_pre": True, "vision.layer_scale": None,
         "vision.pos_embed": "learnable", "text.pool": "argmax", "text.causal": True,
         "text.proj_bias": False, "text.final_ln_after_pool": False, "text.embed_cls": False,
         "text.layer_scale": None, "text.tokenizer": "clip"}


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE_FILE.read_text())["architectures"]


def open_clip_names() -> list[str]:
    """The architectures in the table (open_clip's model-config names)."""
    return list(_table())


def open_clip_architecture(name: str) -> dict:
    """The table entry of an open_clip model config (``ViT-H-14``; case-insensitive, ``/`` for
    ``-`` accepted: ``ViT-H/14``)."""
    table = _table()
    if name in table:
        return table[name]
    key = name.strip().replace("/", "-").lower()
    for known, entry in table.items():
        if known.lower() == key:
            return entry
    raise ValueError(f"unknown open_clip architecture {name!r}; known: {', '.join(table)} (or "
                     f"give the path of an open_clip model-config .json)")


def entry_from_model_config(raw: dict) -> dict:
    """An open_clip model-config dict (``embed_dim``, ``quick_gelu``, ``vision_cfg``,
    ``text_cfg``) -> a table entry, open_clip's defaults filled in."""
    try:
        v, t = dict(raw["vision_cfg"]), dict(raw.get("text_cfg", {}))
        resnet = isinstance(v.get("layers"), (list, tuple))
        vision = {"kind": "resnet" if resnet else "vit", "image_size": v.get("image_size", 224)}
        if resnet:
            vision.update(stage_layers=list(v["layers"]), width=v.get("width", 64),
                          head_width=v.get("head_width", 64))
        else:
            vision.update(patch_size=v.get("patch_size", 16), width=v.get("width", 768),
                          layers=v.get("layers", 12), head_width=v.get("head_width", 64),
                          mlp_ratio=v.get("mlp_ratio", 4.0),
                          pool="attentional" if v.get("attentional_pool") else v.get("pool_type",
                                                                                       "tok"),
                          ln_pre=not v.get("no_ln_pre", False),
                          final_ln_after_pool=v.get("final_ln_after_pool", False),
                          layer_scale=v.get("ls_init_value"),
                          pos_embed=v.get("pos_embed_type", "learnable"))
            if v.get("timm_model_name"):
                vision["pool"] = f"timm:{v['timm_model_name']}"
        text = {"context_length": t.get("context_length", 77),
                "vocab_size": t.get("vocab_size", 49408), "width": t.get("width", 512),
                "heads": t.get("heads", 8), "layers": t.get("layers", 12),
                "mlp_ratio": t.get("mlp_ratio", 4.0), "pool": t.get("pool_type", "argmax"),
                "causal": not t.get("no_causal_mask", False),
                "proj_bias": t.get("proj_bias", False),
                "final_ln_after_pool": t.get("final_ln_after_pool", False),
                "embed_cls": t.get("embed_cls", False), "layer_scale": t.get("ls_init_value"),
                "tokenizer": t.get("hf_tokenizer_name") or "clip"}
        return {"embed_dim": raw["embed_dim"],
                "activation": "quick_gelu" if raw.get("quick_gelu") else "gelu",
                "vision": vision, "text": text}
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not an open_clip model config (needs embed_dim, vision_cfg, "
                         f"text_cfg): {type(err).__name__}: {err}") from None


def config_from_open_clip(arch: Union[str, os.PathLike, dict]) -> CLIPConfig:
    """The ``CLIPConfig`` of an open_clip architecture: a table name (``ViT-H-14``), the path of
    an open_clip model-config ``.json``, or a table entry / model-config dict.

    heads = width // head_width (ResNet attention pool: 32 * width // head_width), MLP width =
    int(width * mlp_ratio), as open_clip builds them. Raises ``ValueError`` for a structure the
    core does not implement."""
    if isinstance(arch, dict):
        entry, label = (arch if "vision" in arch else entry_from_model_config(arch)), "config"
    elif str(arch).endswith(".json") and Path(arch).is_file():
        try:
            raw = json.loads(Path(arch).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{arch}: not a readable JSON file ({err})") from None
        entry, label = entry_from_model_config(raw), str(arch)
    else:
        entry, label = open_clip_architecture(str(arch)), str(arch)
    v, t = entry["vision"], entry["text"]
    unsupported = []
    for path, core in _CORE.items():
        tower, key = path.split(".")
        if tower == "vision" and v["kind"] == "resnet":
            continue
        value = (v if tower == "vision" else t).get(key, core)
        if value != core:
            unsupported.append(f"{path}={json.dumps(value)}")
    if unsupported:
        raise ValueError(f"open_clip architecture {label} uses {', '.join(unsupported)}, which "
                         f"vlprompt's CLIP core does not implement (it has "
                         f"{', '.join(f'{p}={json.dumps(c)}' for p, c in _CORE.items())})")

    def mlp(width: int, ratio: float) -> int:  # 0: the core's default, 4 x width
        hidden = int(width * ratio)
        return 0 if hidden == 4 * width else hidden

    common = dict(embed_dim=entry["embed_dim"], image_size=v["image_size"],
                  vision_width=v["width"], context_length=t["context_length"],
                  vocab_size=t["vocab_size"], text_width=t["width"], text_layers=t["layers"],
                  text_heads=t["heads"], text_mlp_width=mlp(t["width"], t.get("mlp_ratio", 4.0)),
                  activation=entry["activation"])
    if v["kind"] == "resnet":
        return CLIPConfig(**common, vision_kind="resnet",
                          vision_stage_layers=tuple(v["stage_layers"]),
                          vision_heads=v["width"] * 32 // v.get("head_width", 64))
    return CLIPConfig(**common, patch_size=v["patch_size"], vision_layers=v["layers"],
                      vision_heads=v["width"] // v.get("head_width", 64),
                      vision_mlp_width=mlp(v["width"], v.get("mlp_ratio", 4.0)))
