"""Wan2.1 video VAE, numerically equivalent to diffusers' ``AutoencoderKLWan``.

Loads diffusers checkpoints as is: the constructor takes the keys of diffusers'
``vae/config.json`` and ``state_dict()`` uses diffusers' parameter names.

Decoding can be spatially tiled (``enable_tiling``, same tiles and blending as diffusers,
see ``tiling.py``) and, on several ranks, split tile by tile across the sequence-parallel
group (``distributed_decode.py``).
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastvideo.distributed.parallel_state import get_sp_group
from fastvideo.models.vaes.common import DiagonalGaussian
from fastvideo.models.vaes.distributed_decode import decode_tiled_across_ranks
from fastvideo.models.vaes.tiling import TileConfig, TileGrid, decode_tiled
from fastvideo.models.vaes.wanvae_blocks import (
    CausalConv3d,
    Decoder3d,
    Encoder3d,
    FeatureCache,
)

# The encoder sees the first frame alone, then 4 frames at a time; a chunk of 4 frames
# becomes one latent frame with the Wan2.1 temporal downsampling.
ENCODE_CHUNK_FRAMES = 4

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass
class WanVAEConfig:
    """The keys of diffusers' ``AutoencoderKLWan`` config, with diffusers' defaults (Wan2.1).

    ``clip_output`` is not a diffusers key: it turns off the clamp of decoded video to
    [-1, 1] that diffusers always applies.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: Sequence[float] = ()
    temperal_downsample: Sequence[bool] = (False, True, True)
    dropout: float = 0.0
    latents_mean: Sequence[float] = WAN21_LATENTS_MEAN
    latents_std: Sequence[float] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8
    clip_output: bool = True

    def __post_init__(self) -> None:
        # Wan2.2 (TI2V-5B) uses residual up/down blocks and patchified input; not ported.
        if self.is_residual:
            raise ValueError(
                "AutoencoderKLWan config is_residual=True (Wan2.2 VAE) is not supported; "
                "only is_residual=False (Wan2.1) is."
            )
        if self.patch_size is not None:
            raise ValueError(
                f"AutoencoderKLWan config patch_size={self.patch_size!r} (Wan2.2 VAE) is not "
                "supported; only patch_size=None (Wan2.1) is."
            )
        # diffusers builds encoder-only attention blocks for attn_scales and then fails to
        # call them, so no working checkpoint can use them.
        if len(self.attn_scales) > 0:
            raise ValueError(
                f"AutoencoderKLWan config attn_scales={list(self.attn_scales)!r} is not "
                "supported; only attn_scales=[] (Wan2.1) is."
            )
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"AutoencoderKLWan config temperal_downsample needs len(dim_mult) - 1 = "
                f"{len(self.dim_mult) - 1} entries, got {list(self.temperal_downsample)!r}."
            )


class AutoencoderKLWan(nn.Module):
    """Causal 3D KL-VAE of Wan2.1: 1 + 4k frames of H x W video <-> 1 + k latent frames of
    (H / 8) x (W / 8) with ``z_dim`` channels (for the released config).

    Keyword arguments are the fields of :class:`WanVAEConfig`, i.e. diffusers' config keys;
    ``self.config`` exposes them like diffusers' ``vae.config``.

    Decoding on several ranks: see :meth:`decode`.
    """

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self.config = WanVAEConfig(**config)
        cfg = self.config
        dim_mult = list(cfg.dim_mult)
        temperal_downsample = list(cfg.temperal_downsample)

        self.encoder = Encoder3d(
            in_channels=cfg.in_channels,
            dim=cfg.base_dim,
            out_channels=cfg.z_dim * 2,  # mean and logvar
            dim_mult=dim_mult,
            num_res_blocks=cfg.num_res_blocks,
            temperal_downsample=temperal_downsample,
            dropout=cfg.dropout,
        )
        self.quant_conv = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(
            dim=cfg.decoder_base_dim if cfg.decoder_base_dim is not None else cfg.base_dim,
            z_dim=cfg.z_dim,
            dim_mult=dim_mult,
            num_res_blocks=cfg.num_res_blocks,
            temperal_upsample=temperal_downsample[::-1],
            dropout=cfg.dropout,
            out_channels=cfg.out_channels,
        )
        # From the architecture, not config.scale_factor_*: a config may disagree with it.
        self.spatial_ratio = 2 ** (len(dim_mult) - 1)
        self.temporal_ratio = 2 ** sum(temperal_downsample)
        self.tiling: TileConfig | None = None
        # Latent frames per decoder call after the first (which is always alone); see
        # set_decode_chunk_frames. 1 is diffusers' frame-by-frame decode.
        self.decode_chunk_frames = 1
        self.channels_last = False

    def set_decode_chunk_frames(self, frames: int) -> None:
        """Decode ``frames`` latent frames per decoder call instead of one: the same
        computation (the causal convolutions see the same frames through their cache), in
        fewer, larger kernels, for about ``frames`` times the activation memory."""
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"decode_chunk_frames must be a positive int, got {frames!r}")
        self.decode_chunk_frames = frames

    def use_channels_last(self, enabled: bool = True) -> None:
        """Run the decoder's convolutions channels-last (NDHWC / NHWC weights and
        activations), the layout cuDNN's fastest convolution kernels read."""
        formats = {5: torch.channels_last_3d, 4: torch.channels_last}
        for module in self.modules():
            if isinstance(module, nn.Conv3d | nn.Conv2d):
                fmt = formats[module.weight.dim()] if enabled else torch.contiguous_format
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)
        self.channels_last = enabled

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "AutoencoderKLWan":
        """Build from a parsed diffusers ``config.json`` or a diffusers ``vae.config``.

        diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``, ...) all start
        with ``_`` and are dropped; any other unknown key is an error.
        """
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls(**kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Posterior over latents for video ``x`` of shape (B, in_channels, T, H, W) in
        [-1, 1].

        Like diffusers, only the first 1 + 4 * ((T - 1) // 4) frames are encoded; trailing
        frames that do not fill a chunk of 4 are dropped. H and W should be multiples of 8.
        The latents are unnormalised: pipelines apply ``config.latents_mean/std``.
        """
        return DiagonalGaussian(self._encode(x))

    def enable_tiling(
        self,
        tile_sample_min_height: int = 256,
        tile_sample_min_width: int = 256,
        tile_sample_stride_height: int = 192,
        tile_sample_stride_width: int = 192,
    ) -> None:
        """Decode frames larger than one tile tile by tile, like diffusers' ``enable_tiling``
        with the same arguments (video pixels; multiples of ``spatial_ratio``, strides at
        most the tile size). Peak memory becomes one tile's activations plus the output."""
        config = TileConfig(
            sample_min_height=tile_sample_min_height,
            sample_min_width=tile_sample_min_width,
            sample_stride_height=tile_sample_stride_height,
            sample_stride_width=tile_sample_stride_width,
        )
        config.check(self.spatial_ratio)
        self.tiling = config

    def disable_tiling(self) -> None:
        self.tiling = None

    @property
    def use_tiling(self) -> bool:
        return self.tiling is not None

    def decode(
        self,
        z: torch.Tensor,
        *,
        group: dist.ProcessGroup | None = None,
        split_across_ranks: bool = True,
    ) -> torch.Tensor:
        """Video from unnormalised latents ``z`` of shape (B, z_dim, T, h, w); with the
        Wan2.1 config it is (B, out_channels, 1 + 4 * (T - 1), 8h, 8w). Clamped to [-1, 1]
        (as diffusers does) unless ``config.clip_output`` is False.

        With tiling enabled and a frame larger than one tile, decodes tile by tile.

        On several ranks (``group``, by default the sequence-parallel group of
        ``parallel_state``), every rank of the group must call ``decode`` with the same
        ``z``: the tiles are shared out round-robin, exchanged, and every rank returns the
        same video, equal to the single-rank tiled decode. If tiling is not enabled, the
        split uses diffusers' default tiles (256 px every 192 px) when the frame holds more
        than one, and otherwise every rank decodes the whole frame; note that a tiled
        decode differs slightly from an untiled one near tile seams.
        ``split_across_ranks=False`` decodes on this rank alone, e.g. when only some ranks
        of the group decode.
        """
        if split_across_ranks and group is None:
            group = get_sp_group()
        world = dist.get_world_size(group) if split_across_ranks and group is not None else 1
        video = self._decode_tiles_if_enabled(z, group if world > 1 else None)
        # In place: the video is a fresh tensor, and a copy would double the output memory.
        return video.clamp_(-1.0, 1.0) if self.config.clip_output else video

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Reconstruction of ``x`` through the posterior mode (or a sample of it)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    def _decode_tiles_if_enabled(
        self, z: torch.Tensor, group: dist.ProcessGroup | None
    ) -> torch.Tensor:
        tiling = self.tiling
        if tiling is None and group is not None:
            tiling = TileConfig()
        if tiling is None:
            return self._decode(z)
        grid = TileGrid(z.shape[-2], z.shape[-1], tiling, self.spatial_ratio)
        if not grid.is_tiled:
            return self._decode(z)
        if group is None:
            return decode_tiled(self._decode, z, grid)
        frames = 1 + self.temporal_ratio * (z.shape[2] - 1)
        lead_shape = (z.shape[0], self.config.out_channels, frames)
        return decode_tiled_across_ranks(self._decode, z, grid, lead_shape, group)

    # _encode and _decode process one clip (or one tile of it) with a fresh feature cache.

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        cache: FeatureCache = {}
        latents = [self.encoder(chunk, cache) for chunk in _encode_chunks(x)]
        return self.quant_conv(torch.cat(latents, dim=2))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.post_quant_conv(z)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        cache: FeatureCache = {}
        video: torch.Tensor | None = None
        start = t = 0
        # Latent frame 0 alone (it decodes to 1 frame), then chunks of decode_chunk_frames
        # (each latent frame decodes to temporal_ratio = 4). Written into one preallocated
        # video rather than concatenated, which would briefly hold the video twice.
        while t < x.shape[2]:
            n = 1 if t == 0 else min(self.decode_chunk_frames, x.shape[2] - t)
            frames = self.decoder(x[:, :, t : t + n], cache, first_chunk=t == 0)
            if video is None:
                num_frames = 1 + self.temporal_ratio * (x.shape[2] - 1)
                b, c, _, h, w = frames.shape
                video = frames.new_empty(b, c, num_frames, h, w)
            video[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
            t += n
        assert video is not None and start == video.shape[2]
        return video


def _encode_chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Frame 0 alone, then consecutive chunks of ENCODE_CHUNK_FRAMES frames; an incomplete
    trailing chunk is dropped, as diffusers does."""
    yield x[:, :, :1]
    for start in range(1, x.shape[2] - ENCODE_CHUNK_FRAMES + 1, ENCODE_CHUNK_FRAMES):
        yield x[:, :, start : start + ENCODE_CHUNK_FRAMES]
