"""Collections: embeddings of image sets and the indexes that search them.

The index interface (``index``: FAISS with its metadata filters behind it), changes to an index,
the one batch-embedding loop (``engine``), index building, bulk embedding into Parquet sets, and
near-duplicate search. Uses ``ascl.export`` (runtime, cache, model identity) and core;
``ascl.serving.online`` sits above it.
"""
