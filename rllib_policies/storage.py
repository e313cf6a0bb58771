"""Where artifacts that outlive a job go: checkpoints, trained modules, frontiers, request rows, logs.

A job's artifact paths are relative to a storage root R, never to the job's working directory (under
``ray job submit --working-dir`` that is a temporary copy that vanishes with the cluster):

    R = configured (a job's ``storage``)  else  $MORL_STORAGE  else  ~/morl-runs
    resolve(p) = p                    if p is a URI (``scheme://…``) or an absolute path
               = R / p                otherwise

R is an absolute local path or any ``pyarrow.fs`` URI (``s3://bucket/prefix``, ``gs://…``, ``hdfs://…``,
``file:///…``); a relative R is an error (a relative root would again depend on the cwd). Object-store
credentials and endpoints come from the usual environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, …), so a job's runtime env sets them with
``MORL_STORAGE`` (cluster/job-runtime-env.yaml).

    write_json(resolve("crm/decision.json"), decision)          # atomic on a local disk: tmp + rename
    fs, path = filesystem(uri); algo.save_to_path(path, filesystem=fs)   # RLlib checkpoints (jobs.py)
    local = mirror(uri)                                          # a local copy's place, for local-only tools

Writes are atomic on a local file system (a temporary file in the same folder, then a rename) and one PUT
per object on object stores, so a reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

STORAGE_ENV = "MORL_STORAGE"
DEFAULT_ROOT = "~/morl-runs"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_uri(path: str) -> bool:
    """``scheme://…`` (s3, gs, hdfs, file, …)."""
    return bool(_URI.match(path))


def local_root() -> str:
    """The local root for what must stay on this node (TensorBoard, mirrors of remote artifacts):
    ``$MORL_STORAGE`` when it is a local path, else ``~/morl-runs``."""
    root = os.environ.get(STORAGE_ENV) or DEFAULT_ROOT
    root = os.path.expanduser(root)
    if is_uri(root) or not os.path.isabs(root):
        root = os.path.expanduser(DEFAULT_ROOT)
    return os.path.normpath(root)


def storage_root(configured: str | None = None) -> str:
    """R: ``configured``, else ``$MORL_STORAGE``, else ``~/morl-runs`` (``~`` expanded); always an
    absolute local path or a URI. A relative root is an error naming it and where it came from."""
    if configured is not None:
        root, source = configured, "configured storage"
    elif os.environ.get(STORAGE_ENV):
        root, source = os.environ[STORAGE_ENV], f"${STORAGE_ENV}"
    else:
        root, source = DEFAULT_ROOT, "the default"
    if not isinstance(root, str) or not root.strip():
        raise ValueError(f"{source} {root!r}: expected an absolute path or a URI (s3://bucket/prefix)")
    root = root.strip()
    if is_uri(root):
        scheme, rest = root.split("://", 1)
        if not rest.strip("/"):
            raise ValueError(f"{source} {root!r}: a URI needs a bucket or path after {scheme}://")
        return f"{scheme}://{rest.rstrip('/')}"
    root = os.path.expanduser(root)
    if not os.path.isabs(root):
        raise ValueError(
            f"{source} {root!r} is a relative path: it would land in the job's working directory, which "
            f"vanishes with the job; give an absolute path or a URI (s3://bucket/prefix)"
        )
    return os.path.normpath(root)


def resolve(path: str, storage: str | None = None) -> str:
    """``path`` when it is a URI or absolute (``~`` expanded), else joined under ``storage_root(storage)``.
    A relative path may not climb out of the root (``..``)."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"artifact path {path!r}: expected a non-empty path or URI")
    if is_uri(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    rel = posixpath.normpath(path)
    if rel == ".." or rel.startswith("../"):
        raise ValueError(f"artifact path {path!r} climbs out of the storage root")
    root = storage_root(storage)
    return root if rel == "." else join(root, rel)


def join(base: str, *parts: str) -> str:
    """``base/part/…`` for a local path or a URI (a URI's ``?query``, e.g. ``?region=…``, stays at the end)."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    base, query = base.split("?", 1) if "?" in base else (base, None)
    joined = "/".join([base.rstrip("/"), *parts])
    return joined if query is None else f"{joined}?{query}"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it): ``pyarrow.fs.FileSystem.from_uri`` for a URI (``s3://b/k`` →
    (S3FileSystem, ``b/k``)); a local path → (LocalFileSystem, its absolute path)."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"storage location {uri!r}: expected a non-empty path or URI")
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ValueError(f"storage location {uri!r}: no pyarrow file system for it ({e})") from e
    return fs, path.rstrip("/")


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def list_dir(uri: str) -> list[str]:
    """The sorted names directly under ``uri`` ([] when it does not exist)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def write_bytes(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri``: local → temporary file in the same folder + rename (atomic); object
    store → one PUT. Returns ``uri``."""
    if not isinstance(uri, str) or not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes(uri, data): got ({type(uri).__name__}, {type(data).__name__})")
    fs, path = filesystem(uri)
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return uri
    if isinstance(fs, pafs.S3FileSystem) and "allow_delayed_open" not in uri:
        # delayed open: a stream closed below the part size is one PutObject, not a multipart upload
        fs, path = filesystem(uri + ("&" if "?" in uri else "?") + "allow_delayed_open=true")
    with fs.open_output_stream(path) as f:
        f.write(data)
    return uri


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {uri!r}")
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(uri: str, obj: Any, **dumps: Any) -> str:
    """``obj`` as JSON (``json.dumps`` keyword arguments, default ``indent=1``), atomically."""
    if not isinstance(uri, str):
        raise TypeError(f"write_json(uri, obj): uri must be a path or URI, got {type(uri).__name__}")
    return write_bytes(uri, json.dumps(obj, **{"indent": 1, **dumps}).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def json_safe(o: Any) -> Any:
    """``o`` with every non-finite float (NaN: an interval that could not be computed) as None, and NumPy arrays
    as lists: strict JSON, which has no NaN (Starlette's responses and ``allow_nan=False`` refuse it)."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o


def write_parquet(table: pa.Table, uri: str) -> str:
    """One Parquet file at ``uri``, atomically (written to memory, then ``write_bytes``)."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"write_parquet(table, uri): table must be a pyarrow.Table, got {type(table).__name__}")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return write_bytes(uri, buf.getvalue())


def read_parquet(uri: str | list[str]) -> pa.Table:
    """A Parquet file, or every Parquet file under a folder (or under each of a list of them), as one table."""
    if isinstance(uri, (list, tuple)):
        return pa.concat_tables([read_parquet(u) for u in uri])
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs)


def mirror(uri: str) -> str:
    """Where a local copy of ``uri`` lives on this node: ``local_root()/mirror/<scheme>/<path>``;
    a local path (or ``file://`` URI) is its own mirror."""
    if not is_uri(uri) or uri.startswith("file://"):
        return filesystem(uri)[1]
    scheme, rest = uri.split("://", 1)
    parts = [p for p in rest.split("?", 1)[0].split("/") if p not in ("", ".", "..")]
    return os.path.join(local_root(), "mirror", scheme, *parts)


def copy_tree(source: str, destination: str) -> None:
    """Copy a file or a folder (recursively) between any two locations (``pyarrow.fs.copy_files``)."""
    src_fs, src = filesystem(source)
    dst_fs, dst = filesystem(destination)
    if src_fs.get_file_info(src).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {source!r} to copy")
    if _is_local(dst_fs):
        os.makedirs(
            dst if src_fs.get_file_info(src).type == pafs.FileType.Directory else os.path.dirname(dst), exist_ok=True
        )
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


def local_copy(uri: str) -> str:
    """A local path holding ``uri``'s content: a local path as given; a URI downloaded to ``mirror(uri)``."""
    local = mirror(uri)
    if is_uri(uri) and not uri.startswith("file://"):
        copy_tree(uri, local)
    return local
