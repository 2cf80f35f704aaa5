"""digitgan's trainer: the input pipeline, the DCGAN models, the distributed step, checkpoints,
summaries and the training loop.

It knows nothing of export, serving or the judge (see docs/architecture.md); MNIST itself comes
from `mnist_data/`.
"""
