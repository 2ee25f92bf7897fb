"""Food-101: ``food-101/images/<class>/<id>.jpg``."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset


@register_dataset
class Food101(JsonSplitDataset):
    name = "food101"
    aliases = ("Food101",)
    folder = "food-101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    template = dataset_template("food101")
    num_classes = 101
    layout = "food-101/images/<class>/*.jpg, food-101/split_zhou_Food101.json"

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        return f"{classname}/{1000000 + serial}.jpg"
