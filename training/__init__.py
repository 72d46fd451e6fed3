"""ASCL training: encoder, loss, frameworks (MoCo-v2, BYOL), data, loop and evaluation."""
