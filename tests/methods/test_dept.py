"""DePT (METHODS-SOTA.md §4) against references written from the spec's formulas: with head weight
0 it is its base method (logits, loss, gradients) for every supported base; its training loss and
test-time fusion equal the formulas on shared weights; the head's rows follow the class list
(base / new / ImageNet-variant subsets); parameter groups, schedules, configs and checkpoints."""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vlprompt
from vlprompt.config import TrainConfig, resolve_config
from vlprompt.data.base import packaged_classnames
from vlprompt.engine.optim import build_optimizer, set_epoch_lr
from vlprompt.engine.run import method_template
from vlprompt.methods import build_method, get_method, make_config
from vlprompt.methods.dept import DEPT_BASE_SETTINGS, SUPPORTED_BASES

from .conftest import CLASSNAMES, colour_batch

CONFIG_DIR = Path(vlprompt.__file__).parent / "configs" / "dept"
#: training classes of the subset tests ("ImageNet") and a variant's subset of them ("A/R")
TRAIN8 = ["red", "green", "blue", "yellow", "purple", "cyan", "grey", "white"]
SUBSET = ["cyan", "red", "grey"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _batch(n: int = 4, seed: int = 0):
    return colour_batch(n, torch.Generator().manual_seed(seed))


def _perturb(module: torch.nn.Module, seed: int = 3, scale: float = 0.05) -> None:
    """Move every trainable tensor off its initial value (so identities are not trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def _dept(clip, base="coop", classnames=CLASSNAMES, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_method("dept", clip, classnames, base=base, **overrides)


def _randomise_head(method, seed: int = 7) -> None:
    """FiLM away from the identity and a head with larger weights (FiLM and H matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for film in (method.film_v, method.film_t):
            if film is not None:
                film.gamma.copy_(1 + 0.3 * torch.randn(film.gamma.shape, generator=gen))
                film.beta.copy_(0.1 * torch.randn(film.beta.shape, generator=gen))
        if method.head is not None:
            method.head.weight.copy_(0.5 * torch.randn(method.head.weight.shape, generator=gen))
            method.head.bias.copy_(0.2 * torch.randn(method.head.bias.shape, generator=gen))


# ---------------------------------------------------------------------------------- reduction
@pytest.mark.parametrize("base", SUPPORTED_BASES)
def test_head_weight_zero_equals_the_base_method(base, tiny_clip):
    """lambda = 0, FiLM at its identity init: DePT's logits, loss and base-parameter gradients are
    the base method's (configured with DePT's settings); the head gets a zero gradient."""
    dept = _dept(tiny_clip, base, head_weight=0.0)
    torch.manual_seed(0)
    plain = build_method(base, tiny_clip, CLASSNAMES, **DEPT_BASE_SETTINGS[base])
    assert dept.base.config == plain.config
    _perturb(plain)
    plain_params = plain.named_trainable_parameters()
    with torch.no_grad():
        for name, p in plain_params.items():
            dept.base.named_trainable_parameters()[name].copy_(p)
    images, labels = _batch()
    dept.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(dept(images), plain(images))
    dept.train()
    plain.train()
    loss, parts = dept.loss(images, labels)
    ref, ref_parts = plain.loss(images, labels)
    assert torch.equal(loss, ref)
    assert parts["ce"] == ref_parts["ce"]
    loss.backward()
    ref.backward()
    for name, p in plain_params.items():
        got = dept.named_trainable_parameters()[f"base.{name}"].grad
        if base == "promptsrc":  # its terms normalise the features a second time: rounding only
            assert rel_err(got, p.grad) < 1e-5, name
        else:
            assert torch.equal(got, p.grad), name
    assert float(dept.head.weight.grad.abs().sum()) == 0.0


# ---------------------------------------------------------------------------------- formulas
def _reference(method, images, labels):
    """The spec's formulas from the base's raw features: (training loss, test logits)."""
    cfg, base, clip = method.config, method.base, method.clip
    v = clip.encode_image(images).float()  # [B, E]
    if cfg.base == "cocoop":
        t = base.text_features(base.conditional_context(v))  # [B, C, E]
    else:
        t = base.text_features().float()  # [C, E]
    scale = clip.logit_scale.exp()
    vn, tn = F.normalize(v, dim=-1), F.normalize(t, dim=-1)
    per_image = t.dim() == 3
    s = scale * (torch.einsum("be,bce->bc", vn, tn) if per_image else vn @ tn.t())
    t_y = t[torch.arange(len(labels)), labels] if per_image else t[labels]  # [B, E]
    fv, ft = method.film_v, method.film_t
    film_v = fv.gamma * v + fv.beta if fv is not None else v
    film_ty = ft.gamma * t_y + ft.beta if ft is not None else t_y
    if cfg.head == "linear":
        W, b = method.head.weight, method.head.bias
        a_text, a_image = film_ty @ W.t() + b, film_v @ W.t() + b
    else:
        film_t = F.normalize(ft.gamma * t + ft.beta if ft is not None else t, dim=-1)

        def cos(x):
            x = F.normalize(x, dim=-1)
            return scale * (torch.einsum("be,bce->bc", x, film_t) if per_image else x @ film_t.t())
        a_text, a_image = cos(film_ty), cos(film_v)
    lam = cfg.head_weight
    loss = (1 - lam) * F.cross_entropy(s, labels) + lam * F.cross_entropy(
        torch.cat([a_text, a_image]), torch.cat([labels, labels]))
    if cfg.base == "kgcoop":
        t_hc = base.hand_crafted_features()
        loss = loss + base.config.kg_weight * (1 - (tn * t_hc).sum(-1).mean())
    logits = (1 - lam) * s + lam * a_image if cfg.test_time_fusion else a_image
    return loss, logits


@pytest.mark.parametrize("base,overrides", [
    ("coop", {}), ("cocoop", {}), ("kgcoop", {}),
    ("coop", {"head": "similarity"}), ("cocoop", {"head": "similarity"}),
    ("coop", {"film": False}), ("coop", {"test_time_fusion": False}),
    ("kgcoop", {"head_weight": 0.4}),
])
def test_loss_and_fusion_match_the_formulas(base, overrides, tiny_clip):
    method = _dept(tiny_clip, base, **overrides)
    _perturb(method.base)
    _randomise_head(method)
    images, labels = _batch(6, seed=2)
    ref_loss, ref_logits = _reference(method, images, labels)
    loss, parts = method.loss(images, labels)
    assert rel_err(loss, ref_loss) < 1e-5
    assert "ce_head" in parts
    with torch.no_grad():
        assert rel_err(method(images), ref_logits.detach()) < 1e-5


def test_gradients_reach_head_and_film_and_base(tiny_clip):
    method = _dept(tiny_clip, "cocoop")
    loss, _ = method.loss(*_batch())
    loss.backward()
    for name, p in method.named_trainable_parameters().items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_switches_remove_their_parameters(tiny_clip):
    E, C = tiny_clip.embed_dim, len(CLASSNAMES)
    base = build_method("coop", tiny_clip, CLASSNAMES).num_trainable_parameters()
    assert _dept(tiny_clip).num_trainable_parameters() == base + 4 * E + (E + 1) * C
    assert _dept(tiny_clip, film=False).num_trainable_parameters() == base + (E + 1) * C
    assert _dept(tiny_clip, head="similarity").num_trainable_parameters() == base + 4 * E


# ---------------------------------------------------------------------------------- class rows
def test_rows_follow_the_class_list(tiny_clip):
    """Training list: all rows, fused. A subset in another order (ImageNet-A/R of an ImageNet
    run): the head's rows of those classes, fused, equal to the full fused logits' columns. New
    or partly new classes: the base's logits."""
    method = _dept(tiny_clip, classnames=TRAIN8)
    _perturb(method.base)
    _randomise_head(method)
    method.eval()
    images, _ = _batch(5)
    rows = [TRAIN8.index(c) for c in SUBSET]
    with torch.no_grad():
        full = method(images)
        assert method.training_class_index() == list(range(8))
        method.set_classnames(SUBSET)
        assert method.training_class_index() == rows
        assert method.class_rows.tolist() == rows
        torch.testing.assert_close(method(images), full[:, rows], rtol=1e-5, atol=1e-5)
        for names in (["orange", "pink"], ["red", "orange"]):  # new; partly new
            method.set_classnames(names)
            assert method.training_class_index() is None and method.class_rows is None
            assert torch.equal(method(images), method.base(images))
        method.set_classnames(SUBSET)
        exact_only = _dept(tiny_clip, classnames=TRAIN8, fuse_subsets=False)
        exact_only.load_trainable_state_dict(method.trainable_state_dict())
        exact_only.eval()
        torch.testing.assert_close(exact_only(images), full, rtol=1e-5, atol=1e-5)
        exact_only.set_classnames(SUBSET)
        assert torch.equal(exact_only(images), exact_only.base(images))
        method.set_classnames(TRAIN8)
        assert torch.equal(method(images), full)


def test_training_on_a_subset_maps_labels_and_new_classes_drop_the_head(tiny_clip):
    method = _dept(tiny_clip, classnames=TRAIN8)
    _randomise_head(method)
    images, labels = _batch(3)
    method.set_classnames(SUBSET)  # label j is training class rows[j]
    rows = torch.tensor([TRAIN8.index(c) for c in SUBSET])
    features = method.base.forward_features(images)
    film_t, film_v = method.film_t, method.film_v
    x = torch.cat([film_t(features.text[labels]), film_v(features.image)])
    ref = F.cross_entropy(method.head(x), torch.cat([rows[labels], rows[labels]]))
    assert rel_err(method.head_loss(features, labels), ref) < 1e-6
    method.set_classnames(["orange", "pink", "brown"])
    loss, parts = method.loss(images, labels)
    base_loss, _ = method.base.loss(images, labels)
    assert torch.equal(loss, base_loss) and "ce_head" not in parts


def test_imagenet_variants_keep_their_rows(tiny_clip):
    """An ImageNet run's head scores ImageNet-A/R with the rows of their 200 classes."""
    imagenet = packaged_classnames("imagenet")
    method = _dept(tiny_clip, classnames=imagenet)
    assert method.head.weight.shape[0] == 1000
    for variant in ("imagenet_a", "imagenet_r"):
        names = packaged_classnames(variant)
        method.set_classnames(names)
        rows = method.training_class_index()
        assert rows is not None and len(rows) == 200
        assert [imagenet[i].replace("_", " ") for i in rows] == method.classnames
    method.set_classnames(packaged_classnames("eurosat"))
    assert method.training_class_index() is None


def test_checkpoint_round_trip_then_subset(tiny_clip):
    """The engine's evaluation path: build on the training classes (checkpoint header), load,
    then ``set_classnames`` the evaluated ones."""
    trained = _dept(tiny_clip, base="promptsrc", classnames=TRAIN8)
    _perturb(trained)
    trained.on_epoch_end(0, 2)
    state = trained.trainable_state_dict()
    assert {k for k in state if k.startswith("base.gpa.")} and "head.weight" in state
    fresh = _dept(tiny_clip, base="promptsrc", classnames=TRAIN8, seed=1)
    fresh.load_trainable_state_dict(state)
    fresh.set_classnames(SUBSET)
    trained.set_classnames(SUBSET)
    trained.eval()
    fresh.eval()
    images, _ = _batch(2)
    with torch.no_grad():
        assert torch.equal(fresh(images), trained(images))


# ---------------------------------------------------------------------------------- engine
def test_head_and_film_train_at_lr_mult_through_the_schedule(tiny_clip):
    method = _dept(tiny_clip)
    groups = method.param_groups(0.0035)
    own = {id(p) for m in (method.film_v, method.film_t, method.head) for p in m.parameters()}
    assert [g["lr"] for g in groups] == [0.0035, pytest.approx(0.0035 * 6.5)]
    assert {id(p) for p in groups[1]["params"]} == own
    assert sum(len(g["params"]) for g in groups) == len(method.named_trainable_parameters())
    cfg = TrainConfig(max_epoch=10, lr=0.0035, warmup_epoch=1, warmup_lr=1e-5)
    opt = build_optimizer(method, cfg)
    assert set_epoch_lr(opt, 0, cfg) == [1e-5, 1e-5]  # constant warmup: every group
    for epoch in (1, 4, 9):
        base_lr, head_lr = set_epoch_lr(opt, epoch, cfg)
        assert head_lr == pytest.approx(6.5 * base_lr) and base_lr < 0.0035 + 1e-12


def test_template_follows_the_base(tiny_clip):
    dtd = types.SimpleNamespace(dataset="dtd", template="{} texture.")
    assert method_template(get_method("dept"), dtd, {"base": "kgcoop"}) == \
        "a photo of a {}, a type of texture."
    assert method_template(get_method("dept"), dtd, {"base": "coop"}) == "{} texture."
    assert method_template(get_method("dept"), dtd) == "{} texture."


def test_gpa_delegates_to_the_base(tiny_clip):
    method = _dept(tiny_clip, base="promptsrc")
    _perturb(method)
    method.on_epoch_end(0, 1)
    assert int(method.base.gpa_epochs) == 1
    ctx = method.base.text.ctx.detach().clone()
    with torch.no_grad():
        method.base.text.ctx.add_(1.0)
    method.on_train_end()
    assert torch.equal(method.base.text.ctx, ctx)


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("overrides", [
    {"base": "vpt"}, {"base": "dept"}, {"base_config": {"no_such": 1}},
    {"base_settings": {"maple": {"n_ctx": 0}}}, {"base_settings": {"tcp": {}}},
    {"base_config": "n_ctx=4"}, {"head": "mlp"}, {"head_weight": 1.5}, {"lr_mult": 0},
])
def test_bad_configs_raise(overrides):
    with pytest.raises(ValueError):
        make_config(get_method("dept"), overrides)


@pytest.mark.parametrize("protocol", ["base2new", "fewshot", "xd"])
def test_shipped_configs(protocol):
    data = yaml.safe_load((CONFIG_DIR / f"{protocol}.yaml").read_text())
    cfg = make_config(get_method("dept"), data["method"])
    assert (cfg.base, cfg.head_weight, cfg.lr_mult, cfg.head) == ("coop", 0.7, 6.5, "linear")
    assert cfg.film and cfg.test_time_fusion and cfg.fuse_subsets and cfg.base_config == {}
    for base in SUPPORTED_BASES:  # the YAML's settings are the code's (PromptSRC: its defaults)
        cls = get_method(base)
        assert make_config(cls, cfg.base_settings[base]) == make_config(cls,
                                                                        DEPT_BASE_SETTINGS[base])
    assert make_config(get_method("kgcoop"), cfg.base_settings["kgcoop"]).kg_weight == 2.0
    train = data["train"]
    assert (train["max_epoch"], train["lr"], train["batch_size"], train["warmup_epoch"],
            train["warmup_lr"]) == (10, 0.0035, 4, 1, 1e-5)


def test_base_selected_by_override_keeps_its_dept_settings():
    config = resolve_config("dept", "base2new", overrides=[
        "method.base=kgcoop", "method.base_config={n_ctx: 6, ctx_init: ''}"])
    cfg = make_config(get_method("dept"), config["method"])
    base_cfg = cfg.base_method_config()
    assert (base_cfg.n_ctx, base_cfg.ctx_init, base_cfg.kg_weight) == (6, "", 2.0)
    assert dataclasses.asdict(cfg)["base"] == "kgcoop"


def test_parameter_count_at_vit_b16_imagenet_base():
    """METHODS-SOTA.md §4: 2,048 + 513 C on top of CoOp's 16 x 512; ImageNet base C = 500."""
    from vlprompt.clip.model import CLIPConfig, build_clip

    clip = build_clip(CLIPConfig()).requires_grad_(False).eval()
    names = packaged_classnames("imagenet")[:500]
    method = build_method("dept", clip, names)
    own = method.num_trainable_parameters() - method.base.num_trainable_parameters()
    assert (method.base.num_trainable_parameters(), own) == (8_192, 258_548)


@pytest.mark.parametrize("base,extra", [
    ("cocoop", ["train.lr=0.002", "train.batch_size=1"]), ("kgcoop", []), ("maple", []),
    ("promptsrc", []),
])
def test_base2new_command_line_per_base(eurosat_world, base, extra):
    """``vlprompt run base2new --method dept method.base=...``: trains on the base classes and
    evaluates both splits; the evaluation path builds the head on the checkpoint's training
    classes, so base gets all rows (fused) and new none (the base's logits)."""
    from vlprompt.cli import main
    from vlprompt.clip.load import load_clip
    from vlprompt.data.splits import load_split
    from vlprompt.engine import checkpoint as ckpt
    from vlprompt.engine.run import _build_from_run

    tmp, backbone = eurosat_world
    out = tmp / f"out_dept_{base}"
    argv = ["run", "base2new", "--method", "dept", "--datasets", "eurosat", "--seeds", "1",
            "--shots", "2", "--root", str(tmp / "data"), "--backbone", str(backbone),
            "--output", str(out), "--device", "cpu", "train.max_epoch=1", "train.num_workers=0",
            "train.batch_size=4", f"method.base={base}", *extra]
    if base in ("maple", "promptsrc"):
        depth = {"maple": "{depth: 2}",
                 "promptsrc": "{depth_text: 2, depth_vision: 2}"}[base]
        argv.append(f"method.base_config={depth}")
    assert main(argv) == 0
    run_dir = out / "base2new" / "dept" / "eurosat" / "shots_2" / "seed1"
    clip = load_clip(str(backbone))
    gen = ckpt.newest_generation(run_dir)
    assert gen.header()["method_config"]["base"] == base
    root = tmp / "data"
    for subsample, fused in (("base", True), ("new", False)):
        split = load_split("eurosat", root, subsample=subsample)
        model = _build_from_run(run_dir, gen, clip, split.classnames, split.template)
        assert model.training_classnames == [c.replace("_", " ")
                                             for c in gen.header()["classnames"]]
        assert (model.class_rows is not None) == fused
