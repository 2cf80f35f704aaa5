"""Measured quality: the MNIST judge (`judge`) and where the judged images come from (`sources`)."""
