"""Precision and attention choices: what ``auto`` picks, and that the written-out attention is the
same computation as the fused one."""

import ctypes
import os
import subprocess
import sys

import pytest
import torch
from helpers import TINY
from timm.layers.attention import Attention

from mae.config import load_config
from mae.models import build_model
from mae.run import hardware
from mae.run.hardware import MathAttention, resolve_attention, resolve_precision, set_attention

CPU = torch.device("cpu")


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", CPU) == "no"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("no", CPU) == "no"
    assert resolve_attention("auto", CPU, "bf16") == "math"
    assert resolve_attention("auto", CPU, "no") == "fused"
    assert resolve_attention("auto", torch.device("cuda"), "bf16") == "fused"
    assert resolve_attention("fused", CPU, "bf16") == "fused"


def grads(model, images, noise, precision):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(images, noise=noise).loss
    loss.backward()
    return loss.detach().float(), {
        n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("bf16", 5e-2)])
def test_the_written_out_attention_computes_what_the_fused_one_does(precision, tol):
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    assert set_attention(model, "fused") == 3  # two encoder blocks and one decoder block
    loss_f, grads_f = grads(model, images, noise, precision)
    set_attention(model, "math")
    assert all(type(m) is MathAttention for m in model.modules() if isinstance(m, Attention))
    loss_m, grads_m = grads(model, images, noise, precision)
    assert torch.allclose(loss_f, loss_m, rtol=tol, atol=tol)
    for name, g in grads_f.items():
        assert torch.allclose(g, grads_m[name], rtol=tol, atol=tol * g.abs().max()), name
    # only the class changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    set_attention(model, "fused")
    assert all(type(m) is Attention for m in model.modules() if isinstance(m, Attention))


def test_bf16_softmax_runs_in_fp32():
    """Under bf16 autocast the written-out core takes softmax in fp32 (as CUDA autocast does)."""
    torch.manual_seed(0)
    attn = MathAttention(32, num_heads=2, qkv_bias=True)
    seen = {}
    original = torch.Tensor.softmax

    def spy(t, *a, **k):
        seen["dtype"] = t.dtype
        return original(t, *a, **k)

    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "softmax", spy)
        out = attn(torch.randn(2, 17, 32))
    assert seen["dtype"] == torch.float32 and out.dtype == torch.bfloat16


def test_long_sequences_take_the_fused_path():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, qkv_bias=True)
    x = torch.randn(2, hardware.MATH_MAX_TOKENS + 1, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = attn(x)
        set_attention(attn, "math")
        # the same kernel, the same bits
        assert type(attn) is MathAttention and torch.equal(attn(x), fused)
        short = attn(x[:, :17])
        set_attention(attn, "fused")
        # the written-out core: close, not the same bits
        assert not torch.equal(attn(x[:, :17]), short)


MMAPPED_AFTER_16MB = """
import ctypes, sys
from mae.run.hardware import tune_cpu_allocator
applied = tune_cpu_allocator() if sys.argv[1] == "tune" else None
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
block = bytearray(16 << 20)
print(applied, (libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33 to read malloc's state"
)
def test_the_tuned_allocator_takes_large_blocks_from_the_heap_not_fresh_mappings():
    env = {k: v for k, v in os.environ.items() if k not in ("MAE_DEFAULT_MALLOC", "LD_PRELOAD")}

    def mapped(which: str) -> list[str]:
        cmd = [sys.executable, "-c", MMAPPED_AFTER_16MB, which]
        return subprocess.run(
            cmd, capture_output=True, text=True, check=True, env=env
        ).stdout.split()

    # glibc maps a 16 MB block afresh (and unmaps it when freed)
    assert mapped("default") == [
        "None",
        "16",
    ]
    assert mapped("tune") == ["True", "0"]


def test_the_allocator_is_left_alone_where_it_is_already_chosen(monkeypatch):
    chosen = [
        ("MAE_DEFAULT_MALLOC", "1"),
        ("MALLOC_MMAP_THRESHOLD_", "65536"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
        ("LD_PRELOAD", "libjemalloc.so"),
    ]
    for name, value in chosen:
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert hardware.tune_cpu_allocator() is False, name
