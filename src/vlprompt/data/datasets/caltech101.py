"""Caltech-101 (100 classes, no background): ``caltech-101/101_ObjectCategories/<folder>/``."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset

#: class names CoOp renamed from their folder names
FOLDERS = {"airplane": "airplanes", "face": "Faces", "leopard": "Leopards",
           "motorbike": "Motorbikes"}


@register_dataset
class Caltech101(JsonSplitDataset):
    name = "caltech101"
    aliases = ("Caltech101",)
    folder = "caltech-101"
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    template = dataset_template("caltech101")
    num_classes = 100
    layout = ("caltech-101/101_ObjectCategories/<class>/image_*.jpg, "
              "caltech-101/split_zhou_Caltech101.json")

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        folder = FOLDERS.get(classname, classname)
        return f"{folder}/image_{serial + 1:04d}.jpg"
