"""digitgan's exporter: a training checkpoint → a versioned, validated TensorFlow Serving bundle."""
