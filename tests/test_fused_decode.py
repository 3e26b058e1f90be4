"""The fused int8 decoder against the eager int8 loop: same logits and tokens, clean fallbacks, its build cache."""

from __future__ import annotations

import copy

import pytest
import torch

import ftq_core
from ftq_core.errors import UsageError
from ftq_core.generation import DecodeLoop, LeanDecoder, choose_loop, greedy_generate, loop_reasons
from ftq_plugins.fused import build
from ftq_plugins.fused.decoder import FusedDecoder, model_reason

PROMPT_TOKENS, NEW_TOKENS = 9, 8


def make_model(model_type: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
    )
    settings.update(overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval()


def int8(model, **options):
    """``dynamic`` with the int-mm kernel: the per-token numerics the fused path runs, at every row count."""
    return ftq_core.quantize(copy.deepcopy(model), "dynamic", {"kernel": "int-mm", **options}).model.eval()


def prompt(batch: int = 1, tokens: int = PROMPT_TOKENS, seed: int = 1):
    return torch.randint(3, 512, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def step_logits(decoder, ids, tokens):
    """Logits of the prompt's last position, then of each of ``tokens [batch, steps]`` fed in turn."""
    with torch.inference_mode():
        out = [decoder.prefill(ids)]
        out += [decoder.step(tokens[:, i]) for i in range(tokens.shape[1])]
    return torch.stack(out, dim=1)


@pytest.fixture(scope="module", autouse=True)
def library():
    if build.unavailable_reason() is not None or build.load_library() is None:
        pytest.skip(f"fused int8 decoder unavailable here: {build.unavailable_reason()}")


@pytest.mark.parametrize("rows", [1, 3, 5, 15, 16, 17, 40])
@pytest.mark.parametrize("n, k", [(64, 64), (96, 192), (40, 72)])
def test_every_projection_kernel_equals_int_mm_exactly(rows, n, k):
    """The decoder's int8 products (VNNI GEMV with the zero point taken off by row sums below 16 rows; AMX
    tiles from the row-major weight, or torch._int_mm, above; shapes AMX cannot tile fall back) give the same
    floats as Int8DynamicLinear's int-mm kernel: exact int32 sums, the same rescale."""
    from ftq_plugins.int8.kernels import int_mm_int8
    from ftq_plugins.int8.numerics import quantize_per_channel_symmetric

    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    weight, scale = quantize_per_channel_symmetric(torch.randn(n, k, generator=gen))
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
    bias = torch.randn(n, generator=gen)
    lib = build.load_library()
    expected = int_mm_int8(x, weight, scale)
    assert torch.equal(lib.int8_linear(x, weight, scale.float(), None), expected)
    assert torch.equal(lib.int8_linear(x, weight, scale.float(), bias), expected + bias)


@pytest.mark.parametrize("block", [64, 512])
def test_the_decoders_hadamard_butterfly_agrees_with_the_eager_transform(block):
    """down_proj's online rotation: the decoder's butterfly (vectorized where the CPU allows) and the eager
    Kronecker products agree to float rounding."""
    from ftq_plugins.int8.hadamard import block_hadamard

    x = torch.randn(5, 3 * block, generator=torch.Generator().manual_seed(block)) * 3
    torch.testing.assert_close(build.load_library().block_hadamard(x, block), block_hadamard(x, block), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_logits_equal_the_eager_int8_loop(model_type, batch):
    """Every projection's int32 products are exact, so with float32 attention the two loops agree to float
    rounding (qwen2: q/k/v biases), and greedy decoding picks the same tokens."""
    from ftq_core.attention import set_attention_dtype

    model = int8(make_model(model_type))
    set_attention_dtype(model, None)
    ids = prompt(batch)
    tokens = torch.randint(3, 512, (batch, NEW_TOKENS), generator=torch.Generator().manual_seed(2))
    length = PROMPT_TOKENS + NEW_TOKENS + 1
    eager = step_logits(LeanDecoder(model, max_length=length, batch_size=batch), ids, tokens)
    fused = step_logits(FusedDecoder(model, max_length=length, batch_size=batch), ids, tokens)
    assert eager.shape == fused.shape == (batch, NEW_TOKENS + 1, 512)
    torch.testing.assert_close(fused, eager, atol=1e-4 * float(eager.abs().max()), rtol=0)
    assert torch.equal(
        greedy_generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], loop="fused"),
        greedy_generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], loop="lean"),
    )


def test_bf16_attention_follows_atens_rounding():
    """With bf16 attention (the default where the CPU has native bf16) the fused loop rounds q, k, v, the
    probabilities and the output as ATen's bf16 attention does: most steps agree exactly, none by much."""
    from ftq_core.attention import set_attention_dtype

    model = int8(make_model())
    set_attention_dtype(model, "bfloat16")
    ids, tokens = prompt(), torch.randint(3, 512, (1, NEW_TOKENS), generator=torch.Generator().manual_seed(2))
    length = PROMPT_TOKENS + NEW_TOKENS + 1
    eager = step_logits(LeanDecoder(model, max_length=length), ids, tokens)[0]
    fused = step_logits(FusedDecoder(model, max_length=length), ids, tokens)[0]
    exact = [bool(torch.allclose(f, e, atol=1e-4 * float(e.abs().max()), rtol=0)) for f, e in zip(fused, eager)]
    assert sum(exact) >= len(exact) - 3, exact
    assert float((fused - eager).norm() / eager.norm()) < 0.05


def test_auto_picks_fused_for_int8_llama_and_runs_a_prompt_of_many_rows():
    """A prompt above 16 rows takes the prompt GEMM (oneDNN via torch._int_mm), fewer the native kernel."""
    from ftq_core.attention import set_attention_dtype

    model = int8(make_model())
    set_attention_dtype(model, None)
    assert choose_loop(model) is DecodeLoop.FUSED
    for tokens in (3, 40):
        ids = prompt(tokens=tokens)
        with torch.inference_mode():
            eager = LeanDecoder(model, max_length=tokens).prefill(ids)
            fused = FusedDecoder(model, max_length=tokens).prefill(ids)
        torch.testing.assert_close(fused, eager, atol=1e-4 * float(eager.abs().max()), rtol=0)


def test_the_stage_clock_accounts_for_a_step():
    """Off by default; on, every stage of a prompt and of a token gets time, together no more than the calls."""
    import time

    decoder = FusedDecoder(int8(make_model()), max_length=48)
    ids = prompt(tokens=20)
    with torch.inference_mode():
        decoder.prefill(ids)
        assert set(decoder.stage_seconds().values()) == {0.0}
        decoder.set_profiling(True)
        start = time.perf_counter()
        token = decoder.prefill(ids).argmax(-1)
        for _ in range(3):
            token = decoder.step(token).argmax(-1)
        wall = time.perf_counter() - start
    stages = decoder.stage_seconds()
    assert {"q|k|v proj", "attention", "gate|up proj", "down_proj", "final norm+head"} <= set(stages)
    assert all(seconds > 0 for seconds in stages.values()), stages
    assert sum(stages.values()) <= wall


def test_a_float_head_runs_as_the_models_module():
    from ftq_core.attention import set_attention_dtype

    model = int8(make_model(tie_word_embeddings=False), keep_float=["lm_head"])
    set_attention_dtype(model, None)
    assert isinstance(model.lm_head, torch.nn.Linear) and model_reason(model) is None
    ids, tokens = prompt(), torch.randint(3, 512, (1, 4), generator=torch.Generator().manual_seed(3))
    eager = step_logits(LeanDecoder(model, max_length=14), ids, tokens)
    fused = step_logits(FusedDecoder(model, max_length=14), ids, tokens)
    torch.testing.assert_close(fused, eager, atol=1e-4 * float(eager.abs().max()), rtol=0)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: make_model(), "not ftq's per-token int8 Linear"),
        (lambda: int8(make_model(), keep_float=["model.layers.1.mlp.down_proj"]), "layers.1.mlp.down_proj is a Linear"),
        (lambda: ftq_core.quantize(make_model(), "dynamic", {"kernel": "weight-only"}).model.eval(), "'weight-only' kernel"),
        (lambda: int8(make_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64)), "model type 'gpt2'"),
    ],
    ids=["float", "float-layer", "weight-only", "gpt2"],
)
def test_models_the_fused_path_cannot_run_fall_back_up_front(make, reason):
    model = make()
    assert reason in loop_reasons(model)[DecodeLoop.FUSED]
    assert choose_loop(model) in (DecodeLoop.LEAN, DecodeLoop.HF)
    with pytest.raises(UsageError, match="fused decode loop cannot run this model"):
        choose_loop(model, "fused")


def test_opt_out_by_argument_and_environment(monkeypatch):
    model = int8(make_model())
    assert choose_loop(model, compile=False) is DecodeLoop.LEAN
    assert "--no-compile" in loop_reasons(model, compile=False)[DecodeLoop.FUSED]
    monkeypatch.setenv(build.OPT_OUT_ENV, "0")
    assert "FTQ_COMPILE=0" in loop_reasons(model)[DecodeLoop.FUSED]
    assert choose_loop(model) is DecodeLoop.LEAN


def test_a_second_process_loads_the_cached_library_without_compiling(monkeypatch):
    assert (build.library_dir() / "ftq_fused_llama.so").is_file()
    build._forget()

    def no_compiling(*args, **kwargs):
        raise AssertionError("the cached library was compiled again")

    monkeypatch.setattr(build, "_compile", no_compiling)
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # nor is a compiler needed
    try:
        assert build.unavailable_reason() is None and build.load_library() is not None
    finally:
        build._forget()


def test_a_machine_without_a_compiler_decodes_on_the_lean_loop(tmp_path, monkeypatch):
    model = int8(make_model())
    monkeypatch.setenv("FTQ_CACHE_DIR", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    build._forget()
    try:
        reason = loop_reasons(model)[DecodeLoop.FUSED]
        assert "no C++ compiler ('/nonexistent/c++')" in reason and "--no-compile" in reason
        assert choose_loop(model) is DecodeLoop.LEAN
        assert greedy_generate(model, prompt(), max_new_tokens=3, eos_token_id=[]).shape == (1, PROMPT_TOKENS + 3)
    finally:
        build._forget()


def test_a_machine_without_ninja_is_told_so(tmp_path, monkeypatch):
    monkeypatch.setenv("FTQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_ninja_dir", lambda: None)
    build._forget()
    try:
        assert "ninja is missing" in build.unavailable_reason() and build.load_library() is None
    finally:
        build._forget()


def test_a_failed_build_is_known_before_decoding(tmp_path, monkeypatch):
    model = int8(make_model())
    monkeypatch.setenv("FTQ_CACHE_DIR", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'ftq_fused_llama'\nc++: fatal error")

    monkeypatch.setattr(build, "_compile", broken)
    build._forget()
    try:
        assert choose_loop(model) is DecodeLoop.LEAN
        assert "failed to build (Error building extension 'ftq_fused_llama')" in loop_reasons(model)[DecodeLoop.FUSED]
    finally:
        build._forget()


def test_cli_generate_says_which_loop_ran(tmp_path, tiny_tokenizer):
    from click.testing import CliRunner
    from ftq_testing import make_tiny_llama

    from ftq_core.cli import cli

    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    runner = CliRunner()
    quantized = runner.invoke(cli, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q")])
    assert quantized.exit_code == 0, quantized.output
    fused = runner.invoke(cli, ["generate", str(tmp_path / "q"), "-p", "hello there", "-n", "3"])
    assert fused.exit_code == 0, fused.output
    assert "decode loop: fused (fused int8 decoder)" in fused.output
    lean = runner.invoke(cli, ["generate", str(tmp_path / "q"), "-p", "hello there", "-n", "3", "--no-compile"])
    assert lean.exit_code == 0 and "decode loop: lean (not fused: turned off (--no-compile))" in lean.output


@pytest.mark.slow
def test_bundled_model_fused_tokens_differ_from_eager_only_at_near_ties(bundled_model):
    """Teacher-forced on the eager loop's greedy tokens: wherever the fused loop picks another token, the eager
    logits' top two are closer than the two loops' logits differ (a tie within rounding, not a different model)."""
    model = int8(bundled_model.model)
    ids = bundled_model.tokenizer("The river rose two metres overnight, and the", return_tensors="pt").input_ids
    assert choose_loop(model) is DecodeLoop.FUSED
    tokens = greedy_generate(model, ids, max_new_tokens=16, eos_token_id=[], loop="lean")[:, ids.shape[1]:]
    length = ids.shape[1] + 17
    eager = step_logits(LeanDecoder(model, max_length=length), ids, tokens)[0]
    fused = step_logits(FusedDecoder(model, max_length=length), ids, tokens)[0]
    differ = 0
    for position in range(eager.shape[0]):
        if int(fused[position].argmax()) != int(eager[position].argmax()):
            top2 = eager[position].topk(2).values
            assert float(top2[0] - top2[1]) <= float((fused[position] - eager[position]).abs().max())
            differ += 1
    assert differ <= 2, f"{differ} of {eager.shape[0]} positions pick another token"
    # How far rounding alone moves the eager loop: its embeddings scaled by 1 + 1e-6 (a few float32 ulps)
    # flip int8 codes that amplify through 30 layers.  The fused loop must stay within that scale.
    nudged = LeanDecoder(model, max_length=length)
    embed = nudged.embed
    nudged.embed = lambda token_ids: embed(token_ids) * (1 + 1e-6)
    noise = float((step_logits(nudged, ids, tokens)[0] - eager).norm() / eager.norm())
    relative = float((fused - eager).norm() / eager.norm())
    assert relative < 3 * noise, f"fused logits are {relative:.1%} from the eager loop's; rounding alone moves {noise:.1%}"
