"""FGVC-Aircraft 2013b (100 variants): the official ``images_variant_{train,val,test}.txt`` lists.

``fgvc_aircraft/`` is the renamed ``data/`` folder of the archive: ``images/<id>.jpg``,
``variants.txt`` (label = line index) and the three split lists (``<id> <variant name>``).
"""

from typing import Dict, List, Sequence

from ...clip.templates import dataset_template
from ..base import SPLITS, Dataset, DrawFn, atomic_write_text, register_dataset, save_image
from ..records import Record


@register_dataset
class FGVCAircraft(Dataset):
    name = "fgvc_aircraft"
    aliases = ("FGVCAircraft", "aircraft")
    folder = "fgvc_aircraft"
    template = dataset_template("fgvc_aircraft")
    num_classes = 100
    layout = ("fgvc_aircraft/images/*.jpg, fgvc_aircraft/variants.txt, "
              "fgvc_aircraft/images_variant_{train,val,test}.txt")

    def variants(self) -> List[str]:
        path = self.require_dir(self.dataset_dir / "variants.txt", "one variant name per line")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]

    def _read_list(self, split: str, label_of: Dict[str, int]) -> List[Record]:
        path = self.require_dir(self.dataset_dir / f"images_variant_{split}.txt")
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.strip().split(" ")
            if not parts[0]:
                continue
            classname = " ".join(parts[1:])
            if classname not in label_of:
                raise ValueError(f"{path}:{n}: variant {classname!r} is not in variants.txt")
            records.append(Record(str(self.dataset_dir / "images" / f"{parts[0]}.jpg"),
                                  label_of[classname], classname))
        return records

    def read(self) -> Dict[str, List[Record]]:
        self.require_dir(self.dataset_dir)
        names = self.variants()
        label_of = {c: i for i, c in enumerate(names)}
        return {split: self._read_list(split, label_of) for split in SPLITS}

    def classnames(self, parts: Dict[str, List[Record]]) -> List[str]:
        return self.variants()

    def write_synthetic(self, classnames: Sequence[str], counts: Dict[str, int],
                        draw: DrawFn) -> None:
        image_id = 1000000
        for split in SPLITS:
            lines = []
            for label, name in enumerate(classnames):
                for _ in range(counts.get(split, 0)):
                    save_image(draw(label, image_id), self.dataset_dir / "images" / f"{image_id}.jpg")
                    lines.append(f"{image_id} {name}")
                    image_id += 1
            atomic_write_text(self.dataset_dir / f"images_variant_{split}.txt", "\n".join(lines) + "\n")
        atomic_write_text(self.dataset_dir / "variants.txt", "\n".join(classnames) + "\n")
