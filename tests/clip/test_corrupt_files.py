"""A damaged weights file, in any format, raises one ValueError that names the file, says what is
wrong with it and how to get a good copy — never a reader's traceback."""

import os

import pytest
import torch

from vlprompt import load_clip, save_clip
from vlprompt.clip.load import read_checkpoint


def _damage(path, how: str):
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(os.urandom(4096))
    else:  # truncated at 50%
        path.write_bytes(data[: len(data) // 2])
    return path


def _error(path) -> str:
    with pytest.raises(ValueError) as err:
        load_clip(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    with pytest.raises(ValueError) as again:
        read_checkpoint(path)
    assert str(again.value) == message
    return message


def _writers(clip, tmp_path):
    def torchscript(path):
        from vlprompt import tokenize

        traced = torch.jit.trace(clip, (torch.zeros(1, 3, 32, 32), tokenize(["a"])),
                                 check_trace=False)
        traced.save(str(path))
        return path

    def state_dict(path):
        torch.save(clip.state_dict(), path)
        return path

    return {"safetensors": lambda: save_clip(clip, tmp_path / "clip.safetensors"),
            "pt": lambda: state_dict(tmp_path / "clip.pt"),
            "pth": lambda: state_dict(tmp_path / "clip.pth"),
            "bin": lambda: state_dict(tmp_path / "pytorch_model.bin"),
            "torchscript": lambda: torchscript(tmp_path / "ViT-tiny.pt")}


@pytest.mark.parametrize("how", ["empty", "random", "truncated"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth", "bin", "torchscript"])
def test_damaged_file(tiny_clip, tmp_path, fmt, how):
    message = _error(_damage(_writers(tiny_clip, tmp_path)[fmt](), how))
    assert "cannot read CLIP weights" in message and "Re-download or re-copy it" in message
    expected = {"empty": "is empty (0 bytes)", "random": "not a",
                "truncated": "is truncated"}[how]
    assert expected in message, message


def test_truncated_safetensors_says_how_long_it_should_be(tiny_clip, tmp_path):
    path = save_clip(tiny_clip, tmp_path / "clip.safetensors")
    size = path.stat().st_size
    _damage(path, "truncated")
    assert f"its header describes at least {size}" in _error(path)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_hf_folder_with_damaged_weights(tmp_path, weights):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / weights).write_bytes(os.urandom(1000))
    with pytest.raises(ValueError) as err:
        load_clip(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / weights) in message
    assert "not a" in message and "Re-download or re-copy it" in message


def test_hf_folder_with_damaged_config(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"text_config": {')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON .* truncated or corrupt"):
        load_clip(folder)


def test_damaged_cached_backbone_says_delete_to_refetch(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path))
    path = _damage(save_clip(tiny_clip, tmp_path / "ViT-B-16.pt"), "truncated")
    with pytest.raises(ValueError) as err:
        load_clip("ViT-B/16", download=False)
    message = str(err.value)
    assert "\n" not in message and "is truncated" in message
    assert f"cached copy of ViT-B/16: delete {path}" in message
    assert "downloads it again when online" in message and "https://" in message


def test_pickle_without_tensors_is_not_called_corrupt(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list.pt: no tensor state dict found"):
        load_clip(tmp_path / "list.pt")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt does not exist"):
        read_checkpoint(tmp_path / "nothing.pt")


def test_keyboard_interrupt_is_not_swallowed(tiny_clip, tmp_path, monkeypatch):
    path = save_clip(tiny_clip, tmp_path / "clip.pt")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_clip(path)


def test_pickled_module_is_refused_with_the_fix(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(ValueError, match=r"module.pt: holds pickled Python objects "
                                         r"\(torch.nn.modules.linear.Linear\).*state_dict\(\)"):
        load_clip(tmp_path / "module.pt")
