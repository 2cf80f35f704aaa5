"""Serving latency/throughput of the digitgan bundle: in-process vs the project's gRPC server.

Everything is measured in one run on the same machine, so the printed ratios compare like with
like:

  * in-process: the same SavedModel signature called directly, both as TF2
    (`tf.saved_model.load(...).signatures["serving_default"]`) and through the TF1 Session path the
    server itself uses (`serving.servable.LoadedVersion`), 1 and 64 images per call;
  * gRPC Predict to the project's server running in a *subprocess* (so the client's Python does
    not share a GIL with the server; the same as `python cli.py serve --port 0 --rest-port 0`),
    1 and 64 images per request, 1 client (a blocking stub) and 16 concurrent clients
    (bench.loadtest's asyncio clients), batching off and on;
  * the Open Inference Protocol (KServe "v2") beside TF Serving's API on one server: a 1-image
    request as gRPC Predict, REST :predict, v2 gRPC ModelInfer and v2 REST infer (tritonclient, the
    protocol's client library, with binary tensor data both ways), 1 client, batching off;
  * the transport floor: the same 1 and 16 clients against a server that runs no model and
    answers with a precomputed 1-image response, and from it upper bounds on what unbatched and
    batched serving can reach on this machine (client, gRPC and model sharing the same cores);
  * response encoding: float_val (what the server sends) vs tensor_content for 64 images, encode +
    serialize + client parse + decode; and the `sample` signature's `png_bytes` output vs `images`.

The bundle: `--model-base-path` if given, else `models/digitgan` if it exists, else a bundle of the
real generator architecture (trainer.models + export.signatures, untrained weights: same cost)
written to a temporary folder.

    .venv/bin/python -m bench.serving_latency                 # default run, a few minutes
    .venv/bin/python -m bench.serving_latency --seconds 2     # quicker
    .venv/bin/python -m bench.serving_latency --requests 500  # fixed request count per 1-client cell
    .venv/bin/python -m bench.serving_latency --rest-only     # only REST :predict, 1 and 64 images, 1 client
    .venv/bin/python -m bench.serving_latency --v2-only       # only Predict vs v2 (gRPC, REST), 1 image, 1 client

No timing is asserted; targets are reported as met / NOT met with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_kernels, machine, quiet

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    quiet.install()  # before TensorFlow is imported; DIGITGAN_VERBOSE=1 shows its logs
    cpu_kernels.use_onednn()  # likewise before TensorFlow: the kernels `cli.py` runs with

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

from bench.server_process import ServerProcess  # noqa: E402
from client.grpc_client import CHANNEL_OPTIONS  # noqa: E402
from serving import config as serve_config  # noqa: E402

MODEL_NAME = serve_config.MODEL_NAME
WIDTH = 52
GRPC_OPTIONS = list(CHANNEL_OPTIONS)


# ---------------- the bundle ----------------
def find_or_build_bundle(base_path: str | None, workdir: str) -> tuple[str, str, int]:
    """(base path holding numeric versions, description, latent dim)."""
    for candidate in ([base_path] if base_path else [serve_config.MODEL_BASE_PATH]):
        base = Path(candidate)
        versions = sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()) \
            if base.is_dir() else []
        if versions:
            path = base / str(versions[-1])
            latent = latent_dim_of(str(path))
            return str(base.resolve()), f"exported bundle {path}", latent
        if base_path:
            raise SystemExit(f"no numeric version folder under {base_path}")
    return build_bundle(Path(workdir) / MODEL_NAME / "1")


def build_bundle(target: Path) -> tuple[str, str, int]:
    """The default recipe's generator, untrained, exported to `target` (same cost as a trained one)."""
    from configs import recipes
    from export import bundle as bundle_lib, signatures as signatures_lib
    from trainer import models

    defaults = recipes.build("default")  # the default recipe's generator, as `cli.py train` builds it
    latent = defaults.latent_dim
    generator = models.build_generator_of(defaults)
    module = signatures_lib.GeneratorSignatures(generator, latent, conditional=True)
    module.write(str(target))
    try:
        bundle_lib.write_warmup(target, MODEL_NAME, module)
    except Exception:  # warmup file is optional for the benchmark
        pass
    params = sum(int(np.prod(w.shape)) for w in generator.weights)
    return str(target.parent), (f"real digitgan generator ({defaults.architecture}), untrained weights "
                                f"({params:,} parameters), written to a temp dir"), latent


def latent_dim_of(path: str) -> int:
    signature = tf.saved_model.load(path).signatures["serving_default"]
    return int(signature.structured_input_signature[1]["noise"].shape[1])


# ---------------- statistics ----------------
def summarize(latencies: list[float], wall: float, images_per_request: int) -> dict:
    ordered = sorted(latencies)
    count = len(ordered)
    return {"n": count,
            "p50": ordered[count // 2] * 1e3,
            "p99": ordered[min(count - 1, int(count * 0.99))] * 1e3,
            "mean": statistics.fmean(ordered) * 1e3,
            "rps": count / wall,
            "ips": count * images_per_request / wall}


def run_for(call, seconds: float, requests: int | None, warmup: int = 5) -> tuple[list[float], float]:
    for _ in range(warmup):
        call()
    latencies = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
        if requests is not None:
            if len(latencies) >= requests:
                break
        elif t0 - start >= seconds:
            break
    return latencies, time.perf_counter() - start


# ---------------- in-process ----------------
def bench_in_process(version_dir: str, latent: int, args) -> dict:
    from serving.servable import LoadedVersion

    results = {}
    rng = np.random.default_rng(0)
    tf2 = tf.saved_model.load(version_dir).signatures["serving_default"]
    tf1 = LoadedVersion(MODEL_NAME, 1, version_dir)
    signature = tf1.signature_defs["serving_default"]
    feed_name, fetch_name = signature.inputs["noise"].name, signature.outputs["images"].name
    for size in (1, 16, 64):
        noise = rng.standard_normal((size, latent)).astype(np.float32)
        tensor = tf.constant(noise)
        lat, wall = run_for(lambda: tf2(noise=tensor)["images"].numpy(), args.seconds, args.requests)
        results[("tf2", size)] = summarize(lat, wall, size)
        lat, wall = run_for(lambda: tf1.run({feed_name: noise}, [fetch_name]), args.seconds, args.requests)
        results[("tf1", size)] = summarize(lat, wall, size)
    # Two callers at once, as the server runs concurrent requests or batches.
    for size in (1, 16, 64):
        noise = rng.standard_normal((size, latent)).astype(np.float32)
        results[("tf1x2", size)] = run_threads(lambda: tf1.run({feed_name: noise}, [fetch_name]), 2, size, args)
    tf1.retire()  # nothing holds it: its session closes now
    return results


def run_threads(call, threads: int, size: int, args) -> dict:
    for _ in range(2):
        call()
    per_thread = None if args.requests is None else max(1, args.requests // threads)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = time.perf_counter()

    def worker(mine: list) -> None:
        while True:
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            mine.append(t1 - t0)
            if (per_thread is not None and len(mine) >= per_thread) or \
                    (per_thread is None and t1 - start >= args.seconds):
                return

    workers = [threading.Thread(target=worker, args=(mine,)) for mine in latencies]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return summarize([x for mine in latencies for x in mine], time.perf_counter() - start, size)


# ---------------- the server in a subprocess ----------------
def deploy_batching_parameters() -> dict[str, int]:
    """The four BatchingParameters of serving/deploy/batching.config (what real TF Serving gets)."""
    text = (ROOT / "serving" / "deploy" / "batching.config").read_text()
    return {name: int(value) for name, value in
            re.findall(r"^\s*(\w+)\s*\{\s*value:\s*(\d+)\s*\}", text, re.M)}


def start_server(base_path: str, batching: bool, rest: bool = False) -> ServerProcess:
    """The project's server in a subprocess, once its model is loaded (REST on a free port if asked)."""
    knobs = deploy_batching_parameters() if batching else {}
    return ServerProcess.start(model_base_path=base_path, port=0, rest_port=serve_config.FREE_PORT if rest else 0,
                               poll_seconds=0, enable_batching=batching, **knobs)


def predict_request(noise: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL_NAME
    request.inputs["noise"].CopyFrom(tf.make_tensor_proto(noise))
    return request


def bench_grpc(port: int, latent: int, size: int, clients: int, args) -> dict:
    """One client: a plain blocking stub in this process. Several: bench.loadtest's asyncio
    clients on one channel, the cheapest Python client here (bench/README.md), so as much of the
    shared cores as possible is left to the server."""
    request = predict_request(np.random.default_rng(1).standard_normal((size, latent)).astype(np.float32))
    if clients > 1:
        return bench_load(f"127.0.0.1:{port}", request, clients, args.seconds, size)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        latencies, wall = run_for(lambda: stub.Predict(request, timeout=60), args.seconds, args.requests)
    return summarize(latencies, wall, size)


def bench_load(target: str, request, clients: int, seconds: float, size: int) -> dict:
    """Closed-loop load from `clients` coroutines after a short warm-up; every request must succeed."""
    from bench.loadtest import LoadGenerator

    LoadGenerator(target, clients=clients, seconds=min(1.0, seconds), request=request).run()
    result = LoadGenerator(target, clients=clients, seconds=seconds, request=request).run()
    if result.failed:
        raise SystemExit(f"{result.failed} of {result.requests} requests to {target} failed: {result.failures}")
    return {"n": result.requests, "p50": result.p50_ms, "p99": result.p99_ms,
            "rps": result.requests_per_second, "ips": result.requests_per_second * size}


def bench_rest(port: int, latent: int, size: int, args) -> dict:
    """REST :predict (row format, `instances`) from one client on a kept-alive connection; each
    request is timed until the whole JSON reply has arrived (the client does not parse it)."""
    import http.client

    noise = np.random.default_rng(1).standard_normal((size, latent)).astype(np.float32)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    call = rest_predict_call(connection, noise)
    try:
        images = np.asarray(json.loads(call())["predictions"])
        assert images.shape == (size, 28, 28, 1), images.shape
        latencies, wall = run_for(call, args.seconds, args.requests)
    finally:
        connection.close()
    return summarize(latencies, wall, size)


def rest_predict_call(connection, noise: np.ndarray):
    """call() -> the JSON reply of one REST :predict of `noise` (row format) on `connection`."""
    body = json.dumps({"instances": noise.tolist()}).encode()
    path = f"/v1/models/{MODEL_NAME}:predict"

    def call() -> bytes:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        payload = reply.read()
        if reply.status != 200:
            raise SystemExit(f"REST predict failed: HTTP {reply.status} {payload[:300]!r}")
        return payload
    return call


def rest_only(base_path: str, latent: int, args) -> None:
    """`--rest-only`: REST :predict rows, batching off, 1 client (a quick before/after check)."""
    server = start_server(base_path, batching=False, rest=True)
    try:
        for size in (1, 64):
            row = bench_rest(server.rest_port, latent, size, args)
            print(f"{f'REST :predict batching off, {size:2d} img,  1 client':{WIDTH}s} {fmt(row)}", flush=True)
    finally:
        server.stop()


# ---------------- the Open Inference Protocol (KServe "v2") beside Predict ----------------
V2_PATHS = ("gRPC Predict", "REST :predict", "v2 gRPC ModelInfer", "v2 REST infer")


def bench_v2(base_path: str, latent: int, args) -> dict[str, dict]:
    """Label -> row of a 1-image request from 1 client to one server (batching off): TF Serving's
    Predict over gRPC (a plain stub) and REST (`:predict`), and the same noise over v2 with
    tritonclient, gRPC ModelInfer and REST infer (binary tensor data both ways, its default).

    The four take turns request by request, so a machine whose load changes during the run
    slows each of them alike; every path must give the images Predict gives.
    """
    import http.client

    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http

    noise = np.random.default_rng(1).standard_normal((1, latent)).astype(np.float32)
    server = start_server(base_path, batching=False, rest=True)
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=GRPC_OPTIONS))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_request(noise)
        connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
        stack.callback(connection.close)
        calls = [lambda: tf.make_ndarray(stub.Predict(request, timeout=60).outputs["images"]),
                 rest_predict_call(connection, noise)]
        for module, port in ((triton_grpc, server.grpc_port), (triton_http, server.rest_port)):
            client = module.InferenceServerClient(f"127.0.0.1:{port}")
            stack.callback(client.close)
            calls.append(v2_infer_call(module, client, noise))
        expected = calls[0]()
        for call in calls[2:]:
            if not np.array_equal(call(), expected):
                raise SystemExit("a v2 request gave other images than Predict for the same noise")
        latencies = run_interleaved(calls, args)
    return {label: summarize(times, wall, 1) for label, (times, wall) in zip(V2_PATHS, latencies)}


def v2_infer_call(module, client, noise: np.ndarray):
    """call() -> the images of one v2 infer of `noise` to the model `digitgan` with tritonclient."""
    tensor = module.InferInput("noise", list(noise.shape), "FP32")
    tensor.set_data_from_numpy(noise)
    return lambda: client.infer(MODEL_NAME, [tensor]).as_numpy("images")


def run_interleaved(calls: list, args, warmup: int = 5) -> list[tuple[list[float], float]]:
    """(latencies, seconds spent in them) of each call, the calls taking turns: --seconds each in
    all (or --requests each)."""
    for _ in range(warmup):
        for call in calls:
            call()
    latencies: list[list[float]] = [[] for _ in calls]
    started = time.perf_counter()
    while True:
        for call, times in zip(calls, latencies):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        if args.requests is not None:
            if len(latencies[0]) >= args.requests:
                break
        elif time.perf_counter() - started >= args.seconds * len(calls):
            break
    return [(times, sum(times)) for times in latencies]


def print_v2(rows: dict[str, dict]) -> None:
    for label, row in rows.items():
        print(f"{label + ', batching off, 1 img, 1 client':{WIDTH}s} {fmt(row)}", flush=True)


# ---------------- the transport floor: a server that runs no model ----------------
def serve_fixed_response() -> None:
    """`--floor-server`: answer every Predict with one precomputed 1-image response.

    It parses the same request and sends the same bytes as the real server (a 1x28x28x1 float_val
    tensor), so its req/s is what gRPC and the Python client alone allow on this machine.
    """
    from concurrent import futures

    from serving.tensors import ndarray_to_proto

    response = predict_pb2.PredictResponse()
    response.model_spec.name = MODEL_NAME
    response.model_spec.version.value = 1
    response.model_spec.signature_name = "serving_default"
    response.outputs["images"].CopyFrom(ndarray_to_proto(np.zeros((1, 28, 28, 1), np.float32)))

    class FixedPrediction(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(FixedPrediction(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"floor server on port {port}", flush=True)
    server.wait_for_termination()


def bench_floor(latent: int, args) -> dict[int, dict]:
    """Clients (1, 16) -> their row against the no-model server, measured as bench_grpc measures."""
    process = subprocess.Popen([sys.executable, "-m", "bench.serving_latency", "--floor-server"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        match = re.match(r"floor server on port (\d+)", process.stdout.readline())
        if match is None:
            raise SystemExit("the floor server subprocess did not start")
        return {clients: bench_grpc(int(match.group(1)), latent, 1, clients, args) for clients in (1, 16)}
    finally:
        process.terminate()
        process.wait(30)


# ---------------- response encoding ----------------
def bench_encoding(latent: int, args) -> dict:
    from tensorflow.core.framework import tensor_pb2

    from serving.tensors import ndarray_to_proto

    images = np.random.default_rng(2).random((64, 28, 28, 1), dtype=np.float32)
    results = {}
    for name, use_content in (("float_val", False), ("tensor_content", True)):
        def encode():
            return ndarray_to_proto(images, use_tensor_content=use_content).SerializeToString()

        data = encode()

        def decode():
            proto = tensor_pb2.TensorProto()
            proto.ParseFromString(data)
            return tf.make_ndarray(proto)

        assert np.array_equal(decode(), images)
        lat_e, _ = run_for(encode, min(args.seconds, 2.0), args.requests and min(args.requests, 200))
        lat_d, _ = run_for(decode, min(args.seconds, 2.0), args.requests and min(args.requests, 200))
        results[name] = {"bytes": len(data), "encode": statistics.median(lat_e) * 1e3,
                         "decode": statistics.median(lat_d) * 1e3}
    return results


def bench_sample_png(port: int, args) -> dict | None:
    """gRPC Predict on the `sample` signature (64 images), outputs filtered to images / png_bytes."""
    from PIL import Image
    import io

    results = {}
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for output in ("images", "png_bytes"):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MODEL_NAME
            request.model_spec.signature_name = "sample"
            request.inputs["digit"].CopyFrom(tf.make_tensor_proto(np.arange(64, dtype=np.int32) % 10))
            request.inputs["seed"].CopyFrom(tf.make_tensor_proto(np.arange(64, dtype=np.int64)))
            request.output_filter.append(output)
            try:
                response = stub.Predict(request, timeout=60)
            except grpc.RpcError as error:
                return {"error": f"{error.code().name}: {error.details()}"}

            def call_and_decode():
                reply = stub.Predict(request, timeout=60)
                if output == "images":
                    return tf.make_ndarray(reply.outputs["images"])
                return [np.asarray(Image.open(io.BytesIO(png))) for png in reply.outputs["png_bytes"].string_val]

            lat, _ = run_for(call_and_decode, min(args.seconds, 3.0), args.requests and min(args.requests, 100), 2)
            results[output] = {"bytes": response.ByteSize(), "p50": statistics.median(lat) * 1e3}
    return results


# ---------------- report ----------------
def fmt(row: dict) -> str:
    return (f"{row['p50']:8.2f} {row['p99']:8.2f} {row['rps']:9.1f} {row['ips']:10.1f} {row['n']:7d}")


LABELS = {"tf2": "TF2 signature", "tf1": "TF1 Session (server path)", "tf1x2": "TF1 Session, 2 threads"}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measured cell (default 3)")
    parser.add_argument("--requests", type=int, default=None,
                        help="fixed request count per in-process and 1-client cell instead of --seconds "
                             "(cells with 16 clients always run for --seconds)")
    parser.add_argument("--model-base-path", default=None,
                        help=f"folder of numeric versions to serve (default: {serve_config.MODEL_BASE_PATH}, else built)")
    parser.add_argument("--rest-only", action="store_true",
                        help="measure only REST :predict (1 and 64 images, 1 client, batching off) and stop")
    parser.add_argument("--v2-only", action="store_true",
                        help="measure only a 1-image request as Predict (gRPC, REST) and over v2 (gRPC, REST), and stop")
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)  # bench_floor's child
    return parser.parse_args()


def print_setup(description: str, latent: int, args) -> None:
    """The machine, the bundle, the server and how each cell is measured, then the table's header."""
    print(f"machine: {os.cpu_count()} CPUs ({machine.cpu_model()}), {platform.system()} {platform.release()}, "
          f"TF {tf.__version__}, grpcio {grpc.__version__}, Python {platform.python_version()}")
    print(f"bundle: {description}; latent {latent}")
    mode = f"{args.requests} requests" if args.requests else f"{args.seconds:g} s"
    print(f"server: subprocess, run_server(ServeConfig(port=0, rest_port=0)); batching on = "
          f"serving/deploy/batching.config {deploy_batching_parameters()}")
    print(f"each cell: {mode} after warm-up; p50/p99 in ms; rps = requests/s; ips = images/s\n")
    header = f"{'path':{WIDTH}s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>9s} {'images/s':>10s} {'n':>7s}"
    print(header)
    print("-" * len(header))


def in_process_rows(version_dir: str, latent: int, args) -> dict:
    """The in-process cells, printed as they are measured."""
    local = bench_in_process(version_dir, latent, args)
    for (kind, size), row in local.items():
        print(f"{'in-process ' + LABELS[kind] + f', {size:2d} img':{WIDTH}s} {fmt(row)}", flush=True)
    return local


def grpc_rows(base_path: str, latent: int, args) -> tuple[dict, dict | None]:
    """The gRPC cells, batching off then on (printed as measured), and the `sample` signature's
    outputs compared with batching off."""
    remote, png = {}, None
    for batching in (False, True):
        server = start_server(base_path, batching)
        try:
            for size in (1, 64):
                for clients in (1, 16):
                    row = bench_grpc(server.grpc_port, latent, size, clients, args)
                    remote[(batching, size, clients)] = row
                    label = f"gRPC batching {'on ' if batching else 'off'}, {size:2d} img, {clients:2d} clients"
                    print(f"{label:{WIDTH}s} {fmt(row)}", flush=True)
            if not batching:
                png = bench_sample_png(server.grpc_port, args)
        finally:
            server.stop()
    return remote, png


def floor_rows(latent: int, args) -> dict[int, dict]:
    """The transport floor's cells (1 and 16 clients), printed."""
    floors = bench_floor(latent, args)
    for clients, row in floors.items():
        print(f"{f'gRPC, no model (transport floor),  1 img, {clients:2d} clients':{WIDTH}s} {fmt(row)}", flush=True)
    return floors


def print_encoding(encoding: dict, png: dict | None) -> None:
    """float_val vs tensor_content for 64 images, and the `sample` signature's images vs png_bytes."""
    print("\nresponse encoding, 64 images (64x28x28x1 float32): serialize on the server, parse + "
          "tf.make_ndarray on the client")
    for name, row in encoding.items():
        print(f"  {name:15s} {row['bytes']:9,d} bytes  encode {row['encode']:7.3f} ms  decode {row['decode']:7.3f} ms")
    print("  (the server sends float_val, as TF Serving does by default)")
    if png is None:
        return
    print("\nsample signature, 64 images over gRPC (1 client, batching off), incl. client decode:")
    if "error" in png:
        print(f"  not measured: {png['error']}")
        return
    for name, row in png.items():
        decode = "tf.make_ndarray" if name == "images" else "PIL decode of each PNG"
        print(f"  output_filter {name!r:11s} {row['bytes']:9,d} bytes  p50 {row['p50']:7.2f} ms ({decode})")


def print_ratios(local: dict, remote: dict, floors: dict, encoding: dict) -> None:
    """gRPC against in-process, batched against unbatched, float_val against tensor_content."""
    tf1_1, tf1_64_seq, grpc_1 = local[("tf1", 1)], local[("tf1", 64)], remote[(False, 1, 1)]
    tf1_64 = best_in_process_batched(local)
    off16, on16 = remote[(False, 1, 16)], remote[(True, 1, 16)]
    grpc_64 = remote[(False, 64, 1)]
    print("\nratios")
    print(f"  gRPC p50 / in-process (TF1) p50, 1 img 1 client      {grpc_1['p50'] / tf1_1['p50']:6.2f}x  "
          f"({grpc_1['p50'] - tf1_1['p50']:+.2f} ms; "
          f"vs TF2 in-process {grpc_1['p50'] / local[('tf2', 1)]['p50']:.2f}x)")
    print(f"  gRPC p50 of the no-model server, 1 img 1 client      {floors[1]['p50']:6.2f} ms  (what gRPC and the "
          f"client take of the +1 ms)")
    print(f"  gRPC p50 / in-process p50, 64 img 1 client           {grpc_64['p50'] / tf1_64_seq['p50']:6.2f}x  "
          f"({grpc_64['p50'] - tf1_64_seq['p50']:+.2f} ms)")
    print(f"  in-process images/s, 64-img / 1-img calls (TF1)      "
          f"{tf1_64_seq['ips'] / tf1_1['ips']:6.2f}x  (the most batching can gain on this CPU)")
    print(f"  batched rps / unbatched rps (16 clients, 1 img)      {on16['rps'] / off16['rps']:6.2f}x  "
          f"({on16['rps']:.0f} vs {off16['rps']:.0f} req/s)")
    print(f"  batched gRPC images/s / in-process batched images/s  {on16['ips'] / tf1_64['ips']:6.2f}x  "
          f"({on16['ips']:.0f} vs {tf1_64['ips']:.0f} images/s: 16 clients x 1 img vs best in-process 64-img rate)")
    best = max(remote.values(), key=lambda row: row["ips"])
    print(f"  best gRPC images/s / in-process batched images/s     {best['ips'] / tf1_64['ips']:6.2f}x")
    round_trip = {name: row["encode"] + row["decode"] for name, row in encoding.items()}
    print(f"  float_val / tensor_content (encode+decode, 64 img)   "
          f"{round_trip['float_val'] / round_trip['tensor_content']:6.2f}x")


def best_in_process_batched(local: dict) -> dict:
    """The faster in-process 64-image cell: one caller or two."""
    return max(local[("tf1", 64)], local[("tf1x2", 64)], key=lambda row: row["ips"])


def print_bounds(local: dict, remote: dict, floor: dict) -> dict[str, float]:
    """Upper bounds on req/s, unbatched and batched, and this server against them.

    What the shared cores allow at best: each request costs the transport floor's time (gRPC and
    client, no model) plus its share of a model run's time on the same cores, and nothing else.
    """
    seconds_per_request = 1 / floor["rps"]
    bound1 = 1 / (seconds_per_request + 1 / local[("tf1x2", 1)]["ips"])
    bound16 = 1 / (seconds_per_request + 1 / local[("tf1x2", 16)]["ips"])
    off16, on16 = remote[(False, 1, 16)], remote[(True, 1, 16)]
    print(f"  upper bound, 16 clients x 1 img, unbatched           {bound1:6.0f} req/s  (floor {floor['rps']:.0f} "
          f"req/s + in-process 1-img cost, {local[('tf1x2', 1)]['ips']:.0f} images/s)")
    print(f"  upper bound, 16 clients x 1 img, batched             {bound16:6.0f} req/s  (floor + in-process "
          f"16-img cost, {local[('tf1x2', 16)]['ips']:.0f} images/s)")
    print(f"  batched / unbatched, both at their bounds            {bound16 / bound1:6.2f}x")
    tf1_64 = best_in_process_batched(local)
    print(f"  batched bound / in-process batched                   {bound16 / tf1_64['ips']:6.2f}x")
    print(f"  this server / the bounds: unbatched, batched         {off16['rps'] / bound1:6.2f}x, "
          f"{on16['rps'] / bound16:.2f}x")
    return {"unbatched": bound1, "batched": bound16}


def print_targets(local: dict, remote: dict, bounds: dict[str, float]) -> dict[str, bool]:
    """Each target, met or NOT met, with its figure; returns whether each was met."""
    extra = remote[(False, 1, 1)]["p50"] - local[("tf1", 1)]["p50"]
    off16, on16 = remote[(False, 1, 16)], remote[(True, 1, 16)]
    ratio_batch = on16["rps"] / off16["rps"]
    tf1_64 = best_in_process_batched(local)
    ratio_peak = on16["ips"] / tf1_64["ips"]
    print("\ntargets")
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"  gRPC p50 within in-process p50 + 1 ms (1 img):        {verdict(extra <= 1.0)} ({extra:+.2f} ms)")
    print(f"  batched >= 3x unbatched rps (16 clients, 1 img):       {verdict(ratio_batch >= 3)} ({ratio_batch:.2f}x; "
          f"{bounds['batched'] / bounds['unbatched']:.2f}x at the bounds)")
    print(f"  batched >= 70% of in-process batched throughput:      {verdict(ratio_peak >= 0.7)} "
          f"({ratio_peak:.0%}; {bounds['batched'] / tf1_64['ips']:.0%} at the bound)")
    return {"grpc_p50_within_in_process_plus_1ms": extra <= 1.0,
            "batched_at_least_3x_unbatched": ratio_batch >= 3,
            "batched_at_least_70pct_of_in_process": ratio_peak >= 0.7}


def print_json(local: dict, remote: dict, floors: dict, v2: dict, encoding: dict, bounds: dict,
               targets: dict) -> None:
    """The same figures as one JSON line, for scripts (each cell: p50/p99/mean in ms, rps, ips, n)."""
    cells = {f"in-process {LABELS[kind]}, {size} img": row for (kind, size), row in local.items()}
    cells.update({f"gRPC batching {'on' if batching else 'off'}, {size} img, {clients} clients": row
                  for (batching, size, clients), row in remote.items()})
    cells.update({f"gRPC, no model (transport floor), 1 img, {clients} clients": row for clients, row in floors.items()})
    cells.update({f"{label}, 1 img, 1 client": row for label, row in v2.items()})
    print(json.dumps({"bench": "serving_latency", "cells": _rounded(cells), "encoding": _rounded(encoding),
                      "bounds_requests_per_s": _rounded(bounds), "targets": targets}))


def main() -> None:
    args = parse_arguments()
    if args.floor_server:
        return serve_fixed_response()
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="serving_bench_")
    base_path, description, latent = find_or_build_bundle(args.model_base_path, workdir)
    version = max(int(p.name) for p in Path(base_path).iterdir() if p.name.isdigit())
    print_setup(description, latent, args)
    if args.rest_only:
        print(f"(load average {os.getloadavg()[0]:.2f} at start)", flush=True)
        rest_only(base_path, latent, args)
        print(f"\ntotal time {time.perf_counter() - started:.0f} s")
        return
    if args.v2_only:
        print(f"(load average {os.getloadavg()[0]:.2f} at start)", flush=True)
        print_v2(bench_v2(base_path, latent, args))
        print(f"\ntotal time {time.perf_counter() - started:.0f} s")
        return
    local = in_process_rows(str(Path(base_path) / str(version)), latent, args)
    remote, png = grpc_rows(base_path, latent, args)
    v2 = bench_v2(base_path, latent, args)
    print_v2(v2)
    floors = floor_rows(latent, args)
    encoding = bench_encoding(latent, args)
    print_encoding(encoding, png)
    print_ratios(local, remote, floors, encoding)
    bounds = print_bounds(local, remote, floors[16])
    targets = print_targets(local, remote, bounds)
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    print_json(local, remote, floors, v2, encoding, bounds, targets)


def _rounded(value):
    """`value` with every float rounded to 4 decimals (JSON for people and scripts alike)."""
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return round(value, 4) if isinstance(value, float) else value


if __name__ == "__main__":
    main()
