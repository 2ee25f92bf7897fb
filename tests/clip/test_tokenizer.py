"""``vlprompt.tokenize`` equals OpenAI's BPE ids on the class names of the benchmark datasets."""

from importlib import resources

import pytest
import torch

from vlprompt import tokenize
from vlprompt.clip.templates import CUSTOM_TEMPLATES, IMAGENET_TEMPLATES

try:  # imported by name when regenerating the excerpt, from the package when under pytest
    from . import reference_bpe
except ImportError:  # pragma: no cover
    import reference_bpe

# Names that stress the tokenizer (hyphens, digits, apostrophes, accents, slashes, case)
TRICKY = ["747-400", "F-16A/B", "Boeing 737-800", "2012 Tesla Model S", "Jack-o'-lantern",
          "yellow lady's slipper", "crème brûlée", "Café", "pho", "Beijing", "AnnualCrop",
          "Yorkshire_Terrier", "Apply_Eye_Makeup", "outdoor apartment_building", "Highway or Road",
          "CRT screen", "T-shirt", "dough­nut", "São Paulo", "naïve", "x" * 3]


def dataset_classnames() -> list[str]:
    names = []
    folder = resources.files("vlprompt.data") / "classnames"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".txt"):
            for line in entry.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    parts = line.strip().split(" ", 1)
                    # ImageNet-style "wnid name" lines; other lists hold one name per line
                    names.append(parts[1] if parts[0][:1] == "n" and parts[0][1:].isdigit() else line.strip())
    return names


def all_test_strings() -> list[str]:
    names = [n.replace("_", " ") for n in dataset_classnames() + TRICKY]
    return names + [t.format(n) for t in list(CUSTOM_TEMPLATES.values())[:3] for n in names[:50]] \
        + [t.format("dog") for t in IMAGENET_TEMPLATES]


CLASS_COUNTS = {"imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196,
                "oxford_flowers": 102, "food101": 101, "fgvc_aircraft": 100, "sun397": 397,
                "dtd": 47, "eurosat": 10, "ucf101": 101}


def test_class_names_cover_several_datasets():
    folder = resources.files("vlprompt.data") / "classnames"
    for name, count in CLASS_COUNTS.items():
        lines = [l for l in (folder / f"{name}.txt").read_text(encoding="utf-8").splitlines() if l.strip()]
        assert len(lines) == count == len(set(lines)), name
    names = dataset_classnames()
    assert "Annual Crop Land" in names and "tench" in names and "2012 Tesla Model S Sedan" in names
    assert len(names) >= sum(CLASS_COUNTS.values())


def test_known_ids():
    assert tokenize("a photo of a cat.")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]


@pytest.mark.parametrize("chunk", range(4))
def test_matches_reference_bpe(chunk):
    strings = all_test_strings()
    strings = strings[chunk::4]
    got = tokenize(strings)
    mismatches = []
    for text, row in zip(strings, got):
        ids = reference_bpe.encode(text)[:75]
        want = [reference_bpe.SOT, *ids, reference_bpe.EOT]
        want += [0] * (77 - len(want))
        if row.tolist() != want:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} strings differ, e.g. {mismatches[:5]}"


def test_truncation_keeps_eot_and_warns(caplog):
    tokens = tokenize(["word " * 100])
    assert tokens.shape == (1, 77) and tokens[0, -1] == 49407 and tokens[0, 0] == 49406
    assert "truncated" in caplog.text


def test_underscore_replaced_by_space_in_prompts():
    from vlprompt.clip.zeroshot import hand_crafted_text_features  # noqa: F401 (uses the rule)

    assert torch.equal(tokenize("Apply Eye Makeup"), tokenize("Apply_Eye_Makeup".replace("_", " ")))
