"""Converting one decoder layer at a time: what ``dynamic`` and ``static`` share (see :mod:`ftq_core.layerwise`).

The steps are each quantizer's ``convert``, split where the model splits:

* :meth:`LayerwiseConversion.embeddings`: the input embeddings are read: the
  rotation's ``E Q`` (a tied head with them);
* :meth:`~LayerwiseConversion.prepare_layer`: a decoder layer's weights are
  read: the rotation folded into it; the core then runs the calibration
  batches through the float layer to get the next layer's inputs;
* :meth:`~LayerwiseConversion.convert_layer`: its Linears become int8, with
  ``run()`` replaying the layer's calibration inputs for observers and GPTQ
  Hessians (the float inputs the whole-model ``convert`` sees too);
* :meth:`~LayerwiseConversion.finish`: final norm and head, then the steps
  that look at the whole model (report rows, int8 embeddings, kernel choice).

Each float weight sees the same operations in the same order as in
``convert``, and each calibration statistic the same inputs, so the artifact
holds the same bits (tested per quantizer and option).
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["LAYERS_PREFIX", "LayerwiseConversion", "whole_model_options"]

LAYERS_PREFIX = "model.layers."


def whole_model_options(config) -> str | None:
    """Why ``config``'s SmoothQuant or sensitivity budget needs the whole float model (``None``: neither is set).

    Both compare layers with each other over the whole model: SmoothQuant's per-layer alpha search and the
    budget's sensitivity ranking, which keeps the most sensitive layers of all float."""
    names = [name for name, value in (("smoothquant_alpha", config.smoothquant_alpha),
                                      ("ppl_budget", config.ppl_budget)) if value is not None]
    if not names:
        return None
    unset = " and ".join(f"{name}=none" for name in names)
    return (f"{' and '.join(names)} compare(s) layers across the whole float model; set {unset}, or load the whole "
            f"model (--layerwise off) where memory allows")


class LayerwiseConversion:
    """One layer-by-layer conversion's state; subclasses say how a set of float layers becomes int8
    (:meth:`quantize_modules`) and what runs once at the end (:meth:`complete`)."""

    def __init__(self, quantizer, model, *, rotate: bool):
        from ftq_plugins.transforms.rotation import random_orthogonal

        self.quantizer = quantizer
        self.config = quantizer.config
        self.rotation = random_orthogonal(model.config.hidden_size, 0) if rotate else None
        self.floats: dict[str, Any] = {}  # name -> the float module (meta once converted), in module order
        self.excluded: list = []
        self.codes: dict = {}  # layer name -> GPTQ codes, for the report

    # -- what subclasses define ------------------------------------------------
    def quantize_modules(self, model, floats: dict, blocks: dict[str, int], run: Callable | None) -> dict:
        """``{name: int8 module}`` for the float modules ``floats``; ``blocks``: online Hadamard blocks."""
        raise NotImplementedError

    def complete(self, model, scheme: str) -> None:
        """Fill the quantizer's report (from :meth:`reports`) and run its whole-model steps."""
        raise NotImplementedError

    # -- the steps the core calls ----------------------------------------------
    def embeddings(self, model) -> None:
        if self.rotation is not None:
            from ftq_plugins.transforms.rotation import rotate_embeddings

            rotate_embeddings(model, self.rotation, untie_head=self.config.untie_head)

    def prepare_layer(self, model, index: int) -> None:
        if self.rotation is not None:
            from ftq_plugins.transforms.rotation import rotate_layer

            rotate_layer(model.model.layers[index], self.rotation)

    def convert_layer(self, model, index: int, run: Callable | None = None) -> None:
        """Swap decoder layer ``index``'s chosen Linears for int8 ones, in place; their float weights are freed."""
        from ftq_core.checkpoint import release
        from ftq_core.layers import set_submodule
        from ftq_plugins.int8.hadamard import hadamard_block

        prefix = f"{LAYERS_PREFIX}{index}."
        chosen = dict(self._select(model, lambda n: n.startswith(prefix)))
        blocks = {}
        if self.rotation is not None:  # down_proj's input is rotated online (rotation.online_rotation_blocks)
            blocks = {n: hadamard_block(m.in_features) for n, m in chosen.items() if n.endswith(".mlp.down_proj")}
            blocks = {n: b for n, b in blocks.items() if b}
        quantized = self.quantize_modules(model, chosen, blocks, run)
        for name, module in chosen.items():
            self.floats[name] = module
            set_submodule(model, name, quantized[name])
            release(module)  # kept for its report row only (type and size), which the meta module still tells

    def skip_layer(self, model, index: int, restored: dict[str, Any]) -> None:
        """Layer ``index`` was converted by an earlier, interrupted run: put its saved modules in place."""
        from ftq_core.checkpoint import release
        from ftq_core.layers import set_submodule

        prefix = f"{LAYERS_PREFIX}{index}."
        for name, module in self._select(model, lambda n: n.startswith(prefix)):
            self.floats[name] = module
            if self.config_uses_gptq() and name in restored:
                self.codes[name] = None  # its codes came from GPTQ in the run that wrote it
        for name, module in restored.items():
            set_submodule(model, name, module)
        for name, module in self.floats.items():
            if name.startswith(prefix):
                release(module)  # read for the next layer's calibration inputs only

    def finish(self, model, run: Callable | None = None, read_embeddings: Callable | None = None) -> Any:
        """The final norm and head (read), then the quantizer's whole-model steps.

        ``read_embeddings``: reads the embeddings, which are not in memory (then transformed again by
        :meth:`embeddings`): before the head where the head is, or is made from, the embeddings; otherwise
        once the head is int8 and its float weight freed, so the two are never float at once.
        """
        from ftq_core.checkpoint import release
        from ftq_core.layers import set_submodule
        from ftq_plugins.transforms.rotation import ROTATED_SCHEME

        embeddings = model.get_input_embeddings()
        head_needs_them = getattr(model.lm_head, "weight", None) is embeddings.weight or self.config.untie_head
        if read_embeddings is not None and head_needs_them:
            read_embeddings()
            self.embeddings(model)
        if self.rotation is not None:
            from ftq_plugins.transforms.rotation import rotate_head

            rotate_head(model, self.rotation)
        outside = dict(self._select(model, lambda n: not n.startswith(LAYERS_PREFIX)))
        quantized = self.quantize_modules(model, outside, {}, run)
        for name, module in outside.items():
            self.floats[name] = module
            set_submodule(model, name, quantized[name])
            release(module)  # a tied head's weight stays with the embeddings, which hold it too
        if read_embeddings is not None and not head_needs_them:
            read_embeddings()
            self.embeddings(model)
        self.complete(model, self.config.scheme + (ROTATED_SCHEME if self.rotation is not None else ""))
        return model

    # -- helpers ------------------------------------------------------------------
    def config_uses_gptq(self) -> bool:
        return False

    def reports(self, model, scheme: str) -> list:
        """The report rows ``convert`` makes: exclusions, float-only modules, candidates, GPTQ marks."""
        from ftq_plugins.transforms.gptq import mark_gptq_layers
        from ftq_plugins.transforms.layer_selection import plan_reports

        rows = plan_reports(model, self.excluded, self.floats, {}, scheme)
        return mark_gptq_layers(rows, self.codes) if self.codes else rows

    def _select(self, model, inside) -> list[tuple[str, Any]]:
        from ftq_plugins.transforms.layer_selection import select_layers

        chosen, excluded = select_layers(model, self.config.keep_float)
        self.excluded += [row for row in excluded if inside(row.name)]
        return [(name, module) for name, module in chosen if inside(name)]
