"""The toy world benchmark (``vlprompt.toyworld``): colour × shape classes, base and new classes
disjoint attribute combinations. Written by ``vlprompt demo`` / ``toyworld.write_benchmark`` as
``toyworld/images/<class>/<n>.png`` plus ``toyworld/split_toyworld.json``."""

from ..base import JsonSplitDataset, register_dataset


@register_dataset
class ToyWorld(JsonSplitDataset):
    name = "toyworld"
    folder = "toyworld"
    image_dir = "images"
    split_file = "split_toyworld.json"
    template = "a photo of a {}."
    num_classes = 32
    layout = "toyworld/images/<class>/*.png, toyworld/split_toyworld.json (vlprompt demo writes it)"
