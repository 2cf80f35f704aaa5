"""Training recipes as data (`recipes.py`): the named configurations that `python cli.py train
--config NAME` and the benches start from.

May import `trainer.config` (plain dataclasses, no TensorFlow) and nothing else of the project.
"""
