"""What the tuner knows about each GPU architecture: one row of public datasheet facts per product.

Units: bytes for every size (``smem_*``, ``l2_bytes``, ``hbm_bytes``), GB/s (10^9 bytes per
second) for ``hbm_gbs``, and peak *dense* TFLOP/s (no 2:4 sparsity) for ``tflops``.  A zero
in ``tflops`` means the tensor cores have no such format.  The tensor figures are those with
FP32 accumulation (what the kernels use); on GeForce parts that is half the FP16-accumulate
figure NVIDIA prints first.  ``hbm_bytes`` is the marketed capacity (datasheet GB x 10^9),
not what ``cudaMemGetInfo`` reports.

Per-SM limits (shared memory, registers, warps, resident blocks) are compute-capability facts
from the CUDA C++ Programming Guide table "Technical Specifications per Compute Capability";
``smem_per_block`` is the opt-in maximum (``cudaFuncAttributeMaxDynamicSharedMemorySize``),
which is the per-SM capacity less the 1 KiB the driver reserves per block.

Sources of the per-product numbers (public datasheets and spec tables):
  A100 SXM 80GB   NVIDIA A100 datasheet: 108 SMs, 2,039 GB/s, 40 MB L2, FP32 19.5 / TF32 156 /
                  BF16 312 TFLOP/s.
  A10             NVIDIA A10 datasheet: 72 SMs, 24 GB GDDR6, 600 GB/s, 6 MB L2,
                  FP32 31.2 / TF32 62.5 / BF16 125 TFLOP/s.
  RTX 3090        GA102 whitepaper: 82 SMs, 936 GB/s, 6 MB L2, FP32 35.6, TF32 35.6,
                  FP16/BF16 tensor 71 TFLOP/s with FP32 accumulate.
  L40S            NVIDIA L40S datasheet: 142 SMs, 48 GB GDDR6, 864 GB/s, 96 MB L2, FP32 91.6 /
                  TF32 183 / BF16 362 / FP8 733 TFLOP/s dense.
  H100 SXM        NVIDIA H100 datasheet: 132 SMs, 80 GB HBM3 at 3.35 TB/s, 50 MB L2,
                  FP32 67 / TF32 495 / BF16 989 / FP8 1,979 TFLOP/s dense.
  H200 SXM        NVIDIA H200 datasheet: the H100 SXM die and clocks with 141 GB HBM3e at 4.8 TB/s.
  B200 (HGX)      NVIDIA Blackwell datasheet, HGX B200 at 1,000 W: 148 SMs, 180 GB HBM3e at
                  8 TB/s, FP32 80 / TF32 1,100 / BF16 2,250 / FP8 4,500 / FP4 9,000 TFLOP/s dense;
                  126 MB L2 (NVIDIA Blackwell tuning guide).
  RTX 5090        GB202 whitepaper / NVIDIA spec page: 170 SMs, 32 GB GDDR7 at 1,792 GB/s, 96 MB L2,
                  FP32 104.8; tensor with FP32 accumulate: FP16/BF16 209.5, FP8 419; FP4 1,676
                  dense (NVIDIA's 3,352 "AI TOPS" is FP4 with sparsity, accumulator not stated).
"""
from __future__ import annotations

from dataclasses import dataclass, field

KIB = 1024
_MIB = 1024 * 1024  # NVIDIA's "MB" of L2 are binary (deviceQuery: 50 MB -> 52,428,800 bytes)
GB = 1000 ** 3

TFLOPS_KEYS = ("fp32", "tf32", "bf16", "fp16", "fp8", "fp4")

# The format a kernel falls back to when the tensor cores lack the requested one
# (fp8 weights on an A100 are upcast and run as bf16 MMAs, and so on).
_FALLBACK = {"fp4": "fp8", "fp8": "bf16", "bf16": "fp16", "fp16": "tf32", "tf32": "fp32"}

_DTYPE_ALIASES = {
    "fp32": "fp32", "f32": "fp32", "float32": "fp32", "float": "fp32",
    "tf32": "tf32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "f16": "fp16", "float16": "fp16", "half": "fp16",
    "fp8": "fp8", "f8": "fp8", "e4m3": "fp8", "e5m2": "fp8", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8",
    "float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "fp8_ds": "fp8",
    "fp4": "fp4", "f4": "fp4", "e2m1": "fp4", "mxfp4": "fp4", "nvfp4": "fp4",
}

ELEM_BYTES = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp4": 0.5}


def normalize_dtype(dtype: str) -> str:
    """The ``tflops`` key for a dtype name (IR names like ``f16``, torch names, ``e4m3``, ``mxfp4``)."""
    name = str(dtype).lower()
    key = _DTYPE_ALIASES.get(name[len("torch."):] if name.startswith("torch.") else name)
    if key is None:
        raise ValueError(f"unknown compute dtype {dtype!r}; expected one of {', '.join(TFLOPS_KEYS)} "
                         f"or an alias ({', '.join(sorted(_DTYPE_ALIASES))})")
    return key


@dataclass(frozen=True)
class DeviceSpec:
    arch: str               # "sm90"
    name: str               # product name, metadata only
    sm_count: int
    smem_per_block: int     # bytes, opt-in maximum for one block
    smem_per_sm: int        # bytes
    regs_per_sm: int        # 32-bit registers
    max_warps_per_sm: int
    l2_bytes: int
    hbm_bytes: int
    hbm_gbs: float          # GB/s
    tflops: dict = field(hash=False)  # dtype -> peak dense TFLOP/s; do not mutate
    max_blocks_per_sm: int = 32

    def peak_tflops(self, dtype: str) -> float:
        """Peak dense TFLOP/s for ``dtype``, falling back to the next wider format the tensor
        cores have (fp4 -> fp8 -> bf16 -> fp16 -> tf32 -> fp32) where this one is absent."""
        key = normalize_dtype(dtype)
        while True:
            peak = float(self.tflops.get(key, 0.0))
            if peak > 0 or key not in _FALLBACK:
                return peak
            key = _FALLBACK[key]

    def ridge(self, dtype: str) -> float:
        """Arithmetic intensity (FLOP/byte) above which a kernel is compute-bound."""
        return self.peak_tflops(dtype) * 1e12 / (self.hbm_gbs * 1e9)


def _cc(arch: str) -> dict:
    """Per-SM facts of a compute capability (CUDA C++ Programming Guide)."""
    smem_sm, max_warps, max_blocks = {
        "sm80": (164 * KIB, 64, 32),
        "sm86": (100 * KIB, 48, 16),
        "sm89": (100 * KIB, 48, 24),
        "sm90": (228 * KIB, 64, 32),
        "sm100": (228 * KIB, 64, 32),
        "sm120": (100 * KIB, 48, 32),
    }[arch]
    return dict(arch=arch, smem_per_block=smem_sm - KIB, smem_per_sm=smem_sm, regs_per_sm=65536,
                max_warps_per_sm=max_warps, max_blocks_per_sm=max_blocks)


def _tf(fp32, tf32, bf16, fp16, fp8=0.0, fp4=0.0) -> dict:
    return {"fp32": fp32, "tf32": tf32, "bf16": bf16, "fp16": fp16, "fp8": fp8, "fp4": fp4}


DEVICES_BY_PRODUCT: dict[str, DeviceSpec] = {
    "a100-sxm-80gb": DeviceSpec(name="NVIDIA A100-SXM4-80GB", sm_count=108, l2_bytes=40 * _MIB,
                                hbm_bytes=80 * GB, hbm_gbs=2039.0,
                                tflops=_tf(19.5, 156.0, 312.0, 312.0), **_cc("sm80")),
    "a10": DeviceSpec(name="NVIDIA A10", sm_count=72, l2_bytes=6 * _MIB, hbm_bytes=24 * GB, hbm_gbs=600.0,
                      tflops=_tf(31.2, 62.5, 125.0, 125.0), **_cc("sm86")),
    "rtx3090": DeviceSpec(name="NVIDIA GeForce RTX 3090", sm_count=82, l2_bytes=6 * _MIB, hbm_bytes=24 * GB,
                          hbm_gbs=936.0, tflops=_tf(35.6, 35.6, 71.0, 71.0), **_cc("sm86")),
    "l40s": DeviceSpec(name="NVIDIA L40S", sm_count=142, l2_bytes=96 * _MIB, hbm_bytes=48 * GB, hbm_gbs=864.0,
                       tflops=_tf(91.6, 183.0, 362.05, 362.05, 733.0), **_cc("sm89")),
    "h100-sxm": DeviceSpec(name="NVIDIA H100 80GB HBM3 (SXM5)", sm_count=132, l2_bytes=50 * _MIB,
                           hbm_bytes=80 * GB, hbm_gbs=3350.0,
                           tflops=_tf(67.0, 494.7, 989.4, 989.4, 1978.9), **_cc("sm90")),
    "h200-sxm": DeviceSpec(name="NVIDIA H200 (SXM)", sm_count=132, l2_bytes=50 * _MIB,
                           hbm_bytes=141 * GB, hbm_gbs=4800.0,
                           tflops=_tf(67.0, 494.7, 989.4, 989.4, 1978.9), **_cc("sm90")),
    "b200": DeviceSpec(name="NVIDIA B200 (HGX, 1000 W)", sm_count=148, l2_bytes=126 * _MIB,
                       hbm_bytes=180 * GB, hbm_gbs=8000.0,
                       tflops=_tf(80.0, 1100.0, 2250.0, 2250.0, 4500.0, 9000.0), **_cc("sm100")),
    "rtx5090": DeviceSpec(name="NVIDIA GeForce RTX 5090", sm_count=170, l2_bytes=96 * _MIB, hbm_bytes=32 * GB,
                          hbm_gbs=1792.0, tflops=_tf(104.8, 104.8, 209.5, 209.5, 419.0, 1676.0), **_cc("sm120")),
}

# The product a bare architecture name means.
_DEFAULT_PRODUCT = {"sm80": "a100-sxm-80gb", "sm86": "a10", "sm89": "l40s", "sm90": "h100-sxm",
                    "sm100": "b200", "sm120": "rtx5090"}

DEVICES: dict[str, DeviceSpec] = {arch: DEVICES_BY_PRODUCT[p] for arch, p in _DEFAULT_PRODUCT.items()}

# A nominal spec for interpreter runs on the host: nothing is pruned for shared memory and
# the roofline numbers only keep cost-model arithmetic finite.  Not a performance model of any CPU.
CPU = DeviceSpec(arch="cpu", name="nominal CPU (interpreter runs only)", sm_count=1,
                 smem_per_block=1 << 30, smem_per_sm=1 << 30, regs_per_sm=1 << 30, max_warps_per_sm=1 << 20,
                 l2_bytes=32 * _MIB, hbm_bytes=64 * GB, hbm_gbs=50.0,
                 tflops=_tf(1.0, 1.0, 1.0, 1.0, 1.0, 1.0), max_blocks_per_sm=1 << 20)


def device_for_target(target: str) -> DeviceSpec:
    """The spec a compilation target means: ``sm80`` ... ``sm120`` (see ``DEVICES``), a product
    key of ``DEVICES_BY_PRODUCT`` (``h200-sxm``), or ``cpu`` for the nominal interpreter spec."""
    if target == "cpu":
        return CPU
    if target in DEVICES:
        return DEVICES[target]
    if target in DEVICES_BY_PRODUCT:
        return DEVICES_BY_PRODUCT[target]
    raise ValueError(f"unknown target {target!r}; choose cpu, one of {', '.join(DEVICES)} "
                     f"or a product ({', '.join(DEVICES_BY_PRODUCT)})")


def device_for_properties(arch: str, sm_count: int | None = None, total_memory: int | None = None) -> DeviceSpec:
    """The table row for a device seen at run time (``torch.cuda.get_device_properties``):
    same architecture, then same SM count, then the nearest memory size (H100 vs H200).
    Falls back to the architecture's default row; an unknown architecture is a ValueError."""
    rows = [d for d in DEVICES_BY_PRODUCT.values() if d.arch == arch]
    if not rows:
        return device_for_target(arch)  # raises for unknown archs, handles "cpu"
    if sm_count is not None:
        rows = [d for d in rows if d.sm_count == sm_count] or [DEVICES[arch]]
    if total_memory is not None and len(rows) > 1:
        rows = sorted(rows, key=lambda d: abs(d.hbm_bytes - total_memory))
    return rows[0]
