"""Small helpers shared by the trainer and the client: atomic file writes and PNG grids.

Nothing here imports TensorFlow, so the client CLI stays light.
"""
