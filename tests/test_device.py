"""Device selection (slim_engine_params.device_type/device_id, open_engine(device=...)) on this CPU machine.

What can be checked without a GPU: the parameters' validation and versioning, and that asking for CUDA from
a CPU-only ONNX Runtime fails with the provider named. CUDA generation itself is checked on the GPU machine by
benchmarks/gpu_check.sh."""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort
import pytest

import slimengine as se
from slimengine import _native
from slimengine.runtime import parse_device

from .conftest import random_inputs, reference_for

CPU_ONLY = "CUDAExecutionProvider" not in ort.get_available_providers()


def _open(bundle, **fields) -> tuple[str, str, ctypes.c_void_p]:
    """slim_engine_open through raw ctypes with the given params fields."""
    lib = _native.lib()
    params = _native.params(_native.EngineParams)
    params.onnxruntime_library = _native.onnxruntime_library().encode()
    for name, value in fields.items():
        setattr(params, name, value)
    handle = ctypes.c_void_p()
    code = lib.slim_engine_open(str(bundle).encode(), ctypes.byref(params), ctypes.byref(handle))
    return lib.slim_status_name(code).decode(), lib.slim_last_error().decode(), handle


@pytest.mark.skipif(not CPU_ONLY, reason="this ONNX Runtime has the CUDA provider: gpu_check.sh covers CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_only_onnx_runtime_fails_naming_the_provider(distilled_bundle, device):
    with pytest.raises(se.SlimError) as info:
        se.open_engine(distilled_bundle, device=device)
    message = str(info.value)
    assert info.value.status == "SLIM_ERR_BACKEND", message
    assert "CUDAExecutionProvider" in message and "onnxruntime-gpu" in message, message
    assert f"device {device.partition(':')[2] or 0}" in message, message


@pytest.mark.parametrize("fields,message", [
    ({"device_type": 7}, "device_type must be SLIM_DEVICE_CPU (1) or SLIM_DEVICE_CUDA (2), got 7"),
    ({"device_type": 2, "device_id": -1}, "device_id must be >= 0"),
    ({"device_type": 1, "device_id": 1}, "0 for the CPU"),
    ({"host_buffers": 2}, "host_buffers must be 0 or 1, got 2"),
])
def test_bad_device_parameters_are_rejected(distilled_bundle, fields, message):
    status, error, handle = _open(distilled_bundle, **fields)
    assert (status, handle.value) == ("SLIM_ERR_INVALID_ARGUMENT", None), error
    assert message in error


def test_host_buffers_leave_a_cpu_engine_as_it_is(distilled_bundle, distilled_checkpoint):
    """host_buffers (the configuration SLIMENGINE_DEVICE_OPS=cpu gave from the environment before ABI 1.0) is a field
    of the engine's params; on the CPU, where buffers are on the host anyway, the results are the same bits."""
    model, _ = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, 2, 5, seed=4)
    with se.open_engine(distilled_bundle) as plain, se.open_engine(distilled_bundle, host_buffers=True) as host:
        a, b = (e.session().generate(text, pooled, seed=[3, 9], height=8, width=8).latents for e in (plain, host))
    assert np.array_equal(a, b)
    for bad in ("yes", 2, 1.0, None):  # 1.0 was taken as 1 (found by the break-it pass)
        with pytest.raises(TypeError, match="host_buffers must be True or False"):
            se.open_engine(distilled_bundle, host_buffers=bad)


def test_the_cpu_device_is_the_default(distilled_bundle, distilled_checkpoint):
    model, _ = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, 1, 6, seed=3)
    with se.open_engine(distilled_bundle) as default, se.open_engine(distilled_bundle, device="cpu") as cpu:
        a = default.session().generate(text, pooled, seed=5, height=8, width=8).latents
        b = cpu.session().generate(text, pooled, seed=5, height=8, width=8).latents
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("text,expected", [("cpu", (1, 0)), ("cuda", (2, 0)), ("cuda:3", (2, 3))])
def test_device_strings(text, expected):
    assert parse_device(text) == expected


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cpu:0", "CUDA"])
def test_bad_device_strings_raise(text):
    with pytest.raises(ValueError, match="device must be"):
        parse_device(text)
