"""SUN397: ``sun397/SUN397/<letter>/<category>[/<sub>]/sun_*.jpg``.

CoOp's class name is the path after the letter with its components reversed and joined by
spaces (``/a/apartment_building/outdoor`` -> ``outdoor apartment_building``).
"""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset


@register_dataset
class SUN397(JsonSplitDataset):
    name = "sun397"
    aliases = ("SUN397",)
    folder = "sun397"
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    template = dataset_template("sun397")
    num_classes = 397
    layout = "sun397/SUN397/<letter>/<category>/*.jpg, sun397/split_zhou_SUN397.json"

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        category = "/".join(reversed(classname.split(" ")))
        return f"{category[0]}/{category}/sun_{serial:08d}.jpg"
