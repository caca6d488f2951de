"""Which device a run uses: under torchrun each rank its own GPU (LOCAL_RANK), an explicit cuda:N as given, and CPU
runs unchanged. The machine facts are arguments of `resolve_device`, so no mock is needed."""

from __future__ import annotations

import pytest

from calib.backends import resolve_device
from calib.errors import UserError


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_each_torchrun_rank_gets_its_own_gpu(device):
    assert resolve_device(device, cuda_available=True, cuda_count=2, local_rank="1") == "cuda:1"
    assert resolve_device(device, cuda_available=True, cuda_count=2, local_rank="0") == "cuda:0"
    assert resolve_device(device, cuda_available=True, cuda_count=2, local_rank="") == "cuda:0"  # not under torchrun


def test_an_explicit_gpu_is_kept_under_torchrun():
    assert resolve_device("cuda:1", cuda_available=True, cuda_count=2, local_rank="0") == "cuda:1"


def test_cpu_runs_are_unchanged():
    assert resolve_device("auto", cuda_available=False, cuda_count=0, local_rank="1") == "cpu"
    assert resolve_device("cpu", cuda_available=True, cuda_count=2, local_rank="1") == "cpu"


@pytest.mark.parametrize(
    ("device", "available", "rank", "message"),
    [
        ("auto", True, "3", "LOCAL_RANK=3 but this machine has 2 CUDA device(s)"),
        ("cuda:0", False, "", "--device cuda:0: CUDA is not available on this machine"),
        ("tpu", True, "", "--device 'tpu': expected auto, cpu or cuda[:N]"),
    ],
)
def test_impossible_devices_are_one_clear_error(device, available, rank, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        resolve_device(device, cuda_available=available, cuda_count=2, local_rank=rank)
