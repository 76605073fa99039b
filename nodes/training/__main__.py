"""``python -m nodes.training``: see :mod:`nodes.training` and :func:`nodes.training.family.parse_args`."""

from nodes.training.family import main

if __name__ == "__main__":
    main()
