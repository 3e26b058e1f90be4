"""ftq's fused int8 decoder: a Llama-family model's every layer in one native call per step.

* :mod:`.build` compiles the C++ source (``fused_llama.cpp``) for this CPU
  once and keeps the library in ftq's local cache, never in an artifact;
* :mod:`.decoder` checks a model up front and runs prefill and decode
  through it (:class:`~.decoder.FusedDecoder`).
"""
