"""The float module a quantized module stands for: what an export to a float format writes.

One rule per quantized module type ftq's quantizers leave in a model, each
giving the weights the module effectively applies (int8 values times their
scales; SmoothQuant's input scaling folded back).  A third-party module type
joins by defining ``to_float() -> nn.Module`` itself.
"""

from __future__ import annotations

from collections.abc import Container, Iterator

import torch
from torch import nn

from ftq_core.api import ArtifactError, set_submodule

__all__ = ["float_module", "float_linear_from", "to_float_model", "float_tensors", "head_is_embeddings"]


def float_linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight [out, in]`` and ``bias`` as float32.

    A float32 ``weight`` is taken as it is, not copied (the callers pass a
    dequantized weight made for this layer): a copy of a [128k, 4096] head
    would be 2 GB more at the peak of an export.
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")  # no init, no memory
    linear.weight = nn.Parameter(weight.detach().float())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float().clone())
    return linear


def _torch_ao_weight_bias(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = module.weight(), module.bias()
    return weight.dequantize(), bias


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def _merged_lora(module) -> nn.Linear:
    """A peft LoRA layer (over an int8 or a float Linear) as one float Linear: W + the active adapters' updates."""
    base = module.get_base_layer()
    floated = float_module(base) or base
    if not isinstance(floated, nn.Linear):
        raise ArtifactError(f"a LoRA layer over a {type(base).__name__} cannot be exported as float weights")
    with torch.no_grad():
        weight = floated.weight.detach().float()
        if not module.merged:
            for name in module.active_adapters:
                if name in module.lora_A:
                    weight = weight + module.get_delta_weight(name).float()
    return float_linear_from(weight, floated.bias)


class _ScaledEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose rows come out times a constant, as a family's scaled embedding (Gemma) does.

    Its state holds the unscaled table under ``weight``, as the family's own
    class does, so a float export is loaded back by transformers as it is.
    """

    output_multiplier: float = 1.0

    def forward(self, input_ids):
        rows = super().forward(input_ids)
        return rows * self.output_multiplier if self.output_multiplier != 1.0 else rows


def _has_float_rule(module: nn.Module) -> bool:
    """Whether :func:`float_module` turns ``module`` float (without building the float module)."""
    from torch.ao.nn.quantized.dynamic import Linear as TorchAODynamicLinear

    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
    from ftq_plugins.int8.embedding import Int8Embedding
    from ftq_plugins.int8.quant_boundary import QuantBoundary
    from ftq_plugins.int8.w8a8_linear import Int8W8A8Linear

    return (_is_lora_layer(module) or callable(getattr(module, "to_float", None))
            or isinstance(module, (Int8DynamicLinear, Int8W8A8Linear, Int8Embedding, TorchAODynamicLinear, QuantBoundary)))


def float_module(module: nn.Module) -> nn.Module | None:
    """The float module ``module`` computes (up to activation rounding), or ``None`` if it is not quantized."""
    from torch.ao.nn.quantized import Linear as TorchAOLinear
    from torch.ao.nn.quantized.dynamic import Linear as TorchAODynamicLinear

    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
    from ftq_plugins.int8.embedding import Int8Embedding
    from ftq_plugins.int8.quant_boundary import QuantBoundary
    from ftq_plugins.int8.w8a8_linear import Int8W8A8Linear

    if _is_lora_layer(module):  # an adapter over a base layer: the base's float weight plus the adapter's update
        return _merged_lora(module)
    if isinstance(module, (Int8DynamicLinear, Int8W8A8Linear)):
        return float_linear_from(module.dequantized_weight(), module.bias)
    if isinstance(module, Int8Embedding):
        scaled = module.output_multiplier != 1.0
        embedding = (_ScaledEmbedding if scaled else nn.Embedding)(
            module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx, device="meta")
        if scaled:
            embedding.output_multiplier = module.output_multiplier
        embedding.weight = nn.Parameter(module.dequantized_weight())  # its own copy already: no second one
        return embedding
    if isinstance(module, TorchAODynamicLinear):
        return float_linear_from(*_torch_ao_weight_bias(module))
    if isinstance(module, QuantBoundary) and isinstance(module.module, TorchAOLinear):
        weight, bias = _torch_ao_weight_bias(module.module)
        if module.smooth is not None:  # the layer saw x / smooth: fold it back into the weight
            weight = weight / module.smooth[None, :]
        return float_linear_from(weight, bias)
    to_float = getattr(module, "to_float", None)
    return to_float() if callable(to_float) else None


def to_float_model(model: nn.Module) -> int:
    """Turn every quantized module of ``model`` into its float module, in place; how many were turned.

    ftq's own attention setting is dropped (transformers' ``sdpa`` is the
    standard), tied weights are tied again, and a module no rule knows
    (neither torch's, transformers' nor given a ``to_float()``) is an
    :class:`ArtifactError` naming it, since the export would not compute what
    the artifact does.
    """
    from ftq_core.attention import set_attention_dtype

    _refuse_foreign_modules(model)  # before any module is turned, so a refused export leaves the model as it was
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(prefix + ".") for prefix in replaced):
            continue  # the model itself, or inside a module already turned float
        floated = float_module(module)
        if floated is not None:
            set_submodule(model, name, floated)
            replaced.append(name)
    set_attention_dtype(model, None)
    from ftq_plugins.transforms.rotated_norm import untie_final_matrix

    untie_final_matrix(model)  # a rotated model's tied head: transformers' Llama has no final-norm matrix
    _settle_tied_embeddings(model)
    return len(replaced)


def _is_plain(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.nn", "transformers")) or isinstance(module, _ScaledEmbedding)


def _quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(name, module, quantized)`` for the model's modules, not descending into a quantized one (or a LoRA layer)."""
    from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside):
            continue
        quantized = not _is_plain(module) and not isinstance(module, RotatedRMSNorm) or _is_lora_layer(module)
        if quantized:
            inside.append(name)
        yield name, module, quantized


def _refuse_foreign_modules(model: nn.Module) -> None:
    """A module no rule turns float (neither torch's, transformers' nor given a ``to_float()``) is refused, by name."""
    for name, module, quantized in _quantized_modules(model):
        if quantized and not _has_float_rule(module):
            origin = type(module).__module__
            raise ArtifactError(
                f"layer {name!r} is a {type(module).__name__} (from {origin}), which ftq cannot export as float "
                f"weights; its plugin can give the class a to_float() method returning a torch.nn module"
            )


def float_tensors(model: nn.Module, *, shapes_only: bool = False,
                  leave_out: Container[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, float tensor)`` for every tensor of the float model :func:`to_float_model` would make, in order.

    One quantized module is turned float at a time and dropped once its
    tensors are used, so an export streaming these holds the artifact and one
    float layer, not a float copy of the model (32 GB for an 8B model).  The
    model is left as it is: a rotated model's final-norm matrix is folded into
    the head's rows as they are yielded (a unit-weight norm, an untied head),
    as :func:`to_float_model` does in place.  Ties: see :func:`head_is_embeddings`.

    ``shapes_only``: meta tensors of the right shapes, without dequantizing
    ftq's int8 layers or folding a head (other module types are turned float
    to learn their shapes); ``leave_out``: names of modules not to yield.
    """
    from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm, folded_head_weight

    _refuse_foreign_modules(model)
    final_norm = getattr(getattr(model, "model", None), "norm", None)
    rotated = isinstance(final_norm, RotatedRMSNorm)
    for name, module, quantized in _quantized_modules(model):
        if name in leave_out:
            continue
        if rotated and module is final_norm:
            yield f"{name}.weight", torch.ones(final_norm.hidden_size)  # transformers' RMSNorm of unit weight
            continue
        if rotated and name == "lm_head":
            rows = _out_features(module)
            yield "lm_head.weight", (torch.empty(rows, final_norm.hidden_size, device="meta") if shapes_only
                                     else folded_head_weight(_row_reader(module), rows, final_norm.matrix))
            if getattr(module, "bias", None) is not None:
                yield "lm_head.bias", module.bias.detach().float()
            continue
        if quantized and shapes_only and _per_row_int8(module):
            yield f"{name}.weight", torch.empty(module.weight_int8.shape, device="meta")
            if getattr(module, "bias", None) is not None:
                yield f"{name}.bias", torch.empty(module.bias.shape, device="meta")
            continue
        if quantized:
            floated = float_module(module)
            if floated is None:
                raise ArtifactError(f"layer {name!r} ({type(module).__name__}) has no float form to export")
            for key, tensor in floated.state_dict().items():
                yield f"{name}.{key}", tensor
            continue
        prefix = f"{name}." if name else ""
        for key, tensor in module.named_parameters(recurse=False):
            yield prefix + key, tensor.detach()
        for key, tensor in module.named_buffers(recurse=False):
            if tensor is not None and key not in module._non_persistent_buffers_set:
                yield prefix + key, tensor


def _out_features(module: nn.Module) -> int:
    return module.out_features if hasattr(module, "out_features") else module.weight_int8.shape[0]


def _per_row_int8(module: nn.Module) -> bool:
    """Whether ``module``'s float weight is exactly its int8 codes times one scale a row (ftq's per-channel int8
    Linear without a rotated input, or its int8 embedding)."""
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
    from ftq_plugins.int8.embedding import Int8Embedding

    return (type(module) is Int8DynamicLinear and not module.input_rotation_block) or type(module) is Int8Embedding


def _row_reader(module: nn.Module):
    """``(start, stop) -> float rows`` of a head's weight: from int8 codes a block at a time where it has them."""
    if _per_row_int8(module):
        codes, scales = module.weight_int8, module.weight_scale
        return lambda start, stop: codes[start:stop].float().mul_(scales[start:stop].reshape(-1, 1))
    weight = (float_module(module) or module).weight.detach()
    return lambda start, stop: weight[start:stop]


def head_is_embeddings(model: nn.Module) -> bool:
    """Whether the model's output head applies exactly its embedding table (a tied head, as an export writes it).

    Tied in the config and the same float weights (a quantizer may have
    rounded a tied head on its own); the rule :func:`_settle_tied_embeddings`
    applies to a float model too.
    """
    from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    if isinstance(getattr(getattr(model, "model", None), "norm", None), RotatedRMSNorm):
        return False  # the head takes the final norm's matrix: untied in every float form
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is None or output is embeddings or getattr(output, "weight", None) is getattr(embeddings, "weight", 0):
        return True
    if _per_row_int8(output) and _per_row_int8(embeddings):
        # int8 codes times per-row scales on both sides: equal codes and scales are equal weights (no float copies)
        return (torch.equal(output.weight_int8, embeddings.weight_int8)
                and torch.equal(output.weight_scale.flatten(), embeddings.weight_scale.flatten()))
    floated_output, floated_embeddings = float_module(output) or output, float_module(embeddings) or embeddings
    return torch.equal(floated_output.weight, floated_embeddings.weight)


def _settle_tied_embeddings(model: nn.Module) -> None:
    """Tie the output projection to the embeddings again only if they apply the same weights.

    A quantizer may round a tied ``lm_head`` on its own (``static`` and ``qat``
    quantize it, with its own scales, and keep the embedding float): the
    export then says the two are separate, as the artifact computes them.
    """
    config = model.config
    if not getattr(config, "tie_word_embeddings", False):
        return
    embeddings, output = model.get_input_embeddings(), model.get_output_embeddings()
    if output is None or output.weight is embeddings.weight:
        return
    if head_is_embeddings(model):
        model.tie_weights()
    else:
        config.tie_word_embeddings = False
