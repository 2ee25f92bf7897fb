"""Oxford Flowers 102: flat ``oxford_flowers/jpg/image_<nnnnn>.jpg``."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset


@register_dataset
class OxfordFlowers(JsonSplitDataset):
    name = "oxford_flowers"
    aliases = ("OxfordFlowers", "flowers102")
    folder = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    template = dataset_template("oxford_flowers")
    num_classes = 102
    layout = "oxford_flowers/jpg/image_*.jpg, oxford_flowers/split_zhou_OxfordFlowers.json"

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        return f"image_{serial + 1:05d}.jpg"
