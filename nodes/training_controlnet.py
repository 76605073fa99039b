"""Alias of :mod:`nodes.training.controlnet`: ``python -m nodes.training_controlnet`` is the command recorded in
the shipped ``controlnet_training.json``, and keeps working."""

from nodes.training.controlnet import main

if __name__ == "__main__":
    main()
