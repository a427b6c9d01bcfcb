"""The kernels' AVX2 paths (the code a CPU without AVX-512 runs), exercised on this machine by building the kernels a
second time with -march=haswell (scripts/as_march.py): a build of ~45 s, then the kernel tests and a bit-for-bit
comparison with this build's outputs. Skipped where this CPU itself has no AVX-512 (the native build is then the AVX2
build, which the rest of the suite tests) or no AVX2 + FMA, or where the kernels do not build."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remix.kernels import cpu_ext

ROOT = Path(__file__).resolve().parents[1]


def as_haswell(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "as_march.py"), "haswell", "-m", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


@pytest.fixture(scope="module")
def avx2_build():
    if platform.machine() not in ("x86_64", "AMD64") or not cpu_ext.available():
        pytest.skip("needs the compiled kernels on x86-64")
    flags = cpu_ext.cpu_flags()
    if not {"avx2", "fma"} <= flags:
        pytest.skip("this CPU cannot run an AVX2 build")
    if "avx512f" not in flags:
        pytest.skip("the native build is the AVX2 build here (the whole suite tests it)")


def test_avx2_build_gives_the_avx512_builds_outputs_bit_for_bit(avx2_build, tmp_path):
    """Every 16-lane sum of the AVX-512 code is two 8-lane halves in the AVX2 code, summed in the same order: the base
    GEMM at 1-300 rows (D with and without a tail), routed module calls, the decode attention, norm, rotary, silu,
    argmax and sampling, and the engine's tokens and log-probabilities on the tiny model, equal exactly."""
    from tests import kernel_outputs

    saved = tmp_path / "native.pt"
    torch.save(kernel_outputs.outputs(), saved)
    run = as_haswell("tests.kernel_outputs", "compare", str(saved))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "0 mismatches in" in run.stdout


def test_avx2_build_passes_the_kernel_tests(avx2_build):
    """The kernel, sampling-kernel, 8-bit cache and fast-path tests (each kernel against its reference, batch
    invariance) on the AVX2 build."""
    run = as_haswell("pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "tests/test_sampling_kernel.py",
                     "tests/test_kv_int8.py", "tests/test_fastpath.py")
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert " passed" in run.stdout and " failed" not in run.stdout, tail
