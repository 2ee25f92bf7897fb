"""Official checkpoints of every supported method: every tensor placed, the same logits as the
method holding those tensors, inferred settings, and one-line errors for the wrong files."""

import pytest
import torch

from vlprompt.interop.mapping import official_to_ours
from vlprompt.interop.official import layout_of, load_official, supported_methods
from vlprompt.interop.run import evaluate_official
from vlprompt.methods import get_method

from .official_files import (METHODS, NO_TOKENS, official_states, random_method, write_log,
                             write_official)


def test_every_method_with_an_official_repo_is_supported():
    assert set(METHODS) <= set(supported_methods())


@pytest.mark.parametrize("name", METHODS)
def test_every_tensor_is_placed_and_logits_match(name, world, batch, tmp_path):
    ref = random_method(name, world.clip, world.classnames)
    states = official_states(name, ref, world.clip)
    write_official(tmp_path / "out", states, method=name)
    mapped = official_to_ours(layout_of(get_method(name)), states)
    assert mapped.unplaced == []
    official = {n for m, s in states.items() for n in
                (f"{m}/{k}" if len(states) > 1 else k for k in s)}
    accounted = ({n.split("[")[0] for v in mapped.sources.values() for n in v}
                 | {n for _, n, _ in mapped.backbone} | set(mapped.dropped))
    assert official - accounted == {n for n in official if n.endswith(("token_prefix",
                                                                       "token_suffix"))}
    assert len(mapped.tokens) == (0 if name in NO_TOKENS else 2)
    oc = load_official(tmp_path / "out", name, world.clip, world.classnames, None,
                       dataset="eurosat")
    expected = {k for k in ref.trainable_state_dict()}
    assert set(oc.method.trainable_state_dict()) == expected
    with torch.no_grad():
        assert torch.equal(oc.method(batch), ref(batch))


@pytest.mark.parametrize("name", ["coop", "maple", "dpt", "mma", "tcp", "prograd", "hicropl"])
def test_eval_of_official_folder_equals_the_method(name, world, tmp_path):
    from vlprompt.data import ImageDataset, build_transform, load_split
    from vlprompt.engine.evaluate import evaluate_method

    ref = random_method(name, world.clip, world.classnames, template=world.template)
    write_official(tmp_path / "out", official_states(name, ref, world.clip), method=name)
    entry = evaluate_official(tmp_path / "out", name, "eurosat", world.data, world.clip_path,
                              device="cpu")
    split = load_split("eurosat", world.data)
    test = ImageDataset(split.test, build_transform(False, 32), dataset="eurosat")
    direct = evaluate_method(ref, test, split.classnames, device=torch.device("cpu"))
    assert entry["accuracy"] == direct["accuracy"] and entry["num_images"] == direct["num_images"]


def test_finds_latest_best_and_single_files(world, batch, tmp_path):
    old = random_method("coop", world.clip, world.classnames, seed=1)
    new = random_method("coop", world.clip, world.classnames, seed=2)
    out = tmp_path / "out"
    write_official(out, official_states("coop", old, world.clip), epoch=5)
    write_official(out, official_states("coop", new, world.clip), epoch=10)
    write_official(out, official_states("coop", old, world.clip), best=True)
    with torch.no_grad():
        for path, epoch, ref in [(out, "last", new), (out / "prompt_learner", "last", new),
                                 (out, 5, old), (out, "best", old),
                                 (out / "prompt_learner" / "model.pth.tar-10", "last", new)]:
            oc = load_official(path, "coop", world.clip, world.classnames, None, epoch=epoch)
            assert torch.equal(oc.method(batch), ref(batch)), (path, epoch)
    with pytest.raises(FileNotFoundError, match="model.pth.tar-7 does not exist"):
        load_official(out, "coop", world.clip, world.classnames, None, epoch=7)


def test_dpt_needs_its_three_registered_models(world, tmp_path):
    ref = random_method("dpt", world.clip, world.classnames)
    paths = write_official(tmp_path / "out", official_states("dpt", ref, world.clip))
    paths["image_encoder.transformer.extractor"].unlink()
    with pytest.raises(FileNotFoundError, match="extractor/model.pth.tar-5 is missing"):
        load_official(tmp_path / "out", "dpt", world.clip, world.classnames, None)


def test_settings_from_log_txt_and_config_yaml(world, batch, tmp_path):
    ref = random_method("coop", world.clip, world.classnames, n_ctx=4, ctx_init="a photo of a")
    out = tmp_path / "coop"
    write_official(out, official_states("coop", ref, world.clip))
    # CoOp's N_CTX says 16 but ctx_init sets 4 words: the tensor shape wins
    write_log(out, "CoOp", {"TRAINER": {"NAME": "CoOp", "COOP": {
        "N_CTX": 16, "CTX_INIT": "a photo of a", "CSC": False, "CLASS_TOKEN_POSITION": "end",
        "PREC": "fp16"}}, "DATASET": {"NAME": "EuroSAT", "NUM_SHOTS": 16},
        "MODEL": {"BACKBONE": {"NAME": "ViT-B/16"}}})
    oc = load_official(out, "coop", world.clip, world.classnames, None)
    assert oc.fields["ctx_init"] == "a photo of a" and oc.fields["n_ctx"] == 4
    assert any("from log.txt" in n for n in oc.notes)
    assert any("n_ctx=4 (config: 16)" in n for n in oc.notes)
    with torch.no_grad():
        assert torch.equal(oc.method(batch), ref(batch))
    # without the log ctx_init falls back to CoOp's default ("X X X X"): the same prompts,
    # since all 4 words are learned
    (out / "log.txt").unlink()
    oc = load_official(out, "coop", world.clip, world.classnames, None)
    assert oc.fields["ctx_init"] == "" and any("token_suffix matches" in n for n in oc.notes)
    with torch.no_grad():
        assert torch.equal(oc.method(batch), ref(batch))

    import yaml

    mref = random_method("maple", world.clip, world.classnames, ctx_init="a photo")
    mout = tmp_path / "maple"
    write_official(mout, official_states("maple", mref, world.clip))
    (mout / "config.yaml").write_text(yaml.safe_dump({"TRAINER": {"NAME": "MaPLe", "MAPLE": {
        "N_CTX": 2, "CTX_INIT": "a photo", "PROMPT_DEPTH": 9}}}))
    oc = load_official(mout, "maple", world.clip, world.classnames, None)
    assert oc.fields["ctx_init"] == "a photo" and oc.fields["depth"] == 3
    with torch.no_grad():
        assert torch.equal(oc.method(batch), mref(batch))
    # MaPLe learns 2 of the words: a wrong ctx_init changes the fixed tokens, and the file's
    # token_suffix tells
    oc = load_official(mout, "maple", world.clip, world.classnames, None,
                       overrides={"ctx_init": "a photo of a"})
    assert any("token_suffix differs" in n for n in oc.notes)


def test_wrong_trainer_in_log_is_refused(world, tmp_path):
    ref = random_method("maple", world.clip, world.classnames)
    out = tmp_path / "out"
    write_official(out, official_states("maple", ref, world.clip))
    write_log(out, "MaPLe", {"TRAINER": {"NAME": "MaPLe"}})
    with pytest.raises(ValueError, match="trained with trainer MaPLe, not COMMA.*--method maple"):
        load_official(out, "comma", world.clip, world.classnames, None)


@pytest.mark.parametrize("written, asked, match", [
    ("cocoop", "coop", r"holds tensors coop does not have \(meta_net.*expects keys ctx\)"
                       r": it is a cocoop checkpoint; use --method cocoop"),
    ("ivlp", "maple", r"no official maple checkpoint: expected .*MultiModalPromptLearner/"
                      r"model.pth.tar-<epoch>.*VLPromptLearner/ \(hicropl or ivlp or "
                      r"promptsrc\)"),
    ("comma", "maple", r"holds tensors maple does not have .*maple expects keys "
                       r"prompt_learner.ctx, .*it is a comma checkpoint"),
    ("maple", "coop", r"no official coop checkpoint: expected .*/prompt_learner/model.pth.tar"
                      r"-<epoch>.*MultiModalPromptLearner/ \(comma or coprompt or maple\)"),
    ("coop", "dpt", r"no official dpt checkpoint.*prompt_learner/"),
    # same key names as CoCoOp's meta-net: the shapes tell them apart
    ("tcp", "coop", r"holds tensors coop does not have \(meta_net.*: it is a tcp checkpoint; "
                    r"use --method tcp$"),
    ("cocoop", "tcp", r"meta_net.linear1.weight has shape .* but tcp on this backbone expects "
                      r".*; it looks like a cocoop checkpoint$"),
    ("tcp", "cocoop", r"has shape .* but cocoop .*; it looks like a tcp checkpoint$"),
    ("mma", "coop", r"no official coop checkpoint: .*adapter_learner/ \(mma\)"),
    # CoPrompt registers MaPLe's name for MaPLe's tensors plus adapters and a teacher CLIP
    ("coprompt", "maple", r"holds tensors maple does not have \(adapter_image.* it is a "
                          r"coprompt checkpoint; use --method coprompt$"),
    ("maple", "coprompt", r"not an official coprompt checkpoint: no adapter_image.fc.0.weight"
                          r".*; it looks like a maple checkpoint$"),
    # HiCroPL registers IVLP's name; its ctx is also cross_prompts_text.0
    ("hicropl", "ivlp", r"holds tensors ivlp does not have \(prompt_learner.cross_prompts_text"
                        r".*it is a hicropl checkpoint; use --method hicropl$"),
])
def test_checkpoint_of_another_method(world, tmp_path, written, asked, match):
    ref = random_method(written, world.clip, world.classnames)
    write_official(tmp_path / "out", official_states(written, ref, world.clip))
    with pytest.raises((ValueError, FileNotFoundError), match=match) as err:
        load_official(tmp_path / "out", asked, world.clip, world.classnames, None)
    assert str(tmp_path / "out") in str(err.value) and len(str(err.value).splitlines()) == 1


def test_wrong_shapes_and_wrong_backbone(world, tmp_path):
    ref = random_method("coop", world.clip, world.classnames)
    states = official_states("coop", ref, world.clip)
    states["prompt_learner"]["ctx"] = torch.randn(16, 512).half()  # a ViT-B/16 context
    write_official(tmp_path / "wide", states)
    with pytest.raises(ValueError, match=r"ctx has shape \(16, 512\), but coop on this backbone "
                                         r"expects \(16, 48\) \(expected keys: ctx\)") as err:
        load_official(tmp_path / "wide", "coop", world.clip, world.classnames, None)
    assert "model.pth.tar-5" in str(err.value)

    ref = random_method("ivlp", world.clip, world.classnames)
    states = official_states("ivlp", ref, world.clip)
    states["VLPromptLearner"]["image_encoder.conv1.weight"] += 1.0  # another CLIP
    write_official(tmp_path / "other", states)
    with pytest.raises(ValueError, match="image_encoder.conv1.weight differs from .*another "
                                         "backbone"):
        load_official(tmp_path / "other", "ivlp", world.clip, world.classnames, None,
                      backbone="tiny")


def test_dpt_auxiliary_classifiers_are_optional(world, batch, tmp_path):
    ref = random_method("dpt", world.clip, world.classnames)
    states = official_states("dpt", ref, world.clip)
    write_official(tmp_path / "out", states)
    oc = load_official(tmp_path / "out", "dpt", world.clip, world.classnames[5:], None)
    assert any("kept vlprompt's own aux_classifiers.0.weight" in n for n in oc.notes)
    assert oc.method.epoch == 5  # the guidance stage follows the saved epoch
    del states["image_encoder.transformer.extractor"]["classfiers.0.weight"]  # as load_model does
    write_official(tmp_path / "stripped", states)
    oc = load_official(tmp_path / "stripped", "dpt", world.clip, world.classnames, None)
    with torch.no_grad():  # the classifiers are training-only: the logits do not change
        assert torch.equal(oc.method(batch), ref(batch))


def test_mma_settings_from_log_are_one_based_and_slot_zero_is_reported(world, batch, tmp_path):
    ref = random_method("mma", world.clip, world.classnames, adapter_scale=0.01)
    out = tmp_path / "mma"
    states = official_states("mma", ref, world.clip)
    write_official(out, states, method="mma")
    write_log(out, "MultiModalAdapter", {"TRAINER": {"NAME": "MultiModalAdapter", "MMADAPTER": {
        "ADAPTER_START": 1, "ADAPTER_END": 3, "ADAPTER_DIM": 32, "ADAPTER_SCALE": 0.01,
        "TEXT_CTX_INIT": "a photo of a", "PREC": "amp"}}})
    oc = load_official(out, "mma", world.clip, world.classnames, None)
    assert (oc.fields["adapter_start"], oc.fields["adapter_end"]) == (0, 2)
    assert oc.fields["adapter_scale"] == 0.01 and oc.fields["adapter_dim"] == 32
    assert oc.fields["prompt_template"] == "a photo of a {}."
    assert not any("(config:" in n for n in oc.notes)  # the 1-based config agrees with shapes
    assert sorted(oc.mapped.dropped) == ["token_embedding", "tokenized_prompts"]
    with torch.no_grad():
        assert torch.equal(oc.method(batch), ref(batch))
    # the official slot 0 adapts the token embeddings, which vlprompt does not implement
    sd = states["adapter_learner"]
    sd["text_adapter.0.up.weight"] = sd["text_adapter.1.up.weight"].clone()
    mapped = official_to_ours(layout_of(get_method("mma")), states)
    assert mapped.unplaced == ["text_adapter.0.up.weight"]


def test_export_writes_mma_settings_one_based(world, tmp_path):
    import yaml

    from vlprompt.cli import main

    ref = random_method("mma", world.clip, world.classnames, template=world.template)
    write_official(tmp_path / "official", official_states("mma", ref, world.clip), method="mma")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "official"), "--method", "mma", "--dataset", "eurosat",
                 "--root", world.data, "--backbone", world.clip_path, "--output", str(run),
                 "--no-eval"]) == 0
    assert main(["export", str(run), "--format", "dassl", "--output", str(tmp_path / "d")]) == 0
    cfg = yaml.safe_load((tmp_path / "d" / "config.yaml").read_text())["TRAINER"]
    assert cfg["NAME"] == "MultiModalAdapter"
    assert {k: cfg["MMADAPTER"][k] for k in ("ADAPTER_START", "ADAPTER_END", "TEXT_CTX_INIT")} \
        == {"ADAPTER_START": 1, "ADAPTER_END": 3, "TEXT_CTX_INIT": "a photo of a"}


def test_clip_lora_has_no_official_format(world, tmp_path, capsys):
    from vlprompt.cli import main

    assert main(["import", str(tmp_path), "--method", "clip_lora", "--dataset", "eurosat",
                 "--root", world.data, "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "'clip_lora' has no supported official checkpoint format" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="no supported official checkpoint format"):
        load_official(tmp_path, "clip_lora", world.clip, world.classnames, None)


def test_prograd_settings_from_log(world, batch, tmp_path):
    ref = random_method("prograd", world.clip, world.classnames, prograd_lambda=0.8)
    out = tmp_path / "prograd"
    write_official(out, official_states("prograd", ref, world.clip), method="prograd")
    write_log(out, "ProGrad", {"TRAINER": {"NAME": "ProGrad", "COOP": {
        "N_CTX": 16, "CTX_INIT": True, "CSC": False, "CLASS_TOKEN_POSITION": "end",
        "PREC": "fp16"}}, "LOSS": {"NAME": "prograd", "LAMBDA": 0.8, "T": 1.0}})
    oc = load_official(out, "prograd", world.clip, world.classnames, None)
    assert oc.fields["ctx_from_template"] is True and oc.fields["prograd_lambda"] == 0.8
    assert any("token_suffix matches" in n for n in oc.notes)
    with torch.no_grad():
        assert torch.equal(oc.method(batch), ref(batch))


def test_hicropl_ctx_alias_must_agree(world, batch, tmp_path):
    ref = random_method("hicropl", world.clip, world.classnames)
    states = official_states("hicropl", ref, world.clip)
    sd = states["VLPromptLearner"]
    assert torch.equal(sd["prompt_learner.ctx"], sd["prompt_learner.cross_prompts_text.0"])
    assert sd["prompt_learner.text_proxy_token.0"].shape == (1, 48)  # one [1, D] per layer
    sd["prompt_learner.cross_prompts_text.0"] = sd["prompt_learner.ctx"] + 1
    write_official(tmp_path / "out", states)
    with pytest.raises(ValueError, match=r"model.pth.tar-5: prompt_learner.ctx, prompt_learner."
                                         r"cross_prompts_text.0 all map to text.ctx but differ"):
        load_official(tmp_path / "out", "hicropl", world.clip, world.classnames, None)


def test_mmrl_blocks_from_log_are_one_based(world, batch, tmp_path):
    """REP_LAYERS [2, 3] (1-based) are vlprompt's blocks [1, 2]; r2vproj.<j> is the j-th."""
    ref = random_method("mmrl", world.clip, world.classnames, rep_layers=[1, 2],
                        template=world.template)
    out = tmp_path / "mmrl"
    write_official(out, official_states("mmrl", ref, world.clip), method="mmrl")
    write_log(out, "MMRL", {"TRAINER": {"NAME": "MMRL", "MMRL": {
        "N_REP_TOKENS": 5, "REP_DIM": 512, "REP_LAYERS": [2, 3], "ALPHA": 0.7,
        "REG_WEIGHT": 6.0, "PREC": "amp"}}, "DATASET": {"NAME": "EuroSAT", "NUM_SHOTS": 16}})
    oc = load_official(out, "mmrl", world.clip, world.classnames, world.template,
                       dataset="eurosat")
    assert oc.fields["rep_layers"] == [1, 2] and oc.fields["reg_weight"] == 6.0
    assert oc.method.layers == [1, 2]
    with torch.no_grad():
        assert torch.equal(oc.method(batch), ref(batch))
    from vlprompt.interop.mapping import dassl_config
    written = dassl_config(layout_of(get_method("mmrl")), oc.fields)
    assert written["TRAINER.MMRL.REP_LAYERS"] == [2, 3]
