"""Sensitivity-based fallback: keep in float the fewest layers that meet a perplexity budget.

Every candidate layer is quantized, and the most sensitive ones go back to
float, one at a time, until the next-token loss on calibration batches (never
held-out data) is within ``log(1 + budget)`` of the float loss (perplexity is
``exp(loss)``: a +3 % budget is +0.0296 nats).  Each step's loss is measured.

How layers are ranked (``SensitivityMethod``):

* ``exact``: the loss rise when that layer alone is quantized: one forward
  pass per layer (211 passes for SmolLM2-135M: minutes on a CPU).
* ``fisher`` (default): one forward and backward pass of the float model; a
  layer's score is ``½ · mean_t (∂l_t/∂y_t · e_t)²``, the second-order (Fisher)
  estimate of the loss rise from its quantization error ``e_t`` on token ``t``.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass
from typing import Mapping

from .calibration import run_batches

__all__ = ["SensitivityMethod", "Fallback", "fallback_to_budget", "fisher_sensitivity", "latency_cost_ms"]


class SensitivityMethod(enum.Enum):
    FISHER = "fisher"
    EXACT = "exact"


@dataclass
class Fallback:
    """What the fallback decided: per-layer sensitivity (%% loss), kept layers and their reasons."""

    sensitivity: dict[str, float]
    kept: dict[str, str]
    float_loss: float
    final_loss: float


def truncate(batches, tokens: int):
    """At most ``tokens`` tokens of ``batches`` (whole rows, the last one cut short)."""
    out, left = [], tokens
    for ids in batches:
        for row in ids:
            if left <= 1:
                return out
            out.append(row[:left][None])
            left -= out[-1].shape[1]
    return out


def latency_cost_ms(float_module, quantized_module, in_features: int, *, tokens: int = 256, repeats: int = 3) -> float:
    """Extra ms one ``tokens``-row prefill pays with the float layer instead of the int8 one."""
    import torch

    x = torch.randn(tokens, in_features)

    def median_ms(module) -> float:
        times = []
        with torch.inference_mode():
            module(x)
            for _ in range(repeats):
                start = time.perf_counter()
                module(x)
                times.append(time.perf_counter() - start)
        return 1e3 * sorted(times)[len(times) // 2]

    return median_ms(float_module) - median_ms(quantized_module)


def fallback_to_budget(
    model,
    floats: Mapping[str, object],
    quantized: Mapping[str, object],
    batches,
    *,
    budget_pct: float,
    tokens: int = 512,
    method: SensitivityMethod = SensitivityMethod.FISHER,
    latency: bool = True,
) -> Fallback:
    """Install ``quantized`` layers in ``model``, keeping the most sensitive ones float to meet the budget.

    ``floats`` and ``quantized`` map layer names to modules computing the same
    function (float and int8); on return every layer holds one of the two.
    """
    from ftq_core.layers import set_submodule

    batches = truncate(batches, tokens)
    for name, module in floats.items():
        set_submodule(model, name, module)
    base = run_batches(model, batches)
    if method is SensitivityMethod.FISHER:
        sensitivity = {name: 100 * math.expm1(v) for name, v in fisher_sensitivity(model, floats, quantized, batches).items()}
    else:
        sensitivity = {}
        for name, module in quantized.items():
            set_submodule(model, name, module)
            sensitivity[name] = 100 * math.expm1(run_batches(model, batches) - base)
            set_submodule(model, name, floats[name])
    for name, module in quantized.items():
        set_submodule(model, name, module)
    loss, budget = run_batches(model, batches), math.log1p(budget_pct / 100)
    kept: dict[str, str] = {}
    for name in sorted(quantized, key=sensitivity.get, reverse=True):
        if loss - base <= budget:
            break
        set_submodule(model, name, floats[name])
        before, loss = loss, run_batches(model, batches)
        reason = (
            f"sensitivity ({method.value}): {sensitivity[name]:+.2f}% perplexity alone; keeping it float changed "
            f"calibration perplexity by {100 * math.expm1(loss - before):+.2f}% (budget {budget_pct:g}%)"
        )
        if latency:
            weight = getattr(quantized[name], "in_features", None) or _in_features(floats[name])
            reason += f"; float costs {latency_cost_ms(floats[name], quantized[name], weight):+.2f} ms per 256-token prefill"
        kept[name] = reason
    return Fallback(sensitivity, kept, base, loss)


def fisher_sensitivity(model, floats, quantized, batches) -> dict[str, float]:
    """Estimated loss rise (nats) from quantizing each layer alone, from one forward+backward pass."""
    import torch

    scores = {name: 0.0 for name in floats}
    counts = {"tokens": 0}
    handles = []

    def make_hook(name):
        def hook(module, args, output):
            with torch.no_grad():
                error = (quantized[name](args[0]) - output).detach()

            def on_grad(grad):
                # grad is ∂(sum of token losses)/∂y, so per token it is ∂l_t/∂y_t
                per_token = (grad.float() * error).sum(dim=-1)
                scores[name] += 0.5 * per_token.pow(2).sum().item()

            output.register_hook(on_grad)

        return hook

    for name, module in floats.items():
        handles.append(module.register_forward_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            loss.backward()
            counts["tokens"] += ids[:, 1:].numel()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: value / max(counts["tokens"], 1) for name, value in scores.items()}


def _in_features(module) -> int:
    from ftq_core.layers import linear_weight

    return linear_weight(module).shape[1]
