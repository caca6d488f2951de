"""A CPU platform for LightX2V, so its real model code runs where no accelerator is (tests, CI, laptops).

LightX2V picks its device from ``PLATFORM`` (default ``cuda``) among the classes in
``lightx2v_platform.registry_factory.PLATFORM_DEVICE_REGISTER``, after loading every entry point of the group
``lightx2v.platform_plugins`` (``lightx2v_platform/set_ai_device.py``). This package's entry point registers a
``cpu`` device; run with ``PLATFORM=cpu`` and a config that uses torch kernels only::

    "attn_type": "torch_sdpa", "modulate_type": "torch", "rope_type": "torch_complex_rope",
    "layer_norm_type": "torch", "rms_norm_type": "torch"

LightX2V also calls its device's torch module (``getattr(torch, AI_DEVICE)``) as it would ``torch.cuda``:
``manual_seed`` (``seed_all``), ``mem_get_info`` / ``memory_allocated`` / ``memory_reserved`` / ``empty_cache``
(``DefaultRunner.maybe_empty_cache``, after each encoder and generation), ``max_memory_allocated`` (its profiler).
``torch.cpu`` has none of these; `init_device_env` adds the CPU's meaning of each where torch lacks it, and a
no-op ``torch.cpu.Stream.synchronize`` for the block offload manager.
"""

from __future__ import annotations

import os


def _host_memory() -> tuple[int, int]:
    """(free, total) bytes of host memory, as ``torch.cuda.mem_get_info`` gives them for a GPU."""
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def _complete_torch_cpu() -> None:
    """Give ``torch.cpu`` the ``torch.cuda`` functions LightX2V calls on its device module, where torch lacks them.

    The CPU has no caching allocator (nothing to empty, no reserved or peak counts) and its generator is torch's
    default one, which ``torch.manual_seed`` seeds.
    """
    import torch

    def seed(value: int) -> None:
        torch.manual_seed(value)

    def zero(device=None) -> int:
        return 0

    def nothing(device=None) -> None:
        return None

    for name, function in {
        "manual_seed": seed,
        "manual_seed_all": seed,
        "empty_cache": nothing,
        "mem_get_info": lambda device=None: _host_memory(),
        "memory_allocated": zero,
        "memory_reserved": zero,
        "max_memory_allocated": zero,
        "reset_peak_memory_stats": nothing,
    }.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, function)
    # LightX2V's block/phase offload manager waits on its load and compute streams; CPU work is synchronous, and
    # torch.cpu.Stream is a placeholder without the wait.
    if not hasattr(torch.cpu.Stream, "synchronize"):
        torch.cpu.Stream.synchronize = lambda self: None


class CpuDevice:
    name = "cpu"

    @staticmethod
    def init_device_env() -> None:
        _complete_torch_cpu()

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_device() -> str:
        return "cpu"

    @staticmethod
    def init_parallel_env() -> None:
        # gloo: the CPU backend of torch.distributed (cfg_parallel / seq_parallel tests on one machine).
        import torch.distributed as dist

        dist.init_process_group(backend="gloo")


def register() -> None:
    """Entry point of `lightx2v.platform_plugins`: add the `cpu` device once."""
    from lightx2v_platform.registry_factory import PLATFORM_DEVICE_REGISTER

    if "cpu" not in PLATFORM_DEVICE_REGISTER:
        PLATFORM_DEVICE_REGISTER.register(CpuDevice, key="cpu")


__all__ = ["CpuDevice", "register"]
