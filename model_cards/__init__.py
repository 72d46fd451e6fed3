"""Publishing: hub folders with the project's model card, push / pull, and the models this project ships.

- ``publish``: ``save_encoder`` (a hub folder with its card), ``export_folder`` (a run or model
  -> its card facts, figures and hub folder), ``upload``; ``PublishError`` / ``PublishFailure``.
- ``evaluation``: the card's kNN and linear-probe accuracy, measured by ``ascl.training.evaluate``
  (the ``ascl eval`` protocol), with the split described in words.
- ``card``: typed card facts rendered through ``ModelCard``/``ModelCardData``/``EvalResult`` and
  the Jinja template ``card_template.md``.
- ``figures``: the 2-D projection of validation embeddings (the training curve is
  ``ascl.training.metrics.plot_curves``).
- ``catalog``: the shipped and cached encoders of this machine (``ascl models``).
- ``cli``: ``ascl push``, ``ascl pull``, ``ascl models``.

The shipped models' folders sit beside this file; their names map to hub repo ids in
``ascl.registry``. Publishing imports the core (``ascl``) and training, never export, serving
or the demo; nothing below it imports it. Importing this package is cheap (no torch); the
submodules import what they need.
"""
