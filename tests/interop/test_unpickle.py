"""Official checkpoints are read without running arbitrary pickles."""

import os

import pytest
import torch

from vlprompt.interop.unpickle import OfficialObject, read_official_file, state_dict_of

from .official_files import write_official


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dassl_checkpoint_with_optimizer_and_scheduler_objects(tmp_path):
    states = {"prompt_learner": {"ctx": torch.randn(4, 8).half()}}
    path = write_official(tmp_path, states, epoch=7)["prompt_learner"]
    with pytest.raises(Exception):  # the scheduler's successor is a pickled torch object
        torch.load(path, weights_only=True)
    data = read_official_file(path)
    assert data["epoch"] == 7 and data["val_result"] is None
    assert torch.equal(state_dict_of(data, path)["ctx"], states["prompt_learner"]["ctx"])
    successor = data["scheduler"]["successor"]
    assert isinstance(successor, OfficialObject)  # an inert record, no torch.optim code ran
    assert successor.qualname == "torch.optim.lr_scheduler.CosineAnnealingLR"
    assert successor.state["optimizer"].qualname == "torch.optim.sgd.SGD"
    assert "momentum_buffer" in data["optimizer"]["state"][0]


def test_foreign_callable_is_refused_by_name_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pth.tar-5"
    torch.save({"state_dict": {"ctx": torch.zeros(2, 2)}, "epoch": 5, "x": _Evil(marker)}, path)
    with pytest.raises(ValueError) as err:
        read_official_file(path)
    message = str(err.value)
    assert str(path) in message and "system" in message and "refusing" in message
    assert len(message.splitlines()) == 1
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "model.pth.tar-1"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_official_file(junk)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        read_official_file(tmp_path / "list.pth")
    torch.save({"model": {}}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="no 'state_dict'"):
        state_dict_of(read_official_file(tmp_path / "nostate.pth"), tmp_path / "nostate.pth")
