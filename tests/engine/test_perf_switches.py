"""Every exact optimisation (``vlprompt.perf`` switches) gives the plain path's numbers: logits and
gradients within 1e-5 relative in fp32 (issue 14), and the evaluation text-feature cache reuses
features only while nothing can change them."""

from __future__ import annotations

import pytest
import torch

from tests.methods.conftest import (
    CLASSNAMES,
    NEW_CLASSNAMES,
    TINY_OVERRIDES,
    colour_batch,
    make_tiny_clip,
)
from vlprompt.bench.measure import build_bench_method, paper_config
from vlprompt.methods import get_method, list_methods
from vlprompt.perf import SWITCHES, reference_mode, switches

#: PromptKD needs a trained teacher run (engine-resolved); the others build from a config alone
METHODS = [m for m in list_methods() if get_method(m).trainable and m != "promptkd"]
SWITCH_CASES = {
    "no_truncation": {"truncate_text": False},
    "batch1_conditional": {"batched_conditional_text": False},
    "activation_checkpointing": {"activation_checkpointing": True},
    "no_cache": {"cache_text_features": False},
}
RTOL = 1e-5
#: dropout draws depend on the tensor shapes (a truncated text pass draws fewer numbers), so
#: the exactness comparisons run without it
EXACT_OVERRIDES = {"clip_lora": {"dropout": 0.0}}


@pytest.fixture(scope="module")
def clip():
    return make_tiny_clip(0)


def _build(name, clip, classnames=CLASSNAMES):
    config = paper_config(name)
    config["method"].update(TINY_OVERRIDES.get(name, {}))
    config["method"].update(EXACT_OVERRIDES.get(name, {}))
    if "descriptions" in config["method"]:  # descriptions of the new classes too
        from vlprompt.bench.measure import bench_descriptions

        config["method"]["descriptions"] = str(bench_descriptions(CLASSNAMES + NEW_CLASSNAMES))
        config["method"]["description_dataset"] = "bench"
    torch.manual_seed(0)
    return build_bench_method(name, clip, classnames, config)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    """Relative error ``||a - b|| / ||b||`` within ``rtol``."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm()) <= rtol * max(float(b.norm()), 1e-30)


def _grads_close(a: dict, b: dict) -> bool:
    """All trainable tensors' gradients, as one vector, within ``RTOL`` relative (a tensor whose
    gradient is ~0 by cancellation only carries rounding noise of its own size)."""
    assert a.keys() == b.keys()
    return _close(torch.cat([a[n].flatten() for n in b]), torch.cat([b[n].flatten() for n in b]))


def _outputs(method, images, labels):
    """(eval logits, training loss, gradients by name) in fp32."""
    method.eval()
    with torch.no_grad():
        logits = method(images).float()
    method.train()
    method.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # dropout / description draws: the same in both runs
    if method.combines_gradients:
        terms, _ = method.loss_terms(images, labels)
        loss = sum(terms.values())
    else:
        loss, _ = method.loss(images, labels)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in method.named_trainable_parameters().items()
             if p.grad is not None}
    method.zero_grad(set_to_none=True)
    return logits, loss.detach(), grads


def _views(name, images):
    return images.unsqueeze(1).repeat(1, 2, 1, 1, 1) if name == "coprompt" else images


@pytest.mark.parametrize("case", list(SWITCH_CASES))
@pytest.mark.parametrize("name", METHODS)
def test_switch_is_exact(name, case, clip):
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    method = _build(name, clip)
    plain = _outputs(method, _views(name, images), labels)
    with switches(**SWITCH_CASES[case]):
        switched = _outputs(method, _views(name, images), labels)
    assert _close(switched[0], plain[0]), "logits differ"
    assert _close(switched[1], plain[1]), "loss differs"
    assert _grads_close(switched[2], plain[2]), "gradients differ"


@pytest.mark.parametrize("name", ["coop", "cocoop", "maple", "comma"])
def test_reference_mode_is_exact(name, clip):
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    method = _build(name, clip)
    plain = _outputs(method, images, labels)
    with reference_mode():
        assert not SWITCHES.truncate_text and not SWITCHES.cache_text_features
        ref = _outputs(method, images, labels)
    assert SWITCHES.truncate_text and SWITCHES.cache_text_features  # restored
    assert _close(ref[0], plain[0]) and _close(ref[1], plain[1])
    assert _grads_close(ref[2], plain[2])


#: methods whose class text features do not depend on the image and are cached at evaluation
CACHED = ["coop", "kgcoop", "maple", "ivlp", "promptsrc", "comma", "hicropl", "coprompt", "dpt"]


def _count_text_calls(method):
    calls = {"n": 0}
    original = method.clip.encode_text_embeddings

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)
    method.clip.encode_text_embeddings = counting
    return calls


@pytest.mark.parametrize("name", CACHED)
def test_evaluation_text_cache(name):
    clip = make_tiny_clip(0)  # its own: the text tower is instrumented
    method = _build(name, clip)
    method.eval()
    images, _ = colour_batch(6, torch.Generator().manual_seed(0))
    with torch.no_grad(), switches(cache_text_features=False):
        plain = [method(images[i: i + 2]) for i in range(0, 6, 2)]
    calls = _count_text_calls(method)
    with torch.no_grad():
        cached = [method(images[i: i + 2]) for i in range(0, 6, 2)]
        first = calls["n"]
        method(images[:2])
        assert calls["n"] == first, "the text tower ran again on a cached evaluation batch"
    for a, b in zip(cached, plain):
        assert _close(a, b)
    # an optimiser step (in-place update of a trainable tensor) invalidates the cache
    param = next(iter(method.named_trainable_parameters().values()))
    with torch.no_grad():
        param.add_(0.05 * torch.randn_like(param))
        after = method(images[:2])
        with switches(cache_text_features=False):
            expected = method(images[:2])
    assert _close(after, expected)
    assert not _close(after, cached[0], rtol=1e-4)
    # a new class list too
    method.set_classnames(NEW_CLASSNAMES)
    with torch.no_grad():
        new = method(images[:2])
        with switches(cache_text_features=False):
            expected = method(images[:2])
    assert new.shape == (2, len(NEW_CLASSNAMES)) and _close(new, expected)


def test_cache_bypassed_in_training(clip):
    method = _build("kgcoop", clip)
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    method.train()
    loss, _ = method.loss(images, labels)
    loss.backward()  # a cached (graph-less) text feature would leave ctx without a gradient
    assert method.ctx.grad is not None and float(method.ctx.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["coop", "maple", "promptsrc"])
def test_bf16_autocast_close_to_fp32(name, clip):
    """train.precision=bf16 (autocast, CPU too): logits and loss within a bf16 bound of fp32,
    and the prompts stay fp32 master tensors through an engine step."""
    from vlprompt.config import TrainConfig
    from vlprompt.engine.evaluate import autocast
    from vlprompt.engine.train import make_train_step

    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    method = _build(name, clip)
    method.eval()
    with torch.no_grad():
        fp32 = method(images)
        with autocast("bf16", torch.device("cpu")):
            bf16 = method(images).float()
    assert _close(bf16, fp32, rtol=5e-2)
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.75
    step = make_train_step(method, TrainConfig(precision="bf16", batch_size=4),
                           torch.device("cpu"))
    loss, _ = step(images, labels)
    assert torch.isfinite(torch.tensor(loss))
    assert all(p.dtype == torch.float32 for p in method.named_trainable_parameters().values())


def test_compile_falls_back_with_a_warning(monkeypatch, clip, caplog):
    from vlprompt.clip import model

    def failing_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(model, "_COMPILED", {})
    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    method = _build("maple", clip)
    plain = _outputs(method, images, labels)
    with caplog.at_level("WARNING"), switches(compile_blocks=True):
        compiled = _outputs(method, images, labels)
    assert "torch.compile failed" in caplog.text
    assert _close(compiled[0], plain[0]) and _close(compiled[1], plain[1])


def test_make_train_step_is_the_engines_step(clip):
    """``make_train_step`` (bench) takes the same step as ``train_method``'s first one."""
    from torch.utils.data import TensorDataset

    from vlprompt.config import TrainConfig
    from vlprompt.engine.train import make_train_step, train_method

    images, labels = colour_batch(4, torch.Generator().manual_seed(0))
    config = TrainConfig(batch_size=4, max_steps=1, max_epoch=1, lr=0.5, warmup_epoch=0,
                         num_workers=0)
    a = _build("coop", clip)
    train_method(a, TensorDataset(images, labels), config, show_progress=False)
    b = _build("coop", clip)
    make_train_step(b, config, torch.device("cpu"))(images, labels)
    assert _close(a.ctx.detach(), b.ctx.detach(), rtol=1e-5)
    assert not _close(a.ctx.detach(), _build("coop", clip).ctx.detach(), rtol=1e-6)


def test_runtime_switches_do_not_change_run_identity():
    import dataclasses

    from vlprompt.config import RUNTIME_ONLY, TrainConfig
    from vlprompt.engine.run import _compare_config

    assert {"activation_checkpointing", "compile"} <= RUNTIME_ONLY
    stored = {"train": {k: v for k, v in dataclasses.asdict(TrainConfig()).items()
                        if k not in ("activation_checkpointing", "compile")}}
    current = {"train": dataclasses.asdict(TrainConfig())}
    assert _compare_config(stored, current) == []  # fields added since, at their default
    current["train"].update(activation_checkpointing=True, compile=True)
    assert _compare_config(stored, current) == []  # runtime only
    current["train"]["precision"] = "bf16"
    assert _compare_config(stored, current) == ["train.precision: 'auto' -> 'bf16'"]
