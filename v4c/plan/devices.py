"""The GPUs `v4c plan` can plan for: datasheet numbers per GPU, each with where it comes from.

Units: bytes (``memory``), bytes per second (``hbm``, ``nvlink``, ``network``, each in one direction
per GPU), dense FLOP/s without 2:4 sparsity (``flops``). A format a GPU's tensor cores lack is
absent from ``flops`` (H100 has no FP4): kernels in that format run at the next wider one.
``nvlink_domain`` is how many GPUs share one NVLink fabric (8 on an HGX board, 72 in an NVL72 rack):
a collective among more ranks than that crosses the network.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GB = 1e9
TB = 1e12
T = 1e12  # TFLOP/s -> FLOP/s

# Where the tensor cores lack a format, the kernel runs in the next wider one (FP4 weights are
# dequantised to FP8 or BF16 tiles inside the GEMM).
_WIDER = {"fp4": "fp8", "fp8": "bf16"}


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory: float        # bytes of HBM as sold (decimal GB)
    hbm: float           # HBM bytes/s
    flops: dict = field(hash=False)  # "bf16" | "fp8" | "fp4" -> dense FLOP/s
    nvlink: float        # NVLink bytes/s per GPU, one direction
    network: float       # scale-out bytes/s per GPU (one NIC), one direction
    nvlink_domain: int   # GPUs on one NVLink fabric
    arch: str            # compilation target of v4c (kernel configs only; costs do not depend on it)

    def peak(self, dtype: str) -> float:
        """Dense FLOP/s in ``dtype``, or in the next wider format the tensor cores have."""
        while dtype not in self.flops and dtype in _WIDER:
            dtype = _WIDER[dtype]
        return self.flops[dtype]

    def has(self, dtype: str) -> bool:
        return dtype in self.flops

    def link(self, ranks: int) -> float:
        """Bytes/s a collective among ``ranks`` GPUs gets: NVLink inside the domain, else the NIC."""
        return self.nvlink if ranks <= self.nvlink_domain else self.network


def _gpu(key, name, memory_gb, hbm_tbs, tflops, nvlink_gbs, network_gbs, domain, arch) -> GPU:
    """A row in the datasheets' units: GB, TB/s, dense TFLOP/s by format, GB/s each way per GPU."""
    return GPU(key, name, memory_gb * GB, hbm_tbs * TB, {k: v * T for k, v in tflops.items()}, nvlink_gbs * GB,
               network_gbs * GB, domain, arch)


GPUS: dict[str, GPU] = {g.key: g for g in (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3 at 3.35 TB/s; BF16 1,979 / FP8 3,958 TFLOP/s
    # "with sparsity", so 989 / 1,979 dense; NVLink 900 GB/s total = 450 GB/s each way; HGX H100 boards
    # pair each GPU with one ConnectX-7 at 400 Gb/s = 50 GB/s.
    _gpu("h100", "NVIDIA H100 SXM5 80GB", 80, 3.35, {"bf16": 989, "fp8": 1979}, 450, 50, 8, "sm90"),
    # NVIDIA H200 datasheet (SXM): 141 GB HBM3e at 4.8 TB/s; the H100's tensor cores and clocks (BF16 989,
    # FP8 1,979 TFLOP/s dense); NVLink 900 GB/s total; ConnectX-7 400 Gb/s per GPU on HGX H200.
    _gpu("h200", "NVIDIA H200 SXM 141GB", 141, 4.8, {"bf16": 989, "fp8": 1979}, 450, 50, 8, "sm90"),
    # NVIDIA H20 (Hopper for export; no public NVIDIA datasheet, numbers as NVIDIA's product brief was
    # reported, e.g. SemiAnalysis "Nvidia's New China AI Chips", 2023): 96 GB HBM3 at 4.0 TB/s, FP8 296 /
    # BF16 148 TFLOP/s dense, NVLink 900 GB/s total; 400 Gb/s NIC per GPU assumed as on HGX H100.
    _gpu("h20", "NVIDIA H20 96GB", 96, 4.0, {"bf16": 148, "fp8": 296}, 450, 50, 8, "sm90"),
    # NVIDIA HGX B200 datasheet (1,000 W): 1,440 GB for 8 GPUs = 180 GB each, HBM3e at 8 TB/s per GPU
    # (DGX B200: 64 TB/s for 8); dense FP4 9 / FP8 4.5 / BF16 2.25 PFLOP/s (half the sparse 18 / 9 / 4.5);
    # NVLink 5 1.8 TB/s total = 900 GB/s each way; ConnectX-7 400 Gb/s = 50 GB/s per GPU.
    _gpu("b200", "NVIDIA B200 (HGX, 1000 W) 180GB", 180, 8, {"bf16": 2250, "fp8": 4500, "fp4": 9000}, 900, 50, 8,
         "sm100"),
    # NVIDIA HGX B300 datasheet: 2.3 TB for 8 GPUs = 288 GB each, 8 TB/s; FP4 108 PFLOP/s dense for 8 =
    # 13.5 per GPU; FP8 and BF16 as B200 (72 / 36 PFLOP/s sparse for 8 = 4.5 / 2.25 dense per GPU);
    # NVLink 5 1.8 TB/s total; ConnectX-8 SuperNIC 800 Gb/s = 100 GB/s per GPU.
    _gpu("b300", "NVIDIA B300 (HGX) 288GB", 288, 8, {"bf16": 2250, "fp8": 4500, "fp4": 13500}, 900, 100, 8, "sm100"),
    # NVIDIA GB200 NVL72 spec page, per GPU (rack / 72): HBM3e 13.4 TB -> 186 GB, 576 TB/s -> 8 TB/s;
    # FP4 720 / FP8 360 / BF16 180 PFLOP/s dense -> 10 / 5 / 2.5 PFLOP/s (SemiAnalysis /gpu-specs lists the
    # same compute, and 192 GB); NVLink 5 130 TB/s -> 1.8 TB/s total = 900 GB/s each way, 72 GPUs on one
    # fabric; ConnectX-7 400 Gb/s per GPU for scale-out.
    _gpu("gb200", "NVIDIA GB200 (NVL72) 186GB", 186, 8, {"bf16": 2500, "fp8": 5000, "fp4": 10000}, 900, 50, 72,
         "sm100"),
    # NVIDIA GB300 NVL72 spec page, per GPU: HBM3e up to 20.7 TB -> 288 GB, 576 TB/s -> 8 TB/s; FP4 15 /
    # FP8 5 / BF16 2.5 PFLOP/s dense (SemiAnalysis /gpu-specs, as quoted in InferenceX's GB300-vs-GB200
    # post, 2026-05-26); NVLink 5 900 GB/s each way, 72 GPUs; ConnectX-8 800 Gb/s = 100 GB/s per GPU.
    _gpu("gb300", "NVIDIA GB300 (NVL72) 288GB", 288, 8, {"bf16": 2500, "fp8": 5000, "fp4": 15000}, 900, 100, 72,
         "sm100"),
)}


def gpu(name: str) -> GPU:
    key = name.strip().lower().replace("nvidia", "").replace(" ", "").replace("-", "")
    if key not in GPUS:
        raise ValueError(f"unknown --gpu {name!r}; choose one of {', '.join(GPUS)}")
    return GPUS[key]
