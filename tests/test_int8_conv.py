"""Int8Conv2d against an independent im2col (F.unfold) + the bit-exact int8 linear reference, on every ISA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pycompress as pc
from pycompress.nn import Int8Conv2d
from pycompress.reference import int8_conv2d_ref, quantize_weight_per_channel


# (in, out, kernel, stride, padding, dilation, H, W): pointwise, strided pointwise, padded, dilated,
# rectangular kernels, odd channel counts around the 16-wide panels, a ResNet stem.
CONV_CASES = [
    (16, 32, 1, 1, 0, 1, 7, 7),
    (17, 15, 1, 2, 0, 1, 9, 8),
    (6, 8, 1, (2, 3), 0, 1, 7, 10),    # strided 1x1 on NCHW x: only the pixels it reads are copied
    (3, 16, 3, 1, 1, 1, 8, 9),
    (5, 17, 3, 2, 0, 2, 13, 11),
    (4, 6, (3, 5), (1, 2), (2, 1), (2, 1), 11, 10),
    (3, 64, 7, 2, 3, 1, 20, 20),
    (33, 65, 3, 1, 1, 1, 5, 6),
    (8, 8, 1, 1, 1, 1, 4, 4),  # 1x1 with padding takes the im2col path
    # The eager kernel reads im2col rows straight from NHWC x in runs (csrc/q8/q8_gemm.h for_each_run):
    (1, 16, 3, 1, 1, 1, 6, 5),         # one channel
    (200, 16, 3, 1, 1, 1, 4, 4),       # runs longer than a 64-value vector step
    (3, 8, 5, 1, 4, 1, 2, 3),          # kernel wider than the image: rows with no tap inside
    (2, 8, (3, 3), 1, 1, (2, 1), 7, 7),  # dilation along H only: taps of a kernel row stay adjacent
]


def _ref_for(conv: nn.Conv2d, x: torch.Tensor, static=None, padding=None) -> torch.Tensor:
    o = conv.out_channels
    q, scale = quantize_weight_per_channel(conv.weight.detach().reshape(o, -1))
    w_q = q.reshape(conv.weight.shape)
    return int8_conv2d_ref(x, w_q, scale, conv.bias, conv.stride, padding or conv.padding, conv.dilation,
                           static=static)


@pytest.mark.parametrize("case", CONV_CASES)
def test_int8_conv_bit_exact(isa, case):
    c, o, k, s, p, d, h, w = case
    gen = torch.Generator().manual_seed(hash(case) % 1000)
    conv = nn.Conv2d(c, o, k, s, p, d)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    q = Int8Conv2d.from_float(conv, name="conv")
    x = torch.randn(2, c, h, w, generator=gen)
    y = q(x)
    assert y.shape == conv(x).shape
    assert torch.equal(y, _ref_for(conv, x))


def test_int8_conv_tall_im2col_runs_in_passes(isa):
    # 2 x 62 x 62 output pixels of K = 576: 7688 im2col rows, 4.4 MB of uint8 rows: three passes of
    # ~2 MiB, each quantized straight from NHWC x starting at its own first row.
    gen = torch.Generator().manual_seed(7)
    conv = nn.Conv2d(64, 24, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    q = Int8Conv2d.from_float(conv, name="conv")
    x = torch.randn(2, 64, 64, 64, generator=gen)
    assert torch.equal(q(x), _ref_for(conv, x))


def test_int8_conv_static_activations_bit_exact(isa):
    conv = nn.Conv2d(6, 10, 3, padding=1)
    q = Int8Conv2d.from_float(conv, act_scale=0.02, act_zero_point=128, name="conv")
    x = torch.randn(3, 6, 7, 7)
    assert torch.equal(q(x), _ref_for(conv, x, static=(0.02, 128)))


def test_int8_conv_noncontiguous_and_channels_last_inputs():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1)
    q = Int8Conv2d.from_float(conv, name="conv")
    base = torch.randn(2, 8, 12, 14)
    expected = q(base.contiguous())
    assert torch.equal(q(base.to(memory_format=torch.channels_last)), expected)
    wide = torch.randn(2, 8, 12, 28)[..., ::2]  # strided along W
    assert torch.equal(q(wide), q(wide.contiguous()))
    pointwise = Int8Conv2d.from_float(nn.Conv2d(8, 12, 1), name="pw")
    assert torch.equal(pointwise(base.to(memory_format=torch.channels_last)), pointwise(base))


def test_int8_conv_reads_channel_slices_and_keeps_nan_to_its_windows(isa):
    conv = nn.Conv2d(5, 16, 3, padding=1)
    q = Int8Conv2d.from_float(conv, name="conv")
    wide = torch.randn(2, 9, 6, 7).to(memory_format=torch.channels_last)
    x = wide[:, 2:7]  # channels_last slice: pixel stride 9 floats, 5 channels each
    assert torch.equal(q(x), _ref_for(conv, x.contiguous()))
    x = x.contiguous()
    x[1, 3, 2, 4] = float("nan")
    y, ref = q(x), _ref_for(conv, x)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())
    nan_pixels = y.isnan().any(1)
    assert nan_pixels.sum() == 9 and nan_pixels[1, 1:4, 3:6].all()  # exactly the 3x3 windows over (2, 4)


def test_int8_conv_traced_path_gives_the_eager_numbers():
    # torch.compile takes the float-im2col lowering; eager takes the direct kernel: same rows, same bits.
    conv = nn.Conv2d(6, 24, 3, stride=2, padding=1)
    q = Int8Conv2d.from_float(conv, name="conv")
    x = torch.randn(2, 6, 11, 9)
    compiled = torch.compile(q, fullgraph=True)
    assert torch.equal(compiled(x), q(x))


def test_int8_conv_empty_batch():
    q = Int8Conv2d.from_float(nn.Conv2d(4, 8, 3, padding=1), name="conv")
    assert q(torch.randn(0, 4, 5, 5)).shape == (0, 8, 5, 5)


def test_int8_conv_close_to_float():
    conv = nn.Conv2d(32, 64, 3, padding=1)
    x = torch.randn(2, 32, 10, 10)
    err = (Int8Conv2d.from_float(conv)(x) - conv(x)).norm() / conv(x).norm()
    assert err < 0.02  # int8 x uint8: ~1% relative L2 for Gaussian data


def test_int8_conv_bad_inputs_name_the_layer():
    q = Int8Conv2d.from_float(nn.Conv2d(4, 8, 5), name="features.0")
    with pytest.raises(ValueError, match=r"Int8Conv2d\(features.0\): input has shape \(1, 3, 9, 9\), expected \(N, 4, H, W\)"):
        q(torch.randn(1, 3, 9, 9))
    with pytest.raises(ValueError, match=r"Int8Conv2d\(features.0\).*smaller than the 5x5 receptive field"):
        q(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="Int8Conv2d"):
        q(torch.randn(4, 9, 9))


def test_unsupported_convs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="depthwise conv"):
        Int8Conv2d.from_float(nn.Conv2d(8, 8, 3, groups=8), name="dw")
    with pytest.raises(ValueError, match="grouped conv"):
        Int8Conv2d.from_float(nn.Conv2d(8, 16, 3, groups=2), name="g")
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        Int8Conv2d.from_float(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), name="r")


def test_padding_same_and_valid():
    x = torch.randn(1, 3, 9, 9)
    for padding, explicit in (("same", (2, 2)), ("valid", (0, 0))):
        conv = nn.Conv2d(3, 5, 3, padding=padding, dilation=2)
        q = Int8Conv2d.from_float(conv)
        assert q(x).shape == conv(x).shape
        assert torch.equal(q(x), _ref_for(conv, x, padding=explicit))
    with pytest.raises(ValueError, match="asymmetric padding"):
        Int8Conv2d.from_float(nn.Conv2d(3, 5, 4, padding="same"))
