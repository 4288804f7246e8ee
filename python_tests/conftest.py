"""Shared pytest setup: the devices present, a per-test seed, the CUDA marker.

``devices`` is the list every op test is parametrised over: "cpu" always, "cuda" when a
CUDA device is visible AND this build of eagle3_ops holds the CUDA kernels; otherwise
the "cuda" params are collected but skipped with the reason below, so the same files
run unchanged on a GPU machine. Test modules use it either through the ``device``
fixture or, where a fixture cannot be used (hypothesis), as
``from conftest import devices``.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import eagle3_ops

HAS_CUDA = bool(torch.cuda.is_available() and eagle3_ops.has_cuda_kernels())

if HAS_CUDA:
    CUDA_SKIP_REASON = ""
elif not torch.cuda.is_available():
    CUDA_SKIP_REASON = "no CUDA device visible (torch.cuda.is_available() is False)"
else:
    CUDA_SKIP_REASON = "this build of eagle3_ops has no CUDA kernels (eagle3_ops.has_cuda_kernels() is False)"

# Marks for a test that needs the CUDA kernels.
cuda_marks = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "n/a")]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "n/a")

devices = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=cuda_marks),
]


def pytest_configure(config):
    # pyproject.toml registers the marker too; repeated here so the files also run from
    # another rootdir without "unknown marker" warnings.
    config.addinivalue_line("markers", "cuda: needs a CUDA device and the CUDA kernels")


def pytest_report_header(config):
    return (f"eagle3_ops: torch {torch.__version__}, CUDA kernels built: {eagle3_ops.has_cuda_kernels()}, "
            f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")


@pytest.fixture(params=devices)
def device(request) -> str:
    """Each device present ("cuda" params are skipped where there is none)."""
    return request.param


@pytest.fixture
def seed(request) -> int:
    """A seed derived from the test's node id: fresh random inputs per test, reproducible."""
    return zlib.crc32(request.node.nodeid.encode())
