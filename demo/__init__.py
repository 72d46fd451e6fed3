"""Gradio image-search demo and the one-command ``ascl up``."""
