"""Exporter plugins: an artifact written in a format other runtimes read (``hf``: a float Hugging Face directory)."""
