"""digitgan's benchmarks and the tools they share: speed and memory side by side in one run
(`time_to_quality`, `train_throughput`, `serving_latency`, `serving_memory`), the gRPC load
generator (`loadtest`) and the model server in a child process (`server_process`, also used by tests).

Run each from the repository root as `python -m bench.<name> --help`; results are read in
bench/README.md. Modules here may import any project package, never `tests/`.
"""
