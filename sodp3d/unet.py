"""The conditional 1-D U-Net of Diffusion Policy / DP3, with FiLM conditioning.

Shape legend:
    B   batch
    T   horizon (Tp, the predicted action steps)
    Da  action dim
    G   global-condition dim (observation features, flattened over To)
    C   channels inside the network
    K   diffusion training steps (timesteps are integers in [0, K))

The network reads a noisy action sequence (B, T, Da), a diffusion timestep (B,) and
a global condition (B, G) and returns a tensor shaped like the actions (B, T, Da):
the predicted noise or the predicted clean sample, depending on the noise schedule.

Layout (faithful to diffusion_policy's ``ConditionalUnet1D``, which DP3 reuses):
    cond = concat(step_encoder(k), global_cond)                      (B, dsed + G)
    down: for each width in down_dims: ``blocks_per_stage`` residual blocks (the first
          maps to that width); Downsample1d after every stage but the last. Each stage
          output is kept as a skip.
    mid:  ``mid_blocks`` residual blocks at the last width (2; Simple DP3 has 1).
    up:   for each width in reversed(down_dims[:-1]): concatenate the matching skip,
          ``blocks_per_stage`` residual blocks, Upsample1d. There are len(down_dims) - 1
          up stages and each upsamples, so the resolution returns to T; as in the
          original, the first stage's skip (full resolution) is not concatenated.
    out:  Conv1dBlock(down_dims[0]) -> Conv1d(down_dims[0], Da, 1).
Every residual block is FiLM-conditioned on ``cond``. fp32 throughout; the network
runs on whatever device its parameters live on (move it with ``.to(device)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sodp3d.errors import UserError


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar: (B,) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise UserError(f"step embedding dim={dim} is invalid; use an even number >= 4")
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B,) timesteps (any numeric dtype) -> (B, dim) float32."""
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=torch.float32) * -scale)
        arg = x.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat((arg.sin(), arg.cos()), dim=-1)


class Downsample1d(nn.Module):
    """Halve the length: (B, C, L) -> (B, C, L / 2). Conv1d kernel 3, stride 2, padding 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    """Double the length: (B, C, L) -> (B, C, 2 L). ConvTranspose1d kernel 4, stride 2, padding 1."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Conv1dBlock(nn.Module):
    """Conv1d (length-preserving) -> GroupNorm -> Mish: (B, C_in, L) -> (B, C_out, L)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM between them and a residual connection.

    FiLM: cond (B, cond_dim) -> Mish -> Linear -> (scale, bias), each (B, C_out, 1);
    h = scale * block1(x) + bias; out = block2(h) + residual(x), where residual is a
    1x1 conv when C_in != C_out and the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int,
                 kernel_size: int = 5, n_groups: int = 8):
        super().__init__()
        self.out_channels = out_channels
        self.blocks = nn.ModuleList([
            Conv1dBlock(in_channels, out_channels, kernel_size, n_groups),
            Conv1dBlock(out_channels, out_channels, kernel_size, n_groups),
        ])
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_channels))
        self.residual_conv = (nn.Conv1d(in_channels, out_channels, 1)
                              if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, L), cond: (B, cond_dim) -> (B, C_out, L)."""
        h = self.blocks[0](x)
        film = self.cond_encoder(cond).unsqueeze(-1)  # (B, 2 C_out, 1)
        scale, bias = film[:, :self.out_channels], film[:, self.out_channels:]
        h = scale * h + bias
        h = self.blocks[1](h)
        return h + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """Diffusion-policy U-Net: (sample (B, T, Da), timestep (B,), global_cond (B, G)) -> (B, T, Da).

    T must be divisible by 2 ** (len(down_dims) - 1); see :meth:`check_horizon`.
    """

    def __init__(self, action_dim: int, global_cond_dim: int,
                 down_dims: Sequence[int] = (512, 1024, 2048), blocks_per_stage: int = 2,
                 kernel_size: int = 5, n_groups: int = 8, step_embed_dim: int = 128, mid_blocks: int = 2):
        super().__init__()
        down_dims = tuple(int(d) for d in down_dims)
        _validate(action_dim, global_cond_dim, down_dims, blocks_per_stage, kernel_size,
                  n_groups, step_embed_dim, mid_blocks)
        self.action_dim = int(action_dim)
        self.global_cond_dim = int(global_cond_dim)
        self.down_dims = down_dims
        self.blocks_per_stage = int(blocks_per_stage)
        self.kernel_size = int(kernel_size)
        self.n_groups = int(n_groups)
        self.step_embed_dim = int(step_embed_dim)

        dsed = self.step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed), nn.Linear(dsed, 4 * dsed), nn.Mish(), nn.Linear(4 * dsed, dsed))
        cond_dim = dsed + self.global_cond_dim

        def res(cin: int, cout: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(cin, cout, cond_dim, kernel_size, n_groups)

        def stage(cin: int, cout: int) -> nn.ModuleList:
            return nn.ModuleList([res(cin, cout)] + [res(cout, cout) for _ in range(blocks_per_stage - 1)])

        all_dims = (self.action_dim,) + down_dims
        in_out = list(zip(all_dims[:-1], all_dims[1:]))
        self.down_stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, (cin, cout) in enumerate(in_out):
            self.down_stages.append(stage(cin, cout))
            self.downsamples.append(Downsample1d(cout) if i < len(in_out) - 1 else nn.Identity())
        mid = down_dims[-1]
        self.mid_blocks = nn.ModuleList([res(mid, mid) for _ in range(int(mid_blocks))])
        self.up_stages = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for cin, cout in reversed(in_out[1:]):
            # input: current features (cout) concatenated with the skip of the same width (cout)
            self.up_stages.append(stage(2 * cout, cin))
            self.upsamples.append(Upsample1d(cin))
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], self.action_dim, 1),
        )

    @property
    def horizon_multiple(self) -> int:
        """The horizon T must be a multiple of this: 2 ** (number of downsamplings)."""
        return 2 ** (len(self.down_dims) - 1)

    def check_horizon(self, horizon: int) -> None:
        """Raise UserError unless a horizon T fits this U-Net's down/up-sampling."""
        m = self.horizon_multiple
        if horizon < 1 or horizon % m:
            raise UserError(
                f"horizon T={horizon} is not divisible by 2**{len(self.down_dims) - 1}={m} for a U-Net "
                f"with {len(self.down_dims)} levels; use a horizon that is a multiple of {m} "
                f"or a preset with fewer levels")

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                global_cond: torch.Tensor | None = None) -> torch.Tensor:
        """sample: (B, T, Da); timestep: (B,) long tensor, a 0-d / (1,) tensor or a python int
        (broadcast over the batch); global_cond: (B, G) (may be None when G == 0).
        Returns (B, T, Da)."""
        if sample.ndim != 3 or sample.shape[-1] != self.action_dim:
            raise UserError(f"U-Net input has shape {tuple(sample.shape)}; expected (B, T, {self.action_dim})")
        B, T, _ = sample.shape
        self.check_horizon(T)
        steps = _timesteps_for_batch(timestep, B, sample.device)
        cond = self.diffusion_step_encoder(steps)  # (B, dsed)
        if self.global_cond_dim > 0:
            if global_cond is None or tuple(global_cond.shape) != (B, self.global_cond_dim):
                got = None if global_cond is None else tuple(global_cond.shape)
                raise UserError(f"global_cond has shape {got}; expected ({B}, {self.global_cond_dim})")
            cond = torch.cat([cond, global_cond.to(cond.dtype)], dim=-1)  # (B, dsed + G)

        x = sample.transpose(1, 2)  # (B, Da, T)
        skips = []
        for blocks, down in zip(self.down_stages, self.downsamples):
            for block in blocks:
                x = block(x, cond)
            skips.append(x)
            x = down(x)
        for block in self.mid_blocks:
            x = block(x, cond)
        for blocks, up in zip(self.up_stages, self.upsamples):
            x = torch.cat([x, skips.pop()], dim=1)
            for block in blocks:
                x = block(x, cond)
            x = up(x)
        x = self.final_conv(x)  # (B, Da, T)
        return x.transpose(1, 2)


def _timesteps_for_batch(timestep: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """int / 0-d / (1,) / (B,) timesteps -> (B,) tensor on ``device``."""
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([int(timestep)], dtype=torch.long, device=device)
    timestep = timestep.to(device)
    if timestep.ndim == 0:
        timestep = timestep[None]
    if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
        raise UserError(f"timestep has shape {tuple(timestep.shape)}; expected ({batch},), (1,), () or an int")
    return timestep.expand(batch)


def _validate(action_dim, global_cond_dim, down_dims, blocks_per_stage, kernel_size, n_groups,
              step_embed_dim, mid_blocks=2) -> None:
    if int(action_dim) < 1:
        raise UserError(f"action_dim={action_dim} is invalid; use a positive integer")
    if int(global_cond_dim) < 0:
        raise UserError(f"global_cond_dim={global_cond_dim} is invalid; use an integer >= 0")
    if len(down_dims) < 1 or any(d < 1 for d in down_dims):
        raise UserError(f"down_dims={list(down_dims)} is invalid; use one or more positive widths, e.g. [512, 1024, 2048]")
    if int(blocks_per_stage) < 1:
        raise UserError(f"blocks_per_stage={blocks_per_stage} is invalid; use an integer >= 1")
    if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
        raise UserError(f"kernel_size={kernel_size} is invalid; use an odd positive integer (5 in DP3)")
    if int(n_groups) < 1 or any(d % int(n_groups) for d in down_dims):
        raise UserError(f"n_groups={n_groups} does not divide every width in down_dims={list(down_dims)}; "
                        f"use a group count that divides them all (8 in DP3)")
    if int(step_embed_dim) < 4 or int(step_embed_dim) % 2:
        raise UserError(f"step_embed_dim={step_embed_dim} is invalid; use an even number >= 4")
    if int(mid_blocks) < 1:
        raise UserError(f"mid_blocks={mid_blocks} is invalid; use an integer >= 1 (2 in DP3, 1 in Simple DP3)")


# Registry of U-Net sizes, chosen by config key. "paper" is DP3's full U-Net (SODP's
# Meta-World backbone), "simple" is Simple DP3 (SODP's Adroit backbone: one block per
# stage and one middle block; 7,375,236 parameters for 4 action dims and a 256-dim
# condition, as DP3's code), "tiny" is for tests and smoke runs.
UNET_PRESETS: dict[str, dict] = {
    "paper": {"down_dims": (512, 1024, 2048), "blocks_per_stage": 2, "step_embed_dim": 128},
    "simple": {"down_dims": (128, 256, 384), "blocks_per_stage": 1, "step_embed_dim": 128, "mid_blocks": 1},
    "tiny": {"down_dims": (32, 64), "blocks_per_stage": 1, "step_embed_dim": 32},
}

UNET_OPTIONS = ("down_dims", "blocks_per_stage", "kernel_size", "n_groups", "step_embed_dim", "mid_blocks")


def preset_names() -> list[str]:
    """The registered U-Net preset names."""
    return list(UNET_PRESETS)


def build_unet(preset: str, action_dim: int, global_cond_dim: int, **overrides) -> ConditionalUnet1D:
    """A U-Net from a preset name; ``overrides`` replace preset keys (any of UNET_OPTIONS)."""
    if preset not in UNET_PRESETS:
        raise UserError(f"unknown U-Net preset '{preset}'; valid presets: {', '.join(UNET_PRESETS)}")
    unknown = sorted(set(overrides) - set(UNET_OPTIONS))
    if unknown:
        raise UserError(f"unknown U-Net option(s) {', '.join(unknown)}; valid options: {', '.join(UNET_OPTIONS)}")
    kwargs = {**UNET_PRESETS[preset], **overrides}
    if "down_dims" in kwargs:
        kwargs["down_dims"] = tuple(int(d) for d in kwargs["down_dims"])  # lists / OmegaConf ListConfig
    return ConditionalUnet1D(action_dim, global_cond_dim, **kwargs)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
