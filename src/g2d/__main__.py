"""``python -m g2d ...`` (also ``torchrun --nproc_per_node N -m g2d pretrain ...``)."""

from g2d.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
