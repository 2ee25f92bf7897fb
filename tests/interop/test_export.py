"""``vlprompt export``: the classifier head gives ``predict`` the same top-k as the run, and the
Dassl export is read back (and would be loaded by the official loader) with identical logits."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from vlprompt.cli import main
from vlprompt.interop.export import _run_method, read_classifier
from vlprompt.interop.official import load_official
from vlprompt.interop.unpickle import read_official_file

from .official_files import METHODS, official_states, random_method, write_official

#: text features independent of the image, and the plain (or prompted) image tower
FIXED_HEAD = ["coop", "kgcoop", "maple", "ivlp", "vpt", "promptsrc", "comma", "tcp", "prograd"]
NO_VISION_PROMPTS = ("coop", "kgcoop", "tcp", "prograd")


def _imported_run(name, world, tmp_path):
    ref = random_method(name, world.clip, world.classnames, template=world.template)
    write_official(tmp_path / "official", official_states(name, ref, world.clip), method=name)
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "official"), "--method", name, "--dataset", "eurosat",
                 "--root", world.data, "--backbone", world.clip_path, "--output", str(run),
                 "--no-eval"]) == 0
    return run, ref


@pytest.fixture(scope="module")
def trained_coop(world, tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "coop"
    assert main(["train", "--method", "coop", "--dataset", "eurosat", "--root", world.data,
                 "--backbone", world.clip_path, "--shots", "1", "--run-dir", str(run),
                 "--device", "cpu", "train.max_epoch=1", "n_ctx=4"]) == 0
    return run


def _predict(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(["predict", "--topk", "3", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", FIXED_HEAD)
def test_classifier_export_gives_predict_the_same_topk(name, world, tmp_path, capsys):
    run, _ = _imported_run(name, world, tmp_path)
    head = tmp_path / "head.safetensors"
    assert main(["export", str(run), "--format", "classifier", "--output", str(head)]) == 0
    loaded = read_classifier(head)
    assert loaded.text_features.shape == (10, 32) and loaded.classnames == world.classnames
    assert torch.allclose(loaded.text_features.norm(dim=-1), torch.ones(10))
    assert (loaded.shallow is None) == (name in NO_VISION_PROMPTS)
    assert loaded.metadata["backbone_fingerprint"]
    by_run = _predict(capsys, "--checkpoint", str(run), *world.images)
    by_head = _predict(capsys, "--checkpoint", str(head), *world.images)
    assert by_head == by_run
    two = world.classnames[1:3]
    subset = _predict(capsys, "--checkpoint", str(head), "--classes", ",".join(two), *world.images)
    names = {line.split("%", 1)[1].strip() for line in subset.splitlines() if "%" in line}
    assert names == set(two)


def test_classifier_of_a_trained_run_and_its_errors(trained_coop, world, tmp_path, capsys):
    head = tmp_path / "coop.safetensors"
    assert main(["export", str(trained_coop), "--format", "classifier", "--output",
                 str(head)]) == 0
    assert (_predict(capsys, "--checkpoint", str(head), *world.images)
            == _predict(capsys, "--checkpoint", str(trained_coop), *world.images))
    assert main(["predict", "--checkpoint", str(head), "--classes", "cat,dog",
                 *world.images]) == 1
    assert "not for cat, dog" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(trained_coop), "--backbone", world.clip_path,
                 *world.images]) == 1
    assert "only for an exported classifier" in capsys.readouterr().err


# MMA: fixed text features, but the image tower's blocks carry adapters the head cannot hold;
# CoPrompt: an adapter on the image features; HiCroPL: the frozen image feature is added
@pytest.mark.parametrize("name", ["cocoop", "dpt", "mma", "coprompt", "hicropl"])
def test_classifier_export_refused_when_logits_are_not_a_fixed_head(name, world, tmp_path,
                                                                     capsys):
    run, _ = _imported_run(name, world, tmp_path)
    assert main(["export", str(run), "--format", "classifier", "--output",
                 str(tmp_path / "h.safetensors")]) == 1
    assert "not a fixed classifier" in capsys.readouterr().err
    assert not (tmp_path / "h.safetensors").exists()


def _official_module(state: dict) -> nn.Module:
    """A module whose state-dict keys are ``state``'s (the official model's names)."""
    root = nn.Module()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(torch.zeros_like(value, dtype=torch.float)))
    return root


@pytest.mark.parametrize("name", METHODS)
def test_dassl_export_round_trip(name, world, batch, tmp_path, capsys):
    run, ref = _imported_run(name, world, tmp_path)
    out = tmp_path / "dassl"
    assert main(["export", str(run), "--format", "dassl", "--output", str(out)]) == 0
    model, _, _ = _run_method(run, None, "cpu")
    oc = load_official(out, name, world.clip, world.classnames, model.template,
                       dataset="eurosat")
    with torch.no_grad():
        assert torch.equal(oc.method(batch), model(batch))
    assert main(["eval", "--checkpoint", str(out), "--method", name, "--dataset", "eurosat",
                 "--root", world.data, "--backbone", world.clip_path]) == 0
    assert "accuracy" in capsys.readouterr().out
    # what the official load_model does: torch.load, drop the token buffers, strict=False
    written = official_states(name, ref, world.clip)
    for model_name, path in oc.run.files.items():
        checkpoint = torch.load(path, weights_only=False)
        assert set(checkpoint) == {"state_dict", "epoch", "optimizer", "scheduler", "val_result"}
        assert (path.parent / "checkpoint").read_text().strip() == path.name
        state = OrderedDict(checkpoint["state_dict"])
        for key in [k for k in state if k.endswith(("token_prefix", "token_suffix"))]:
            del state[key]
        official = _official_module(written[model_name])
        result = official.load_state_dict(state, strict=False)
        assert result.unexpected_keys == []
        # missing: only the frozen CLIP (from the backbone file) and tensors never used
        unused = {"logit_scale", "prompt_learner.compound_prompts_image", "bias_vectors",
                  "meta_net.linear1.weight", "meta_net.linear1.bias"}
        frozen = ("image_encoder.", "text_encoder.", "prompt_learner.ZS_image_encoder.",
                  "model_distill.")
        # deleted above, as the official loader does (MMA's loader: its prompt buffers; MMRL's:
        # its template embeddings)
        tokens = ("token_prefix", "token_suffix", "token_embedding", "tokenized_prompts",
                  "prompt_embeddings")
        assert all(k in unused or k.endswith(tokens) or (k.startswith(frozen) and "VPT" not in k)
                   for k in result.missing_keys), result.missing_keys
        assert read_official_file(path)["epoch"] == 5


def test_dassl_export_of_a_trained_run(trained_coop, world, batch, tmp_path):
    out = tmp_path / "dassl"
    assert main(["export", str(trained_coop), "--format", "dassl", "--output", str(out)]) == 0
    model, header, _ = _run_method(trained_coop, None, "cpu")
    oc = load_official(out, "coop", world.clip, world.classnames, model.template)
    assert oc.fields["n_ctx"] == 4 and any("config.yaml" in n for n in oc.notes)
    with torch.no_grad():
        assert torch.equal(oc.method(batch), model(batch))
    assert (out / "prompt_learner" / f"model.pth.tar-{header['epoch']}").is_file()
