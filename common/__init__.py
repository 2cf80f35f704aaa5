"""Small helpers shared by the trainer, the judge, export and the client: atomic file writes, PNG
grids, the scope for Keras's process-global precision policy, and the start-up log filter (quiet).

Nothing here imports TensorFlow at import time, so the client CLI stays light.
"""
