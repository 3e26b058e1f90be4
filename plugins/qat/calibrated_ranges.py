"""Starting torch.ao fake-quant activation ranges from calibration instead of from the first training batch.

``prepare_qat`` gives every activation a moving-average min/max observer that
starts empty: the first training steps learn against ranges set by a batch or
two, and the final ranges are the largest values seen, which on an LLM's
activations leaves most of the 7- or 8-bit grid to rare peaks.  Here the
calibration batches run once through the prepared model with fake-quant off
(the float model's activations), a calibration observer sees each activation
fake-quant's input (the quantizer picks one for layer inputs and one for
requantized outputs), and its range is written into that fake-quant,
observer and qparams alike, so training and ``convert`` use it.  The activation observers then stay off:
weights train against fixed activation grids.
"""

from __future__ import annotations

__all__ = ["activation_fake_quants", "calibrate_activation_ranges"]


def activation_fake_quants(wrappers) -> list:
    """The activation fake-quant modules (inputs and requantized outputs) of prepared quant boundaries."""
    from torch.ao.quantization import FakeQuantizeBase

    found = []
    for wrapper in wrappers:
        for name, module in wrapper.named_modules():  # weights' fake-quants are named weight_fake_quant
            if name.endswith("activation_post_process") and isinstance(module, FakeQuantizeBase):
                found.append(module)
    return found


def calibrate_activation_ranges(model, wrappers, batches, input_observer, output_observer) -> int:
    """Set every activation fake-quant range of ``wrappers`` from ``batches`` run through ``model``.

    ``input_observer`` builds the calibration observer of each layer's input,
    ``output_observer`` that of its requantized output (an engine may need a
    reduced range on inputs only: the output is requantized from int32).
    Returns how many ranges were set; the activation observers are left disabled.
    """
    from torch.ao.quantization import disable_fake_quant, enable_fake_quant

    from ftq_plugins.transforms.calibration import run_batches

    fake_quants = activation_fake_quants(wrappers)
    outputs = {id(wrapper.module.activation_post_process) for wrapper in wrappers}
    observers = [(output_observer if id(fq) in outputs else input_observer)() for fq in fake_quants]
    handles = [fq.register_forward_pre_hook(lambda _m, args, obs=obs: obs(args[0].detach().float()))
               for fq, obs in zip(fake_quants, observers)]
    for wrapper in wrappers:
        wrapper.apply(disable_fake_quant)  # the float model's activations, as post-training calibration sees them
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
        for wrapper in wrappers:
            wrapper.apply(enable_fake_quant)
    for fq, obs in zip(fake_quants, observers):
        scale, zero_point = obs.calculate_qparams()
        _set_qparams(fq, scale, zero_point)
        fq.disable_observer()
    return len(fake_quants)


def _set_qparams(fake_quant, scale, zero_point) -> None:
    """Make ``fake_quant`` (and ``convert``, which reads its observer's min/max) use ``scale``/``zero_point``.

    The converted model quantizes with these qparams into the dtype's whole
    range: an engine's reduced (7-bit) range only sets the scale, and values
    above it still get codes up to 255.  The fake-quant clamps the same way.
    """
    import torch

    info = torch.iinfo(fake_quant.dtype)
    inner = fake_quant.activation_post_process
    inner.quant_min, inner.quant_max = int(info.min), int(info.max)
    with torch.no_grad():
        low, high = (info.min - zero_point) * scale, (info.max - zero_point) * scale
        inner.min_val.resize_(low.shape).copy_(low)
        inner.max_val.resize_(high.shape).copy_(high)
        fake_quant.scale.resize_(scale.shape).copy_(scale)
        fake_quant.zero_point.resize_(zero_point.shape).copy_(zero_point.to(fake_quant.zero_point.dtype))
