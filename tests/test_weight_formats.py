"""FP8 128x128 and MXFP4 weight formats, activation quantisation, and quantised weights in the IR."""
import pytest
import torch

from v4c.errors import GraphError
from v4c.graph.builder import GraphBuilder
from v4c.graph.text import parse_graph, print_graph
from v4c.graph.verify import verify
from v4c.graph.weight_formats import (FORMATS, dequantize_act_fp8, dequantize_fp8_block, dequantize_mxfp4,
                                      quantize_act_fp8, quantize_fp8_block, quantize_mxfp4)
from v4c.graph.weights import QuantizedWeight, grouped_linear, linear


def _bytes(t):
    return t.view(torch.uint8).tolist()


def test_fp8_block_bit_patterns():
    w = torch.zeros(130, 4)
    w[0, :3] = torch.tensor([1.0, 0.5, -1.0])  # block (0, 0): amax 1 -> scale 2^-8 (1/448 <= 2^-8 < 2/448)
    w[129, 0] = 448.0 * 4  # block (1, 0): amax 1792 -> scale 2^2, code 448
    data, scale = quantize_fp8_block(w)
    assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    assert scale.shape == (2, 1)
    assert _bytes(scale) == [[127 - 8], [127 + 2]]
    # e4m3fn: 256 = 2^8 -> exponent field 8 + 7 = 15, mantissa 0 -> 0x78; 128 -> 0x70; -256 -> 0xF8; 448 -> 0x7E
    assert _bytes(data[0, :3]) == [0x78, 0x70, 0xF8]
    assert _bytes(data[129, :1]) == [0x7E]
    assert torch.equal(dequantize_fp8_block(data, scale), w)  # these values are exact on the grid


@pytest.mark.parametrize("shape,scale_shape", [((200, 300), (2, 3)), ((128, 129), (1, 2)), ((1, 1), (1, 1)),
                                               ((256, 128), (2, 1))])
def test_fp8_scale_shapes_and_round_trip(shape, scale_shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    data, scale = quantize_fp8_block(w)
    assert data.shape == shape and scale.shape == scale_shape == FORMATS["f8e4m3"].scale_shape(shape)
    back = dequantize_fp8_block(data, scale)
    s = dequantize_fp8_block(torch.ones(shape).to(torch.float8_e4m3fn), scale)  # each element's block scale
    # e4m3 rounding: half a step, 2^-4 relative for normal codes, 2^-10 * scale among the subnormals
    assert ((back - w).abs() <= torch.maximum(w.abs() / 16, s / 1024)).all()
    assert (back - w).abs().max() > 0  # random values do get rounded
    assert torch.equal(dequantize_fp8_block(*quantize_fp8_block(back)), back)  # representable values are fixed


def test_mxfp4_bit_patterns_and_ties():
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([0.5, -1.5, 6.0, 0.0])  # block 0: amax 6 -> scale 1 (byte 127)
    w[0, 32:36] = torch.tensor([0.25, 0.75, 2.5, 5.0]) * 2  # block 1: amax 10 -> scale 2: ties 0.25/0.75/2.5/5
    packed, scale = quantize_mxfp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (1, 32) and scale.shape == (1, 2)
    assert _bytes(scale) == [[127, 128]]
    # element 2j in the low nibble: codes 0.5 -> 1, -1.5 -> 8|3, 6 -> 7, 0 -> 0
    assert _bytes(packed[0, :2]) == [0xB1, 0x07]
    # ties go to the even code: 0.25 -> 0 (0.0), 0.75 -> 2 (1.0), 2.5 -> 4 (2.0), 5.0 -> 6 (4.0)
    assert _bytes(packed[0, 16:18]) == [0x20, 0x64]
    assert dequantize_mxfp4(packed, scale)[0, 32:36].tolist() == [0.0, 2.0, 4.0, 8.0]


def test_mxfp4_round_trip_leading_dims():
    w = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1))
    packed, scale = quantize_mxfp4(w)
    assert packed.shape == (3, 5, 48) and scale.shape == (3, 5, 3)
    back = dequantize_mxfp4(packed, scale)
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(back)), back)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match=r"expected shape \(3, 5, 3\)"):
        dequantize_mxfp4(packed, scale[:, :, :2])


def test_act_quant_per_1x128():
    x = torch.zeros(2, 300)
    x[0, 0] = 1.0  # block amax 1 -> 2^-8
    q, s = quantize_act_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    assert s[0, 0].item() == 2.0 ** -8 and _bytes(q[0, :1]) == [0x78]
    assert s[1, 0].item() == 2.0 ** -22  # all-zero block: amax floored at 1e-4 -> 2^ceil(log2(1e-4/448))
    y = torch.randn(4, 7, 200)
    q, s = quantize_act_fp8(y)
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # powers of two
    step = s.repeat_interleave(128, dim=-1)[..., :200] / 1024
    assert ((dequantize_act_fp8(q, s) - y).abs() <= torch.maximum(y.abs() / 16, step)).all()


def test_linear_products_against_dequantised_reference():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(5, 256, generator=g), torch.randn(384, 256, generator=g) / 16
    xq = dequantize_act_fp8(*quantize_act_fp8(x))
    for fmt, enc, dec in (("f8e4m3", quantize_fp8_block, dequantize_fp8_block),
                          ("mxfp4", quantize_mxfp4, dequantize_mxfp4)):
        data, scale = enc(w)
        qw = QuantizedWeight(fmt, data, scale)
        want = xq @ dec(data, scale).T
        torch.testing.assert_close(linear(x, qw), want, rtol=1e-5, atol=1e-5)
        x4 = torch.randn(1, 3, 2, 256, generator=g)
        got = grouped_linear(x4, qw, 2)
        xq4 = dequantize_act_fp8(*quantize_act_fp8(x4))
        ref = torch.einsum("btgk,grk->btgr", xq4, dec(data, scale).view(2, 192, 256))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"scale has shape \(2, 2\), expected \(3, 2\)"):
        QuantizedWeight("f8e4m3", *(quantize_fp8_block(w)[0], torch.zeros(2, 2, dtype=torch.float8_e8m0fnu)))


def _graph(scale_shape=(1, 2), with_scale=True):
    b = GraphBuilder("q")
    x = b.input("x", ("B", "T", 200), "f32")
    w = b.param("w.weight", (64, 200), "f8e4m3")
    if with_scale:
        b.param("w.weight_scale_inv", scale_shape, "e8m0")
    e = b.param("experts", (4, 32, 64), "mxfp4")
    b.param("experts_scale_inv", (4, 32, 2), "e8m0")
    y = b.op("linear", x, w, out="y")
    return b.finish([y])


def test_quantised_params_in_the_ir():
    g = verify(_graph())
    text = print_graph(g)
    assert "param %w.weight : f8e4m3[64,200]" in text and "param %w.weight_scale_inv : e8m0[1,2]" in text
    assert "param %experts : mxfp4[4,32,64]" in text
    assert parse_graph(text) == g
    assert dict(g.params)["experts"].nbytes() == 4 * 32 * 32  # two values per byte
    with pytest.raises(GraphError, match=r"%w.weight : f8e4m3\[64,200\]: its scale %w.weight_scale_inv is "
                                         r"e8m0\[2,2\], expected e8m0\[1,2\]"):
        verify(_graph(scale_shape=(2, 2)))
    with pytest.raises(GraphError, match=r"has no scale param %w.weight_scale_inv"):
        verify(_graph(with_scale=False))
