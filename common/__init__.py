"""Small helpers shared by the trainer, the judge, export and the client: atomic file writes, PNG
grids, and the scope for Keras's process-global precision policy.

Nothing here imports TensorFlow at import time, so the client CLI stays light.
"""
