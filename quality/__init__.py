"""Measured quality: the shipped MNIST judge (`judge`), the per-epoch figures (`epochs`) and where
the judged images come from (`sources`: a run, a bundle or a served model).

May import `export/`, `client/`, `mnist_data/` and `common/`; never `trainer/` (the judge is plugged
into training by the caller), and nothing in `trainer/` may import it.
"""
