"""A class-conditional DiT with any linvision mixer and an MLP or SANA's Mix-FFN, trained from scratch.

Paper: "Scalable Diffusion Models with Transformers", Peebles & Xie, arXiv 2212.09748 (adaLN-Zero, learned
sigma). Official: ``facebookresearch/DiT: models.py`` (``TimestepEmbedder``, ``LabelEmbedder``, ``DiTBlock``,
``FinalLayer``, ``DiT.initialize_weights``). The SANA-style variant (``mixer="sana"``, ``mlp_layer="glumbconv"``,
``pos_embed="none"``) takes the block of "SANA: Efficient High-Resolution Image Synthesis with Linear Diffusion
Transformers", Xie et al., arXiv 2410.10629 (ReLU linear attention + Mix-FFN, no positional embedding; official
``NVlabs/Sana: diffusion/model/nets/sana.py``), with DiT's class conditioning in place of SANA's text
cross-attention and adaLN-single.

Called as diffusers' ``DiTTransformer2DModel``: ``model(latents, timestep=t, class_labels=y).sample`` with
``latents (B, C, H, W)`` and a ``(B, 2C, H, W)`` output (ε, then the learned-sigma channels), so
``linvision.sample.dit.sample_dit`` and the digits teacher's loop use it unchanged; saved and loaded with
``save_pretrained``/``from_pretrained`` (its constructor arguments are the config), also inside a
``DiTPipeline``. Resolution comes from each call: any ``H, W`` multiple of ``patch_size``.

Deviations from the official DiT, all to match diffusers' port (the demo's softmax teacher): the null class
(classifier-free guidance) is ``num_classes`` and label dropout draws from the global generator, as diffusers'
``LabelEmbedding``; the sin-cos positional embedding at a grid other than ``sample_size/patch_size`` spreads
the same span of positions over the new grid (diffusers' ``PatchEmbed`` rule, ``interpolation_scale=1``).
Mixers with their own ``reset_parameters`` keep their official init; DiT's Xavier init covers the rest.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

from ..kernels.validation import check_bool, check_choice, check_float, check_int
from ..mixers import create_mixer, list_mixers
from .block import MLP_LAYERS, apply_ffn, build_ffn

POS_EMBEDS = ("sincos", "none")
FREQUENCY_CHANNELS = 256  # DiT's TimestepEmbedder.frequency_embedding_size


def timestep_features(t: Tensor, channels: int = FREQUENCY_CHANNELS, max_period: float = 10000.0) -> Tensor:
    """``t (B,)`` → ``(B, channels)`` fp32 ``[cos(t·f), sin(t·f)]``, ``f_i = max_period^(-i/half)`` (DiT's)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_positions(dim: int, hw: Tuple[int, int], base: int, device=None) -> Tensor:
    """``(h·w, dim)`` fp32 2D sin-cos embedding (MAE/DiT): first half the column, second half the row.

    Positions along an axis of ``n`` tokens are ``arange(n)·base/n`` (diffusers' ``get_2d_sincos_pos_embed``
    with ``base_size=base``): the training grid ``base`` gives integer positions.
    """
    h, w = hw
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def axis(n: int) -> Tensor:
        out = (torch.arange(n, dtype=torch.float64, device=device) * (base / n))[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # (n, dim/2)

    cols, rows = axis(w), axis(h)
    grid = torch.cat([cols[None, :, :].expand(h, w, -1), rows[:, None, :].expand(h, w, -1)], dim=-1)
    return grid.reshape(h * w, dim).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """``x (B, h·w, D)``, conditioning ``c (B, D)`` → ``(B, h·w, D)``, DiT's adaLN-Zero block::

        shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c)      SiLU → Linear(D, 6D), zero init
        x = x + gate1 · attn(modulate(norm1(x), shift1, scale1), hw)
        x = x + gate2 · mlp(modulate(norm2(x), shift2, scale2))

    ``attn``: ``create_mixer(mixer, D, num_heads, **mixer_kwargs)``; ``mlp``: :func:`build_ffn` (DiT's MLP
    with tanh-GELU, or SANA's GLUMBConv, which also gets ``hw``); norms: LayerNorm without affine, eps 1e-6.
    """

    def __init__(self, dim: int, num_heads: int, mixer: str, mixer_kwargs: Mapping[str, Any], mlp_layer: str,
                 mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = create_mixer(mixer, dim, num_heads, **dict(mixer_kwargs))
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = build_ffn(mlp_layer, dim, mlp_ratio, partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, hw: Tuple[int, int]) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), hw, 0)
        return x + gate2[:, None] * apply_ffn(self.mlp, modulate(self.norm2(x), shift2, scale2), hw, 0)


class LinVisionDiT(ModelMixin, ConfigMixin):
    """Class-conditional DiT: ``forward(hidden_states (B, C, H, W), timestep (B,) or scalar, class_labels (B,))``
    → ``Transformer2DModelOutput(sample=(B, C_out, H, W))``, ``C_out = 2C`` with ``learn_sigma`` (ε first).

    Width ``D = num_attention_heads · attention_head_dim``; ``num_layers`` :class:`DiTBlock`; patch embedding
    ``Conv2d(C, D, patch_size, stride=patch_size)`` plus, with ``pos_embed="sincos"``, DiT's fixed 2D sin-cos
    embedding (SANA-style models use ``"none"``: the Mix-FFN's depth-wise conv places the tokens).
    Conditioning ``c = TimestepEmbedder(t) + LabelEmbedder(y)``; labels in ``[0, num_classes]``, where
    ``num_classes`` is the null class of classifier-free guidance, and in training each label becomes the null
    class with probability ``class_dropout_prob``. Final layer: adaLN (shift, scale) then ``Linear(D, p²·C_out)``.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        num_layers: int = 12,
        num_attention_heads: int = 6,
        attention_head_dim: int = 64,
        mixer: str = "softmax",
        mixer_kwargs: Optional[Mapping[str, Any]] = None,
        mlp_layer: str = "mlp",
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        p = check_int("patch_size", patch_size, min=1)
        if check_int("sample_size", sample_size, min=1) % p:
            raise ValueError(f"sample_size={sample_size} must be a multiple of patch_size={p}")
        c_in = check_int("in_channels", in_channels, min=1)
        check_int("num_layers", num_layers, min=1)
        heads = check_int("num_attention_heads", num_attention_heads, min=1)
        dim = heads * check_int("attention_head_dim", attention_head_dim, min=1)
        check_choice("mixer", mixer, list_mixers())
        if mixer_kwargs is not None and not isinstance(mixer_kwargs, Mapping):
            raise ValueError(f"mixer_kwargs must be a mapping of mixer options or None, got {mixer_kwargs!r}")
        check_choice("mlp_layer", mlp_layer, MLP_LAYERS)
        check_float("mlp_ratio", mlp_ratio, min=0, min_open=True)
        if int(dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} leaves no hidden channels at width {dim}")
        self.out_channels = 2 * c_in if check_bool("learn_sigma", learn_sigma) else c_in
        self.num_classes = check_int("num_classes", num_classes, min=1)
        self.class_dropout_prob = check_float("class_dropout_prob", class_dropout_prob, min=0, max=1, max_open=True)
        self.use_pos_embed = check_choice("pos_embed", pos_embed, POS_EMBEDS) == "sincos"
        if self.use_pos_embed and dim % 4:
            raise ValueError(f"pos_embed='sincos' needs a width divisible by 4, got {dim}")
        self.x_embedder = nn.Conv2d(c_in, dim, p, stride=p)
        self.t_embedder = nn.Sequential(nn.Linear(FREQUENCY_CHANNELS, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Embedding(self.num_classes + 1, dim)
        self.blocks = nn.ModuleList(
            DiTBlock(dim, heads, mixer, mixer_kwargs or {}, mlp_layer, mlp_ratio) for _ in range(num_layers))
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.proj_out = nn.Linear(dim, p * p * self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init: Xavier-uniform linears (zero bias; mixers with a ``reset_parameters`` keep their own),
        patch embedding Xavier on its flattened kernel, embedders N(0, 0.02), adaLN modulations and the output
        projection zero (every block starts as the identity, the output as 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            if hasattr(block.attn, "reset_parameters"):
                block.attn.reset_parameters()
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for layer in (self.final_modulation[-1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _labels(self, class_labels: Tensor, batch: int) -> Tensor:
        y = torch.as_tensor(class_labels, device=self.y_embedder.weight.device).reshape(-1)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.numel() != batch:
            raise ValueError(f"class_labels must be {batch} integers, got {tuple(y.shape)} {y.dtype}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes}: the null class)")
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(batch, device=y.device) < self.class_dropout_prob  # global generator, as diffusers
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return y

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Union[Tensor, float, int],
        class_labels: Tensor,
        return_dict: bool = True,
    ) -> Union[Transformer2DModelOutput, Tuple[Tensor]]:
        p, c_in = self.config.patch_size, self.config.in_channels
        if hidden_states.dim() != 4 or hidden_states.shape[1] != c_in:
            raise ValueError(f"expected latents of shape (B, {c_in}, H, W), got {tuple(hidden_states.shape)}")
        B, _, H, W = hidden_states.shape
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} must be a multiple of patch_size={p}")
        hw = (H // p, W // p)
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        if t.numel() not in (1, B):
            raise ValueError(f"timestep must be a scalar or {B} values, got {t.numel()}")
        t = t.expand(B)
        dtype = self.x_embedder.weight.dtype
        x = self.x_embedder(hidden_states.to(dtype)).flatten(2).transpose(1, 2)  # (B, h·w, D)
        if self.use_pos_embed:
            base = self.config.sample_size // p
            x = x + sincos_positions(x.shape[-1], hw, base, x.device).to(dtype)
        c = self.t_embedder(timestep_features(t).to(dtype)) + self.y_embedder(self._labels(class_labels, B))
        for block in self.blocks:
            x = block(x, c, hw)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        x = self.proj_out(modulate(self.norm_final(x), shift, scale))  # (B, h·w, p·p·C_out)
        x = x.reshape(B, hw[0], hw[1], p, p, self.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", x).reshape(B, self.out_channels, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


__all__ = ["DiTBlock", "LinVisionDiT", "POS_EMBEDS", "sincos_positions", "timestep_features"]
