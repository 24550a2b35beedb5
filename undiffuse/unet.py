"""The noise-prediction network: a UNet with residual blocks, a sinusoidal time embedding,
self-attention at chosen resolutions and optional class conditioning.

After improved-diffusion's unet.py, condensed: (x_t [N, C, H, W], t [N] long,
class_labels [N] long or None) -> output [N, C, H, W] (epsilon, or v for v-prediction).
Class label NULL_CLASS (-1) is the "no class" embedding used for classifier-free guidance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from undiffuse.config import UNetConfig

__all__ = ["UNet", "UNetConfig"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, as in DDPM): t [N] -> [N, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time/class embedding added in between."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, through scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (N, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, C/heads)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution's worth of blocks: a ResBlock, optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, groups = cfg.base_channels, cfg.norm_groups
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # index num_classes is the null class used by classifier-free guidance
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def level(cin: int, cout: int, res: int) -> _Level:
            attn = AttentionBlock(cout, cfg.num_heads, groups) if res in cfg.attention_resolutions else None
            return _Level(ResBlock(cin, cout, emb_dim, cfg.dropout, groups), attn)

        # encoder: remember every block's output width for the skip connections
        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(level(cur, ch * mult, res))
                cur = ch * mult
                skips.append(cur)
            if i < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, emb_dim, cfg.dropout, groups),
                AttentionBlock(cur, cfg.num_heads, groups),
                ResBlock(cur, cur, emb_dim, cfg.dropout, groups),
            ]
        )
        # decoder: one more block per level, each eating one skip
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for j in range(cfg.num_res_blocks + 1):
                self.up.append(level(cur + skips.pop(), ch * mult, res))
                cur = ch * mult
                if i > 0 and j == cfg.num_res_blocks:
                    self.up.append(Upsample(cur))
                    res *= 2
        self.out = nn.Sequential(nn.GroupNorm(groups, cur), nn.SiLU(), nn.Conv2d(cur, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x: [N, C, H, W]; t: [N] long timesteps; class_labels: [N] long in
        [-1, num_classes) (-1: no class), or None (unconditional). Returns [N, C, H, W]."""
        emb = self.time_mlp(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, -1)
            null = self.class_emb.num_embeddings - 1
            emb = emb + self.class_emb(torch.where(class_labels < 0, null, class_labels))
        elif class_labels is not None:
            raise ValueError("this model is unconditional; class_labels must be None")
        h = self.stem(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Level) else block(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            if isinstance(block, _Level):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.out(h)
