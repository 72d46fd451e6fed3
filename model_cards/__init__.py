"""Model cards and the models this project ships.

- ``registry``: the one place that maps model names (``ascl-resnet18-cifar10``) to hub repo ids
  and to their shipped folders beside this file.
- ``card``: typed card facts rendered through ``ModelCard``/``ModelCardData``/``EvalResult`` and
  the Jinja template ``card_template.md``.
- ``figures``: the training-curve plot and the 2-D projection of validation embeddings.

Importing this package is cheap (no torch); the submodules import what they need.
"""
