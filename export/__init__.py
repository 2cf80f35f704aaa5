"""digitgan's exporter: a training checkpoint → a versioned, validated TensorFlow Serving bundle.

May import `trainer/` (to rebuild the models) and `common/`; never `serving/`, `client/` or
`quality/` (the blessing gate is passed in by the caller).
"""
