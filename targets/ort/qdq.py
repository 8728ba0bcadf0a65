"""QDQ building blocks shared by the single-layer graphs (profiling) and the whole-model exporter, so the
two emit the same nodes for the same precision (what the LUT measures is what the export runs).

Encoding of hwmpq's quantizers (zero point is always 0 in torch):
- activations at 8 bits or fewer: uint8. Unsigned codes use zero point 0; signed codes
  [-2^(b-1), 2^(b-1)-1] use zero point 128, which dequantizes to exactly the same values
  (``(q - 128) * s``). ORT fuses DQ -> Conv/Gemm -> Q into QLinearConv/QGemm only when input and output
  share one element type, so uint8 everywhere is what gives integer kernels (int8 x int8 also fuses with
  ``session.qdqisint8allowed=1`` but measured ~8x slower on this AVX2 CPU). On AVX2 without VNNI the
  fast u8 x s8 kernel (vpmaddubsw) saturates int16 pair sums for large codes (measured: 92% top-1
  agreement on a first layer with signed input); sessions on such CPUs therefore set
  ``session.x64quantprecision=1`` (exact; with VNNI the fast path is exact: targets/ort/timing.py).
  Widths below 8 get a Clip to the narrow range before QuantizeLinear.
- activations at 16 bits: int16 (signed) or uint16 (unsigned), zero point 0.
- weights: int8 (8 bits, and 2-7 bits stored in int8), native int4 (4 bits), int16 (16 bits); per
  output channel (axis 0), zero point 0.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from hwmpq.quantizers import qrange

OPSET = 21  # int4/int16 QuantizeLinear need opset 21
IR_VERSION = 10  # onnx 1.23 writes IR 11+ by default; ORT 1.31 loads IR 10 with opset 21


def act_container(bits: int, signed: bool, u8_carrier: bool = True) -> tuple[int, int, type]:
    """(ONNX element type, zero point, numpy dtype) that carries ``bits``-wide activation codes.
    ``u8_carrier`` is kept for callers; 8-bit codes always travel as uint8 (signed: zero point 128)."""
    del u8_carrier
    if bits <= 8:
        return (TensorProto.UINT8, 128, np.uint8) if signed else (TensorProto.UINT8, 0, np.uint8)
    if bits == 16:
        return (TensorProto.INT16, 0, np.int16) if signed else (TensorProto.UINT16, 0, np.uint16)
    raise ValueError(f"no ONNX activation container for {bits} bits")


def weight_container(bits: int) -> int:
    if bits == 4:
        return TensorProto.INT4
    if bits <= 8:
        return TensorProto.INT8
    if bits == 16:
        return TensorProto.INT16
    raise ValueError(f"no ONNX weight container for {bits} bits")


class GraphParts:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def scalar_zp(self, name: str, elem_type: int, value: int) -> str:
        self.inits.append(helper.make_tensor(name, elem_type, [], [int(value)]))
        return name

    def quantize_act(self, src: str, out: str, scale: float, bits: int, signed: bool, u8_carrier: bool = False) -> str:
        """float ``src`` -> integer codes ``out`` (Clip to the narrow range for widths without a type)."""
        elem, zp, _ = act_container(bits, signed, u8_carrier)
        s = self.const(f"{out}_scale", np.array(scale, dtype=np.float32))
        z = self.scalar_zp(f"{out}_zp", elem, zp)
        if bits not in (8, 16):
            qmin, qmax = qrange(bits, signed)
            lo = self.const(f"{out}_lo", np.array(qmin * scale, dtype=np.float32))
            hi = self.const(f"{out}_hi", np.array(qmax * scale, dtype=np.float32))
            self.nodes.append(helper.make_node("Clip", [src, lo, hi], [f"{out}_clipped"], name=f"{out}_clip"))
            src = f"{out}_clipped"
        self.nodes.append(helper.make_node("QuantizeLinear", [src, s, z], [out], name=f"{out}_Q"))
        return out

    def dequantize_act(self, src: str, out: str, scale: float, bits: int, signed: bool, u8_carrier: bool = False) -> str:
        elem, zp, _ = act_container(bits, signed, u8_carrier)
        s = self.const(f"{out}_scale", np.array(scale, dtype=np.float32))
        z = self.scalar_zp(f"{out}_zp", elem, zp)
        self.nodes.append(helper.make_node("DequantizeLinear", [src, s, z], [out], name=f"{out}_DQ"))
        return out

    def dequantized_weight(self, name: str, w_float: np.ndarray, scales: np.ndarray, bits: int) -> str:
        """Per-output-channel symmetric weight codes as an initializer, and the DQ node that reads them."""
        qmin, qmax = qrange(bits, True)
        shape = (-1,) + (1,) * (w_float.ndim - 1)
        codes = np.clip(np.round(w_float / scales.reshape(shape)), qmin, qmax).astype(np.int32)
        elem = weight_container(bits)
        if elem == TensorProto.INT4:
            q = helper.make_tensor(f"{name}_q", TensorProto.INT4, codes.shape, codes.ravel().tolist())
            zp = helper.make_tensor(f"{name}_zp", TensorProto.INT4, [len(scales)], [0] * len(scales))
            self.inits += [q, zp]
        else:
            dtype = np.int8 if elem == TensorProto.INT8 else np.int16
            self.const(f"{name}_q", codes.astype(dtype))
            self.const(f"{name}_zp", np.zeros(len(scales), dtype=dtype))
        self.const(f"{name}_scale", scales.astype(np.float32))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"],
                                           [f"{name}_dq"], name=f"{name}_DQ", axis=0))
        return f"{name}_dq"

    def dequantized_bias(self, name: str, bias: np.ndarray, in_scale: float, w_scales: np.ndarray) -> str:
        """Bias as int32 codes at scale in_scale * w_scale (what QLinearConv/QGemm consume)."""
        s = (np.float32(in_scale) * w_scales.astype(np.float32)).astype(np.float32)
        # float64: int32's limits are exact there (float32 rounds 2**31 - 1 up, and the cast wraps around)
        codes = np.clip(np.round(bias.astype(np.float64) / s), -(2**31), 2**31 - 1).astype(np.int32)
        self.const(f"{name}_q", codes)
        self.const(f"{name}_scale", s)
        self.const(f"{name}_zp", np.zeros(len(s), dtype=np.int32))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"],
                                           [f"{name}_dq"], name=f"{name}_DQ", axis=0))
        return f"{name}_dq"


def pool_attributes(pool: tuple[int, ...]) -> dict:
    """MaxPool attributes of an ``Edge.pool`` (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w)."""
    kh, kw, sh, sw, ph, pw = pool
    return {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [ph, pw, ph, pw]}


def integer_max_pool(parts: GraphParts, codes: str, tag: str, attrs: dict) -> str:
    """MaxPool ``attrs`` on integer ``codes`` as ORT's channels-last integer max pool between two
    Transposes. ORT runs an integer max pool channels-last by itself only when its input already is;
    after a float island (a float stem) it would run it channels-first, 20x slower, and leave the
    residual stream channels-first with a Transpose around every later block. Written this way, the
    Transposes cancel against the integer convs' and the stream stays channels-last."""
    parts.nodes.append(helper.make_node("Transpose", [codes], [f"{tag}_nhwc"], name=f"{tag}_to_nhwc", perm=[0, 2, 3, 1]))
    parts.nodes.append(helper.make_node("NhwcMaxPool", [f"{tag}_nhwc"], [f"{tag}_pooled_nhwc"], name=f"{tag}_nhwc",
                                        domain="com.microsoft", **attrs))
    parts.nodes.append(helper.make_node("Transpose", [f"{tag}_pooled_nhwc"], [f"{tag}_pooled"], name=f"{tag}_to_nchw",
                                        perm=[0, 3, 1, 2]))
    return f"{tag}_pooled"


def matmul_nbits(parts: GraphParts, src: str, out: str, w_float: np.ndarray, scales: np.ndarray,
                 bias: np.ndarray | None, prefix: str | None = None) -> str:
    """int4 weight-only Linear as com.microsoft MatMulNBits (float activations): per-output-channel
    symmetric codes stored as uint4 with zero point 8, the channel scale repeated over K blocks."""
    n, k = w_float.shape
    p = prefix or out
    block = 16
    while block * 2 <= min(k, 128) and k % (block * 2) == 0:
        block *= 2
    n_blocks = -(-k // block)
    codes = np.clip(np.round(w_float / scales.reshape(-1, 1)), -8, 7).astype(np.int32) + 8
    padded = np.full((n, n_blocks * block), 8, dtype=np.uint8)
    padded[:, :k] = codes
    lo, hi = padded[:, 0::2], padded[:, 1::2]
    packed = (lo | (hi << 4)).astype(np.uint8).reshape(n, n_blocks, block // 2)
    parts.const(f"{p}_B", packed)
    parts.const(f"{p}_scales", np.repeat(scales.astype(np.float32), n_blocks))
    inputs = [src, f"{p}_B", f"{p}_scales"]
    if bias is not None:
        inputs += ["", "", parts.const(f"{p}_bias", bias.astype(np.float32))]
    parts.nodes.append(helper.make_node("MatMulNBits", inputs, [out], name=f"{p}_MatMulNBits", domain="com.microsoft",
                                        K=k, N=n, bits=4, block_size=block))
    return out
