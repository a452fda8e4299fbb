"""Diffusion Policy's image encoder: a ResNet-18 with GroupNorm and spatial-softmax pooling,
next to DP3's agent_pos MLP.

Shapes:
    B    batch (the policy folds its To observed steps into it)
    H, W image rows and columns (the camera's resolution)
    C    image channels: 3 (rgb) or 4 (rgb + depth, ``env.<suite>.image=rgbd``)
    h, w the crop: ``round(crop_ratio * H)`` x ``round(crop_ratio * W)`` (76 x 76 of 84 x 84)
    K    keypoints of the spatial softmax (32)
    Dp   agent_pos dim
    F    feature dim: out_channels + 64 (128 by default, as DP3's encoder)

Image branch, as Diffusion Policy builds it (its robomimic ``VisualCore`` with
``replace_bn_with_gn``): uint8 (B, H, W, C) -> float in [0, 1] (here, not in the min-max
normaliser) -> crop (h, w) -> torchvision's ResNet-18, random init (nothing is
downloaded), every BatchNorm a GroupNorm of channels // 16 groups, without its average
pool and classifier -> (B, 512, h/32, w/32) -> 1x1 conv to K maps -> spatial softmax:
each map's softmax-weighted mean pixel coordinate in [-1, 1] -> (B, K, 2) -> flatten ->
Linear(2K, out_channels). agent_pos branch: DP3's Linear(Dp, 64), ReLU, Linear(64, 64).

Crops (Diffusion Policy's ``CropRandomizer``): the policy's pre-training loss draws one
random crop per image (``draw_augmentation``) from its generator; everything else (acting,
fine-tuning's log-probabilities) sees the centre crop, so what the policy is scored on
is what it acts on.

``use_depth=True`` reads the fourth (depth) channel of an rgbd image; by default only rgb
is read, even from rgbd images.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sodp3d.errors import UserError

from .base import Encoder, ShapeMeta, agent_pos_mlp, boolean, positive_int, vector_dim

RESNET_CHANNELS = 512  # ResNet-18's last stage
GROUP_SIZE = 16        # Diffusion Policy's GroupNorm: num_groups = channels // 16


def torchvision():
    """``import torchvision``, also where its C++ extension cannot load.

    torchvision's ``_meta_registrations`` registers fake kernels for ``torchvision::nms``
    and ``torchvision::qnms`` on import without checking that the extension (which
    defines those ops) loaded; on a CPU-only torch with a torchvision wheel built for
    CUDA the extension fails, and the import raises "operator torchvision::nms does not
    exist". Declaring the two schemas first lets the pure-Python models (all this encoder
    uses) import. Where the extension loads (a matching build, a CUDA machine) it defines
    them and nothing is declared here.
    """
    import importlib.util
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise UserError("encoder=image needs torchvision; install it (make install adds the build matching torch)")
    if not _extension_loads(spec.origin):
        for op in ("nms", "qnms"):
            if not hasattr(torch.ops.torchvision, op):
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision as tv

    return tv


def _extension_loads(origin: str) -> bool:
    """Whether torchvision's C++ extension (its ``_C`` library, next to ``origin``) loads
    into this torch, as ``import torchvision`` would load it."""
    from pathlib import Path

    libs = sorted(Path(origin).parent.glob("_C.*"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
        return True
    except (OSError, RuntimeError):
        return False


class SpatialSoftmax(nn.Module):
    """Keypoints of a feature map (robomimic's ``SpatialSoftmax``, as Diffusion Policy uses it):
    (B, C, H, W) -> 1x1 conv to K maps -> per map a softmax over its H * W pixels -> the
    expected pixel coordinate (x, y), with x from -1 (left column) to 1 (right) and y from
    -1 (top row) to 1 (bottom) -> (B, K, 2)."""

    def __init__(self, in_channels: int, height: int, width: int, num_kp: int = 32, temperature: float = 1.0):
        super().__init__()
        self.keypoints = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        self.num_kp, self.temperature = num_kp, float(temperature)
        ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij")
        self.register_buffer("pos", torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1), persistent=False)  # (HW, 2)

    def expected_coordinates(self, maps: Tensor) -> Tensor:
        """(B, K, H, W) maps -> (B, K, 2) softmax-weighted mean (x, y)."""
        B, K = maps.shape[:2]
        attention = torch.softmax(maps.reshape(B, K, -1) / self.temperature, dim=-1)  # (B, K, HW)
        return attention @ self.pos  # (B, K, 2)

    def forward(self, features: Tensor) -> Tensor:
        return self.expected_coordinates(self.keypoints(features))


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(channels // GROUP_SIZE, channels)


def resnet18_trunk(in_channels: int) -> nn.Sequential:
    """torchvision's ResNet-18 (random init, GroupNorm) up to its last stage:
    (B, in_channels, h, w) -> (B, 512, ceil(h / 32), ceil(w / 32))."""
    net = torchvision().models.resnet18(weights=None, norm_layer=group_norm)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)


def _trunk_size(n: int) -> int:
    """Feature-map side of ResNet-18 for an input side n (conv1, max-pool, 3 strided stages)."""
    for _ in range(5):
        n = (n + 1) // 2
    return n


class ImageEncoder(Encoder):
    """(image (B, H, W, C) uint8 or float in [0, 255], agent_pos (B, Dp)) -> (B, out_channels + 64)."""

    keys = ("image", "agent_pos")

    def __init__(
        self,
        shape_meta: ShapeMeta,
        crop_ratio: float = 0.9,
        keypoints: int = 32,
        out_channels: int = 64,
        use_depth: bool = False,
    ):
        super().__init__(shape_meta)
        shape = self.shape_meta["image"]
        if len(shape) != 3 or shape[2] not in (3, 4):
            raise UserError(f"shape_meta['image'] must be (H, W, 3) for rgb or (H, W, 4) for rgbd, got {shape}")
        if isinstance(crop_ratio, bool) or not isinstance(crop_ratio, (int, float)) or not 0 < crop_ratio <= 1:
            raise UserError(f"encoder.crop_ratio must be in (0, 1] (1: no crop), got {crop_ratio!r}")
        keypoints = positive_int("keypoints", keypoints)
        out_channels = positive_int("out_channels", out_channels)
        self.use_depth = boolean("use_depth", use_depth)
        if self.use_depth and shape[2] != 4:
            raise UserError(
                "encoder.use_depth=true needs rgbd images (4 channels), but the dataset's images have 3; "
                "collect with env.<suite>.image=rgbd (e.g. env.metaworld.image=rgbd) or drop encoder.use_depth"
            )
        self.in_channels = 4 if self.use_depth else 3
        H, W = shape[0], shape[1]
        self.crop = (max(1, round(crop_ratio * H)), max(1, round(crop_ratio * W)))
        self.trunk = resnet18_trunk(self.in_channels)
        self.pool = SpatialSoftmax(RESNET_CHANNELS, _trunk_size(self.crop[0]), _trunk_size(self.crop[1]), keypoints)
        self.projection = nn.Linear(2 * keypoints, out_channels)
        self.agent_pos_mlp = agent_pos_mlp(vector_dim(self.shape_meta, "agent_pos"))
        self.out_dim = out_channels + self.agent_pos_mlp[-1].out_features

    # -- crops ---------------------------------------------------------------------------
    def draw_augmentation(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """Random top-left corners of n crops, (n, 2) long (row, column), uniform over the
        image (Diffusion Policy's training crops). An encoder with this method augments in
        training: the policy's loss calls it and passes the draws to ``forward``."""
        H, W = self.shape_meta["image"][:2]
        h, w = self.crop
        rows = torch.randint(0, H - h + 1, (n,), generator=generator, device=device)
        cols = torch.randint(0, W - w + 1, (n,), generator=generator, device=device)
        return torch.stack([rows, cols], dim=1)

    def centre(self, n: int, device=None) -> Tensor:
        H, W = self.shape_meta["image"][:2]
        h, w = self.crop
        return torch.tensor([(H - h) // 2, (W - w) // 2], device=device).expand(n, 2)

    def cropped(self, image: Tensor, corners: Tensor) -> Tensor:
        """(B, H, W, C) images, (B, 2) corners -> (B, C', h, w) float in [0, 1], C' the channels read."""
        h, w = self.crop
        B = image.shape[0]
        rows = corners[:, :1] + torch.arange(h, device=image.device)  # (B, h)
        cols = corners[:, 1:] + torch.arange(w, device=image.device)  # (B, w)
        batch = torch.arange(B, device=image.device)[:, None, None]
        patch = image[batch, rows[:, :, None], cols[:, None, :], : self.in_channels]  # (B, h, w, C')
        return patch.permute(0, 3, 1, 2).float().div_(255.0)

    # -- forward -------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """(B, C', h, w) in [0, 1] -> (B, out_channels)."""
        return self.projection(self.pool(self.trunk(images)).flatten(1))

    def forward(self, obs: Mapping[str, Tensor], augmentation: Tensor | None = None) -> Tensor:
        """obs["image"]: (B, H, W, C), obs["agent_pos"]: (B, Dp) -> (B, F). ``augmentation``:
        (B, 2) crop corners (``draw_augmentation``); the centre crop without them."""
        image = obs["image"]
        corners = self.centre(image.shape[0], image.device) if augmentation is None else augmentation
        x = self.image_features(self.cropped(image, corners))
        return torch.cat([x, self.agent_pos_mlp(obs["agent_pos"])], dim=-1)
