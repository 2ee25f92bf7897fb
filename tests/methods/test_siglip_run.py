"""A Hugging Face SigLIP folder through the engine: CoOp trains and evaluates on the synthetic
EuroSAT with the folder's own tokenizer, and MaPLe-style deep prompts run; MMRL (which inserts
after the CLS token) refuses in one line."""

from __future__ import annotations

import pytest
import torch

from vlprompt.clip.load import load_clip
from vlprompt.clip.tokenizer import SentencePieceTokenizer
from vlprompt.engine import evaluate_run, run_experiment

from ..siglip_tiny import train_spiece

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

FAST = ["max_epoch=1", "batch_size=8", "num_workers=0", "print_freq=100"]


@pytest.fixture(scope="module")
def siglip_world(tmp_path_factory):
    from vlprompt.data.synthetic import write_dataset

    root = tmp_path_factory.mktemp("siglip_world")
    folder = root / "siglip"
    folder.mkdir()
    train_spiece(folder / "spiece.model")
    vocab = SentencePieceTokenizer(folder / "spiece.model").vocab_size
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8))
    transformers.SiglipModel(config).save_pretrained(folder)
    data = root / "data"
    write_dataset(data, "eurosat", images_per_class=12, image_size=32, seed=0)
    return root, folder, data


@pytest.mark.parametrize("method", ["coop", "maple"])
def test_siglip_folder_trains_and_evaluates(siglip_world, method):
    root, folder, data = siglip_world
    run_dir = root / f"run_{method}"
    result = run_experiment(method, "eurosat", data, folder, run_dir, shots=2, seed=1,
                            subsample="base", protocol="fewshot", overrides=FAST,
                            show_progress=False)
    assert result is not None
    # evaluated from the checkpoint alone: the backbone folder is loaded again, tokenizer too
    entry = evaluate_run(run_dir, "eurosat", data, subsample="new")
    assert entry["subsample"] == "new" and 0 <= entry["accuracy"] <= 100


def test_siglip_refuses_mmrl_in_one_line(siglip_world):
    from vlprompt.methods import build_method

    _, folder, _ = siglip_world
    with pytest.raises(ValueError) as err:
        build_method("mmrl", load_clip(folder), ["a", "b"])
    assert "\n" not in str(err.value) and str(err.value).startswith("mmrl ")
    assert "SigLIP" in str(err.value)
