"""One loaded SavedModel version (TF Serving's servable): its session, signatures and users.

A version loads into its own TF1 Graph + Session, which loads TF1 and TF2 SavedModels alike,
as TF Serving's C++ does. Requests take a reference for their duration; a retired version
closes its session once the last request has released it (manager.py decides when).
"""

from __future__ import annotations

import logging
import threading

import tensorflow as tf
from tensorflow.core.protobuf import config_pb2

LOG = logging.getLogger("serving.servable")


class LoadedVersion:
    """One loaded SavedModel version: its session, signatures and a reference count."""

    def __init__(self, name: str, version: int, path: str, tags=("serve",), method_name_check: bool = False):
        self.name = name
        self.version = version
        self.path = path
        # TF Serving's --enable_signature_method_name_check, read by inference.py.
        self.method_name_check = method_name_check
        self.graph = tf.Graph()
        # No config: the session takes TensorFlow's context config, where the server has put
        # --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism.
        self.session = tf.compat.v1.Session(graph=self.graph)
        self.meta_graph = tf.compat.v1.saved_model.loader.load(self.session, list(tags), path)
        self.signature_defs = dict(self.meta_graph.signature_def)
        self._callables: dict = {}
        self._lock = threading.Lock()
        self._references = 0
        self._retired = False
        self._closed = False

    def run(self, feeds_by_name: dict, fetch_names: list[str], timeout_in_ms: int = 0) -> list:
        """Run the graph feeding tensor names -> arrays; returns fetched arrays in order.

        A CallableOptions callable skips the Python feed-shape check of Session.run, so
        shapes are judged by the ops, as in TF Serving; dtype errors come from the runtime.
        A run longer than timeout_in_ms (0: no limit) is cancelled with DEADLINE_EXCEEDED, as
        TF Serving's RunOptions.timeout_in_ms.
        """
        feed_names = tuple(sorted(feeds_by_name))
        key = (feed_names, tuple(fetch_names), timeout_in_ms)
        with self._lock:
            runner = self._callables.get(key)
            if runner is None:
                options = config_pb2.CallableOptions(feed=list(feed_names), fetch=list(fetch_names))
                options.run_options.timeout_in_ms = timeout_in_ms
                runner = self.session._make_callable_from_options(options)
                self._callables[key] = runner
        return runner(*[feeds_by_name[name] for name in feed_names])

    def acquire(self) -> bool:
        with self._lock:
            if self._retired:
                return False
            self._references += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._references -= 1
            close_now = self._retired and self._references == 0
        if close_now:
            self._close()

    def retire(self) -> None:
        """Stop new use; the session closes once in-flight requests have released it."""
        with self._lock:
            self._retired = True
            close_now = self._references == 0
        if close_now:
            self._close()

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.session.close()
        LOG.info("unloaded %s version %d", self.name, self.version)
