"""Image transforms that timm and torchvision do not have."""

from __future__ import annotations

import torch

# The principal components of ImageNet's RGB pixel values (in [0, 1]): eigenvalues, and the
# eigenvectors as the columns of the matrix. Published with Facebook's ResNet training code
# (github.com/facebookarchive/fb.resnet.torch, datasets/imagenet.lua) and used as they are by
# clovaai/CutMix-PyTorch (train.py), whose ImageNet recipe the paper's CutMix row follows.
IMAGENET_EIGENVALUES = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009),
                         (-0.5808, -0.0045, -0.8140),
                         (-0.5836, -0.6948, 0.4203))


class PCALighting:
    """AlexNet's lighting noise (Krizhevsky et al. 2012, section 4.1): add to every pixel of a
    [0, 1] RGB tensor `V @ (alpha * eigenvalues)`, with `alpha ~ N(0, std^2)` drawn once per
    image and V's columns the eigenvectors: a random shift of the whole image's colour along the
    principal components of natural colour variation. Goes after ToTensor and before Normalize.
    """

    def __init__(self, std: float, eigenvalues=IMAGENET_EIGENVALUES, eigenvectors=IMAGENET_EIGENVECTORS):
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std = float(std)
        self.eigenvalues = torch.tensor(eigenvalues, dtype=torch.float32)
        self.eigenvectors = torch.tensor(eigenvectors, dtype=torch.float32)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return image
        alpha = torch.randn(3) * self.std
        shift = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + shift.to(image.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std})"
