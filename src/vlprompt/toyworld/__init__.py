"""The toy world: vlprompt's offline, self-contained stand-in for real CLIP weights and datasets.

Procedurally drawn objects with compositional attributes and captions (``world``), a tiny CLIP
pretrained on them by vlprompt's own code (``pretrain``), a base-to-new benchmark in the CoOp
dataset layout whose new classes are unseen colour × shape pairs (``benchmark``), and
``vlprompt demo``, which runs the whole pipeline in minutes on a CPU (``demo``).
"""

from .benchmark import BenchmarkConfig, class_pairs, classnames, write_benchmark
from .demo import DemoConfig, run_demo
from .pretrain import PretrainConfig, cached_path, load_or_pretrain
from .version import TOYWORLD_VERSION

__all__ = ["TOYWORLD_VERSION", "BenchmarkConfig", "DemoConfig", "PretrainConfig", "cached_path",
           "class_pairs", "classnames", "load_or_pretrain", "run_demo",
           "write_benchmark"]
