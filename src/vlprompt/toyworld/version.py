"""Version of the toy world's drawing, captions and pretraining recipe.

Bump it whenever a change alters the drawn images, the captions or the training procedure: it is
part of the cache key of the pretrained tiny CLIP, so stale weights are never reused.
"""

TOYWORLD_VERSION = "1"
