"""``vlprompt predict`` zero-shot: top-k lines per image, clear errors for bad input."""

import pytest

from vlprompt import save_clip
from vlprompt.cli import main
from vlprompt.data.synthetic import write_dataset


@pytest.fixture
def images(tmp_path):
    folder = write_dataset(tmp_path / "data", "eurosat", num_classes=2, images_per_class=3)
    return sorted(str(p) for p in folder.rglob("*.jpg"))[:2]


def test_predict_prints_topk(tiny_clip, tmp_path, images, capsys):
    weights = save_clip(tiny_clip, tmp_path / "tiny.safetensors")
    assert main(["predict", "--backbone", str(weights), "--classes", "cat,dog,car",
                 "--topk", "2", *images]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == images[0] and lines[3] == images[1]
    probs = [float(line.split("%")[0]) for line in lines[1:3]]
    assert probs[0] >= probs[1] > 0 and all(line.split("%")[1].strip() in {"cat", "dog", "car"}
                                             for line in lines[1:3])


def test_predict_errors(tiny_clip, tmp_path, images, capsys):
    weights = str(save_clip(tiny_clip, tmp_path / "tiny.safetensors"))
    assert main(["predict", "--backbone", weights, "--classes", "cat,dog", "missing.jpg"]) == 1
    assert "missing.jpg" in capsys.readouterr().err
    assert main(["predict", "--backbone", weights, "--classes", "cat", images[0]]) == 1
    assert "at least two" in capsys.readouterr().err
    assert main(["predict", "--backbone", weights, "--classes", "a,b", "--template", "x", images[0]]) == 1
    assert "{}" in capsys.readouterr().err
    page = tmp_path / "page.jpg"
    page.write_text("<html>not an image</html>")
    assert main(["predict", "--backbone", weights, "--classes", "cat,dog", str(page)]) == 1
    assert f"{page}: cannot decode image (not an image file" in capsys.readouterr().err
