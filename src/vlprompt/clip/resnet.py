"""The ResNet image tower of CLIP (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision", §2.4): a ResNet-D-style network with three changes to
torchvision's ResNet, as the paper and OpenAI's released RN50/RN101/RN50x4/x16/x64 describe:

- a stem of three 3x3 convolutions (the first with stride 2) followed by a 2x2 average pool, in
  place of the single 7x7 convolution and max pool;
- anti-aliased downsampling: a stride-s stage does an s x s average pool before its 1x1
  expansion convolution and before the 1x1 convolution of its shortcut, every convolution
  having stride 1;
- attention pooling in place of global average pooling: the mean of the final feature grid is
  a query token that attends (multi-head, one layer, learned positional embedding over the mean
  token and the grid) to itself and the grid; its output projection gives the image feature.

Parameter names follow OpenAI's state-dict layout (``visual.conv1.weight``, ``visual.bn1.*``,
``visual.layer1.0.conv1.weight``, ``visual.layer1.0.downsample.0/1.*``,
``visual.attnpool.{positional_embedding, q_proj, k_proj, v_proj, c_proj}``) so OpenAI and
open_clip RN checkpoints load without renaming. Written from the published structure.

The CLIP is frozen, so batch normalisation always uses its running statistics
(``FrozenBatchNorm2d``: eval semantics in every mode, no ``num_batches_tracked`` counter).
A ResNet has no tokens: it takes no prompts, hooks or attention deltas, and says so through
``capabilities`` (empty) rather than by family (DESIGN.md, "Backbone families").
"""

from __future__ import annotations

import functools
import inspect
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Bottleneck expansion: a stage of ``planes`` outputs ``4 * planes`` channels
EXPANSION = 4


@functools.lru_cache(maxsize=1)
def _token_arguments() -> frozenset:
    """The keyword arguments of ``VisionTransformer.forward`` beyond the images (all of them act
    on tokens, so none applies to a ResNet)."""
    from .model import VisionTransformer  # model.py imports this module

    params = inspect.signature(VisionTransformer.forward).parameters
    return frozenset(n for n, p in params.items()
                     if n not in ("self", "images") and p.kind is not p.VAR_KEYWORD)


class FrozenBatchNorm2d(nn.Module):
    """Batch normalisation with fixed statistics: ``(x - mean) / sqrt(var + eps) * weight + bias``
    per channel, whatever the module's mode. Same parameter and buffer names as
    ``nn.BatchNorm2d`` (``weight``, ``bias``, ``running_mean``, ``running_var``); a checkpoint's
    ``num_batches_tracked`` is not needed (``load.py`` drops it)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> (s x s average pool) -> 1x1 expand, plus a shortcut that is the input,
    or (s x s average pool) -> 1x1 conv -> BN when the stride or the channel count changes.
    [B, inplanes, H, W] -> [B, 4 * planes, H / s, W / s]."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.conv1 = _conv(inplanes, planes, 1)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * EXPANSION, 1)
        self.bn3 = FrozenBatchNorm2d(planes * EXPANSION)
        self.downsample = None
        if stride > 1 or inplanes != planes * EXPANSION:
            # indices 0 and 1 as in OpenAI's layout; its pool (no parameters) runs in forward
            self.downsample = nn.Sequential(_conv(inplanes, planes * EXPANSION, 1),
                                            FrozenBatchNorm2d(planes * EXPANSION))

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.stride) if self.stride > 1 else x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self._pool(out)))
        shortcut = x if self.downsample is None else self.downsample(self._pool(x))
        return F.relu(out + shortcut)


class AttentionPool2d(nn.Module):
    """One multi-head attention layer whose single query is the mean of the feature grid.

    Tokens: [mean, grid positions...] + ``positional_embedding`` [1 + g*g, C]; the query is the
    first of them, keys and values all of them; ``c_proj`` maps the attended value to
    ``output_dim``. [B, C, g, g] -> [B, output_dim]."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention pool width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width ** 0.5)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, 1 + g*g, C]
        x = x + self.positional_embedding.to(x.dtype)
        B, _, C = x.shape
        d = C // self.heads

        def heads(t: Tensor) -> Tensor:  # [B, T', C] -> [B, H, T', d]
            return t.view(B, t.shape[1], self.heads, d).transpose(1, 2)

        q = heads(self.q_proj(x[:, :1]))  # [B, H, 1, d]
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))  # [B, H, T, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, d]
        return self.c_proj(out.transpose(1, 2).reshape(B, C))  # [B, output_dim]


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: images [B, 3, S, S] -> features [B, E] (S divisible by 32).

    ``stage_layers`` are the Bottleneck counts of the four stages (RN50: 3, 4, 6, 3); ``width``
    the stem's output channels (64 for RN50/RN101, 80/96/128 for RN50x4/x16/x64); stage i has
    ``width * 2**i`` planes, so the attention pool sees ``32 * width`` channels on an S/32 grid
    with ``heads`` heads (OpenAI: ``32 * width // 64``)."""

    #: what the tower's forward supports beyond plain images (see ``CLIP.capabilities``)
    capabilities: frozenset = frozenset()

    def __init__(self, stage_layers: Sequence[int], output_dim: int, heads: int,
                 image_size: int = 224, width: int = 64):
        super().__init__()
        if len(stage_layers) != 4 or min(stage_layers) < 1:
            raise ValueError(f"a CLIP ResNet has four stages of >= 1 blocks, got "
                             f"{list(stage_layers)}")
        if image_size % 32:
            raise ValueError(f"a CLIP ResNet needs an image size divisible by 32, got {image_size}")
        self.image_size = image_size
        self.width = width
        self.output_dim = output_dim
        self.stage_layers = tuple(int(n) for n in stage_layers)
        half = width // 2
        self.conv1 = _conv(3, half, 3, stride=2)
        self.bn1 = FrozenBatchNorm2d(half)
        self.conv2 = _conv(half, half, 3)
        self.bn2 = FrozenBatchNorm2d(half)
        self.conv3 = _conv(half, width, 3)
        self.bn3 = FrozenBatchNorm2d(width)
        inplanes = width
        for i, blocks in enumerate(self.stage_layers):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * EXPANSION
            stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, images: Tensor) -> Tensor:
        """[B, 3, S, S] -> [B, width, S/4, S/4]."""
        x = F.relu(self.bn1(self.conv1(images.to(self.conv1.weight.dtype))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return F.avg_pool2d(x, 2)

    def forward(self, images: Tensor, **token_kwargs) -> Tensor:
        """Encode images [B, 3, S, S] -> features [B, E] (unnormalised).

        Accepts ``VisionTransformer.forward``'s keyword arguments so callers need not branch,
        but a ResNet has no tokens: any of them given (not None / False / empty) raises
        ``ValueError``."""
        unknown = sorted(set(token_kwargs) - _token_arguments())
        if unknown:
            raise TypeError(f"ModifiedResNet.forward got unexpected arguments {unknown}")
        used = [k for k, v in token_kwargs.items()
                if v is not None and v is not False and not (isinstance(v, Mapping) and not v)]
        if used:
            raise ValueError(f"the ResNet image tower has no tokens and cannot take "
                             f"{', '.join(used)}; prompting the image tower needs a ViT backbone")
        x = self.stem(images)
        for stage in self.stages:
            x = stage(x)
        return self.attnpool(x)

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation: attention-pool projections ~ N(0, C^-1/2), and each block's
        last BN scale zero, so every residual block starts as the identity."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj,
                     self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)
