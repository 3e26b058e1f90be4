"""The ``lora`` adapter: LoRA (through HF peft) over a frozen int8 model.

``ftq run --quantizer dynamic --adapter lora`` quantizes the model, then
trains only low-rank float matrices ``A [r, in]``, ``B [out, r]`` beside each
chosen layer (``y = W x + (alpha / r) * B A x``): the int8 weights stay as the
quantizer made them, get no gradient and no optimizer state, and are never
float for the whole model at once (:mod:`ftq_plugins.int8.autograd`).

The artifact keeps the int8 base as usual and the adapter beside it in peft's
own format (``adapter_config.json``, ``adapter_model.safetensors``, keys
``base_model.model.<layer>.lora_A.weight``), so peft loads it onto a float
copy of the base too.  ``merge = true`` folds ``W + (alpha / r) * B A`` back
into the int8 weights after training (one more rounding; the report shows
both).

peft is used rather than ftq's own LoRA code because its initialisation,
scaling variants and file format are what the rest of the field trains,
loads and serves; ftq adds only what peft cannot know, an int8 base layer
(:mod:`ftq_plugins.adapters.int8_lora`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ftq_core.api import UsageError, check, hookimpl
from ftq_core.untrusted_json import parse_untrusted_json

log = logging.getLogger("ftq")

__all__ = ["LoraOptions", "LoraAdapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

#: peft's file names: the artifact directory doubles as a peft adapter directory.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The prefix peft's ``PeftModel`` puts before module names in the adapter file.
_PEFT_PREFIX = "base_model.model."
#: What :meth:`LoraAdapter.load` takes from ``adapter_config.json``: the keys :meth:`LoraAdapter.attach` sets.
_LOADED_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type")
#: Keys that describe the file rather than the adapter (ignored on load).
_DESCRIPTIVE_KEYS = ("peft_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode")


@dataclass(frozen=True, kw_only=True)
class LoraOptions:
    """Options of the ``lora`` adapter."""

    rank: int = field(default=16, metadata={"help": "rank r of each adapter (A is r x in, B is out x r)"})
    alpha: float = field(default=32.0, metadata={"help": "scale numerator: the update is (alpha / rank) * B A"})
    dropout: float = field(
        default=0.0,
        metadata={"help": "dropout on the adapter's input while training (0: off; on a CPU each adapted layer's random mask "
                          "costs about a fifth of a training step)"},
    )
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "glob patterns of layer names to adapt, e.g. *.q_proj,*.v_proj; empty: every Linear "
                          "layer but the output head"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the adapters' random initialisation (A; B starts at zero)"})
    merge: bool = field(
        default=False,
        metadata={"help": "after training, fold the adapter into the int8 weights (requantized; the report shows "
                          "perplexity before and after)"},
    )

    def __post_init__(self) -> None:
        check(
            [
                (self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
                (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
                (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
                (all(isinstance(p, str) and p for p in self.target_modules),
                 "target_modules entries must be non-empty glob patterns"),
            ]
        )


def _adaptable_layers(model) -> list[tuple[str, object]]:
    """Every layer LoRA can wrap, but the output head: ftq int8 Linears and float Linear/Conv1D."""
    from ftq_core.layers import is_linear_like
    from ftq_plugins.adapters.int8_lora import INT8_LINEAR_TYPES

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module) for name, module in model.named_modules()
        if module is not head and (isinstance(module, INT8_LINEAR_TYPES) or is_linear_like(module))
    ]


def _torch_ao_layers(model) -> list[str]:
    """Layers quantized by torch.ao, whose int8 kernels pass no gradient: LoRA cannot train through them."""
    return [name for name, module in model.named_modules() if type(module).__module__.startswith("torch.ao.nn.quantized")]


def _peft_targets(model, chosen: list[str]) -> list[str]:
    """``chosen`` layer names as peft target names: a leaf name (``q_proj``) where it picks exactly those layers."""
    by_leaf: dict[str, set[str]] = {}
    for name, _ in model.named_modules():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(name)
    picked = set(chosen)
    targets = []
    for leaf in sorted({name.rsplit(".", 1)[-1] for name in chosen}):
        if by_leaf[leaf] <= picked:
            targets.append(leaf)
        else:
            targets.extend(sorted(name for name in by_leaf[leaf] if name in picked))
    return targets


class LoraAdapter:
    """LoRA over the converted model; see :class:`ftq_core.protocols.Adapter` and the module docstring."""

    def __init__(self, config: LoraOptions):
        self.config = config

    # -- training ---------------------------------------------------------------
    def attach(self, model):
        """Add LoRA layers to ``model`` in place; only they require grad afterwards."""
        import torch
        from peft import LoraConfig

        from ftq_core.layers import matches_any
        from ftq_plugins.adapters.int8_lora import inject_lora

        cfg = self.config
        layers = _adaptable_layers(model)
        if cfg.target_modules:
            chosen = [name for name, _ in layers if matches_any(name, cfg.target_modules)]
        else:
            chosen = [name for name, _ in layers]
        torch_ao = [name for name in _torch_ao_layers(model)
                    if not cfg.target_modules or matches_any(name, cfg.target_modules)]
        if torch_ao:
            raise UsageError(
                f"adapter 'lora' trains over ftq's own int8 layers, and {torch_ao[0]!r} (and {len(torch_ao) - 1} more) "
                f"is a torch.ao quantized layer, which passes no gradient; quantize with dynamic or static on their "
                f"default backend (ftq), or with qat-int8"
            )
        if not chosen:
            examples = ", ".join(name for name, _ in layers[:3]) or "none"
            raise UsageError(
                f"adapter 'lora': target_modules {list(cfg.target_modules)} match no Linear layer of this model "
                f"(for example: {examples}); fix the patterns or leave target_modules empty for every layer"
            )
        peft_config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=_peft_targets(model, chosen),
            bias="none", task_type="CAUSAL_LM",
        )
        model.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # the same adapters every run, whatever ran before
            torch.manual_seed(cfg.seed)
            model = inject_lora(model, peft_config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("lora: rank %d on %d layers, %.2fM trainable parameters", cfg.rank, len(chosen), trainable / 1e6)
        return model

    def merge(self, model):
        """Fold every adapter into its base layer (int8 layers requantized) and take the LoRA layers out."""
        from ftq_core.layers import set_submodule

        for name, layer in self._lora_layers(model):
            layer.merge()
            set_submodule(model, name, layer.get_base_layer())
        if hasattr(model, "peft_config"):
            del model.peft_config
        return model

    # -- saving and loading -------------------------------------------------------
    @contextlib.contextmanager
    def detached(self, model) -> Iterator[object]:
        """``model`` with its LoRA layers replaced by their base layers (to save the base), put back afterwards."""
        from ftq_core.layers import set_submodule

        layers = self._lora_layers(model)
        peft_config = model.__dict__.pop("peft_config", None)  # peft's mark of an adapted model
        for name, layer in layers:
            set_submodule(model, name, layer.get_base_layer())
        try:
            yield model
        finally:
            for name, layer in layers:
                set_submodule(model, name, layer)
            if peft_config is not None:
                model.peft_config = peft_config

    def files(self, model) -> dict[str, bytes]:
        """The adapter as peft writes it: ``adapter_config.json`` and ``adapter_model.safetensors``."""
        import tempfile

        from peft import get_peft_model_state_dict
        from safetensors.torch import save

        state = get_peft_model_state_dict(model, adapter_name="default")
        tensors = {_PEFT_PREFIX + key: value.detach().to("cpu").contiguous() for key, value in state.items()}
        with tempfile.TemporaryDirectory() as tmp:
            model.peft_config["default"].save_pretrained(tmp)  # peft's own JSON (sets as lists, sorted keys)
            config_bytes = (Path(tmp) / ADAPTER_CONFIG).read_bytes()
        return {ADAPTER_CONFIG: config_bytes, ADAPTER_WEIGHTS: save(tensors, metadata={"format": "pt"})}

    def load(self, model, directory):
        """Attach the adapter :meth:`files` wrote into ``directory`` to ``model`` (its int8 base).

        The adapter's JSON is data: only the plain LoRA keys :meth:`attach`
        writes are taken (rank, alpha, dropout, targets), and a file asking
        for anything else (replaced modules, layer replication, other
        initialisations or LoRA variants, custom code) is refused.
        """
        from peft import LoraConfig, set_peft_model_state_dict

        from ftq_core.api import ArtifactError
        from ftq_core.tensor_io import load_tensors
        from ftq_plugins.adapters.int8_lora import inject_lora
        from ftq_plugins.adapters.saved_config import check_adapter_config

        directory = Path(directory)

        def refused(why: str) -> ArtifactError:
            return ArtifactError(f"the LoRA adapter in {directory} is refused: {why}; write the artifact again with ftq")

        try:
            values = parse_untrusted_json((directory / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise refused(f"it cannot be read ({exc})") from None
        if not isinstance(values, dict) or values.get("peft_type") != "LORA":
            raise refused(f"{ADAPTER_CONFIG} holds no LoRA configuration")
        problems = check_adapter_config(values, directory / ADAPTER_WEIGHTS)  # before peft allocates or matches
        if problems:
            raise refused(f"{ADAPTER_CONFIG}: {'; '.join(problems)}")
        try:
            tensors = load_tensors(directory / ADAPTER_WEIGHTS)
        except (OSError, ValueError) as exc:
            raise refused(f"it cannot be read ({exc})") from None
        try:
            peft_config = LoraConfig(**{key: values[key] for key in _LOADED_KEYS if key in values})
        except (TypeError, ValueError) as exc:
            raise refused(f"{ADAPTER_CONFIG} is not a LoRA configuration ({exc})") from None
        # every other key must say what peft's default says: plain LoRA, nothing replaced, no code
        defaults = json.loads(json.dumps(peft_config.to_dict(), default=list))
        unexpected = sorted(key for key, value in values.items()
                            if key not in (*_LOADED_KEYS, *_DESCRIPTIVE_KEYS) and value != defaults.get(key))
        if unexpected or peft_config.bias != "none":
            raise refused(f"{ADAPTER_CONFIG} sets {', '.join(unexpected) or 'bias'} beyond plain LoRA, which ftq "
                          f"neither writes nor loads")
        model.requires_grad_(False)
        try:
            model = inject_lora(model, peft_config)
            state = {key.removeprefix(_PEFT_PREFIX): value for key, value in tensors.items()}
            result = set_peft_model_state_dict(model, state, adapter_name="default")
        except (ValueError, RuntimeError, KeyError) as exc:
            raise refused(f"it does not fit its base model ({exc})") from None
        missing = [key for key in result.missing_keys if "lora_" in key]
        if missing or result.unexpected_keys:
            raise refused(f"it does not fit its base model (missing {missing[:3]}, unexpected "
                          f"{list(result.unexpected_keys)[:3]})")
        return model

    @staticmethod
    def _lora_layers(model) -> list[tuple[str, object]]:
        from peft.tuners.lora.layer import LoraLayer

        return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


@hookimpl
def register_adapters(register):
    register("lora", LoraAdapter, LoraOptions,
             description="LoRA (peft) over the frozen int8 model: train small float adapters, keep or merge them")
