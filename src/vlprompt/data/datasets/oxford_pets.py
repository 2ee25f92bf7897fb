"""Oxford-IIIT Pets (37 breeds): flat ``oxford_pets/images/<Breed>_<n>.jpg``."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset


@register_dataset
class OxfordPets(JsonSplitDataset):
    name = "oxford_pets"
    aliases = ("OxfordPets", "pets")
    folder = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    template = dataset_template("oxford_pets")
    num_classes = 37
    layout = "oxford_pets/images/*.jpg, oxford_pets/split_zhou_OxfordPets.json"

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        return f"{classname}_{serial + 1}.jpg"
