"""Codec for ftq's int8 embedding: saved and rebuilt from tensors and JSON only."""

from __future__ import annotations

from ftq_core.hookspecs import hookimpl

__all__ = ["Int8EmbeddingCodec"]


class Int8EmbeddingCodec:
    """:class:`ftq_plugins.int8.embedding.Int8Embedding`: int8 rows plus one scale per row."""

    kind = "ftq.int8_embedding"

    @property
    def module_type(self):
        from ftq_plugins.int8.embedding import Int8Embedding

        return Int8Embedding

    def export(self, module):
        tensors = {"weight_int8": module.weight_int8, "weight_scale": module.weight_scale}
        meta = {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
        }
        if module.output_multiplier != 1.0:
            meta["output_multiplier"] = module.output_multiplier
        return tensors, meta

    def restore(self, tensors, meta):
        from ftq_plugins.int8.embedding import Int8Embedding

        return Int8Embedding.from_tensors(tensors, meta)


@hookimpl
def register_module_codecs(register):
    register(Int8EmbeddingCodec())
