"""The paper's experiment pipeline, built on the library (never imported by it).

``data`` (dataset readers), ``models`` (our VGG/ResNet and the torchvision
adapter), ``train`` (one run: dense, explore, fine-tune, export), ``sweep`` (a
grid of runs), ``results`` and ``plot`` (tables and figures), ``cli`` (the
``dce`` command). Needs the ``experiments`` extra: tqdm, matplotlib, scipy.
"""
