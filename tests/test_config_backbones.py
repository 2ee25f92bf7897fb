"""Per-backbone blocks of config files (``backbones: {RN50: {method: ..., train: ...}}``): the
packaged CoOp RN50 few-shot setting, the merge order, and which backbone spec selects a block."""

from __future__ import annotations

import pytest

from vlprompt.config import (_read_yaml, backbone_config_name, protocol_config_file,
                             resolve_config)


@pytest.mark.parametrize("method", ["coop", "cocoop", "zeroshot"])
def test_rn50_setting_ships(method):
    data = _read_yaml(protocol_config_file(method, "fewshot"))
    assert "RN50" in data["backbones"]


def test_coop_rn50_is_coops_published_schedule():
    """rn50_ep50 (1 shot), rn50_ep100 (2/4 shots), rn50 (8/16 shots), ImageNet always 50."""
    epochs = {shots: resolve_config("coop", "fewshot", shots=shots, dataset="caltech101",
                                    backbone="RN50")["train"]["max_epoch"]
              for shots in (1, 2, 4, 8, 16)}
    assert epochs == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    imagenet = resolve_config("coop", "fewshot", shots=16, dataset="imagenet", backbone="RN50")
    assert imagenet["train"]["max_epoch"] == 50
    train = imagenet["train"]
    assert (train["lr"], train["batch_size"], train["eval_batch_size"]) == (0.002, 32, 100)
    cocoop = resolve_config("cocoop", "fewshot", shots=16, dataset="caltech101", backbone="RN50")
    assert cocoop["method"]["ctx_init"] == "a photo of a" and cocoop["train"]["batch_size"] == 1


def test_backbone_block_merge_order(tmp_path):
    """File sections, then the file's backbone block, then its dataset block; a user file after
    the packaged one; overrides last."""
    user = tmp_path / "user.yaml"
    user.write_text("train: {lr: 0.01}\n"
                    "backbones:\n  rn50: {train: {lr: 0.02, warmup_epoch: 3}}\n"
                    "datasets:\n  dtd: {train: {lr: 0.03}}\n")
    lr = lambda **kw: resolve_config("coop", "fewshot", user, **kw)["train"]  # noqa: E731
    assert lr(backbone=None)["lr"] == 0.01
    assert lr(backbone="RN50")["lr"] == 0.02 and lr(backbone="RN50")["warmup_epoch"] == 3
    assert lr(backbone="ViT-B/16")["lr"] == 0.01
    assert lr(backbone="RN50", dataset="dtd")["lr"] == 0.03
    assert resolve_config("coop", "fewshot", user, ["train.lr=0.5"],
                          backbone="RN50")["train"]["lr"] == 0.5


def test_bad_backbone_blocks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbones:\n  RN49: {train: {lr: 0.1}}\n")
    with pytest.raises(ValueError, match="backbones.RN49: not a known backbone"):
        _read_yaml(bad)
    bad.write_text("backbones:\n  RN50: {optim: {lr: 1}}\n")
    with pytest.raises(ValueError, match="backbones.RN50"):
        _read_yaml(bad)


def test_which_spec_selects_a_block(tmp_path):
    assert backbone_config_name("RN50") == "RN50"
    assert backbone_config_name("rn50") == "RN50"
    assert backbone_config_name("openai:RN50") == "RN50"
    assert backbone_config_name(tmp_path / "RN50.pt") == "RN50"  # a cached named file
    assert backbone_config_name(tmp_path / "my_resnet.pt") is None
    assert backbone_config_name("open_clip:ViT-H-14") is None

    class Loaded:
        backbone_name = "RN50"

    assert backbone_config_name(None, Loaded()) == "RN50"
