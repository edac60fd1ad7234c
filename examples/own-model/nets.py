"""A model factory of your own: batchgap calls it as ``small_cnn(input_shape, num_classes, **options)``."""
import torch
from torch import nn


def small_cnn(input_shape, num_classes, width=8):
    """Two 3x3 conv blocks with BatchNorm (running statistics) and a linear head, for (C, H, W) inputs."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )


def flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """An augmentation of your own, on a whole batch: flip each image left-right with probability 1/2."""
    mask = torch.rand(len(x), generator=gen) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
