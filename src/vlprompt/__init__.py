"""vlprompt: prompt learning for CLIP-style vision-language models, every method on one CLIP core."""

__version__ = "0.1.0"

from .clip.load import load_clip, save_clip  # noqa: E402
from .clip.tokenizer import tokenize  # noqa: E402


def build_method(name, clip, classnames, template=None, **config_overrides):
    """Build a registered prompt-learning method (see ``vlprompt.methods``)."""
    from .methods import build_method as _build

    return _build(name, clip, classnames, template=template, **config_overrides)


__all__ = ["__version__", "load_clip", "save_clip", "tokenize", "build_method"]
