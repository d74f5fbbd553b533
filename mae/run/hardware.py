"""What runs fast on this machine: the precision ``auto`` picks, and the attention kernel.

- ``mixed_precision=auto`` is bf16 autocast where the device computes bf16 natively (a CUDA GPU
  with bf16; a CPU with AVX512-BF16 or AMX-BF16), fp32 elsewhere (emulated bf16 is slower than
  fp32).
- ``attention=auto`` picks per device and precision. PyTorch's fused CPU attention kernel is slow
  in bf16 for short sequences (MAE's 17 and 65 tokens for ViT-Tiny/4 at 32 px, 50 in the ViT-B/16
  encoder), so on CPU under bf16 the attention core of sequences up to ``MATH_MAX_TOKENS`` is
  written out (``MathAttention``: bf16 matmuls, softmax in fp32 as CUDA autocast does); longer
  sequences and every other case use timm's ``F.scaled_dot_product_attention`` (flash on GPU).
  ``python bench/vs_hf.py`` measures both; parameters and state dicts do not change.
- ``tune_cpu_allocator``: training on CPU keeps its large short-lived tensors in glibc's heap
  instead of mapping fresh pages for each one (``python bench/allocator.py`` measures it).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from torch import nn


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo`` (Linux; elsewhere: no)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return False
    flags = next(
        (line for line in info.read_text().splitlines() if line.startswith("flags")), ""
    ).split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``device`` computes it natively, else ``no``; others unchanged."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    return "no"


def resolve_attention(requested: str, device: torch.device, precision: str) -> str:
    """``auto`` -> ``math`` on CPU under bf16, else ``fused``; others unchanged."""
    if requested != "auto":
        return requested
    return "math" if device.type == "cpu" and precision == "bf16" else "fused"


# Up to this many tokens the written-out core is faster on CPU under bf16; beyond it the fused
# kernel is (ViT-B/16 at 224 px, batch 32: 4.46 img/s with the encoder's 50 tokens written out and
# the decoder's 197 fused, 4.37 all fused, 3.67 all written out).
MATH_MAX_TOKENS = 128


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap threshold to 32 MB and its trim threshold to 2 GB, for this process and
    the processes it forks. By default glibc maps every allocation over a threshold (which adapts,
    but not beyond 32 MB) with a fresh ``mmap`` and unmaps it when freed, so the step's activations
    and gradients of a few MB to 32 MB are page-faulted in anew at every step. With these settings
    they are reused from the heap. The arithmetic is unchanged.

    Skipped, returning False, without glibc, or where these settings are already chosen
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or their ``GLIBC_TUNABLES``), with an
    allocator in ``LD_PRELOAD`` (jemalloc, tcmalloc), or with ``MAE_DEFAULT_MALLOC=1``."""
    env = os.environ
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "mmap_threshold", "trim_threshold")
    chosen = any(n in env for n in names[:2]) or any(
        n in env.get("GLIBC_TUNABLES", "") for n in names[2:]
    )
    if chosen or env.get("LD_PRELOAD") or env.get("MAE_DEFAULT_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has, the C library's among them
        # glibc only (musl and macOS have no mallopt like it): a missing symbol raises
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


class MathAttention(Attention):
    """timm's ``Attention`` with the core written out for sequences of at most ``MATH_MAX_TOKENS``:
    q k^T and (softmax) v in the autocast dtype, the softmax in fp32; longer ones take timm's fused
    path. Same parameters; swapped in and out by ``set_attention``."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        if n > MATH_MAX_TOKENS:
            return super().forward(x, attn_mask, is_causal)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(n, attn, attn_mask, is_causal))
        attn = self.attn_drop(attn.float().softmax(dim=-1).to(v.dtype))
        x = self.norm((attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


# Each attention module class, with the class computing the same attention the other way: its
# fused (SDPA) and its math variant. A module's kind is switched by its class alone (parameters,
# buffers and state dict are the same), which works for timm's blocks inside any timm model as well
# as for the project's own modules; ``register_attention`` adds a pair.
ATTENTION_VARIANTS: dict[type[nn.Module], dict[str, type[nn.Module]]] = {}


def register_attention(fused: type[nn.Module], math: type[nn.Module]) -> None:
    """``set_attention`` turns ``fused`` modules into ``math`` ones and back."""
    variants = {"fused": fused, "math": math}
    ATTENTION_VARIANTS[fused] = ATTENTION_VARIANTS[math] = variants


register_attention(Attention, MathAttention)


def set_attention(model: nn.Module, kind: str) -> int:
    """Every attention module of ``model`` with a registered pair (``ATTENTION_VARIANTS``: timm's
    ``Attention``, the project's ``CrossAttention``) computes with ``kind`` (``fused`` | ``math``);
    returns how many modules there are."""
    count = 0
    for module in model.modules():
        variants = ATTENTION_VARIANTS.get(type(module))
        if variants is not None:
            module.__class__ = variants[kind]
            if isinstance(module, Attention):  # fused means timm's SDPA path, whatever its default
                module.fused_attn = True
            count += 1
    return count
