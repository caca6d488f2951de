"""A CPU platform for LightX2V, so its real model code runs where no accelerator is (tests, CI, laptops).

LightX2V picks its device from ``PLATFORM`` (default ``cuda``) among the classes in
``lightx2v_platform.registry_factory.PLATFORM_DEVICE_REGISTER``, after loading every entry point of the group
``lightx2v.platform_plugins`` (``lightx2v_platform/set_ai_device.py``). This package's entry point registers a
``cpu`` device; run with ``PLATFORM=cpu`` and a config that uses torch kernels only::

    "attn_type": "torch_sdpa", "modulate_type": "torch", "rope_type": "torch_complex_rope",
    "layer_norm_type": "torch", "rms_norm_type": "torch"
"""

from __future__ import annotations


class CpuDevice:
    name = "cpu"

    @staticmethod
    def init_device_env() -> None:
        pass

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
