"""The toy world: vlprompt's offline, self-contained stand-in for real CLIP weights and datasets.

Procedurally drawn objects with compositional attributes and captions (``world``), a tiny CLIP
pretrained on them by vlprompt's own code (``pretrain``), a base-to-new benchmark in the CoOp
dataset layout whose new classes are unseen colour × shape pairs (``benchmark``), and
``vlprompt demo``, which runs the whole pipeline in minutes on a CPU (``demo``).
"""

from .version import TOYWORLD_VERSION

__all__ = ["TOYWORLD_VERSION"]
