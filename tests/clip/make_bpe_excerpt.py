"""Regenerate ``data/bpe_excerpt.json`` (not run by the tests).

Needs OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (it ships, e.g., inside the open_clip_torch wheel:
``pip download --no-deps open_clip_torch`` and unzip ``open_clip/bpe_simple_vocab_16e6.txt.gz``).

    python tests/clip/make_bpe_excerpt.py PATH/bpe_simple_vocab_16e6.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reference_bpe import words  # noqa: E402
from test_tokenizer import all_test_strings  # noqa: E402


def main(vocab_gz: str) -> None:
    lines = gzip.open(vocab_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    pieces = {w for text in all_test_strings() for w in words(text)}
    keep = []
    for rank, (a, b) in enumerate(merges):
        joined = (a + b).replace("</w>", "")
        if any(joined in w for w in pieces):
            keep.append([rank, a, b])
    out = Path(__file__).parent / "data" / "bpe_excerpt.json"
    out.write_text(json.dumps({"source": "bpe_simple_vocab_16e6.txt.gz", "merges": keep}))
    print(f"{len(keep)} of {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
