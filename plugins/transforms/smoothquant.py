"""SmoothQuant: migrate activation outliers into the weights, channel by channel.

A few input channels of LLM Linear layers carry values 10-100x larger than the
rest, and a shared int8 activation scale then wastes its levels on them.
SmoothQuant (Xiao et al., 2023) divides input channel ``j`` by

    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha)

and multiplies weight column ``j`` by ``s_j``: ``(X / s) (W s)^T = X W^T``, so
the float function is unchanged while the activation gets easier to quantize
and the weight (quantized per output channel) absorbs the difficulty.
``alpha`` sets how much moves (0.5 balances the two; larger moves more).

Where the input is produced by a layer that can absorb ``1/s`` exactly, it is
folded there and costs nothing at run time:

* Llama: ``input_layernorm`` → q/k/v, ``post_attention_layernorm`` →
  gate/up (RMSNorm weight), ``v_proj`` → ``o_proj`` (rows of v; grouped-query
  heads share one scale), ``up_proj`` → ``down_proj`` (``act(gate) * up`` is
  linear in ``up``);
* GPT-2: ``ln_1`` → ``c_attn``, ``ln_2`` → ``c_fc`` (LayerNorm weight and
  bias), the value third of ``c_attn`` → ``attn.c_proj``.

Every other layer (GPT-2's ``mlp.c_proj`` after GELU, a tied ``lm_head``, any
other architecture) gets an *explicit* scale: :func:`smooth_model` returns it,
and the quantized module divides its input by it (``Int8W8A8Linear.smooth``).

One ``alpha`` rarely suits every layer: :func:`choose_alphas` picks one per
group of layers sharing an input, from :data:`ALPHA_GRID`, as the one whose
int8 outputs (activations quantized as the int8 layer will, per token or per
tensor; weights per channel) stay closest to the float outputs on calibration
inputs captured by :func:`capture_group_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

__all__ = [
    "SmoothGroup", "plan_groups", "smoothing_scales", "smooth_model", "ALPHA_GRID", "capture_group_inputs",
    "choose_alphas", "per_layer_alphas",
]

#: smoothing scales are clamped to this range so that dead channels stay finite
_MIN_SCALE, _MAX_SCALE = 1e-5, 1e5


@dataclass
class SmoothGroup:
    """Layers that read one input, and how ``1/s`` is folded into its producer.

    ``kind``: ``norm`` (divide ``producer.weight``/``bias``), ``rows`` (divide
    output rows ``row_slice`` of the Linear/Conv1D ``producer``, ``groups``
    consumer channels per producer row for grouped-query attention) or
    ``explicit`` (nothing to fold into).
    """

    kind: str
    consumers: list[str]
    producer: object = None
    row_offset: int = 0
    groups: int = 1
    head_dim: int = 0
    extra: dict = field(default_factory=dict)


def _is_norm(module) -> bool:
    name = type(module).__name__
    return getattr(module, "weight", None) is not None and (
        name == "LayerNorm" or (name.endswith("RMSNorm") and "Gemma" not in name)
    )


def _llama_groups(prefix: str, block) -> list[SmoothGroup] | None:
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if attn is None or mlp is None or not all(hasattr(attn, n) for n in names):
        return None
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    if not (_is_norm(block.input_layernorm) and _is_norm(block.post_attention_layernorm)):
        return None
    p = f"{prefix}." if prefix else ""
    head_dim = getattr(attn, "head_dim", None) or attn.o_proj.in_features // attn.config.num_attention_heads
    groups = getattr(attn, "num_key_value_groups", None) or attn.o_proj.in_features // attn.v_proj.out_features
    return [
        SmoothGroup("norm", [f"{p}self_attn.{n}" for n in names[:3]], block.input_layernorm),
        SmoothGroup("rows", [f"{p}self_attn.o_proj"], attn.v_proj, groups=groups, head_dim=head_dim),
        SmoothGroup("norm", [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"], block.post_attention_layernorm),
        SmoothGroup("rows", [f"{p}mlp.down_proj"], mlp.up_proj),
    ]


def _gpt2_groups(prefix: str, block) -> list[SmoothGroup] | None:
    if not all(hasattr(block, n) for n in ("ln_1", "attn", "ln_2", "mlp")) or not hasattr(block.attn, "c_attn"):
        return None
    p = f"{prefix}." if prefix else ""
    embed = block.attn.c_proj.weight.shape[0]  # Conv1D weight is [in, out]
    return [
        SmoothGroup("norm", [f"{p}attn.c_attn"], block.ln_1),
        SmoothGroup("rows", [f"{p}attn.c_proj"], block.attn.c_attn, row_offset=2 * embed),
        SmoothGroup("norm", [f"{p}mlp.c_fc"], block.ln_2),
        SmoothGroup("explicit", [f"{p}mlp.c_proj"]),
    ]


def plan_groups(model, layer_names) -> list[SmoothGroup]:
    """Group ``layer_names`` by shared input; layers of unknown blocks become ``explicit``."""
    grouped: list[SmoothGroup] = []
    for prefix, module in model.named_modules():
        groups = _llama_groups(prefix, module) or _gpt2_groups(prefix, module)
        if groups:
            grouped.extend(groups)
    wanted = set(layer_names)
    covered = {name for group in grouped for name in group.consumers}
    # a foldable group is smoothed only if one of its consumers is quantized
    plan = [group for group in grouped if wanted & set(group.consumers)]
    plan += [SmoothGroup("explicit", [name]) for name in layer_names if name not in covered]
    return plan


def smoothing_scales(x_absmax, weights, alpha: float):
    """``s`` per input channel from activation absmax and the consumers' ``[out, in]`` weights."""
    import torch

    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float().cpu() for w in weights]).amax(dim=0)
    scale = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.clamp_min(1e-5).pow(1 - alpha)
    return scale.clamp(_MIN_SCALE, _MAX_SCALE)


def _fold(group: SmoothGroup, scale) -> None:
    import torch

    producer = group.producer
    with torch.no_grad():
        if group.kind == "norm":
            producer.weight.div_(scale.to(producer.weight))
            if getattr(producer, "bias", None) is not None:
                producer.bias.div_(scale.to(producer.bias))
            return
        from ftq_core.layers import linear_weight

        rows = slice(group.row_offset, group.row_offset + scale.numel())
        weight = linear_weight(producer)  # a view for Conv1D: in-place ops reach the parameter
        weight[rows].div_(scale.to(weight)[:, None])
        if producer.bias is not None:
            producer.bias[rows].div_(scale.to(producer.bias))


def _grouped(values, group: SmoothGroup):
    """Per-consumer-channel values reduced to one per producer row (grouped-query heads)."""
    if group.groups <= 1:
        return values
    d = group.head_dim
    return values.reshape(-1, group.groups, d).amax(dim=1).reshape(-1)


def _expand(scale, group: SmoothGroup):
    if group.groups <= 1:
        return scale
    d = group.head_dim
    return scale.reshape(-1, 1, d).expand(-1, group.groups, d).reshape(-1)


def _group_scales(group: SmoothGroup, x, weights, alpha: float):
    """``(scale folded into the producer, or None for explicit; scale of the consumers' input channels)``."""
    if group.kind == "explicit":
        scale = smoothing_scales(x, weights, alpha)
        return None, scale
    x_g = _grouped(x, group)
    w_g = [_grouped(w.detach().abs().amax(dim=0), group)[None, :] for w in weights]
    scale = smoothing_scales(x_g, w_g, alpha)
    return scale, _expand(scale, group)


def _group_input(absmax, group: SmoothGroup):
    import torch

    return torch.stack([absmax[name] for name in group.consumers]).amax(dim=0)


def smooth_model(model, absmax: Mapping[str, "torch.Tensor"], alpha: float, layer_names,  # noqa: F821
                 alphas: Mapping[str, float] | None = None) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """Smooth ``layer_names`` of ``model`` in place; return the explicit scales left to apply.

    Folded groups change the producer and the consumers' float weights (the
    model computes the same function); an ``explicit`` layer keeps its float
    weights, and its returned ``s`` must be applied by the quantized module
    (input ``/ s``, weight ``* s``).  ``alphas`` (by a group's first consumer,
    :func:`choose_alphas`) overrides ``alpha`` group by group.
    """
    import torch

    from ftq_core.layers import linear_weight

    alphas = alphas or {}
    explicit: dict[str, torch.Tensor] = {}
    for group in plan_groups(model, layer_names):
        if any(name not in absmax for name in group.consumers):
            continue  # never saw calibration data: leave it alone
        weights = [linear_weight(model.get_submodule(name)) for name in group.consumers]
        fold, consumer_scale = _group_scales(group, _group_input(absmax, group), weights,
                                             alphas.get(group.consumers[0], alpha))
        if fold is None:
            explicit[group.consumers[0]] = consumer_scale
            continue
        _fold(group, fold)
        with torch.no_grad():
            for weight in weights:
                weight.mul_(consumer_scale.to(weight)[None, :])
    return explicit


#: The strengths :func:`choose_alphas` tries.
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def capture_group_inputs(model, layer_names, batches, *, max_tokens: int = 256) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """The first ``max_tokens`` calibration inputs of each smoothing group, by its first consumer's name.

    Runs ``batches`` through the (not yet smoothed) float model once.
    """
    import torch

    from .calibration import run_batches

    inputs: dict[str, list] = {}
    handles = []
    for group in plan_groups(model, layer_names):
        name = group.consumers[0]

        def hook(module, args, name=name):
            rows = args[0].detach().float().reshape(-1, args[0].shape[-1])
            have = sum(r.shape[0] for r in inputs.setdefault(name, []))
            if have < max_tokens:
                inputs[name].append(rows[: max_tokens - have].cpu())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(rows) for name, rows in inputs.items()}


def _int8_output_error(x, weight, scale, *, per_token: bool) -> float:
    """Relative error of ``(x / s) (W s)^T`` in int8 (activation per token or per tensor, weight per channel)."""
    from ftq_plugins.int8.numerics import round_to_codes, scale_from_absmax, symmetric_codes

    xs, ws = x / scale, weight * scale[None, :]
    if per_token:
        codes, x_scale = symmetric_codes(xs)
    else:
        x_scale = scale_from_absmax(xs.abs().amax())
        codes = round_to_codes(xs, x_scale)
    w_codes, w_scale = symmetric_codes(ws)
    expected = x @ weight.t()
    actual = (codes * x_scale) @ (w_codes * w_scale).t()
    return float((actual - expected).square().sum() / expected.square().sum().clamp_min(1e-30))


def choose_alphas(model, absmax, inputs, layer_names, *, per_token: bool, grid=ALPHA_GRID) -> dict[str, float]:
    """``{group's first consumer: alpha}`` of least int8 output error on ``inputs`` (:func:`capture_group_inputs`)."""
    import torch

    from ftq_core.layers import linear_weight

    chosen = {}
    with torch.no_grad():
        for group in plan_groups(model, layer_names):
            first = group.consumers[0]
            if first not in inputs or any(name not in absmax for name in group.consumers):
                continue
            weights = [linear_weight(model.get_submodule(name)).detach().float() for name in group.consumers]
            x, x_absmax = inputs[first], _group_input(absmax, group)

            def error(alpha):
                _, scale = _group_scales(group, x_absmax, weights, alpha)
                return sum(_int8_output_error(x, w, scale, per_token=per_token) for w in weights)

            chosen[first] = min(grid, key=error)
    return chosen


def per_layer_alphas(model, recorder, layer_names, *, per_token: bool) -> dict[str, float]:
    """:func:`choose_alphas` on the first 256 tokens a :class:`~.calibration.CalibrationRecorder` recorded:
    per-token activations for ``dynamic``, per tensor (minmax) for ``static``."""
    inputs = capture_group_inputs(model, layer_names, recorder.batches)
    return choose_alphas(model, recorder.absmax, inputs, layer_names, per_token=per_token)
