"""EuroSAT (Sentinel-2 land use, 10 classes): ``eurosat/2750/<Folder>/<Folder>_<n>.jpg``."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset

#: the original folder name of each class as CoOp renamed it in split_zhou_EuroSAT.json
FOLDERS = {
    "Annual Crop Land": "AnnualCrop", "Forest": "Forest",
    "Herbaceous Vegetation Land": "HerbaceousVegetation", "Highway or Road": "Highway",
    "Industrial Buildings": "Industrial", "Pasture Land": "Pasture",
    "Permanent Crop Land": "PermanentCrop", "Residential Buildings": "Residential",
    "River": "River", "Sea or Lake": "SeaLake",
}


@register_dataset
class EuroSAT(JsonSplitDataset):
    name = "eurosat"
    aliases = ("EuroSAT",)
    folder = "eurosat"
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    template = dataset_template("eurosat")
    num_classes = 10
    layout = "eurosat/2750/<class folder>/*.jpg, eurosat/split_zhou_EuroSAT.json"

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        folder = FOLDERS.get(classname, classname.replace(" ", ""))
        return f"{folder}/{folder}_{serial + 1}.jpg"
