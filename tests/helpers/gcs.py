"""A local Google Cloud Storage emulator for tests: `gcp_storage_emulator`, patched, in-memory,
served on 127.0.0.1 from a background thread, reached by tensorstore/Orbax, gcsfs/epath and
google-cloud-storage through the environment variables that `GcsEmulator` sets.

What is patched, and why:
- Object generations: the stock emulator ignores `ifGenerationMatch`/`ifGenerationNotMatch`
  and sends no `x-goog-generation` header, so tensorstore's OCDBT (Orbax's default format)
  fails with "Malformed StorageGeneration". Each object handler is wrapped to answer
  412 on a mismatch (`ifGenerationMatch=0`: only if absent), 304 for a GET whose
  `ifGenerationNotMatch` is the current generation, and to add `x-goog-generation`.
- Serving: the stock server handles one request at a time with a listen backlog of 5, which
  stalls tensorstore's parallel reads; here a threading HTTP/1.1 server (backlog 256,
  `Expect: 100-continue` answered) runs the handlers under one lock.
- Request bodies are always read before answering, so an early 412 cannot reset the socket.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from functools import partial
from http import HTTPStatus
from http.server import ThreadingHTTPServer

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import buckets, objects
from gcp_storage_emulator.storage import Storage

_LOCK = threading.RLock()
_READS = (objects.get, objects.download)
_WRITES = (objects.insert, objects.upload_partial, objects.xml_upload)
_OBJECT_HANDLERS = (*_READS, *_WRITES, objects.delete, objects.patch)


def _object_name(request, storage):
    """The object a request is about, or None (a bucket-level request)."""
    if "upload_id" in request.query:
        return storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
    if (request.params or {}).get("object_id"):
        return request.params["object_id"]
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or data).get("name")
    return None


def _query(request, name, header=None):
    value = request.query.get(name, [None])[0]
    if value is None and header:
        value = request.get_header(header)
    return None if value is None else int(value)


def _precondition(request, current, is_write):
    """The HTTP status a failed generation precondition answers with, or None."""
    if current is None and not is_write:
        return None  # the handler answers 404
    generation = int(current["generation"]) if current else 0
    match = _query(request, "ifGenerationMatch", "x-goog-if-generation-match")
    not_match = _query(request, "ifGenerationNotMatch")
    pinned = _query(request, "generation")
    if pinned is not None and not is_write and pinned != generation:
        return HTTPStatus.NOT_FOUND
    if match is not None and match != generation:
        return HTTPStatus.PRECONDITION_FAILED
    if not_match is not None and not_match == generation:
        return HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
    return None


def _wrap(handler):
    def wrapped(request, response, storage, *args, **kwargs):
        request.data  # noqa: B018 - always drain the body (keep-alive; no reset on early answers)
        with _LOCK:
            if handler not in _OBJECT_HANDLERS:
                return handler(request, response, storage, *args, **kwargs)
            bucket = request.params["bucket_name"]
            try:
                name = _object_name(request, storage)
                current = storage.get_file_obj(bucket, name) if name else None
            except NotFound:
                current = None
            status = _precondition(request, current, handler in _WRITES)
            if status is not None:
                response.status = status
                if status != HTTPStatus.NOT_MODIFIED:
                    response.json({"error": {"code": int(status), "message": status.phrase}})
                return None
            result = handler(request, response, storage, *args, **kwargs)
            if handler in _READS and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                response["x-goog-generation"] = current["generation"]
                response["x-goog-metageneration"] = current["metageneration"]
            return result

    wrapped.__wrapped__ = handler
    return wrapped


if not getattr(server, "_generations_patched", False):
    server.HANDLERS = tuple(
        (regex, {method: _wrap(fn) for method, fn in methods.items()}) for regex, methods in server.HANDLERS
    )
    server._generations_patched = True


class _Handler(server.RequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client hung up early
            super().handle_error(request, client_address)


class GcsEmulator:
    """`with GcsEmulator() as gcs: path = gcs.bucket("b")  # "gs://b"`.

    While open, the process environment points tensorstore, gcsfs and google-cloud-storage at
    the emulator (no credentials, no metadata-server probe); on exit the environment is restored.
    """

    def __init__(self):
        self.storage = Storage(use_memory_fs=True)
        self._httpd = None
        self._saved_env = {}
        self.url = None

    def env(self):
        return {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore (Orbax)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
            "NO_GCE_CHECK": "true",  # google-auth: no metadata-server probe
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC retries (~60 s/call)
            "GOOGLE_CLOUD_PROJECT": "test",
        }

    def __enter__(self):
        logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
        self._httpd = _Server(("127.0.0.1", 0), partial(_Handler, self.storage))
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="gcs-emulator").start()
        for key, value in self.env().items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        self._clear_gcsfs_cache()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._clear_gcsfs_cache()

    def bucket(self, name=None):
        """Create bucket `name` (default: a fresh unique name); return "gs://name"."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        with _LOCK:
            buckets.create_bucket(name, self.storage)
        return f"gs://{name}"

    @staticmethod
    def _clear_gcsfs_cache():
        try:
            import gcsfs
        except ImportError:
            return
        gcsfs.GCSFileSystem.clear_instance_cache()
