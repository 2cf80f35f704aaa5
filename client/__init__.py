"""digitgan's gRPC client: the library behind the CLI's generate, interpolate, status, metadata and
evaluate commands (`grpc_client`).

It speaks only the standard TF Serving protos and stubs, so it works against this project's server
and against the real tensorflow_model_server alike. It imports grpcio, numpy, tensorflow-serving-api
and TensorFlow's tensor helpers (lazily); from the server's folder only `serving.config`, plain
constants (the default model name and address) with no imports of its own, never the server itself.
"""
