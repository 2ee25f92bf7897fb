"""Stanford Cars (196): ``stanford_cars/cars_train/*.jpg``, ``cars_test/*.jpg``; JSON paths are
relative to the dataset folder itself."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset


@register_dataset
class StanfordCars(JsonSplitDataset):
    name = "stanford_cars"
    aliases = ("StanfordCars", "cars")
    folder = "stanford_cars"
    image_dir = ""
    split_file = "split_zhou_StanfordCars.json"
    template = dataset_template("stanford_cars")
    num_classes = 196
    layout = ("stanford_cars/cars_train/*.jpg, stanford_cars/cars_test/*.jpg, "
              "stanford_cars/split_zhou_StanfordCars.json")

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        sub = "cars_test" if split == "test" else "cars_train"
        return f"{sub}/{serial + 1:05d}.jpg"
