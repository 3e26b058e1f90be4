"""Small module-tree helpers the core needs (plugins have their own richer set)."""

from __future__ import annotations

__all__ = ["set_submodule"]


def set_submodule(model, name: str, module) -> None:
    """Replace the submodule at dotted ``name`` with ``module``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)
