"""Collections: embeddings of image sets and the indexes that search them.

The index (FAISS, with metadata filters), building and changing it, bulk embedding into Parquet
sets, near-duplicate search, and the record of which model made a set of embeddings. Uses
``ascl.export`` (runtime, cache) and core; ``ascl.serving.online`` sits above it.
"""
