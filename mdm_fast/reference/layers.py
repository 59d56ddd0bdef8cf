"""Building blocks of the reference UNet, numerically identical to the public code.

Parameter names follow apple/ml-mdm so that public checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdm_fast.reference.config import ResNetConfig


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (the public code's init for output projections)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat per-sample rows to ``batch`` rows, each sample's copies adjacent ("b -> (b n)").

    The temporal mode folds frames into the batch, so the time embedding of a sample is repeated
    for each of its frames.
    """
    if batch > t.size(0):
        t = t.repeat_interleave(batch // t.size(0), dim=0)
    return t


def frames_to_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """``b c (n h) (m w) -> (b n m) c h w`` with ``m = n``: a grid of frames into the batch."""
    if n == 1:
        return x
    b, c, hh, ww = x.shape
    h, w = hh // n, ww // n
    return x.reshape(b, c, n, h, n, w).permute(0, 2, 4, 1, 3, 5).reshape(b * n * n, c, h, w)


def batch_to_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    """``(b n m) c h w -> b c (n h) (m w)``: the inverse of :func:`frames_to_batch`."""
    if n == 1:
        return x
    bnm, c, h, w = x.shape
    b = bnm // (n * n)
    return x.reshape(b, n, n, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, n * h, n * w)


class ResNet(nn.Module):
    """GroupNorm-SiLU-conv, then the time-embedding scale-shift ``silu(norm2(h) * (1 + a) + b)``."""

    def __init__(self, time_emb_channels: int, config: ResNetConfig):
        super().__init__()
        self.config = config
        cin, cout = config.num_channels, config.output_channels
        self.norm1 = nn.GroupNorm(config.num_groups_norm, cin)
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True)
        self.time_layer = nn.Linear(time_emb_channels, cout * 2)
        self.norm2 = nn.GroupNorm(config.num_groups_norm, cout)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = zero_module(nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=True))
        if cout != cin:
            self.conv3 = nn.Conv2d(cin, cout, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        ta, tb = self.time_layer(F.silu(temb)).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        ta, tb = repeat_to_batch(ta, h.size(0)), repeat_to_batch(tb, h.size(0))
        h = F.silu(self.norm2(h) * (1 + ta) + tb)
        h = self.conv2(self.dropout(h))
        if self.config.output_channels != self.config.num_channels:
            x = self.conv3(x)
        return h + x


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Public channel-major attention: q (B, C, L), k/v (B, C, S) -> (B, C, L).

    ``q`` and ``k`` are each scaled by d**-1/4 before the product (the public code's choice, more
    stable in fp16); the softmax runs in fp32. A key with ``mask == 0`` is excluded.
    """
    bs, width, length = q.shape
    ch = width // num_heads
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", (q * scale).reshape(bs * num_heads, ch, length),
                          (k * scale).reshape(bs * num_heads, ch, -1))  # (B*h, L, S)
    if mask is not None:
        mask = mask.view(mask.size(0), 1, 1, mask.size(1)).repeat(1, num_heads, 1, 1).flatten(0, 1)
        weight = weight.masked_fill(mask == 0, float("-inf"))
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * num_heads, ch, -1))
    return a.reshape(bs, -1, length)


class SelfAttention(nn.Module):
    """Self-attention over pixels plus cross-attention over text tokens (two softmaxes, summed)."""

    def __init__(self, channels: int, num_heads: int = 8, cond_dim: Optional[int] = None,
                 use_attention_ffn: bool = False):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.cond_dim = cond_dim
        if cond_dim is not None and cond_dim > 0:
            self.norm_cond = nn.LayerNorm(cond_dim)
            self.kv_cond = nn.Linear(cond_dim, channels * 2)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))
        self.ffn = nn.Sequential(
            nn.GroupNorm(32, channels),
            nn.Conv2d(channels, 4 * channels, 1),
            nn.GELU(),
            zero_module(nn.Conv2d(4 * channels, channels, 1)),
        ) if use_attention_ffn else None

    @property
    def has_cross(self) -> bool:
        return self.cond_dim is not None and self.cond_dim > 0

    def forward(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None,
                cond_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x))
        q, k, v = qkv.reshape(b, 3 * c, -1).chunk(3, dim=1)  # each (B, C, L)
        h = _attention(q, k, v, self.num_heads)
        if self.has_cross:
            kv_cond = self.kv_cond(self.norm_cond(cond)).transpose(-2, -1)  # (B, 2C, T)
            k_cond, v_cond = kv_cond.chunk(2, dim=1)
            h = h + _attention(q, k_cond, v_cond, self.num_heads, cond_mask)
        x = x + self.proj_out(h.reshape(b, c, *spatial))
        if self.ffn is not None:
            x = self.ffn(x) + x
        return x


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the sequence axis, as ``rotary_embedding_torch`` computes it
    (interleaved pairs, theta 10000); ``freqs`` is a frozen parameter there, so it is one here."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def rotate_queries_or_keys(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (..., L, d): rotate along L."""
        pos = torch.arange(t.shape[-2], device=t.device, dtype=self.freqs.dtype)
        freqs = torch.einsum("i,j->ij", pos, self.freqs).repeat_interleave(2, dim=-1)  # (L, d)
        pairs = t.reshape(*t.shape[:-1], -1, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).reshape(t.shape)
        return (t * freqs.cos() + rotated * freqs.sin()).type(t.dtype)


class SelfAttention1D(nn.Module):
    """Self-attention over a token sequence (B, L, C), optional key mask and rotary positions."""

    def __init__(self, channels: int, num_heads: int = 8, num_head_channels: int = -1,
                 use_attention_ffn: bool = False, pos_emb: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, channels * 3)
        self.proj_out = zero_module(nn.Linear(channels, channels))
        self.ffn = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, 4 * channels),
            nn.GELU(),
            zero_module(nn.Linear(4 * channels, channels)),
        ) if use_attention_ffn else None
        self.pos_emb = RotaryEmbedding(channels // self.num_heads) if pos_emb else None

    def attention(self, q, k, v, mask=None):
        bs, length, width = q.shape
        ch = width // self.num_heads
        scale = 1 / math.sqrt(math.sqrt(ch))
        q = q.reshape(bs, length, self.num_heads, ch)
        k = k.reshape(bs, length, self.num_heads, ch)
        if self.pos_emb is not None:
            q = self.pos_emb.rotate_queries_or_keys(q.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
            k = self.pos_emb.rotate_queries_or_keys(k.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        weight = torch.einsum("bthc,bshc->bhts", q * scale, k * scale)  # (B, h, L, L)
        if mask is not None:
            weight = weight.masked_fill(mask.view(mask.size(0), 1, 1, mask.size(1)) == 0, float("-inf"))
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bhts,bshc->bthc", weight, v.reshape(bs, -1, self.num_heads, ch))
        return a.reshape(bs, length, -1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj_out(self.attention(q, k, v, mask))
        if self.ffn is not None:
            x = x + self.ffn(x)
        return x


class MLP(nn.Module):
    def __init__(self, channels: int, multiplier: int = 4):
        super().__init__()
        self.main = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, multiplier * channels),
            nn.GELU(),
            zero_module(nn.Linear(multiplier * channels, channels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class SelfAttention1DBlock(nn.Module):
    """One LM-head layer: 1-D self-attention over the text tokens, then an MLP."""

    def __init__(self, channels: int, num_heads: int = 8, num_head_channels: int = -1, mlp_multiplier: int = 4):
        super().__init__()
        self.attn = SelfAttention1D(channels, num_heads, num_head_channels)
        self.mlp = MLP(channels, mlp_multiplier)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.mlp(self.attn(x, mask))


class TemporalAttentionBlock(nn.Module):
    """Attention across the frames of each pixel (frames folded in the batch), at half resolution."""

    def __init__(self, channels: int, num_heads: int = 8, num_head_channels: int = -1, down: bool = False,
                 pos_emb: bool = False):
        super().__init__()
        self.attn = SelfAttention1D(channels, num_heads, num_head_channels, pos_emb=pos_emb)
        self.mlp = MLP(channels, multiplier=4)
        self.down = down
        if down:
            self.down_conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1, bias=True)
            self.up_conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x_in = x
        if self.down:
            x = self.down_conv(x)
        bt, c, h, w = x.shape
        t = bt // temb.size(0)  # frames per sample
        x = x.reshape(-1, t, c, h, w).permute(0, 3, 4, 1, 2).reshape(-1, t, c)  # (B*h*w, T, C)
        x = self.mlp(self.attn(x, None))
        x = x.reshape(-1, h, w, t, c).permute(0, 3, 4, 1, 2).reshape(bt, c, h, w)
        if self.down:
            x = self.up_conv(F.interpolate(x, scale_factor=2))
        return x + x_in


class ResNetBlock(nn.Module):
    """One resolution level: ResNets, each followed by attention / temporal attention layers, then
    an optional stride-2 downsampling conv or nearest-2x upsampling + conv."""

    def __init__(self, temporal_dim: int, num_residual_blocks: int, num_attention_layers: int,
                 downsample_output: bool, upsample_output: bool, resnet_configs: List[ResNetConfig],
                 conditioning_feature_dim: int = -1, temporal_mode: bool = False, temporal_pos_emb: bool = False,
                 temporal_spatial_ds: bool = False, num_temporal_attention_layers: Optional[int] = None):
        super().__init__()
        assert not (downsample_output and upsample_output)
        self.temporal = temporal_mode
        self.temporal_spatial_ds = temporal_spatial_ds
        self.num_residual_blocks = num_residual_blocks
        self.num_attention_layers = int(num_attention_layers)
        self.upsample_output = upsample_output
        self.downsample_output = downsample_output
        self.resnets = nn.ModuleList(ResNet(temporal_dim, resnet_configs[i]) for i in range(num_residual_blocks))
        if self.num_attention_layers > 0:
            self.attn = nn.ModuleList(
                SelfAttention(resnet_configs[i].output_channels, cond_dim=conditioning_feature_dim,
                              use_attention_ffn=resnet_configs[i].use_attention_ffn)
                for i in range(num_residual_blocks) for _ in range(self.num_attention_layers))
        self.num_temporal_attention_layers = 0
        if num_temporal_attention_layers and not temporal_spatial_ds:
            self.num_temporal_attention_layers = num_temporal_attention_layers
            self.t_attn = nn.ModuleList(
                TemporalAttentionBlock(resnet_configs[i].output_channels, num_head_channels=32, down=True,
                                       pos_emb=temporal_pos_emb)
                for i in range(num_residual_blocks) for _ in range(num_temporal_attention_layers))
        # In the temporal mode (without spatial downsampling) the levels resample the frame axis.
        conv = nn.Conv2d if (not temporal_mode) or temporal_spatial_ds else nn.Conv1d
        ch = resnet_configs[-1].output_channels
        if downsample_output:
            self.resample = conv(ch, ch, kernel_size=3, stride=2, padding=1, bias=True)
        elif upsample_output:
            self.resample = conv(ch, ch, kernel_size=3, stride=1, padding=1, bias=True)

    @property
    def resamples_frames(self) -> bool:
        return self.temporal and not self.temporal_spatial_ds

    def forward(self, x, temb, skip_activations=None, return_activations=False, conditioning=None,
                cond_mask=None):
        activations = []
        for i in range(self.num_residual_blocks):
            x = self._skip_then_resnet(i, x, temb, skip_activations)
            for j in range(self.num_attention_layers):
                x = self.attn[i * self.num_attention_layers + j](x, conditioning, cond_mask)
            for j in range(self.num_temporal_attention_layers):
                x = self.t_attn[i * self.num_temporal_attention_layers + j](x, temb)
            activations.append(x)
        if self.downsample_output or self.upsample_output:
            x = self._resample(x, temb)
            activations.append(x)
        return (x, activations) if return_activations else x

    def _skip_then_resnet(self, i: int, x: torch.Tensor, temb: torch.Tensor, skip_activations) -> torch.Tensor:
        """The i-th ResNet on x; on the up path the next skip activation is concatenated onto x first."""
        if skip_activations is not None:
            x = torch.cat((x, skip_activations.pop(0)), dim=1)
        return self.resnets[i](x, temb)

    def _resample(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.resamples_frames:
            bt, c, h, w = x.shape
            t = bt // temb.size(0)
            x = x.reshape(-1, t, c, h, w).permute(0, 3, 4, 2, 1).reshape(-1, c, t)  # (B*h*w, C, T)
        if self.upsample_output:
            x = F.interpolate(x.type(torch.float32), scale_factor=2).type(x.dtype)
        x = self.resample(x)
        if self.resamples_frames:
            t = x.size(-1)
            x = x.reshape(-1, h, w, c, t).permute(0, 4, 3, 1, 2).reshape(-1, c, h, w)
        return x
