"""The token-mixer contract shared by every mechanism."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

from torch import Tensor, nn
from torch.fx import Proxy

from ..kernels.validation import check_bool, check_hw, check_int
from .token_chunks import TokenRows, linear_rows
from .tracing import trace_mix


def check_tokens(x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, dim: int) -> Tuple[int, int]:
    """Validate ``x (B, N, C)`` against ``hw`` and the prefix count; return ``(h, w)`` as ints.

    Raises ``ValueError`` for a wrong rank, a channel count other than ``dim``, a token count
    ``N != h*w + num_prefix_tokens``, a non-floating dtype, or a malformed ``hw``.
    """
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"expected x of shape (B, N, C), got {tuple(getattr(x, 'shape', ()))}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point x, got {x.dtype}")
    h, w = check_hw(hw)
    num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, min=0)
    if x.shape[-1] != dim:
        raise ValueError(f"expected {dim} channels, got x of shape {tuple(x.shape)}")
    if x.shape[1] != h * w + num_prefix_tokens:
        raise ValueError(
            f"token count {x.shape[1]} does not match hw={h}x{w} plus {num_prefix_tokens} prefix tokens "
            f"(= {h * w + num_prefix_tokens})"
        )
    return h, w


class TokenMixer(nn.Module):
    """Base of every mixer: ``forward(x, hw, num_prefix_tokens=0)`` with ``x, y: (B, N, C)``.

    Tokens are ``num_prefix_tokens`` prefix tokens (class, registers, text) followed by ``h*w`` image
    tokens in raster order. Subclasses implement :meth:`mix`; the base validates the input first.
    Resolution is an argument of every call, never state. Under ``torch.fx.symbolic_trace`` (a symbolic ``x``)
    the call goes to :func:`.tracing.trace_mix`: the mixer traces at the concrete ``hw``, or says why it cannot.

    What a mixer supports is declared by class attributes, never probed by trying it (tests/mixers/
    test_capabilities.py checks each declaration):

    - ``linear_cost``: whether the mixer's cost grows linearly with the tokens (checked by
      ``linvision bench --growth``); a quadratic mixer sets it to False.
    - ``prefix_tokens``: whether it takes ``num_prefix_tokens > 0`` (class, register or text tokens).
    - ``joint_attention``: whether it serves a joint text+image attention (SD3, FLUX) as the core of a
      :mod:`linvision.diffusers.joint` processor, the text tokens as its prefix tokens.
    - ``softmax_weights``: the layout in which its projections take a softmax attention's weights (weight
      inheritance): ``"qkv"`` (fused ``qkv`` + ``proj``, :class:`QKVMixer`), ``"to_qkv"`` (diffusers'
      ``to_q/to_k/to_v/to_out``), or None (it cannot inherit them).
    - ``paper_inherit``: the initialisation its paper uses when it replaces a softmax attention:
      ``"qkv+proj"`` (copy the teacher's projections) or ``"none"``.
    - ``supports_rope``: the mixer takes a teacher's rotary embedding for the calls inside
      ``with mixer.rotation(rope):`` (a :class:`linvision.mixers.rotary.Rotation`; its ``mix`` then gets a
      ``rope`` keyword). It is not a ``forward`` argument because torch.fx's codegen cannot trace a second
      defaulted argument beside a tuple ``hw``; outside the block the mixer holds none.
    - ``supports_qk_norm``: it applies ``q_norm``/``k_norm`` modules set by :meth:`QKVMixer.carry_qk_norm`
      to q and k per head. Both are checked by ``linvision.timm.linearize``.
    """

    linear_cost: bool = True
    prefix_tokens: bool = True
    joint_attention: bool = False
    softmax_weights: Optional[str] = None
    paper_inherit: str = "none"
    supports_rope: bool = False
    supports_qk_norm: bool = False

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        dim = check_int("dim", dim, min=1)
        num_heads = check_int("num_heads", num_heads, min=1)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    def forward(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int = 0) -> Tensor:
        if isinstance(x, Proxy):  # torch.fx.symbolic_trace of the mixer itself (see .tracing)
            return trace_mix(self, x, hw, num_prefix_tokens)
        h, w = check_tokens(x, hw, num_prefix_tokens, self.dim)
        rope = self.current_rope
        if rope is None:
            return self.mix(x, (h, w), int(num_prefix_tokens))
        if rope.tokens != h * w or rope.sin.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE for {rope.tokens} image tokens of {rope.sin.shape[-1]} dims; the grid "
                             f"hw={h}x{w} has {h * w} tokens, the heads {self.head_dim} dims")
        return self.mix(x, (h, w), int(num_prefix_tokens), rope=rope)

    @property
    def current_rope(self):
        """The :class:`~linvision.mixers.rotary.Rotation` of the enclosing :meth:`rotation` block, or None."""
        return self.__dict__.get("_rope")

    @contextmanager
    def rotation(self, rope) -> Iterator["TokenMixer"]:
        """``with mixer.rotation(rope): mixer(x, hw, T)``: the calls inside rotate q/k (features) of the image
        tokens with ``rope``; ``ValueError`` for a mixer without ``supports_rope``."""
        if not self.supports_rope:
            raise ValueError(f"{type(self).__name__} does not take a rotary position embedding (rope)")
        previous = self.__dict__.get("_rope")
        self.__dict__["_rope"] = rope
        try:
            yield self
        finally:
            self.__dict__["_rope"] = previous

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement mix()")

    def split_heads(self, t: Tensor) -> Tensor:
        """(B, N, C) → (B, N, H, D), a view."""
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


class QKVMixer(TokenMixer):
    """A mixer with timm-style fused ``qkv`` and ``proj`` linears, so softmax attention weights load as they are."""

    softmax_weights = "qkv"
    paper_inherit = "qkv+proj"

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=check_bool("qkv_bias", qkv_bias))
        self.proj = nn.Linear(dim, dim, bias=check_bool("proj_bias", proj_bias))

    def project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(B, N, C) → three (B, N, H, D) views of one packed projection (no copies); q and k go through
        ``q_norm``/``k_norm`` per head when :meth:`carry_qk_norm` set them."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(2)
        q_norm, k_norm = self.qk_norms()
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return q, k, v

    def qkv_rows(self, x: Tensor) -> Tuple[TokenRows, TokenRows, TokenRows]:
        """:meth:`project_qkv` as three functions of a token range: ``q(a, b)`` is ``q[:, a:b]`` ``[B, b − a, H, D]``.

        Each range is projected on its own from its third of the ``qkv`` weight (:func:`linear_rows`), so the
        ``[B, N, 3C]`` projection is never held (unless autograd records ``x`` or ``qkv`` is not a plain
        ``nn.Linear``). Ask each range once (it is projected on every call); ``v(0, N)`` gives all the values.
        """
        q_norm, k_norm = self.qk_norms()

        def heads(rows: TokenRows, norm: Optional[nn.Module]) -> TokenRows:
            if norm is None:
                return lambda a, b: self.split_heads(rows(a, b))
            return lambda a, b: norm(self.split_heads(rows(a, b)))

        return tuple(heads(rows, norm) for rows, norm in zip(linear_rows(self.qkv, x, 3), (q_norm, k_norm, None)))

    def qk_norms(self) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
        """``(q_norm, k_norm)`` set by :meth:`carry_qk_norm`, or ``(None, None)``."""
        return self._modules.get("q_norm"), self._modules.get("k_norm")

    def carry_qk_norm(self, q_norm: nn.Module, k_norm: nn.Module) -> None:
        """Normalise q and k per head (over ``D``) with these modules, as timm's ``Attention(qk_norm=True)``
        does before the softmax (state-dict keys ``q_norm.*``, ``k_norm.*``, as there). Only for a class
        with ``supports_qk_norm`` (``ValueError`` otherwise)."""
        if not self.supports_qk_norm:
            raise ValueError(f"{type(self).__name__} does not apply q/k norms (supports_qk_norm is False)")
        if not isinstance(q_norm, nn.Module) or not isinstance(k_norm, nn.Module):
            raise ValueError("q_norm and k_norm must be modules")
        self.q_norm, self.k_norm = q_norm, k_norm
