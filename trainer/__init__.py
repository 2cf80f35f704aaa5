"""digitgan's trainer: MNIST data, the DCGAN models, the distributed step and the training loop.

It knows nothing of export or serving (see ARCHITECTURE.md).
"""
