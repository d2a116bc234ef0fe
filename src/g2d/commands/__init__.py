"""Sub-commands of the ``g2d`` command line beyond ``pretrain`` and ``demo``."""
