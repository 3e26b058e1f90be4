"""The exact int8 product behind ``int-mm``: every implementation and every native build equal torch._int_mm bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ftq_core.cpu_features import cpu_flags
from ftq_plugins.fused import build
from ftq_plugins.int8 import exact_matmul

SHAPES = [(1, 576, 192), (5, 100, 7), (64, 576, 1536), (33, 1536, 65), (17, 2100, 40), (3, 31, 9)]


def _codes(m, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    # the extremes of the code range included: the AVX2 kernel's int16 pair sums are tightest there
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    x[0, : min(k, 40)] = 127
    w[0, : min(k, 40)] = -127
    return x, w


def _reference(x, w):
    return (x.long() @ w.long().t()).to(torch.int32)


@pytest.mark.parametrize("name", exact_matmul.BACKENDS)
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_every_implementation_equals_the_integer_product(name, m, k, n):
    """K above FLOAT_EXACT_MAX_K (2100) makes the float path sum slices; odd sizes exercise every tail."""
    if name == "ftq" and (build.unavailable_reason() is not None or build.load_library() is None):
        pytest.skip(f"native library unavailable here: {build.unavailable_reason()}")
    x, w = _codes(m, k, n, seed=m * 7 + k + n)
    assert torch.equal(exact_matmul.run_backend(name, x, w), _reference(x, w))


def test_the_choice_is_measured_or_forced_and_a_bad_name_is_refused(monkeypatch):
    from ftq_core.errors import UsageError

    exact_matmul.backend.cache_clear()
    try:
        monkeypatch.delenv(exact_matmul.BACKEND_ENV, raising=False)
        assert exact_matmul.backend(True) in exact_matmul.BACKENDS
        exact_matmul.backend.cache_clear()
        monkeypatch.setenv(exact_matmul.BACKEND_ENV, "float")
        assert exact_matmul.backend(True) == "float" and exact_matmul.backend(False) == "float"
        x, w = _codes(9, 64, 12, seed=1)
        assert torch.equal(exact_matmul.int8_matmul(x, w), torch._int_mm(x, w.t()))
        exact_matmul.backend.cache_clear()
        monkeypatch.setenv(exact_matmul.BACKEND_ENV, "fastest")
        with pytest.raises(UsageError, match="FTQ_INT8_MATMUL='fastest' is not one of torch, ftq, float"):
            exact_matmul.backend(True)
    finally:
        exact_matmul.backend.cache_clear()


def test_an_unknown_isa_is_refused_in_one_line(monkeypatch):
    from ftq_core.errors import UsageError

    monkeypatch.setenv(build.ISA_ENV, "sse9")
    with pytest.raises(UsageError, match="FTQ_FUSED_ISA='sse9' is not one of native, avx512, avx2, generic"):
        build.compiler_flags()


def _buildable_isas() -> list[str]:
    """``generic`` always; AVX2 and AVX512-VNNI where this CPU runs them (x86 only)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = set(cpu_flags().split())
    isas = ["generic"]
    if {"avx2", "fma"} <= flags:
        isas.append("avx2")
    if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        isas.append("avx512")
    return isas


_CHECK = textwrap.dedent("""
    import torch
    from ftq_plugins.fused import build
    from ftq_plugins.int8.kernels import int_mm_int8
    from ftq_plugins.int8.numerics import quantize_per_channel_symmetric
    lib = build.load_library(verbose=False)
    assert lib is not None, build.unavailable_reason()
    gen = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 64, 40), (7, 96, 24), (16, 200, 33), (40, 576, 96), (64, 1536, 70)]:
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        assert torch.equal(lib.int8_gemm(x, w), (x.long() @ w.long().t()).int()), (m, k, n)
        weight, scale = quantize_per_channel_symmetric(torch.randn(n, k, generator=gen))
        xf = torch.randn(m, k, generator=gen) * 3
        assert torch.equal(lib.int8_linear(xf, weight, scale, None), int_mm_int8(xf, weight, scale)), (m, k, n)
    # one artifact, two loops: with auto kernels (the default) the fused decoder's greedy tokens are the
    # eager loop's on this build too (prompt through the GEMM, tokens through the GEMV)
    import ftq_core
    from transformers import AutoConfig, AutoModelForCausalLM
    from ftq_core.attention import set_attention_dtype
    from ftq_core.generation import greedy_generate
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2)).eval()
    model = ftq_core.quantize(model, "dynamic").model.eval()
    set_attention_dtype(model, None)
    ids = torch.randint(3, 512, (1, 24), generator=gen)
    fused = greedy_generate(model, ids, max_new_tokens=16, eos_token_id=[], loop="fused")
    lean = greedy_generate(model, ids, max_new_tokens=16, eos_token_id=[], loop="lean")
    assert torch.equal(fused, lean), (fused, lean)
    print(lib.isa(), lib.gemm_isa())
""")


@pytest.mark.parametrize("isa", _buildable_isas())
def test_each_isa_build_computes_the_same_integers(isa):
    """Every build this CPU can run (the narrower ones stand in for older CPUs): its GEMM and the decoder's
    projections (GEMV below 16 rows, GEMM above) equal the integer product and Int8DynamicLinear's int-mm."""
    if build.unavailable_reason() is not None:
        pytest.skip(f"native library unavailable here: {build.unavailable_reason()}")
    env = {**os.environ, build.ISA_ENV: isa}
    done = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    gemm_isa = done.stdout.split()[-1]
    assert gemm_isa == ("generic" if isa == "generic" else "avx2")


_SELFTEST = build.SOURCE.with_name("int8_gemm_selftest.cpp")


def _compile_and_run(compiler: str, flags: list[str], tmp_path, runner: list[str] = ()) -> str:
    binary = tmp_path / f"selftest-{abs(hash((compiler, *flags)))}"
    built = subprocess.run([compiler, "-O2", *flags, f"-I{_SELFTEST.parent}", str(_SELFTEST), "-o", str(binary)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout.strip()


@pytest.mark.parametrize("isa", _buildable_isas())
def test_the_torch_free_kernel_self_test_passes_on_this_cpu(isa, tmp_path):
    """The kernels alone (int8_gemm_kernels.h), without torch or threads, for each x86 build this CPU runs."""
    import shutil

    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        pytest.skip("no C++ compiler")
    march = {"generic": "-march=x86-64", "avx2": "-march=haswell", "avx512": "-march=icelake-server"}[isa]
    assert _compile_and_run(compiler, [march], tmp_path) == ("generic ok" if isa == "generic" else "avx2 ok")


#: CI sets this: there the ARM self-test must run, never skip (.ci/run installs the cross compiler and qemu).
REQUIRE_ARM_ENV = "FTQ_REQUIRE_ARM_SELFTEST"


@pytest.mark.parametrize("march, expected", [("armv8.2-a+dotprod", "neon-dotprod ok"), ("armv8-a", "neon ok")])
def test_the_neon_kernels_run_bit_exact_on_aarch64_under_qemu(march, expected, tmp_path):
    """ARM's kernels (vdotq_s32, and plain NEON without the dot product) executed, not only compiled:
    cross-built with Debian's g++-aarch64-linux-gnu, run by qemu-user (correctness, not speed)."""
    import shutil

    compiler, emulator = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or emulator is None:
        if os.environ.get(REQUIRE_ARM_ENV) == "1":
            pytest.fail("aarch64-linux-gnu-g++ and qemu-aarch64 are required here (apt-get install g++-aarch64-linux-gnu qemu-user)")
        pytest.skip("needs g++-aarch64-linux-gnu and qemu-user (Debian packages)")
    out = _compile_and_run(compiler, [f"-march={march}", "-static"], tmp_path, runner=[emulator, "-cpu", "max"])
    assert out == expected
