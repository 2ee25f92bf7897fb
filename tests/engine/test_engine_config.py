"""resolve_config: defaults -> packaged protocol YAML -> user YAML -> key=value overrides."""

import pytest

from vlprompt.config import TrainConfig, resolve_config


def test_merge_order(tmp_path):
    defaults = resolve_config("coop")
    assert defaults["method"] == {"n_ctx": 16, "ctx_init": "", "class_token_position": "end", "csc": False}
    assert defaults["train"]["lr"] == 0.002 and defaults["train"]["warmup_lr"] == 1e-5
    b2n = resolve_config("coop", "base2new")
    assert b2n["method"]["n_ctx"] == 4 and b2n["method"]["ctx_init"] == "a photo of a"
    assert b2n["train"]["max_epoch"] == 200
    user = tmp_path / "my.yaml"
    user.write_text("method:\n  n_ctx: 8\ntrain:\n  lr: 0.01\n  batch_size: 16\n")
    cfg = resolve_config("coop", "base2new", user, ["train.lr=0.02", "method.csc=true", "warmup_epoch=0"])
    assert cfg["method"]["n_ctx"] == 8 and cfg["method"]["csc"] is True
    assert cfg["method"]["ctx_init"] == "a photo of a"
    assert cfg["train"]["lr"] == 0.02 and cfg["train"]["batch_size"] == 16
    assert cfg["train"]["warmup_epoch"] == 0


def test_epochs_by_shots_and_dataset():
    assert [resolve_config("coop", "fewshot", shots=k)["train"]["max_epoch"]
            for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert resolve_config("coop", "fewshot", shots=16, dataset="imagenet")["train"]["max_epoch"] == 50
    assert resolve_config("coop", "base2new", shots=16, dataset="imagenet")["train"]["max_epoch"] == 50
    # an explicit max_epoch wins
    assert resolve_config("coop", "fewshot", overrides=["max_epoch=3"], shots=1)["train"]["max_epoch"] == 3


def test_errors_name_the_valid_fields(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field 'nctx'.*method: n_ctx.*train: max_epoch"):
        resolve_config("coop", overrides=["nctx=4"])
    with pytest.raises(ValueError, match=r"unknown train field 'lrr'.*valid train fields: max_epoch, lr"):
        resolve_config("coop", overrides=["train.lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        resolve_config("coop", overrides=["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1\n")
    with pytest.raises(ValueError, match="unknown section.*optim"):
        resolve_config("coop", config_file=bad)
    bad.write_text("method:\n  templates: single\n")
    with pytest.raises(ValueError, match="unknown method field 'templates'.*n_ctx"):
        resolve_config("coop", config_file=bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        resolve_config("coop", config_file=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="precision"):
        resolve_config("coop", overrides=["precision=fp8"])
    with pytest.raises(ValueError, match="class_token_position"):
        resolve_config("coop", overrides=["class_token_position=left"])
    with pytest.raises(KeyError, match="unknown method"):
        resolve_config("cooop")


def test_values_are_parsed_as_yaml():
    cfg = resolve_config("coop", overrides=["ctx_init=a photo of a", "lr=1e-3", "csc=yes"])
    assert cfg["method"]["ctx_init"] == "a photo of a" and cfg["method"]["csc"] is True
    assert cfg["train"]["lr"] == 1e-3
    assert TrainConfig(**cfg["train"]).lr == 1e-3
    assert resolve_config("zeroshot", "xd")["method"] == {"templates": "single"}


def test_values_get_the_field_types():
    cfg = resolve_config("coop", overrides=["ctx_init=1", "max_epoch=5.0", "warmup_lr=2"])
    assert cfg["method"]["ctx_init"] == "1" and cfg["train"]["max_epoch"] == 5
    assert isinstance(cfg["train"]["warmup_lr"], float)
    with pytest.raises(ValueError, match="train.lr must be a number"):
        resolve_config("coop", overrides=["lr=fast"])
    with pytest.raises(ValueError, match="method.csc must be true or false"):
        resolve_config("coop", overrides=["csc=maybe"])
    with pytest.raises(ValueError, match="train.max_epoch must be an integer"):
        resolve_config("coop", overrides=["max_epoch=2.5"])


def test_per_dataset_blocks_in_config_files(tmp_path):
    from vlprompt.config import resolve_config

    # packaged: PromptSRC few-shot GPA differs per dataset (METHODS.md §6.7)
    cars = resolve_config("promptsrc", "fewshot", dataset="stanford_cars")["method"]
    pets = resolve_config("promptsrc", "fewshot", dataset="oxford_pets")["method"]
    assert (cars["gpa_mean"], cars["gpa_std"]) == (45.0, 5.0)
    assert (pets["gpa_mean"], pets["gpa_std"]) == (30.0, 30.0)
    # user file: its per-dataset block applies, and a command-line override still wins
    user = tmp_path / "my.yaml"
    user.write_text("train: {lr: 0.01}\ndatasets:\n  dtd: {train: {lr: 0.02}}\n")
    assert resolve_config("coop", config_file=user, dataset="dtd")["train"]["lr"] == 0.02
    assert resolve_config("coop", config_file=user, dataset="eurosat")["train"]["lr"] == 0.01
    assert resolve_config("coop", config_file=user, dataset="dtd",
                          overrides=["train.lr=0.03"])["train"]["lr"] == 0.03
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  dtd: {optim: {lr: 1}}\n")
    with pytest.raises(ValueError, match="datasets.dtd"):
        resolve_config("coop", config_file=bad, dataset="dtd")
