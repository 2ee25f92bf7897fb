"""Describable Textures (47 classes): ``dtd/images/<class>/<class>_<n>.jpg``."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset


@register_dataset
class DTD(JsonSplitDataset):
    name = "dtd"
    aliases = ("DescribableTextures",)
    folder = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    template = dataset_template("dtd")
    num_classes = 47
    layout = "dtd/images/<class>/*.jpg, dtd/split_zhou_DescribableTextures.json"
