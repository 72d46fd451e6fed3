"""Online serving: the one serve path (``serve``), the Triton model repository and its Python
models, the launcher, the supervised service behind its front door, the gRPC/HTTP client, and
the gallery service the demo talks to.

Uses ``ascl.serving.collections`` (the index and its writes), ``ascl.export`` and core; never the
other way round.
"""
