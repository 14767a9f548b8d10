"""benchmarks/fp8_attention_quality.py's FP8 attention: the model's attention up to e4m3 rounding, and rounded."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fp8_attention_quality as quality  # noqa: E402
from qandc.model.dit import Attention, split_heads  # noqa: E402


def test_fp8_attention_is_the_attention_up_to_e4m3_rounding():
    torch.manual_seed(0)
    attn = Attention(64, 4).eval()
    qkv = torch.randn(2, 37, 192) * 2
    with torch.no_grad():
        want = attn.attend(qkv)
        attn.fp8_scales = torch.stack([t.abs().amax() for t in split_heads(qkv, attn.num_heads)]) / quality.FP8_MAX
        got = quality.fp8_attend(attn, qkv)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.1, error  # rounded, but the same attention (layout, softmax scale and normalisation)
