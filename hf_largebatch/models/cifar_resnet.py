"""The CIFAR ResNets of He et al. 2016 (section 4.2) as a Hugging Face ``PreTrainedModel``.

Why not ``transformers.ResNetForImageClassification``: its stem is ImageNet's (7x7 convolution with stride 2, then
a max-pool), fixed in code, so a 32x32 image is 8x8 when it reaches the first stage, and the network cannot reach
CIFAR-10's published accuracy (ResNet-20: 91.25%). Here the stem is one 3x3 convolution at full resolution; three
stages of ``depths[i]`` basic blocks with ``hidden_sizes`` channels (16-32-64), the 2nd and 3rd starting with
stride 2; global average pooling and a linear classifier. ResNet-(6n+2) has ``depths = [n, n, n]``: ResNet-20 is
n = 3 (0.27M parameters). Shortcuts are the paper's option A: identity, and where the shape changes the input
subsampled by 2 and zero-padded to the new width (no parameters).

``CifarResNetConfig`` (``model_type="cifar_resnet"``) and ``CifarResNetForImageClassification`` follow HF's image
classification conventions (``pixel_values``, ``labels``, ``ImageClassifierOutputWithNoAttention``) and are
registered with the Auto classes when ``hf_largebatch.models`` is imported.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention


@strict
class CifarResNetConfig(PreTrainedConfig):
    r"""Configuration of ``CifarResNetForImageClassification``.

    Args:
        num_channels: input image channels.
        depths: basic blocks per stage (ResNet-20: [3, 3, 3]; ResNet-56: [9, 9, 9]).
        hidden_sizes: channels per stage (the paper's 16, 32, 64); the stem has ``hidden_sizes[0]``.
    """

    model_type = "cifar_resnet"

    num_channels: int = 3
    depths: list[int] | tuple[int, ...] = (3, 3, 3)
    hidden_sizes: list[int] | tuple[int, ...] = (16, 32, 64)

    def validate_architecture(self):
        """Part of ``@strict``-powered validation."""
        if len(self.depths) != len(self.hidden_sizes) or not self.depths:
            raise ValueError(f"CifarResNetConfig needs one depth per stage: depths {list(self.depths)}, "
                             f"hidden_sizes {list(self.hidden_sizes)}")
        if min(self.depths) < 1 or min(self.hidden_sizes) < 1 or self.num_channels < 1:
            raise ValueError("CifarResNetConfig: depths, hidden_sizes and num_channels must be >= 1")
        if any(b < a for a, b in zip(self.hidden_sizes, self.hidden_sizes[1:])):
            raise ValueError(f"CifarResNetConfig.hidden_sizes must not shrink (option-A shortcuts pad channels): "
                             f"{list(self.hidden_sizes)}")


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the option-A shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra_channels:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return torch.relu(out + shortcut)


class CifarResNetPreTrainedModel(PreTrainedModel):
    config_class = CifarResNetConfig
    config: CifarResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module):
        # He et al.: He-normal convolutions; BatchNorm at (1, 0); the classifier as torch's default Linear
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.in_features ** 0.5
            init.uniform_(module.weight, -bound, bound)
            init.uniform_(module.bias, -bound, bound)


class CifarResNetForImageClassification(CifarResNetPreTrainedModel):
    def __init__(self, config: CifarResNetConfig):
        super().__init__(config)
        widths = list(config.hidden_sizes)
        self.stem = nn.Sequential(nn.Conv2d(config.num_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, channels = [], widths[0]
        for stage, (depth, width) in enumerate(zip(config.depths, widths)):
            for i in range(depth):
                blocks.append(BasicBlock(channels, width, stride=2 if stage > 0 and i == 0 else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels, config.num_labels)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: torch.LongTensor | None = None,
                **kwargs) -> ImageClassifierOutputWithNoAttention:
        features = self.blocks(self.stem(pixel_values)).mean(dim=(2, 3))
        logits = self.classifier(features)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)
