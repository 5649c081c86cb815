"""Tiny random-weight diffusers pipelines built from configs (no hub), for integration and job tests.

Each ``build_*`` returns a pipeline in eval mode; ``save`` writes it to a folder and reloads it offline.
``run(pipe, family, height, width)`` samples 2 steps with precomputed text embeddings, so no tokenizer
or text encoder runs. Configs follow the team spec ``shared/spec/integration.md`` (diffusers' dummy components).
"""
from __future__ import annotations

import json
import os

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

FAMILIES = ("unet", "dit", "pixart", "sd3", "flux", "sana")
# Latent stride (pixels per image token at the top level) and a "training" resolution per family.
STRIDE = {"unet": 2, "dit": 8, "pixart": 4, "sd3": 2, "flux": 4, "sana": 32}
TRAIN_SIZE = {"unet": 32, "dit": 32, "pixart": 32, "sd3": 32, "flux": 32, "sana": 64}


def tiny_vae(latent_channels: int = 4, blocks: int = 2) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[4, 8, 8, 8][:blocks], down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks, latent_channels=latent_channels, norm_num_groups=2,
        sample_size=32,
    )


def tiny_clip_tokenizer(folder: str):
    """A CLIPTokenizer over single letters (no merges): every prompt tokenises offline."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!": 1}
    for token in letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab) + 1
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!", model_max_length=16)


def build_sd(tokenizer_folder=None) -> StableDiffusionPipeline:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=2,
    )
    text_encoder = tokenizer = None
    if tokenizer_folder is not None:
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2, vocab_size=1000,
            bos_token_id=0, eos_token_id=2, pad_token_id=1))
        tokenizer = tiny_clip_tokenizer(tokenizer_folder)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return in_eval_mode(StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    ))


def build_dit() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=4, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )
    vae = tiny_vae(blocks=4)  # vae_scale_factor 8, as DiTPipeline assumes
    return in_eval_mode(DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(steps_offset=1)))


def build_pixart() -> PixArtAlphaPipeline:
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return in_eval_mode(PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                                        scheduler=DDIMScheduler(steps_offset=1)))


def build_sd3() -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=64, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=2,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5)
    return in_eval_mode(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    ))


def build_flux(tokenizer_folder=None) -> FluxPipeline:
    """Tiny FLUX; with ``tokenizer_folder``, tiny CLIP and T5 encoders sharing the letter tokenizer."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=1, norm_num_groups=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    encoders = dict(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if tokenizer_folder is not None:
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        tokenizer = tiny_clip_tokenizer(tokenizer_folder)
        encoders = dict(
            text_encoder=CLIPTextModel(CLIPTextConfig(
                hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)),
            tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                   num_heads=4)),
            tokenizer_2=tokenizer,
        )
    return in_eval_mode(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
                                     **encoders))


def in_eval_mode(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """``pipe`` with every module component in eval mode (components built from configs start in train mode)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def tiny_gemma_tokenizer():
    """A Gemma tokenizer over single printable characters (no merges, no files): any prompt tokenises offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GemmaTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for c in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return GemmaTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                              unk_token="<unk>")


def build_sana(text_encoder: bool = False) -> SanaPipeline:
    """Tiny SANA: 2 blocks of 16 channels (ReLU linear self-attention, GLUMBConv), a 6-level DC-AE (stride 32,
    as the published ``dc-ae-f32c32``), the published flow-prediction DPM-Solver; with ``text_encoder``, a tiny
    random Gemma-2 and a character tokenizer."""
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=8,
        sample_size=2, patch_size=1,
    )
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=blocks, decoder_block_types=blocks,
        encoder_block_out_channels=(4,) * 6, decoder_block_out_channels=(4,) * 6,
        encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3, decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6, downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    encoder = tokenizer = None
    if text_encoder:
        from transformers import Gemma2Config, Gemma2Model

        encoder = Gemma2Model(Gemma2Config(vocab_size=128, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                           max_position_embeddings=4096))
        tokenizer = tiny_gemma_tokenizer()
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return in_eval_mode(SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer,
                                     scheduler=scheduler))


BUILDERS = {"unet": build_sd, "dit": build_dit, "pixart": build_pixart, "sd3": build_sd3, "flux": build_flux,
            "sana": build_sana}


def captioned_images(folder, sizes, seed: int = 0) -> str:
    """Random RGB images ``(h, w)`` named a.png, b.png, … in ``folder`` and ``captions.jsonl`` beside it; returns
    the captions path."""
    import numpy as np
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i, (h, w) in enumerate(sizes):
        name = f"{chr(ord('a') + i)}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, name))
        lines.append(json.dumps({"file": name, "text": f"a photo number {chr(ord('a') + i)}"}))
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), "captions.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def save(pipe, folder: str) -> DiffusionPipeline:
    """Save ``pipe`` to ``folder`` and load it back offline (eval mode, fp32)."""
    pipe.save_pretrained(folder)
    return load(folder)


def load(folder: str) -> DiffusionPipeline:
    from linvision.sample.pipeline import load_pipeline

    return load_pipeline(folder)


def embeds(family: str, batch: int = 1):
    """Precomputed conditioning for ``family``: a kwargs dict for the pipeline call."""
    g = torch.Generator().manual_seed(123)
    if family == "unet":
        return {"prompt_embeds": torch.randn(batch, 6, 8, generator=g),
                "negative_prompt_embeds": torch.randn(batch, 6, 8, generator=g)}
    if family == "pixart":
        return {"prompt_embeds": torch.randn(batch, 5, 32, generator=g), "prompt_attention_mask": torch.ones(batch, 5),
                "negative_prompt_embeds": torch.randn(batch, 5, 32, generator=g),
                "negative_prompt_attention_mask": torch.ones(batch, 5), "negative_prompt": None}
    if family == "sana":
        return {"prompt_embeds": torch.randn(batch, 5, 8, generator=g), "prompt_attention_mask": torch.ones(batch, 5),
                "negative_prompt_embeds": torch.randn(batch, 5, 8, generator=g),
                "negative_prompt_attention_mask": torch.ones(batch, 5), "negative_prompt": None}
    if family == "sd3":
        return {"prompt_embeds": torch.randn(batch, 6, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(batch, 16, generator=g),
                "negative_prompt_embeds": torch.randn(batch, 6, 32, generator=g),
                "negative_pooled_prompt_embeds": torch.randn(batch, 16, generator=g)}
    if family == "flux":
        return {"prompt_embeds": torch.randn(batch, 6, 32, generator=g),
                "pooled_prompt_embeds": torch.randn(batch, 32, generator=g)}
    return {"class_labels": list(range(batch))}


def run(pipe, family: str, height: int, width: int, steps: int = 2, seed: int = 0):
    """A ``(B, 3, H, W)`` float image tensor from a ``steps``-step run of ``pipe`` at ``height``×``width``."""
    generator = torch.Generator().manual_seed(seed)
    if family == "dit":
        from linvision.sample.dit import sample_dit

        return sample_dit(pipe, class_labels=[1], height=height, width=width, steps=steps, guidance_scale=1.5,
                          generator=generator, output_type="pt")
    kwargs = dict(height=height, width=width, num_inference_steps=steps, generator=generator, output_type="pt")
    if family in ("pixart", "sana"):
        kwargs["use_resolution_binning"] = False
    if family == "flux":
        kwargs["max_sequence_length"] = 6
    return pipe(**kwargs, **embeds(family)).images
