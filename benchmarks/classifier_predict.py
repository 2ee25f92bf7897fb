"""``vlprompt predict`` with a run folder vs with its exported classifier head (issue 12).

A ViT-B/16-shaped CLIP with random weights (the same compute as the real one), a CoOp run with
random context for EuroSAT's 10 and Caltech101's 101 class names, its ``export --format
classifier`` head, and synthetic 224 px images. Times predict after the backbone is loaded (the
part the head saves: building the method and the text tower on C prompts), min of 7
(interleaved), and checks
that both give the same top-5.

    OMP_NUM_THREADS=2 python benchmarks/classifier_predict.py --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch

from vlprompt.clip.load import load_clip, save_clip
from vlprompt.clip.model import CLIPConfig, build_clip
from vlprompt.data.base import packaged_classnames
from vlprompt.data.synthetic import write_dataset
from vlprompt.engine.checkpoint import make_header, save_checkpoint
from vlprompt.engine.run import predict_with_checkpoint
from vlprompt.interop.export import export_classifier, predict_with_classifier
from vlprompt.methods import build_method

VIT_B16 = CLIPConfig(embed_dim=512, image_size=224, patch_size=16, vision_width=768,
                     vision_layers=12, vision_heads=12, text_width=512, text_layers=12,
                     text_heads=8)


def setup(work: Path) -> tuple[Path, list[str]]:
    work.mkdir(parents=True, exist_ok=True)
    backbone = work / "vitb16_random.safetensors"
    if not backbone.exists():
        torch.manual_seed(0)
        save_clip(build_clip(VIT_B16).eval(), backbone)
    clip = load_clip(backbone)
    for ds in ("eurosat", "caltech101"):
        method = build_method("coop", clip, packaged_classnames(ds))
        with torch.no_grad():
            method.ctx.normal_(0, 0.3)
        save_checkpoint(work / f"run_{ds}", method, make_header(method, str(backbone), 1))
        export_classifier(work / f"run_{ds}", work / f"head_{ds}.safetensors")
    write_dataset(work / "data", "eurosat", images_per_class=3, image_size=224)
    return backbone, sorted(str(p) for p in (work / "data").rglob("*.jpg"))[:8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench-classifier")
    work = Path(parser.parse_args().workdir)
    backbone, images = setup(work)
    clip = load_clip(backbone)
    for ds in ("eurosat", "caltech101"):
        for n in (1, 8):
            run = partial(predict_with_checkpoint, work / f"run_{ds}", images[:n], clip=clip,
                          device="cpu")
            head = partial(predict_with_classifier, work / f"head_{ds}.safetensors", images[:n],
                           None, clip=clip)
            best, tops = {"run": float("inf"), "classifier": float("inf")}, {}
            for _ in range(7):  # interleaved, so that load from other processes hits both
                for label, fn in (("run", run), ("classifier", head)):
                    start = time.perf_counter()
                    out = fn()
                    best[label] = min(best[label], time.perf_counter() - start)
                    tops[label] = [[c for c, _ in row] for row in out]
            assert tops["run"] == tops["classifier"], "top-5 differ"
            print(f"{ds} ({len(packaged_classnames(ds))} classes), {n} image(s): run folder "
                  f"{best['run']:.3f} s, classifier {best['classifier']:.3f} s, "
                  f"speed-up {best['run'] / best['classifier']:.2f}x, same top-5")


if __name__ == "__main__":
    main()
