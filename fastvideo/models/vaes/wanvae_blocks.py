"""Building blocks of the Wan2.1 video VAE.

Submodule and parameter names follow diffusers' ``autoencoder_kl_wan`` so that its
checkpoints load without renaming.

Video is processed causally in time, one chunk of frames at a time. Every temporal
convolution needs the last frames of the previous chunk; a ``FeatureCache`` carries them
from chunk to chunk, keyed by the module that owns them. Start a new (empty) cache for
every clip, and for every tile of a tiled decode (see ``tiling.py``).
"""

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from fastvideo.layers.fused_ops import channel_norm_fuses, channel_rms_norm, write_stacked_frames

# Temporal kernel size 3 with causal padding means each cached conv looks back 2 frames.
CACHE_FRAMES = 2

FeatureCache = dict[nn.Module, torch.Tensor]


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value, value, value) if isinstance(value, int) else tuple(value)


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time: output frame t only sees input frames <= t.

    ``padding`` is given like ``nn.Conv3d``'s; the temporal part is doubled and applied in
    front only, spatial padding stays symmetric.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = _triple(padding)
        self.causal_pad = 2 * pad_t
        self.spatial_pad = (pad_w, pad_w, pad_h, pad_h)

    def forward(
        self, x: torch.Tensor, cache: FeatureCache | None = None, norm: "RMSNorm | None" = None
    ) -> torch.Tensor:
        """Convolve ``x``, or ``silu(norm(x))`` when ``norm`` is given.

        Where the fused kernels run (CUDA), a temporal kernel of 3 is computed as one 2D
        convolution over the three frames it reads stacked along channels (cuDNN's 2D
        kernels run this at about twice the speed of its 3D ones), and the norm writes its
        output straight into that stacked, zero-padded buffer: no separate normalised
        activation, concatenation with the cached frames or padded copy. The same sum of
        products, in another order."""
        gamma = None if norm is None else norm.gamma
        if self._stacks_frames() and channel_norm_fuses(x, gamma):
            return self._forward_stacked(x, cache, norm)
        if norm is not None:
            x = norm(x, silu=True)
        time_pad = self.causal_pad
        if cache is not None and time_pad > 0:
            prev = cache.get(self)
            cache[self] = _trailing_frames(x, prev)
            if prev is not None:
                # The previous chunk's frames replace (part of) the zero padding.
                x = torch.cat([prev, x], dim=2)
                time_pad -= prev.shape[2]
        x = F.pad(x, (*self.spatial_pad, time_pad, 0))
        return super().forward(x)

    def _stacks_frames(self) -> bool:
        return (
            self.kernel_size[0] == 3
            and self.causal_pad == 2
            and self.stride == (1, 1, 1)
            and self.dilation == (1, 1, 1)
            and self.groups == 1
        )

    def _forward_stacked(
        self, x: torch.Tensor, cache: FeatureCache | None, norm: "RMSNorm | None"
    ) -> torch.Tensor:
        """Output frame f reads padded frames f, f + 1, f + 2 (two zero or cached frames,
        then x's). Buffer: (B*T, 3*C, H + 2ph, W + 2pw) channels-last, channel block s
        holding frame f + s; spatial borders zero."""
        b, c, t, h, w = x.shape
        pad_w, _, pad_h, _ = self.spatial_pad
        prev = cache.get(self) if cache is not None else None
        num_prev = 0 if prev is None else prev.shape[2]
        zero_frames = self.causal_pad - num_prev
        stacked = torch.empty(
            b * t,
            3 * c,
            h + 2 * pad_h,
            w + 2 * pad_w,
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last,
        )
        if pad_h:
            stacked[:, :, :pad_h].zero_()
            stacked[:, :, -pad_h:].zero_()
        if pad_w:
            stacked[..., :pad_w].zero_()
            stacked[..., -pad_w:].zero_()
        inner = stacked.view(b, t, 3, c, *stacked.shape[2:])[
            ..., pad_h : pad_h + h, pad_w : pad_w + w
        ]
        # The slots that read the two frames in front of x: zeros or the cached frames.
        for frame in range(min(t, self.causal_pad)):
            for shift in range(self.causal_pad - frame):
                source = frame + shift
                if source < zero_frames:
                    inner[:, frame, shift].zero_()
                else:
                    inner[:, frame, shift] = prev[:, :, source - zero_frames]
        if norm is None:
            write_stacked_frames(x, inner, self.causal_pad)
        else:
            write_stacked_frames(x, inner, self.causal_pad, norm.gamma, norm.scale, silu=True)
        if cache is not None:
            # _trailing_frames' rule: the last CACHE_FRAMES input frames, cached ones included
            # (padded frame p = t + 1 + s - 2 sits in the last output frame's shift s).
            first = max(zero_frames, t + self.causal_pad - CACHE_FRAMES) - (t - 1)
            cache[self] = torch.stack([inner[:, t - 1, s] for s in range(first, 3)], dim=2)
        weight = self.weight.transpose(1, 2).reshape(
            self.out_channels, 3 * c, *self.kernel_size[1:]
        )
        out = F.conv2d(stacked, weight.contiguous(memory_format=torch.channels_last), self.bias)
        # (B*T, C_out, H, W) channels-last -> (B, C_out, T, H, W) channels-last-3d, no copy.
        return out.view(b, t, *out.shape[1:]).transpose(1, 2)


def _trailing_frames(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """The frames the next chunk must look back on: the last CACHE_FRAMES of ``x``, topped
    up with the last cached frame when ``x`` is a single frame (frame-by-frame decoding)."""
    tail = x[:, :, -CACHE_FRAMES:]
    if tail.shape[2] < CACHE_FRAMES and prev is not None:
        tail = torch.cat([prev[:, :, -1:], tail], dim=2)
    # Copy so the cache does not keep the whole activation tensor alive through a view.
    return tail.clone()


class RMSNorm(nn.Module):
    """L2-normalises over the channel dim (dim 1) and rescales by sqrt(dim) * gamma.

    ``spatial_dims`` is the number of trailing dims gamma broadcasts over: 3 for
    (B, C, T, H, W) activations, 2 for per-frame (B*T, C, H, W) ones.
    """

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(
        self,
        x: torch.Tensor,
        silu: bool = False,
        inplace: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The norm, then SiLU if ``silu``; one fused pass on CUDA (``fused_ops``), which
        may write over ``x`` when ``inplace`` (the caller's temporary, read by nobody else)
        or into ``out``. Sub-fp32 inputs are normalised in fp32: their sum of squares loses
        too much precision."""
        return channel_rms_norm(x, self.gamma, self.scale, silu=silu, inplace=inplace, out=out)


class NearestUpsample2x(nn.Module):
    """2x spatial nearest-exact upsampling of (N, C, H, W).

    Runs in fp32 like the original Wan code (its workaround for bf16 nearest interpolation);
    nearest only copies values, so the round trip is lossless.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial 2x up/down-sampling, optionally combined with temporal 2x up/down-sampling.

    ``mode`` is one of ``upsample2d``, ``upsample3d``, ``downsample2d``, ``downsample3d``.
    Upsampling halves the channel count (``dim -> dim // 2``), downsampling keeps it.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        # ``resample`` is an nn.Sequential whose conv sits at index 1, as in diffusers'
        # checkpoints (``resample.1.weight``).
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1)
            )
        elif mode in ("downsample2d", "downsample3d"):
            # Pad right/bottom only so the stride-2 conv maps H -> H // 2 for even H.
            self.resample = nn.Sequential(
                nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2)
            )
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

        if mode == "upsample3d":
            # Predicts two output frames per input frame, stacked along channels.
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(
        self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool = False
    ) -> torch.Tensor:
        # The first chunk is the lone first frame, which stays a single frame (causal VAE:
        # 1 + 4k frames <-> 1 + k latents), so it skips temporal up-sampling.
        if self.mode == "upsample3d" and not first_chunk:
            b, c, t, h, w = x.shape
            x = self.time_conv(x, cache)
            # (b, 2c, t, h, w) -> (b, c, 2t, h, w): channel half k becomes frame 2t + k.
            x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

        b, c, t, h, w = x.shape
        # Spatial resampling is per frame: (b, c, t, h, w) -> (b*t, c, h, w) and back.
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.resample(x)
        x = x.view(b, t, x.shape[1], x.shape[2], x.shape[3]).permute(0, 2, 1, 3, 4)

        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            # Without a previous chunk this is the lone first frame: it passes through as
            # is. Later chunks are strided over together with the previous chunk's last
            # frame, so 4 frames after the first map to 2, then 1.
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


class ResidualBlock(nn.Module):
    """(RMSNorm -> SiLU -> causal conv) x 2 with a 1x1x1 conv shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim, spatial_dims=3)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim, spatial_dims=3)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = (
            CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # One statement per step, rebinding x, so each intermediate is freed as soon as the
        # next exists: nesting the calls would keep conv1's output alive through conv2,
        # one more full-resolution activation at the decoder's peak. The norms run inside
        # the convolutions (see CausalConv3d.forward).
        shortcut = self.conv_shortcut(x)
        x = self.conv1(x, cache, norm=self.norm1)  # conv1(silu(norm1(x)))
        if self.training and self.dropout.p > 0:
            x = self.conv2(self.dropout(self.norm2(x, silu=True)), cache)
        else:
            x = self.conv2(x, cache, norm=self.norm2)
        return x.add_(shortcut)  # conv2's fresh output: no third full-resolution tensor


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        # (b, c, t, h, w) -> (b*t, c, h, w)
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x))
        # (b*t, 3c, h, w) -> (b*t, 1 head, h*w, 3c); contiguous so SDPA gets dense q/k/v.
        qkv = qkv.reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        # (b*t, 1, h*w, c) -> (b*t, c, h, w)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        # (b*t, c, h, w) -> (b, c, t, h, w)
        x = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + identity


class MidBlock(nn.Module):
    """Residual block, then (attention, residual block) pairs."""

    def __init__(self, dim: int, dropout: float = 0.0, num_layers: int = 1) -> None:
        super().__init__()
        self.attentions = nn.ModuleList(AttentionBlock(dim) for _ in range(num_layers))
        self.resnets = nn.ModuleList(
            ResidualBlock(dim, dim, dropout) for _ in range(num_layers + 1)
        )

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = attn(x)
            x = resnet(x, cache)
        return x


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks followed by an optional upsampler."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        dropout: float = 0.0,
        upsample_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout)
            for i in range(num_res_blocks + 1)
        )
        # A list (empty or of one) because checkpoints name it ``upsamplers.0``.
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)] if upsample_mode else [])

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        for upsampler in self.upsamplers:
            x = upsampler(x, cache, first_chunk=first_chunk)
        return x


class Encoder3d(nn.Module):
    """Video (B, in_channels, T, H, W) -> (B, out_channels, T', H', W').

    Level i has ``dim * dim_mult[i]`` channels; every level but the last ends with a 2x
    spatial downsample, also 2x temporal where ``temperal_downsample[i]`` is set.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        out_channels: int,
        dim_mult: list[int],
        num_res_blocks: int,
        temperal_downsample: list[bool],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)

        # A flat list (resnets then resample per level), as the checkpoint keys expect.
        blocks: list[nn.Module] = []
        last_level = len(dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            for i in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout))
            if level != last_level:
                mode = "downsample3d" if temperal_downsample[level] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.down_blocks = nn.ModuleList(blocks)

        self.mid_block = MidBlock(dims[-1], dropout)
        self.norm_out = RMSNorm(dims[-1], spatial_dims=3)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(x, cache, norm=self.norm_out)


class Decoder3d(nn.Module):
    """Latents (B, z_dim, T, h, w) -> video (B, out_channels, T', H, W); mirrors Encoder3d.

    ``temperal_upsample`` is the encoder's ``temperal_downsample`` reversed.
    """

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: list[int],
        num_res_blocks: int,
        temperal_upsample: list[bool],
        dropout: float = 0.0,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *reversed(dim_mult)]]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], dropout)

        blocks = []
        last_level = len(dim_mult) - 1
        for level, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            if level > 0:
                # The previous level's upsampler halved the channels.
                in_dim //= 2
            mode = None
            if level != last_level:
                mode = "upsample3d" if temperal_upsample[level] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)

        self.norm_out = RMSNorm(dims[-1], spatial_dims=3)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: FeatureCache, first_chunk: bool) -> torch.Tensor:
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache, first_chunk)
        return self.conv_out(x, cache, norm=self.norm_out)
