"""Watching calibration passes: per-channel input ranges and the token batches seen.

Quantizers that calibrate attach a :class:`CalibrationRecorder` in ``prepare``;
the pipeline then runs its calibration batches through the model, and the
recorder keeps, with forward pre-hooks (the model itself is not changed):

* for every watched layer, the largest ``|x|`` seen on each input channel
  (what SmoothQuant needs), and
* the first few ``input_ids`` batches, so that ``convert`` can run the same
  calibration data again (to calibrate static scales after smoothing, or to
  measure each layer's sensitivity) without ever touching held-out data.
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["CalibrationRecorder", "run_batches"]


class CalibrationRecorder:
    """Records per-channel input absmax of named layers and the batches the model saw."""

    def __init__(self, *, keep_batches: int = 8):
        self.keep_batches = keep_batches
        self.absmax: dict[str, "torch.Tensor"] = {}  # noqa: F821 - torch is imported lazily
        self.batches: list = []
        self._handles: list = []

    def attach(self, model, layers: Iterable[tuple[str, object]]) -> None:
        """Start watching ``model`` and each ``(name, module)`` of ``layers``."""
        self.detach()
        self._handles.append(model.register_forward_pre_hook(self._record_ids, with_kwargs=True))
        for name, module in layers:
            self._handles.append(module.register_forward_pre_hook(self._channel_hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and len(self.batches) < self.keep_batches:
            self.batches.append(ids.detach().to("cpu").clone())

    def _channel_hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            current = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            previous = self.absmax.get(name)
            self.absmax[name] = current if previous is None else previous.maximum(current)

        return hook


def run_batches(model, batches) -> float:
    """Run ``batches`` of input ids through ``model`` (no grad); return the mean next-token loss."""
    import torch

    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    total, tokens = 0.0, 0
    with torch.no_grad():  # not inference_mode: observers keep the tensors they make
        for ids in batches:
            ids = ids.to(device)
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            tokens += ids[:, 1:].numel()
    return total / max(tokens, 1)
