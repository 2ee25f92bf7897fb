"""Official-layout checkpoints written as the official trainers write them, for the tests.

Independent of ``vlprompt.interop``: the key names and nesting below were written from reading
each official trainer (KaiyangZhou/CoOp trainers/coop.py, cocoop.py; htyao89/KgCoOp
KgCoOp/trainers/kgcoop.py; muzairkhattak/multimodal-prompt-learning trainers/maple.py,
independentVL.py, vpt.py and clip/model.py; muzairkhattak/PromptSRC trainers/promptsrc.py;
hulianyuyy/COMMA trainers/comma.py; fanrena/DPT trainers/DPT.py;
ShuvenduRoy/CoPrompt trainers/coprompt.py and clip/model.py; zzeoZheng/HiCroPL
trainers/hicropl.py and clip/model.py;
ZjjConan/Multi-Modal-Adapter trainers/mmadapter.py and clip/model.py; htyao89/
Textual-based_Class-aware_prompt_tuning trainers/tcp.py; BeierZhu/Prompt-align
ProGrad.public/trainers/prograd.py and Dassl.ProGrad.pytorch's ``save_model``, which writes no
``val_result``) and Dassl's ``TrainerBase.save_model`` / ``save_checkpoint``. Tensors are random
(fp16-representable, so half-precision entries hold exactly the method's values).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from vlprompt.clip.tokenizer import tokenize
from vlprompt.methods import build_method

METHODS = ["coop", "cocoop", "kgcoop", "maple", "ivlp", "vpt", "promptsrc", "comma", "dpt",
           "mma", "tcp", "prograd", "coprompt", "hicropl", "mmrl"]
EXTRACTOR = "image_encoder.transformer.extractor"
#: methods whose official files hold no token_prefix/token_suffix (MMA keeps whole-prompt
#: buffers, token_embedding and tokenized_prompts, which its load_model deletes)
NO_TOKENS = ("vpt", "mma", "mmrl")
#: method settings for the 3-block test CLIP (MMA's blocks 4..11 would be capped to one)
FIELDS = {"mma": {"adapter_start": 0, "adapter_end": 2},
          "hicropl": {"n_ctx": 2, "depth": 3, "cross_layer": 1}}
#: how each official trainer's run saves: optimiser, warmup (Dassl wraps the cosine in a
#: constant warmup when WARMUP_EPOCH > 0), and whether its Dassl writes ``val_result``
SAVES = {"mma": {"optim": "sgd", "warmup": False},  # vit_b16_ep5.yaml: WARMUP_EPOCH 0
         "tcp": {"optim": "adam"},  # Adam, eps 1e-3 (its README's Dassl patch)
         "prograd": {"val_result": False},
         "mmrl": {"optim": "adamw"}}  # vit_b16.yaml: AdamW  # Dassl.ProGrad.pytorch save_model


class ConstantWarmupScheduler(LRScheduler):
    """Dassl's ``dassl/optim/lr_scheduler.py`` warmup (its state dict holds the successor)."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def random_method(name: str, clip, classnames, seed: int = 0, **fields):
    """``name`` on ``clip`` with every learned tensor random (and fp16-representable), for the
    classes of the synthetic EuroSAT (its LLM descriptions)."""
    method = build_method(name, clip, classnames, **{**FIELDS.get(name, {}), **fields})
    if hasattr(method, "set_dataset"):
        method.set_dataset("eurosat")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in method.trainable_state_dict().items():
        if not value.is_floating_point():
            state[key] = value
            continue
        noise = torch.randn(value.shape, generator=g) * 0.3
        state[key] = (noise + (1.0 if key.endswith(("ln.weight", "ln2.weight")) else 0.0)).half()
        state[key] = state[key].float()
    if name == "promptsrc":  # the aggregate equals the prompts (the file holds the aggregate)
        state.update({f"gpa.{k}": state[k] for k in list(state) if not k.startswith("gpa.")
                      and k != "gpa.epochs" and f"gpa.{k}" in state})
        state["gpa.epochs"] = torch.tensor([5])
    if name == "dpt":
        state["epoch"] = torch.tensor([5])
    method.load_trainable_state_dict(state)
    return method.eval()


def _tokens(clip, classnames, prefix_words: str, n_ctx: int, after: str = "{}.") -> dict:
    """``token_prefix``/``token_suffix`` as every CoOp-family PromptLearner registers them
    (``after``: the words after the context, "{}." = class name and period)."""
    tokens = tokenize([f"{prefix_words} {after.format(c.replace('_', ' '))}"
                       for c in classnames])
    with torch.no_grad():
        emb = clip.token_embedding(tokens).half()  # [C, 77, D], CLIP's fp16
    return {"token_prefix": emb[:, :1], "token_suffix": emb[:, 1 + n_ctx:]}


def _prefix(method, n_ctx: int) -> str:
    return method.config.ctx_init or " ".join(["X"] * n_ctx)


def _custom_clip(clip, extra_visual: dict = (), extra_text: dict = ()) -> OrderedDict:
    """The frozen CLIP inside a ``CustomCLIP`` state dict: ``image_encoder`` (= clip.visual),
    ``text_encoder`` (TextEncoder: transformer, positional_embedding, ln_final,
    text_projection) and ``logit_scale``; fp16 as ``clip.build_model`` converts it."""
    out = OrderedDict()
    for key, value in clip.state_dict().items():
        if key.startswith("visual."):
            out["image_encoder." + key[7:]] = value.half()
        elif key == "logit_scale":
            out[key] = value.clone()
        elif key != "token_embedding.weight":
            out["text_encoder." + key] = value.half()
    out.update(dict(extra_visual))
    out.update(dict(extra_text))
    return out


def _vpt_keys(vision_shallow, vision_deep, text_deep=None) -> dict:
    """IVLP/VPT/PromptSRC prompts: ``image_encoder.VPT`` and ``VPT_shallow`` of blocks 1..d-1."""
    out = {"image_encoder.VPT": vision_shallow}
    for i, p in enumerate(vision_deep if vision_deep is not None else []):
        out[f"image_encoder.transformer.resblocks.{i + 1}.VPT_shallow"] = p
    for i, p in enumerate(text_deep if text_deep is not None else []):
        out[f"text_encoder.transformer.resblocks.{i + 1}.VPT_shallow"] = p
    return out


def official_states(name: str, method, clip) -> dict[str, OrderedDict]:
    """``{registered model name: state_dict}`` of the official trainer for ``method``'s tensors."""
    s = method.trainable_state_dict()
    names = method.classnames
    if name in ("coop", "cocoop", "kgcoop"):
        sd = OrderedDict(ctx=s["ctx"].half())
        if name == "cocoop":
            for k in ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"):
                sd[f"meta_net.{k}"] = s[f"meta_net.{k}"].half()
        if name == "kgcoop":  # created, never trained nor used
            sd["bias_vectors"] = torch.randn(1, 512).half()
            sd["meta_net.linear1.weight"] = torch.randn(512, 512).half()
            sd["meta_net.linear1.bias"] = torch.randn(512).half()
        sd.update(_tokens(clip, names, _prefix(method, s["ctx"].shape[-2]), s["ctx"].shape[-2]))
        return {"prompt_learner": sd}
    if name == "maple":
        n = s["prompts.ctx"].shape[0]
        sd = OrderedDict({"prompt_learner.ctx": s["prompts.ctx"].half(),
                          "prompt_learner.proj.weight": s["prompts.proj.weight"].half(),
                          "prompt_learner.proj.bias": s["prompts.proj.bias"].half()})
        for i, p in enumerate(s["prompts.text_deep.prompts"]):
            sd[f"prompt_learner.compound_prompts_text.{i}"] = p.clone()
        for i in range(s["prompts.text_deep.prompts"].shape[0]):
            for k in ("weight", "bias"):
                sd[f"prompt_learner.compound_prompt_projections.{i}.{k}"] = \
                    s[f"prompts.couplings.{i}.{k}"].clone()
        sd.update({f"prompt_learner.{k}": v for k, v in
                   _tokens(clip, names, _prefix(method, n), n).items()})
        sd.update(_custom_clip(clip))
        return {"MultiModalPromptLearner": sd}
    if name in ("ivlp", "promptsrc"):
        n = s["text.ctx"].shape[0]
        sd = OrderedDict({"prompt_learner.ctx": s["text.ctx"].half()})
        sd.update({f"prompt_learner.{k}": v for k, v in
                   _tokens(clip, names, _prefix(method, n), n).items()})
        if name == "promptsrc":  # the frozen zero-shot image tower lives in the prompt learner
            sd.update({f"prompt_learner.ZS_image_encoder.{k[7:]}": v.half()
                       for k, v in clip.state_dict().items() if k.startswith("visual.")})
        sd.update(_custom_clip(clip, _vpt_keys(s["vision.shallow"], s.get("vision.deep.prompts"),
                                               s.get("text.deep.prompts"))))
        return {"VLPromptLearner": sd}
    if name == "vpt":
        return {"prompt_learner": _custom_clip(
            clip, _vpt_keys(s["vision.shallow"], s.get("vision.deep.prompts")))}
    if name == "comma":
        return {"MultiModalPromptLearner": _comma(method, s, clip)}
    if name == "dpt":
        return _dpt(method, s, clip)
    if name == "mma":
        return {"adapter_learner": _mma(method, s, clip)}
    if name == "hicropl":
        return {"VLPromptLearner": _hicropl(method, s, clip)}
    if name == "coprompt":  # the whole CustomCLIP: MaPLe's learner, adapters, teacher CLIP
        sd = official_states("maple", method, clip)["MultiModalPromptLearner"]
        for ours, theirs in (("image_adapter", "adapter_image"), ("text_adapter", "adapter_text")):
            for k in ("fc.0.weight", "fc.2.weight"):  # Linear(512, 128), Linear(128, 512)
                sd[f"{theirs}.{k}"] = s[f"{ours}.{k}"].half()
        sd.update({f"model_distill.{k}": v.clone() if k == "logit_scale" else v.half()
                   for k, v in clip.state_dict().items()})
        return {"MultiModalPromptLearner": sd}
    if name == "tcp":  # PREC fp16: ctx and meta-net in half precision
        n = s["ctx"].shape[0]
        sd = OrderedDict(ctx=s["ctx"].half())
        for official, ours in (("linear1", "0"), ("linear2", "2")):
            for k in ("weight", "bias"):
                sd[f"meta_net.{official}.{k}"] = s[f"meta_net.{ours}.{k}"].half()
        # CUSTOM_TEMPLATES: "X X X X" then the dataset's words after the context
        sd.update(_tokens(clip, names, " ".join(["X"] * n), n, method.suffix))
        return {"prompt_learner": sd}
    if name == "mmrl":  # the whole CustomCLIP, the learner cast to CLIP's dtype (fp32: amp)
        sd = OrderedDict({"representation_learner.compound_rep_tokens": s["rep_tokens"].clone()})
        for ours, theirs in (("to_vision", "r2vproj"), ("to_text", "r2tproj")):
            for j in range(len(method.layers)):
                for k in ("weight", "bias"):
                    sd[f"representation_learner.compound_rep_tokens_{theirs}.{j}.{k}"] = \
                        s[f"{ours}.{j}.{k}"].clone()
        tokens = tokenize([method.template.format(c) for c in names], clip.context_length)
        sd["prompt_embeddings"] = clip.token_embedding(tokens).detach()
        sd.update(_custom_clip(clip, {"image_encoder.proj_rep": s["rep_proj"].clone()}))
        return {"MultiModalRepresentationLearner": sd}
    if name == "prograd":
        n = s["ctx"].shape[0]
        # CTX_INIT True: the template without " {}." fills the last w of n slots, "X" before
        words = method.prograd_template.replace(" {}.", "")
        prefix = " ".join(["X"] * (n - len(words.split(" ")))) + " " + words
        sd = OrderedDict(ctx=s["ctx"].half())
        sd.update(_tokens(clip, names, prefix, n))
        return {"prompt_learner": sd}
    raise KeyError(name)


def _hicropl(method, s: dict, clip) -> OrderedDict:
    """The whole CustomCLIP (PREC fp16): ``ctx`` is also ``cross_prompts_text.0`` (one
    Parameter in two places), per-layer ParameterLists, mappers, LKP nets, [1, D] proxy queries,
    the zero-shot image tower and the frozen CLIP."""
    pl = "prompt_learner."
    text = [s["text.ctx"]] + list(s["text.deep.prompts"])
    vision = [s["vision.shallow"]] + list(s["vision.deep.prompts"])
    sd = OrderedDict({pl + "ctx": text[0].half()})
    sd.update({f"{pl}cross_prompts_text.{i}": t.half() for i, t in enumerate(text)})
    sd.update({f"{pl}cross_prompts_visual.{i}": v.half() for i, v in enumerate(vision)})
    for ours, theirs in (("text_to_vision.", "text2visual_net."),
                         ("vision_to_text.", "visual2text_net."),
                         ("text_proxy_nets.", "attn_pooling_text_nets."),
                         ("vision_proxy_nets.", "attn_pooling_visual_nets.")):
        sd.update({pl + theirs + k[len(ours):]: v.half() for k, v in s.items()
                   if k.startswith(ours)})
    sd.update({f"{pl}text_proxy_token.{i}": q[None].half()
               for i, q in enumerate(s["text_proxies"])})
    sd.update({f"{pl}visual_proxy_token.{i}": q[None].half()
               for i, q in enumerate(s["vision_proxies"])})
    sd.update({f"{pl}ZS_image_encoder.{k[7:]}": v.half()
               for k, v in clip.state_dict().items() if k.startswith("visual.")})
    n = text[0].shape[0]  # CTX_INIT only for up to 4 tokens, else "X X ... X"
    words = method.config.ctx_init if method.config.ctx_init and n <= 4 else " ".join(["X"] * n)
    sd.update({pl + k: v for k, v in _tokens(clip, method.classnames, words, n).items()})
    sd.update(_custom_clip(clip))
    return sd


def _mma(method, s: dict, clip) -> OrderedDict:
    """``AdapterLearner``: the prompt buffers, then ModuleLists whose slot i adapts block i-1
    (slot 0, the embedding adapter, is None when ADAPTER_START > 0); amp keeps them fp32."""
    names = [c.replace("_", " ") for c in method.classnames]
    tokens = tokenize(["a photo of a " + c + "." for c in names])  # TEXT_CTX_INIT + name + "."
    with torch.no_grad():
        emb = clip.token_embedding(tokens).float()  # [C, 77, D]
    sd = OrderedDict(token_embedding=emb, tokenized_prompts=tokens)
    blocks = sorted({int(k.split(".")[1]) for k in s if k.startswith("text.")})
    for tower, official in (("text", "text_adapter"), ("vision", "visual_adapter")):
        for b in blocks:
            for part in ("down.0.weight", "down.0.bias", "up.weight", "up.bias"):
                sd[f"{official}.{b + 1}.{part}"] = s[f"{tower}.{b}.{part}"].clone()
    for b in blocks:  # Linear(32, 32) + ReLU: d_model == mid_dim gives no down/up
        for part in ("weight", "bias"):
            sd[f"shared_adapter.{b + 1}.0.{part}"] = s[f"shared.{b}.0.{part}"].clone()
    return sd


def _comma(method, s: dict, clip) -> OrderedDict:
    n = s["prompts.ctx"].shape[0]
    deep = s["prompts.text_deep.prompts"]
    sd = OrderedDict({"prompt_learner.ctx": s["prompts.ctx"].half(),
                      "prompt_learner.proj.weight": s["prompts.proj.weight"].half(),
                      "prompt_learner.proj.bias": s["prompts.proj.bias"].half(),
                      "prompt_learner.compound_prompts_text": deep.clone(),
                      # overwritten at every forward by the transforms: any value
                      "prompt_learner.compound_prompts_image":
                          torch.randn(deep.shape[0], n, clip.vision_width)})
    parts = ("fc.weight", "fc.bias", "ln.weight", "ln.bias", "mlp.0.weight", "mlp.0.bias",
             "mlp.2.weight", "mlp.2.bias")
    for part in parts:
        sd[f"prompt_learner.compound_prompt_projections_image_base.{part}"] = \
            s[f"generators.0.{part}"].half()
    for i in range(deep.shape[0] - 1):
        for part in parts:
            sd[f"prompt_learner.compound_prompt_projections_image.{i}.{part}"] = \
                s[f"generators.{i + 1}.{part}"].clone()
    sd.update({f"prompt_learner.{k}": v for k, v in
               _tokens(clip, method.classnames, _prefix(method, n), n).items()})
    sd.update(_custom_clip(clip))
    return sd


def _dpt(method, s: dict, clip) -> dict[str, OrderedDict]:
    depth = sum(1 for k in s if k.endswith(".kv_tokens"))
    ext = OrderedDict(ctx=torch.stack([s[f"cavpt.{i}.kv_tokens"] for i in range(depth)]).half())
    for i in range(depth):
        ext[f"meta_nets.{i}.weight"] = s[f"cavpt.{i}.meta_net.weight"].half()
        ext[f"meta_nets.{i}.bias"] = s[f"cavpt.{i}.meta_net.bias"].half()
        ext[f"attns.{i}.kmlp.weight"] = s[f"cavpt.{i}.k_proj.weight"].half()
        ext[f"attns.{i}.qmlp.weight"] = s[f"cavpt.{i}.q_proj.weight"].half()
        ext[f"attns.{i}.vmlp.weight"] = s[f"cavpt.{i}.v_out.weight"].half()
        for ln, ours in (("lns", "ln"), ("lns2", "ln2")):
            for k in ("weight", "bias"):
                ext[f"{ln}.{i}.{k}"] = s[f"cavpt.{i}.{ours}.{k}"].half()
        ext[f"classfiers.{i}.weight"] = s[f"aux_classifiers.{i}.weight"].half()
    n = s["ctx"].shape[0]
    text = OrderedDict(ctx=s["ctx"].half())
    text.update(_tokens(clip, method.classnames, _prefix(method, n), n))
    return {"image_encoder.transformer.ctx_learner": OrderedDict(ctx=s["vpt"].half()),
            EXTRACTOR: ext, "prompt_learner": text}


def _optimizer_entries(state: OrderedDict, max_epoch: int, optim: str = "sgd",
                       warmup: bool = True) -> tuple[dict, dict]:
    """Dassl's optimiser/scheduler state dicts for a model (SGD, Adam or AdamW, cosine, by default
    inside a constant warmup; one step taken so that momentum buffers exist)."""
    params = [nn.Parameter(v.float().clone()) for v in state.values() if v.is_floating_point()]
    if optim == "adam":
        opt = torch.optim.Adam(params, lr=0.002, eps=1e-3, weight_decay=5e-4)
    elif optim == "adamw":
        opt = torch.optim.AdamW(params, lr=0.001, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=5e-4)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(max_epoch))
    cosine.last_epoch = 1
    sched = ConstantWarmupScheduler(opt, cosine, 1, 1e-5) if warmup else cosine
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    return opt.state_dict(), sched.state_dict()


def write_official(folder: Path, states: dict[str, OrderedDict], epoch: int = 5,
                   best: bool = False, method: str = "") -> dict[str, Path]:
    """``<folder>/<model>/model.pth.tar-<epoch>`` (+ ``checkpoint``) as ``save_checkpoint``
    (``method``: save as that official trainer does, ``SAVES``)."""
    how = dict(SAVES.get(method, {}))
    with_val = how.pop("val_result", True)
    paths = {}
    for model, state in states.items():
        optim, sched = _optimizer_entries(state, epoch, **how)
        path = folder / model / ("model-best.pth.tar" if best else f"model.pth.tar-{epoch}")
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {"state_dict": state, "epoch": epoch, "optimizer": optim,
                      "scheduler": sched}
        if with_val:
            checkpoint["val_result"] = None
        torch.save(checkpoint, path)
        (path.parent / "checkpoint").write_text(path.name + "\n")
        paths[model] = path
    return paths


def yacs_text(tree: dict, indent: int = 0) -> str:
    """``print(cfg)`` of a yacs ``CfgNode``: sorted ``KEY: value`` lines, 2 spaces per level."""
    lines = []
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(yacs_text(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


def write_log(folder: Path, trainer: str, config: dict, seed: int = 1) -> Path:
    """A Dassl ``log.txt`` (``train.py``'s ``print_args`` then the config)."""
    args = {"backbone": "", "config_file": f"configs/trainers/{trainer}/vit_b16.yaml",
            "dataset_config_file": "configs/datasets/eurosat.yaml", "eval_only": False,
            "output_dir": str(folder), "seed": seed, "trainer": trainer}
    text = [f"Setting fixed seed: {seed}", "***************", "** Arguments **",
            "***************"] + [f"{k}: {args[k]}" for k in sorted(args)]
    text += ["************", "** Config **", "************", yacs_text(config),
             "Collecting env info ...", "** System info **"]
    path = folder / "log.txt"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")
    return path
