"""Build tiny random-weight Wan2.1 pipelines in diffusers format, with diffusers itself.

The folders are what ``WanPipeline.save_pretrained`` writes (``model_index.json``, one
sub-folder per component), so our loader reads them exactly as it reads a real checkpoint,
and diffusers can load the same folder as the numerical reference. Nothing is downloaded:
the T5 tokenizer is trained here on a few sentences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastvideo.models.dits import wanvideo  # ours; diffusers' class has the same name

_CORPUS = [
    "a cat and a dog baking a cake together in a kitchen",
    "the quick brown fox jumps over the lazy dog at sunset",
    "a red panda eating bamboo in the snow, cinematic lighting",
    "waves crash on a rocky shore while seagulls fly overhead",
    "a drone shot over a city at night with neon lights",
]


@dataclass
class TinyWanConfig:
    num_attention_heads: int = 2
    attention_head_dim: int = 12
    num_layers: int = 2
    ffn_dim: int = 32
    text_dim: int = 32
    freq_dim: int = 16
    z_dim: int = 4
    vae_base_dim: int = 8
    vae_dim_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    vae_num_res_blocks: int = 1
    vae_temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])
    t5_layers: int = 2
    t5_heads: int = 4
    scheduler: str = "unipc"  # or "flow_match_euler"
    image_to_video: bool = False
    #: Wan2.2's two experts: a second DiT (other weights) for the low-noise steps, switched
    #: at ``boundary_ratio`` of the training timesteps.
    boundary_ratio: float | None = None
    clip_hidden: int = 24
    clip_image_size: int = 32

    def vae_kwargs(self) -> dict:
        """The tiny VAE's architecture as ``AutoencoderKLWan`` keyword arguments (diffusers'
        names, which ours takes too)."""
        return dict(
            base_dim=self.vae_base_dim,
            z_dim=self.z_dim,
            dim_mult=list(self.vae_dim_mult),
            num_res_blocks=self.vae_num_res_blocks,
            temperal_downsample=list(self.vae_temperal_downsample),
        )


def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=128, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(_CORPUS * 10, trainer)
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=512,
    )


def _scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
            num_train_timesteps=1000,
        )
    if kind == "flow_match_euler":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    raise ValueError(f"scheduler must be 'unipc' or 'flow_match_euler', got {kind!r}")


def build_tiny_wan_components(config: TinyWanConfig, seed: int = 0) -> dict:
    """The diffusers/transformers modules of a tiny Wan2.1 pipeline, random weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=config.text_dim,
            d_kv=8,
            d_ff=48,
            num_layers=config.t5_layers,
            num_heads=config.t5_heads,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    vae = AutoencoderKLWan(
        **config.vae_kwargs(),
        latents_mean=[0.1 * i for i in range(config.z_dim)],
        latents_std=[1.0 + 0.1 * i for i in range(config.z_dim)],
    ).eval()
    in_channels = config.z_dim
    image_kwargs = {}
    components = {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}
    if config.image_to_video:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        in_channels = 2 * config.z_dim + vae.config.scale_factor_temporal
        inner = config.num_attention_heads * config.attention_head_dim
        image_kwargs = {"image_dim": config.clip_hidden, "added_kv_proj_dim": inner}
        components["image_encoder"] = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=config.clip_hidden,
                intermediate_size=48,
                projection_dim=16,
                num_hidden_layers=3,
                num_attention_heads=4,
                image_size=config.clip_image_size,
                patch_size=8,
            )
        ).eval()
        components["image_processor"] = CLIPImageProcessor(
            crop_size=config.clip_image_size, size={"shortest_edge": config.clip_image_size}
        )
    components["transformer"] = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=in_channels,
        out_channels=config.z_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **image_kwargs,
    ).eval()
    if config.boundary_ratio is not None:
        # Drawn after the first: other random weights, the same architecture.
        first = components["transformer"]
        components["transformer_2"] = WanTransformer3DModel.from_config(first.config).eval()
    components["scheduler"] = _scheduler(config.scheduler)
    return components


def save_tiny_wan(
    folder: str | Path,
    config: TinyWanConfig | None = None,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a tiny Wan2.1 pipeline (T2V, or I2V with ``config.image_to_video``) to ``folder``.

    ``max_shard_size`` (e.g. ``"20KB"``) splits each model's weights into sharded
    safetensors with an index, as large real checkpoints are stored.
    """
    from diffusers import WanImageToVideoPipeline, WanPipeline

    config = config or TinyWanConfig()
    components = build_tiny_wan_components(config, seed)
    pipeline_cls = WanImageToVideoPipeline if config.image_to_video else WanPipeline
    extra = {"boundary_ratio": config.boundary_ratio} if config.boundary_ratio is not None else {}
    pipeline = pipeline_cls(**components, **extra)
    folder = Path(folder)
    pipeline.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return folder


def tiny_dit(device: str | torch.device = "cpu", seed: int = 0):
    """Our Wan DiT alone, two blocks of 2 heads x 16, random weights (``seed``): small enough
    to compile or to run through Triton's interpreter in a test."""
    torch.manual_seed(seed)
    model = wanvideo.WanTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=24,
        freq_dim=16,
        ffn_dim=40,
        num_layers=2,
    )
    return model.eval().to(device)


def tiny_dit_inputs(batch: int = 1, device: str | torch.device = "cpu"):
    """(latents, timesteps, text) for :func:`tiny_dit`: a 3x6x10 latent (45 tokens after
    patching), timesteps 999, 500, ... and 7 text tokens, from the global RNG."""
    latents = torch.randn(batch, 4, 3, 6, 10, device=device)
    text = torch.randn(batch, 7, 24, device=device)
    timestep = torch.tensor([999.0 - 499.0 * i for i in range(batch)], device=device)
    return latents, timestep, text
