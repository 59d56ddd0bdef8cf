"""The reference UNet and NestedUNet: the public MDM models, structure, names and numbers.

``model(x_t, times, conditioning, cond_mask, micros)`` where ``x_t`` is a tensor for a UNet and a
list, highest resolution first, for a NestedUNet (which returns a list in the same order).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mdm_fast.reference.config import NestedUNetConfig, UNetConfig, parse_micro_conditioning
from mdm_fast.reference.layers import (ResNetBlock, SelfAttention1DBlock, batch_to_frames, frames_to_batch,
                                       zero_module)


class UNet(nn.Module):
    def __init__(self, input_channels: int, output_channels: int, config: UNetConfig):
        super().__init__()
        config = copy.deepcopy(config)
        self.config = self._config = config
        self.input_channels = input_channels
        self.output_channels = output_channels
        # The text width the caller passes; the blocks see the projected width when a projection is set.
        self.input_conditioning_feature_dim = config.conditioning_feature_dim
        if config.conditioning_feature_dim > 0 and config.conditioning_feature_proj_dim > 0:
            config.conditioning_feature_dim = config.conditioning_feature_proj_dim
        self.temporal_dim = config.resolution_channels[0] * 4 if config.temporal_dim is None else config.temporal_dim
        if self.temporal_dim % 8:
            raise ValueError(f"unet_config: the time embedding width 4 x resolution_channels[0] = "
                             f"{self.temporal_dim} must be a multiple of 8; set temporal_dim")

        half_dim = self.temporal_dim // 8
        freqs = torch.exp(torch.arange(half_dim, dtype=torch.float) * -(math.log(10000) / half_dim))
        self.register_buffer("t_emb", freqs.unsqueeze(0), persistent=False)  # (1, temporal_dim/8)
        self.temb_layer1 = nn.Linear(self.temporal_dim // 4, self.temporal_dim)
        self.temb_layer2 = nn.Linear(self.temporal_dim, self.temporal_dim)
        uses_text = config.conditioning_feature_dim > 0 and not config.skip_cond_emb
        self.cond_emb = nn.Linear(config.conditioning_feature_dim, self.temporal_dim, bias=False) if uses_text else None

        self.conditions: Optional[Dict[str, float]] = None
        if config.micro_conditioning is not None:
            self.conditions = parse_micro_conditioning(config.micro_conditioning)
            self.cond_layers = nn.ModuleDict({
                name: nn.ModuleList([nn.Linear(self.temporal_dim // 4, self.temporal_dim),
                                     zero_module(nn.Linear(self.temporal_dim, self.temporal_dim))])
                for name in self.conditions})

        channels = config.resolution_channels[0]
        self.conv_in = nn.Conv2d(input_channels, channels, kernel_size=3, stride=1, padding=1, bias=True)
        self._build_levels(config, channels)
        self.masked_cross_attention = config.masked_cross_attention
        if uses_text:
            if config.conditioning_feature_proj_dim > 0:
                self.lm_proj = nn.Linear(self.input_conditioning_feature_dim, config.conditioning_feature_dim)
            self.lm_head = nn.ModuleList(SelfAttention1DBlock(config.conditioning_feature_dim)
                                         for _ in range(config.num_lm_head_layers))
        self.is_temporal: List[bool] = []

    # ---- construction ---------------------------------------------------------------------

    def _block(self, level: int, resnet_configs, down: bool, up: bool) -> ResNetBlock:
        c = self.config
        attends = level in c.attention_levels
        return ResNetBlock(
            self.temporal_dim, len(resnet_configs), c.num_attention_layers[level] if attends else 0,
            downsample_output=down, upsample_output=up, resnet_configs=resnet_configs,
            conditioning_feature_dim=c.conditioning_feature_dim if attends else -1,
            temporal_mode=c.temporal_mode, temporal_pos_emb=c.temporal_positional_encoding,
            temporal_spatial_ds=c.temporal_spatial_ds,
            num_temporal_attention_layers=(c.num_temporal_attention_layers[level]
                                           if c.num_temporal_attention_layers is not None else None))

    def _resnet_config(self, cin: int, cout: int):
        rc = copy.copy(self.config.resnet_config)
        rc.num_channels, rc.output_channels = cin, cout
        return rc

    def _build_levels(self, config: UNetConfig, channels: int) -> None:
        levels = len(config.resolution_channels)
        self.num_resolutions = levels
        skip_channels = [channels]
        down = []
        for i in range(levels):
            configs = []
            for _ in range(config.num_resnets_per_resolution[i]):
                configs.append(self._resnet_config(channels, config.resolution_channels[i]))
                channels = config.resolution_channels[i]
                skip_channels.append(channels)
            if i != levels - 1:
                skip_channels.append(channels)  # the downsampled output is a skip too
            down.append(self._block(i, configs, down=i != levels - 1, up=False))

        mid = []
        if not config.skip_mid_blocks:
            rc = self._resnet_config(channels, channels)
            mid = [ResNetBlock(self.temporal_dim, 1, 1, False, False, resnet_configs=[rc],
                               conditioning_feature_dim=config.conditioning_feature_dim),
                   ResNetBlock(self.temporal_dim, 1, 0, False, False, resnet_configs=[copy.copy(rc)])]

        up = []
        for i in reversed(range(levels)):
            configs = []
            for _ in range(config.num_resnets_per_resolution[i] + 1):
                configs.append(self._resnet_config(channels + skip_channels.pop(), config.resolution_channels[i]))
                channels = config.resolution_channels[i]
            up.append(self._block(i, configs, down=False, up=i != 0))

        self.norm_out = nn.GroupNorm(config.resnet_config.num_groups_norm, channels)
        self.conv_out = zero_module(nn.Conv2d(channels, self.output_channels, kernel_size=3, padding=1))
        # Registered after norm_out/conv_out, as in the public code, so parameters() has its order.
        self.down_blocks = nn.ModuleList(down)
        if mid:
            self.mid_blocks = nn.ModuleList(mid)
        self.up_blocks = nn.ModuleList(up)

    @property
    def model_type(self) -> str:
        return "unet"

    def unused_parameters(self) -> List[str]:
        """Names of the parameters the forward never reads (built as the public code builds them): a
        plain UNet reads all of its own."""
        return []

    # ---- the temporal (video) mode: frames tiled in the image grid --------------------------

    def _frame_grid(self, stage: str) -> Tuple[int, int]:
        """Frames per side of the grid going into and coming out of ``stage`` (1: no frames)."""
        if not self.config.temporal_mode:
            return 1, 1
        ratios = getattr(self, "nest_ratio", None)
        if ratios is None:
            raise ValueError("unet_config.temporal_mode: the temporal mode needs a nested model "
                             "(the frame grid is derived from its nest_ratio)")
        s = ratios[0]
        t = 1 if len(ratios) == 1 else ratios[1]
        if self.config.temporal_spatial_ds:
            s = t
        return {"input": (s, s), "output": (s, s), "down": (s, t), "up": (t, s)}[stage]

    def frames_per_side(self) -> int:
        """Frames per side of the grid the model takes (a temporal model's clip of n*n frames tiled in
        one image; 1: images)."""
        return self._frame_grid("input")[0]

    # ---- conditioning ----------------------------------------------------------------------

    def create_temporal_embedding(self, times: torch.Tensor, ff_layers=None) -> torch.Tensor:
        temb = times.view(-1, 1) * self.t_emb
        temb = torch.cat([torch.sin(temb), torch.cos(temb)], dim=1)  # (B, temporal_dim/4)
        layer1, layer2 = ff_layers if ff_layers is not None else (self.temb_layer1, self.temb_layer2)
        return layer2(F.silu(layer1(temb)))  # (B, temporal_dim)

    def forward_conditioning(self, conditioning, cond_mask):
        """Text tokens -> (pooled embedding for the time embedding, tokens for attention, mask)."""
        if self.config.conditioning_feature_proj_dim > 0:
            conditioning = self.lm_proj(conditioning)
        for head in self.lm_head:
            conditioning = head(conditioning, mask=cond_mask if self.masked_cross_attention else None)
        if cond_mask is None or (not self.masked_cross_attention and len(self.lm_head) > 0):
            y = conditioning.mean(dim=1)
        else:
            y = (cond_mask.unsqueeze(-1) * conditioning).sum(dim=1) / cond_mask.sum(dim=1, keepdim=True)
        if not self.masked_cross_attention:
            cond_mask = None
        return self.cond_emb(y), conditioning, cond_mask

    def forward_micro_conditioning(self, times: torch.Tensor, micros: Dict[str, torch.Tensor]) -> torch.Tensor:
        temb = 0
        for key, default in self.conditions.items():
            micro = micros.get(key, default * torch.ones_like(times))
            micro = (micro / default).clamp(max=1) * default if key == "scale" else micro * 1000
            temb = temb + self.create_temporal_embedding(micro, ff_layers=self.cond_layers[key])
        return temb

    def time_embedding(self, times, cond_emb, micros) -> torch.Tensor:
        temb = self.create_temporal_embedding(times)
        if cond_emb is not None:
            temb = temb + cond_emb
        if self.conditions is not None:
            temb = temb + self.forward_micro_conditioning(times, micros)
        return temb

    # ---- the four stages -------------------------------------------------------------------

    def forward_input_layer(self, x_t: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        n_in, n_out = self._frame_grid("input")
        x_t = frames_to_batch(x_t, n_in)
        if normalize:
            x_t = x_t / x_t.std((1, 2, 3), keepdim=True)
        return batch_to_frames(self.conv_in(x_t), n_out)

    def forward_output_layer(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = self._frame_grid("output")
        x = frames_to_batch(x, n_in)
        return batch_to_frames(self.conv_out(F.silu(self.norm_out(x))), n_out)

    def forward_downsample(self, x, temb, conditioning, cond_mask):
        n_in, n_out = self._frame_grid("down")
        x = frames_to_batch(x, n_in)
        skip_activations = [x]
        for i, block in enumerate(self.down_blocks):
            text = (conditioning, cond_mask) if i in self.config.attention_levels else (None, None)
            x, activations = block(x, temb, return_activations=True, conditioning=text[0], cond_mask=text[1])
            skip_activations.extend(activations)
        return batch_to_frames(x, n_out), skip_activations

    def forward_upsample(self, x, temb, conditioning, cond_mask, skip_activations):
        n_in, n_out = self._frame_grid("up")
        x = frames_to_batch(x, n_in)
        for i, block in enumerate(self.up_blocks):
            level = self.num_resolutions - 1 - i
            num_skip = self.config.num_resnets_per_resolution[level] + 1
            skips = skip_activations[-num_skip:][::-1]
            del skip_activations[-num_skip:]
            text = (conditioning, cond_mask) if level in self.config.attention_levels else (None, None)
            x = block(x, temb, skip_activations=skips, conditioning=text[0], cond_mask=text[1])
        return batch_to_frames(x, n_out)

    def forward_mid(self, x, temb, conditioning, cond_mask):
        if self.config.skip_mid_blocks:
            return x
        x = self.mid_blocks[0](x, temb, conditioning=conditioning, cond_mask=cond_mask)
        return self.mid_blocks[1](x, temb)

    def forward_denoising(self, x_t, times, cond_emb=None, conditioning=None, cond_mask=None, micros=None):
        temb = self.time_embedding(times, cond_emb, micros or {})
        x_feat = None
        if self.config.nesting:
            x_t, x_feat = x_t
        if isinstance(x_t, (list, tuple)):
            (x_t,) = x_t
        x = self.forward_input_layer(x_t)
        if x_feat is not None:
            x = x + x_feat
        x_out, x = self.forward_body(x, temb, conditioning, cond_mask)
        return (x_out, x) if self.config.nesting else x_out

    def forward_body(self, x, temb, conditioning, cond_mask):
        """Everything after the input layer: (output image, last features)."""
        x, skips = self.forward_downsample(x, temb, conditioning, cond_mask)
        x = self.forward_mid(x, temb, conditioning, cond_mask)
        x = self.forward_upsample(x, temb, conditioning, cond_mask, skips)
        return self.forward_output_layer(x), x

    def forward(self, x_t, times, conditioning=None, cond_mask=None, micros=None):
        times = self.check_inputs(x_t, times, conditioning, cond_mask)  # (B,)
        cond_emb = None
        if self.config.conditioning_feature_dim > 0:
            cond_emb, conditioning, cond_mask = self.forward_conditioning(conditioning, cond_mask)
        return self.forward_denoising(x_t, times, cond_emb, conditioning, cond_mask, micros or {})

    # ---- input checks ----------------------------------------------------------------------

    def size_multiple(self) -> int:
        """What the top image's sides must be multiples of, so that every down-sampling (stride 2, this
        UNet's levels and then its inner UNet's) halves them evenly and the up path meets its skips.
        1 for a temporal model (:meth:`check_image_size` tries its sizes on the meta device)."""
        inner = getattr(self, "inner_unet", None)
        below = 1 if inner is None else inner.size_multiple()
        if self.config.temporal_mode or (inner is not None and below == 1):
            return 1
        return 2 ** (len(self.config.resolution_channels) - 1) * below

    def check_image_size(self, size: int) -> None:
        """A ValueError naming the multiple an unusable top image size misses (a temporal model: the sizes
        near it that its frame grids and levels take, found by shape-only forwards)."""
        m = self.size_multiple()
        if size < 1 or size % m:
            raise ValueError(f"image size {size}: this model halves it {m.bit_length() - 1} times (its levels, "
                             f"nested ones included), so it must be a positive multiple of {m}")
        if self.config.temporal_mode and not self._runs_at(size):
            n = self.frames_per_side()
            near: List[int] = []
            multiples = range(max(n, (size // n - 8) * n), (size // n + 9) * n, n)  # the grid's multiples near it
            for s in sorted(multiples, key=lambda s: (abs(s - size), s)):
                if len(near) < 4 and s != size and self._runs_at(s):
                    near.append(s)
            near.sort()
            raise ValueError(f"image size {size}: this temporal model's {n}x{n} frame grid and levels do not "
                             f"divide it evenly; sizes near it that they do: {near or 'none found'}")

    def _runs_at(self, size: int) -> bool:
        """Whether a forward at a size x size top image goes through: a reference model of this config on
        the meta device (shapes only; this model and what it caches stay untouched)."""
        cls = next(c for c in type(self).__mro__ if c.__module__ == __name__)  # the reference class
        with torch.device("meta"):
            probe = cls(self.input_channels, self.output_channels, self.config)
            x_t = [torch.empty(1, self.input_channels, size // r, size // r) for r in self.resolution_ratios()]
            text = (torch.empty(1, 1, probe.input_conditioning_feature_dim), torch.ones(1, 1)) \
                if self.config.conditioning_feature_dim > 0 else (None, None)
            try:
                with torch.no_grad():
                    probe(x_t if len(x_t) > 1 else x_t[0], torch.zeros(1, dtype=torch.long), *text)
            except (RuntimeError, ValueError):
                return False
        return True

    def resolution_ratios(self) -> List[int]:
        """Top resolution over each level's resolution, top first: ``[1]`` for a UNet, ``[1, 4]``
        for the 256x256 model, ``[1, 4, 16]`` for the 1024x1024 one.

        (``nest_ratio`` is the public form: top over innermost, then the inner model's own list.)
        """
        ratios = getattr(self, "nest_ratio", None)
        if not ratios:
            return [1]
        return [1] + [ratios[0] // r for r in ratios[1:]] + [ratios[0]]

    def check_inputs(self, x_t, times, conditioning, cond_mask) -> torch.Tensor:
        """Raises a ValueError naming what is wrong; returns the times, one per sample."""
        from mdm_fast.reference.checks import check_model_inputs

        return check_model_inputs(self, x_t, times, conditioning, cond_mask)


class NestedUNet(UNet):
    """A UNet whose middle is another (possibly nested) UNet at a lower resolution."""

    def __init__(self, input_channels: int, output_channels: int, config: NestedUNetConfig):
        super().__init__(input_channels, output_channels, config)
        config = self.config  # the private copy, with the projected text width
        inner_config = config.inner_config
        inner_config.conditioning_feature_dim = config.conditioning_feature_dim
        inner_cls = NestedUNet if isinstance(inner_config, NestedUNetConfig) else UNet
        self.inner_unet = inner_cls(input_channels, output_channels, inner_config)

        outer_ch, inner_ch = config.resolution_channels[-1], inner_config.resolution_channels[0]
        self.in_adapter = None if config.skip_inner_unet_input else zero_module(
            nn.Conv2d(outer_ch, inner_ch, kernel_size=3, padding=1, bias=True))
        self.out_adapter = zero_module(nn.Conv2d(inner_ch, outer_ch, kernel_size=3, padding=1, bias=True))

        self.is_temporal = [config.temporal_mode and not config.temporal_spatial_ds] + self.inner_unet.is_temporal
        ratio = 2 ** (len(config.resolution_channels) - 1)
        if self.is_temporal[0]:
            ratio = int(math.sqrt(ratio))
        inner_ratios = getattr(self.inner_unet, "nest_ratio", None)
        self.nest_ratio = [ratio * inner_ratios[0]] + inner_ratios if inner_ratios else [ratio]

        if config.initialize_inner_with_pretrained is not None:
            self.load_inner(config.initialize_inner_with_pretrained)
        if config.freeze_inner_unet:
            self.inner_unet.requires_grad_(False)
        if config.interp_conditioning:
            self.interp_layer1 = nn.Linear(self.temporal_dim // 4, self.temporal_dim)
            self.interp_layer2 = nn.Linear(self.temporal_dim, self.temporal_dim)

    @property
    def model_type(self) -> str:
        return "nested_unet"

    def unused_parameters(self) -> List[str]:
        """The inner UNet's, and this level's own text layers (the innermost level encodes the text for
        all: ``forward_conditioning``) and ``interp_conditioning``'s layers, which the public code builds
        and never calls."""
        own = [name for name in ("cond_emb", "lm_proj", "lm_head", "interp_layer1", "interp_layer2")
               if getattr(self, name, None) is not None]
        return ([f"{m}.{n}" for m in own for n, _ in getattr(self, m).named_parameters()]
                + [f"inner_unet.{n}" for n in self.inner_unet.unused_parameters()])

    def load_inner(self, path: str) -> None:
        """Initialise the inner UNet from a lower-resolution model's checkpoint (``{"state_dict": ...}``)."""
        if not os.path.isfile(path):
            warnings.warn(f"unet_config.initialize_inner_with_pretrained: no file {path!r}; the inner UNet "
                          "keeps its fresh initialisation", stacklevel=3)
            return
        if any(p.is_meta for p in self.inner_unet.parameters()):
            return  # built on the meta device: nothing to load into
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
        self.inner_unet.load_state_dict(state, strict=True)

    def forward_conditioning(self, conditioning, cond_mask):
        return self.inner_unet.forward_conditioning(conditioning, cond_mask)

    def forward_denoising(self, x_t, times, cond_emb=None, conditioning=None, cond_mask=None, micros=None):
        micros = micros or {}
        temb = self.time_embedding(times, cond_emb, micros)
        x_feat = None
        if self.config.nesting:
            x_t, x_feat = x_t
        bh = x_t[0].size(0)  # a mixed batch has fewer high-resolution samples than low-resolution ones
        x_t_low, x_t = x_t[1:], x_t[0]
        x = self.forward_input_layer(x_t, normalize=not self.config.skip_normalization)
        if x_feat is not None:
            x = x + x_feat
        text_h = conditioning[:bh] if conditioning is not None else None
        mask_h = cond_mask[:bh] if cond_mask is not None else None
        x, skips = self.forward_downsample(x, temb[:bh], text_h, mask_h)
        x, x_low = self.forward_inner(x, x_t_low, times, cond_emb, conditioning, cond_mask, micros)
        x = self.forward_upsample(x, temb[:bh], text_h, mask_h, skips)
        out = [self.forward_output_layer(x)] + (x_low if isinstance(x_low, list) else [x_low])
        return (out, x) if self.config.nesting else out

    def forward_inner(self, x, x_t_low, times, cond_emb, conditioning, cond_mask, micros):
        """The inner UNet between this level's down and up blocks: ``x`` (bh, C, h, w) features in,
        (``x`` plus the inner UNet's adapted features, the inner outputs) out."""
        bh, bl = x.size(0), x_t_low[0].size(0)
        x_inner = None  # skip_inner_unet_input: the inner UNet gets no features of this level (the public
        # code pads None with zeros on a mixed batch, bh < bl, and crashes)
        if self.in_adapter is not None:
            x_inner = self.in_adapter(x)
            if bh < bl:  # zero features for the samples that only have low resolutions
                x_inner = torch.cat([x_inner, x_inner.new_zeros(bl - bh, *x_inner.shape[1:])], 0)
        x_low, x_inner = self.inner_unet.forward_denoising((x_t_low, x_inner), times, cond_emb, conditioning,
                                                           cond_mask, micros)
        return x + self.out_adapter(x_inner)[:bh], x_low
