"""Quantizer plugins, one module each (``dynamic``, ``static``, ``qat``, ``qat-int8``), on a shared base and options."""
