"""GPU names: the one mapping between ``stationthis.type.v1.GpuType`` and ComfyUI Deploy's spelling.

Upstream names GPUs ``CPU, T4, L4, A10G, L40S, A100, A100-80GB, H100, H200, B200`` (reference §2.1);
the enum spells them ``GPU_TYPE_<NAME>`` with ``-`` written ``_``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from stationthis.type.v1 import gpu_pb2

# GpuType value -> upstream name ("GPU_TYPE_A100_80GB" -> "A100-80GB"); UNSPECIFIED has no name.
GPU_NAMES: Mapping[int, str] = MappingProxyType(
    {
        value.number: value.name.removeprefix("GPU_TYPE_").replace("_80GB", "-80GB")
        for value in gpu_pb2.GpuType.DESCRIPTOR.values
        if value.number != gpu_pb2.GPU_TYPE_UNSPECIFIED
    }
)
# Upstream name -> GpuType value.
GPU_TYPES: Mapping[str, gpu_pb2.GpuType] = MappingProxyType(
    {name: getattr(gpu_pb2, f"GPU_TYPE_{name.replace('-', '_')}") for name in GPU_NAMES.values()}
)


def gpu_type(name: str | None) -> gpu_pb2.GpuType:
    """The GpuType value of an upstream GPU name; GPU_TYPE_UNSPECIFIED (0) when unknown or empty."""
    return GPU_TYPES.get(name or "", gpu_pb2.GPU_TYPE_UNSPECIFIED)
