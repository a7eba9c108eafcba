"""The devices a device-parametrised test runs on: ``cpu``, plus ``cuda`` when
``torch.cuda.is_available()``. ``GENRET_TEST_DEVICES=cpu,cuda`` names them explicitly (what the GPU
check sets); naming an absent one fails the test, so a GPU check cannot pass by silently running
on the CPU."""

from __future__ import annotations

import os

import pytest
import torch


def present_devices() -> list[str]:
    named = os.environ.get("GENRET_TEST_DEVICES")
    if named:
        return [d for d in named.split(",") if d]
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


DEVICES = present_devices()


def require(device: str) -> str:
    """``device``, or the test fails when it names a GPU this machine does not have."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"device {device} was asked for but torch.cuda.is_available() is False")
    return device
