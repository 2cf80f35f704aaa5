"""digitgan's model server: a TF Serving-compatible gRPC and REST server for exported bundles
(`python cli.py serve`), and nothing else.

It imports TensorFlow, numpy, grpcio (with its health and reflection services) and the
tensorflow-serving-api protos; never trainer/, export/, quality/, client/ or bench/. The client
(client/), the load generator and the process harness for tests and benches (bench/) live outside.
"""
