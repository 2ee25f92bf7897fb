"""UCF101 middle frames: ``ucf101/UCF-101-midframes/<Action_Name>/v_<Action>_gXX_cYY.jpg``."""

from ...clip.templates import dataset_template
from ..base import JsonSplitDataset, register_dataset


@register_dataset
class UCF101(JsonSplitDataset):
    name = "ucf101"
    aliases = ("UCF101",)
    folder = "ucf101"
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    template = dataset_template("ucf101")
    num_classes = 101
    layout = "ucf101/UCF-101-midframes/<Action_Name>/*.jpg, ucf101/split_zhou_UCF101.json"

    def synthetic_relpath(self, classname: str, label: int, split: str, serial: int) -> str:
        action = classname.replace("_", "")
        return f"{classname}/v_{action}_g{serial // 7 + 1:02d}_c{serial % 7 + 1:02d}.jpg"
