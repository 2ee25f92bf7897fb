"""``train.precision: auto``: bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on the
others, ``$VLPROMPT_CPU_BF16`` deciding when set; GPUs keep bf16 (fp16 without it); ``fp32`` is
fp32 everywhere; a run records the precision it ran as."""

import pytest
import torch

from vlprompt.config import TrainConfig
from vlprompt.engine import evaluate as E
from vlprompt.engine import train_method
from vlprompt.methods.coop import CoOp

from test_engine_train import NAMES, tensor_data  # noqa: E402 (same folder)

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_on_cpu_follows_the_cpus_bf16_instructions(monkeypatch, native, expected):
    monkeypatch.delenv(E.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert E.cpu_has_native_bf16() is native
    assert E.autocast_dtype("auto", CPU) is expected
    assert E.autocast_dtype("fp32", CPU) is None  # exact reproduction on any machine
    assert E.autocast_dtype("bf16", CPU) is torch.bfloat16


def test_amx_alone_counts_as_native(monkeypatch):
    monkeypatch.delenv(E.CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert E.resolved_precision("auto", CPU) == "bf16"


@pytest.mark.parametrize("value, expected", [("1", "bf16"), ("0", "fp32")])
def test_the_environment_decides_when_set(monkeypatch, value, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: value == "0")
    monkeypatch.setenv(E.CPU_BF16_ENV, value)
    assert E.resolved_precision("auto", CPU) == expected


def test_a_run_records_the_precision_it_ran_as(world, monkeypatch):
    monkeypatch.setenv(E.CPU_BF16_ENV, "1")
    clip = world.clip
    torch.manual_seed(0)
    auto = train_method(CoOp(clip, NAMES, CoOp.Config(n_ctx=4)), tensor_data(),
                        TrainConfig(max_epoch=1, batch_size=4, num_workers=0),
                        show_progress=False)
    torch.manual_seed(0)
    exact = train_method(CoOp(clip, NAMES, CoOp.Config(n_ctx=4)), tensor_data(),
                         TrainConfig(max_epoch=1, batch_size=4, num_workers=0, precision="fp32"),
                         show_progress=False)
    assert auto["precision"] == "bf16" and exact["precision"] == "fp32"
    assert auto["loss_history"] != exact["loss_history"]  # bf16 really ran
def test_resuming_auto_on_a_machine_with_another_precision_warns(world, tmp_path, monkeypatch,
                                                                 caplog):
    class Killed(BaseException):
        pass

    def kill(epoch):
        raise Killed

    clip = world.clip
    config = TrainConfig(max_epoch=2, batch_size=4, num_workers=0, checkpoint_every_minutes=0)
    monkeypatch.setenv(E.CPU_BF16_ENV, "0")
    with pytest.raises(Killed):
        train_method(CoOp(clip, NAMES, CoOp.Config(n_ctx=4)), tensor_data(), config,
                     run_dir=tmp_path, show_progress=False, epoch_callback=kill)
    monkeypatch.setenv(E.CPU_BF16_ENV, "1")
    with caplog.at_level("WARNING"):
        result = train_method(CoOp(clip, NAMES, CoOp.Config(n_ctx=4)), tensor_data(), config,
                              run_dir=tmp_path, show_progress=False)
    assert result["precision"] == "bf16"
    assert "ran in fp32 and resumes in bf16" in caplog.text
    assert "train.precision=fp32 to continue" in caplog.text
