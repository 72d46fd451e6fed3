"""A local stand-in for the Hugging Face Hub HTTP API, for tests of the real client.

It answers exactly the requests ``huggingface_hub`` 2.x makes for downloads and uploads:

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: a regular file's bytes with ``X-Repo-Commit``,
  ``ETag`` (the git blob sha1, as the Hub) and ``Content-Length``; an LFS file answers like the
  Hub does, with a 302 to its object in a separate storage origin (the Hub's CDN) and
  ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, which the client reads
  from the redirect itself. 404s carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
  EntryNotFound) like the real Hub so the client raises its typed errors;
- ``GET /api/models/{repo}[/revision/{revision}]`` (``repo_info``, first call of
  ``snapshot_download``; ``?blobs=true`` adds sizes and LFS info) and
  ``GET /api/models/{repo}/tree/{revision}`` (file listing, with ``lfs`` for LFS files);
- ``POST /api/repos/create`` (the repo starts with the Hub's default ``.gitattributes``),
  ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}`` (``"lfs"`` for a path the
  repo's ``.gitattributes`` marks ``filter=lfs`` or a file above ``HubStandIn.lfs_threshold``,
  10 MiB like the Hub; ``"regular"`` otherwise), ``/api/models/{repo}/commit/{rev}`` (the ndjson
  commit: ``file`` entries with base64 contents, ``lfsFile`` entries naming an uploaded object
  by sha256 and size, ``deletedFile``) and ``/api/models/{repo}/branch/{branch}``;
- the git LFS batch API, ``POST /{repo}.git/info/lfs/objects/batch`` (operation "upload",
  "basic" transfer: an ``upload`` href on the storage origin that takes one PUT of the bytes,
  checked against the oid and size, and a ``verify`` href; no actions for an object the repo
  already stores), and ``POST /{repo}.git/info/lfs/objects/verify``.

Only the LFS transfer is served, not Xet: ``huggingface_hub`` sends LFS-mode files through Xet
whenever ``hf_xet`` is installed, so clients must run with ``HF_HUB_DISABLE_XET=1``
(``HubStandIn.client_env``); the Xet token route answers 501 saying so.

Repos live in memory as commits (path -> bytes), with per commit the paths stored as LFS
pointers, the repo's LFS objects (sha256 -> bytes) and a log of what each commit call sent
(``commit_log``). Binds 127.0.0.1 on two free ports (the Hub, and its object storage); use it as
a context manager so the server threads always stop.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular files above 10 MiB: they must go through LFS

# The .gitattributes the Hub writes into a new model repo.
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
    "*.xz", "*.zip", "*.zst", "*tfevents*",
)).encode()

_OID = re.compile(r"^[0-9a-f]{64}$")
_STORAGE = "lfs-storage"  # first path segment of object URLs on the storage origin


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git LFS pointer file that a repo holds in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def lfs_tracked(path: str, gitattributes: bytes | None) -> bool:
    """Whether ``.gitattributes`` puts ``path`` under ``filter=lfs`` (the last matching line wins)."""
    tracked = False
    for line in (gitattributes or b"").decode(errors="replace").splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        pattern, attrs = fields[0], fields[1:]
        # A pattern without a slash matches the file name at any depth; with one, the whole path.
        target = path if "/" in pattern.strip("/") else path.rsplit("/", 1)[-1]
        if not fnmatch.fnmatchcase(target, pattern.strip("/")):
            continue
        if "filter=lfs" in attrs:
            tracked = True
        elif any(a in ("-filter", "!filter") or (a.startswith("filter=") and a != "filter=lfs") for a in attrs):
            tracked = False
    return tracked


@dataclass
class CommitRecord:
    """What one call of the commit API sent and made."""

    sha: str
    branch: str
    summary: str  # the commit message
    regular: list[str]  # paths sent as "file" entries (content inline, base64)
    lfs: dict[str, str]  # path -> sha256 of the paths sent as "lfsFile" entries
    deleted: list[str]


@dataclass
class Repo:
    """Commits (sha -> files) and branches (name -> sha) of one model repo, and its LFS storage."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False
    lfs_files: dict[str, dict[str, str]] = field(default_factory=dict)  # commit sha -> {path: sha256} stored as LFS
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> bytes (uploaded through the batch API)
    log: list[CommitRecord] = field(default_factory=list)  # every call of the commit API that made a commit

    def commit(self, files: dict[str, bytes], branch: str = "main", lfs: dict[str, str] | None = None) -> str:
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode())
        sha = hashlib.sha1(f"{len(self.commits)}:{digest.hexdigest()}".encode()).hexdigest()  # 40 hex
        self.commits[sha] = dict(files)
        self.lfs_files[sha] = dict(lfs or {})
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None

    def entry(self, sha: str, path: str) -> dict[str, Any]:
        """The tree entry of a file, as the Hub lists it (``lfs`` only for LFS files)."""
        data = self.commits[sha][path]
        oid = self.lfs_files[sha].get(path)
        if oid is None:
            return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        pointer = lfs_pointer(oid, len(data))
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(pointer),
                "lfs": {"oid": oid, "size": len(data), "pointerSize": len(pointer)}}


class HubStandIn:
    """In-memory hub served over HTTP; ``url`` is what ``HF_ENDPOINT`` should be set to."""

    def __init__(self, *, lfs_threshold: int = LFS_THRESHOLD) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_threshold = lfs_threshold  # files above this size go through LFS whatever .gitattributes says
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served, both origins
        self.lfs_uploads: list[tuple[str, str, int]] = []  # (repo_id, oid, size) of every object PUT and stored
        self.lfs_verified: list[tuple[str, str]] = []  # (repo_id, oid) of every verify call that passed
        self._lock = threading.Lock()
        handler = _handler_for(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._storage = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # another origin, like the Hub's S3/CDN
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self._server, self._storage)]

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    @property
    def storage_url(self) -> str:
        """The origin of LFS object URLs (upload hrefs and download redirects); not the Hub's."""
        port = self._storage.server_address[1]
        return f"http://127.0.0.1:{port}"

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for a ``huggingface_hub`` process that talks to this stand-in."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1"}

    def __enter__(self) -> HubStandIn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._server, self._storage):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def add_folder(self, repo_id: str, folder: Path, *, branch: str = "main", lfs: bool = False) -> str:
        """Publish every file under ``folder`` as one commit on ``branch``; returns its sha.

        With ``lfs``, the files the Hub's default ``.gitattributes`` (or the size threshold) puts
        under LFS are stored as LFS objects, as a push through the client would store them.
        """
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo())
            lfs_map: dict[str, str] = {}
            if lfs:
                for path, data in files.items():
                    if lfs_tracked(path, DEFAULT_GITATTRIBUTES) or len(data) > self.lfs_threshold:
                        oid = hashlib.sha256(data).hexdigest()
                        repo.lfs_objects[oid] = data
                        lfs_map[path] = oid
            return repo.commit(files, branch, lfs=lfs_map)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (for assertions)."""
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, f"no revision {revision} in {repo_id}"
        return repo.commits[sha]

    def lfs_paths(self, repo_id: str, revision: str = "main") -> dict[str, str]:
        """Path -> sha256 of the files a revision stores as LFS objects (for assertions)."""
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, f"no revision {revision} in {repo_id}"
        return dict(repo.lfs_files[sha])

    def commit_log(self, repo_id: str) -> list[CommitRecord]:
        """What each commit API call on ``repo_id`` sent, oldest first (for assertions)."""
        return list(self.repos[repo_id].log)


def _handler_for(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "HubStandIn/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        # ---- plumbing ---------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None,
                  content_type: str = "application/json") -> None:
            self._send(status, json.dumps(obj).encode(), headers, content_type)

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers, then the blank line
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()  # CRLF after each chunk
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _route(self) -> list[str]:
            path = urlsplit(self.path).path
            with hub._lock:
                hub.requests.append((self.command, path))
            return [unquote(p) for p in path.strip("/").split("/")]

        def _query(self) -> dict[str, list[str]]:
            return parse_qs(urlsplit(self.path).query)

        def _repo(self, org: str, name: str) -> Repo | None:
            repo = hub.repos.get(f"{org}/{name}")
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
            return repo

        # ---- downloads --------------------------------------------------------------------
        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            parts = self._route()
            if len(parts) == 4 and parts[0] == _STORAGE:
                return self._object(parts[1], parts[2], parts[3])
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(parts[0], parts[1], parts[3], "/".join(parts[4:]))
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo = self._repo(parts[2], parts[3])
                if repo is None:
                    return None
                rest = parts[4:]
                if not rest or rest[0] == "revision":
                    return self._info(f"{parts[2]}/{parts[3]}", repo, rest[1] if len(rest) > 1 else "main")
                if rest[0] == "tree" and len(rest) >= 2:
                    return self._tree(repo, rest[1], "/".join(rest[2:]))
                if rest[0] in ("xet-write-token", "xet-read-token"):
                    return self._error(501, "XetNotSupported", "the Hub stand-in serves LFS transfers only, not Xet:"
                                       " run the client with HF_HUB_DISABLE_XET=1")
            return self._error(404, "NotFound", f"no route for {self.path}")

        def _bytes(self, data: bytes, headers: dict[str, str]) -> None:
            """``data`` whole, or from a ``Range: bytes=N-`` offset (resumed downloads)."""
            headers = {**headers, "Accept-Ranges": "bytes"}
            rng = self.headers.get("Range")
            if rng and self.command == "GET" and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, data[start:], headers, "application/octet-stream")
            return self._send(200, data, headers, "application/octet-stream")

        def _resolve(self, org: str, name: str, revision: str, path: str) -> None:
            repo = self._repo(org, name)
            if repo is None:
                return
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            data = repo.commits[sha].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", commit=sha)
            oid = repo.lfs_files[sha].get(path)
            if oid is None:
                return self._bytes(data, {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'})
            # LFS: like the Hub, a redirect to the object on another origin; the client takes the
            # file's metadata from this response (it does not follow redirects off the Hub's origin).
            location = f"{hub.storage_url}/{_STORAGE}/{quote(org)}/{quote(name)}/{oid}"
            self._send(302, b"", {
                "Location": location, "X-Repo-Commit": sha, "X-Linked-Etag": f'"{oid}"',
                "X-Linked-Size": str(len(data)), "ETag": f'"{git_blob_sha1(lfs_pointer(oid, len(data)))}"',
            })

        def _object(self, org: str, name: str, oid: str) -> None:
            repo = hub.repos.get(f"{org}/{name}")
            data = repo.lfs_objects.get(oid) if repo is not None else None
            if data is None:
                return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", content_type="application/xml")
            self._bytes(data, {"ETag": f'"{oid}"'})

        def _info(self, repo_id: str, repo: Repo, revision: str) -> None:
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            blobs = self._query().get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for p in sorted(repo.commits[sha]):
                sibling: dict[str, Any] = {"rfilename": p}
                if blobs:
                    entry = repo.entry(sha, p)
                    sibling.update(size=entry["size"], blobId=entry["oid"])
                    if "lfs" in entry:
                        sibling["lfs"] = {"sha256": entry["lfs"]["oid"], "size": entry["lfs"]["size"],
                                          "pointerSize": entry["lfs"]["pointerSize"]}
                siblings.append(sibling)
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

        def _tree(self, repo: Repo, revision: str, prefix: str) -> None:
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            entries = [repo.entry(sha, p) for p in sorted(repo.commits[sha])
                       if not prefix or p.startswith(prefix.rstrip("/") + "/")]
            self._json(200, entries)

        # ---- uploads ----------------------------------------------------------------------
        def do_PUT(self) -> None:
            parts = self._route()
            body = self._body()
            if len(parts) == 4 and parts[0] == _STORAGE:
                return self._put_object(f"{parts[1]}/{parts[2]}", parts[3], body)
            return self._error(404, "NotFound", f"no route for {self.path}")

        def _put_object(self, repo_id: str, oid: str, body: bytes) -> None:
            """The single-part ("basic") upload of an LFS object, to the href the batch API gave."""
            size = int(self._query().get("size", ["-1"])[0])
            if hashlib.sha256(body).hexdigest() != oid:
                return self._send(400, b"<Error><Code>BadDigest</Code><Message>sha256 of the body is not the oid"
                                       b"</Message></Error>", content_type="application/xml")
            if len(body) != size:
                return self._send(400, b"<Error><Code>IncompleteBody</Code><Message>body size is not the size"
                                       b" announced to the batch API</Message></Error>", content_type="application/xml")
            with hub._lock:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._send(403, b"<Error><Code>AccessDenied</Code></Error>", content_type="application/xml")
                repo.lfs_objects[oid] = body
                hub.lfs_uploads.append((repo_id, oid, len(body)))
            self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

        def do_POST(self) -> None:
            parts = self._route()
            body = self._body()
            if parts == ["api", "repos", "create"]:
                payload = json.loads(body)
                repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                with hub._lock:
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        repo = hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
                        repo.commit({".gitattributes": DEFAULT_GITATTRIBUTES})
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if parts == ["api", "validate-yaml"]:
                return self._json(200, {})
            if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
                repo = self._repo(parts[0], parts[1].removesuffix(".git"))
                if repo is None:
                    return None
                repo_id = f"{parts[0]}/{parts[1].removesuffix('.git')}"
                if parts[5] == "batch":
                    return self._lfs_batch(repo_id, repo, json.loads(body or b"{}"))
                if parts[5] == "verify":
                    return self._lfs_verify(repo_id, repo, json.loads(body or b"{}"))
            if len(parts) >= 6 and parts[:2] == ["api", "models"]:
                repo = self._repo(parts[2], parts[3])
                if repo is None:
                    return None
                action, revision = parts[4], "/".join(parts[5:])
                if action == "preupload":
                    return self._preupload(repo, revision, json.loads(body)["files"])
                if action == "commit":
                    return self._commit(f"{parts[2]}/{parts[3]}", repo, revision, body)
                if action == "branch":
                    return self._branch(repo, revision, json.loads(body or b"{}"))
            return self._error(404, "NotFound", f"no route for {self.path}")

        def _preupload(self, repo: Repo, revision: str, files: list[dict[str, Any]]) -> None:
            with hub._lock:
                sha = repo.resolve(revision)
                if sha is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                head = repo.commits[sha]
                gitattributes = head.get(".gitattributes")
                answers = []
                for f in files:
                    path, size = f["path"], int(f.get("size", 0))
                    lfs = lfs_tracked(path, gitattributes) or size > hub.lfs_threshold
                    oid = None  # the file's oid on the Hub now, so the client can skip unchanged files
                    if path in head:
                        oid = repo.lfs_files[sha].get(path) or git_blob_sha1(head[path])
                    answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                                    "shouldIgnore": False, "oid": oid})
            self._json(200, {"files": answers})

        def _lfs_batch(self, repo_id: str, repo: Repo, payload: dict[str, Any]) -> None:
            """git LFS batch API (https://github.com/git-lfs/git-lfs/blob/main/docs/api/batch.md), upload only."""
            if payload.get("operation") != "upload":
                return self._error(422, "BadRequest", "the stand-in's LFS batch API serves operation 'upload' only")
            if "basic" not in payload.get("transfers", ["basic"]):
                return self._error(422, "BadRequest", "the stand-in serves the 'basic' LFS transfer only")
            if payload.get("hash_algo", "sha256") != "sha256":
                return self._error(422, "BadRequest", "hash_algo must be sha256")
            base = f"{hub.url}/{repo_id}.git/info/lfs/objects"
            objects = []
            with hub._lock:
                for obj in payload.get("objects", []):
                    oid, size = obj.get("oid"), obj.get("size")
                    if not isinstance(oid, str) or not _OID.match(oid) or not isinstance(size, int) or size < 0:
                        objects.append({"oid": str(oid), "size": size if isinstance(size, int) else -1,
                                        "error": {"code": 422, "message": "Invalid oid or size"}})
                    elif oid in repo.lfs_objects and len(repo.lfs_objects[oid]) == size:
                        objects.append({"oid": oid, "size": size})  # already stored: nothing to do
                    else:
                        objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                            "upload": {"href": f"{hub.storage_url}/{_STORAGE}/{repo_id}/{oid}?size={size}",
                                       "expires_in": 86400},
                            "verify": {"href": f"{base}/verify", "expires_in": 86400},
                        }})
            self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                       content_type="application/vnd.git-lfs+json")

        def _lfs_verify(self, repo_id: str, repo: Repo, payload: dict[str, Any]) -> None:
            oid, size = payload.get("oid"), payload.get("size")
            with hub._lock:
                data = repo.lfs_objects.get(str(oid))
                if data is None or len(data) != size:
                    return self._error(404, "EntryNotFound", f"LFS object {oid} of size {size} was not uploaded")
                hub.lfs_verified.append((repo_id, str(oid)))
            self._json(200, {})

        def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
            with hub._lock:
                base = repo.resolve(revision)
                if base is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                files = dict(repo.commits[base])
                lfs = dict(repo.lfs_files[base])
                record = CommitRecord(sha="", branch=revision, summary="", regular=[], lfs={}, deleted=[])
                for line in body.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        data = base64.b64decode(value["content"])
                        if len(data) > hub.lfs_threshold:
                            return self._error(400, "BadRequest", "Your push was rejected because it contains files"
                                               f" larger than 10 MiB ({value['path']}). Please use"
                                               " https://git-lfs.github.com/ to store large files.")
                        files[value["path"]] = data
                        lfs.pop(value["path"], None)
                        record.regular.append(value["path"])
                    elif item["key"] == "lfsFile":
                        path, oid = value["path"], value.get("oid")
                        if value.get("algo", "sha256") != "sha256":
                            return self._error(400, "BadRequest", f"{path}: unsupported LFS algo {value.get('algo')!r}")
                        data = repo.lfs_objects.get(str(oid))
                        if data is None:
                            return self._error(400, "BadRequest", "Your push was rejected because an LFS pointer"
                                               " pointed to a file that does not exist. Offending file:"
                                               f" - {path} (sha256 {oid} was never uploaded)")
                        if "size" in value and value["size"] != len(data):
                            return self._error(400, "BadRequest", f"{path}: LFS object {oid} has size {len(data)},"
                                               f" the commit says {value['size']}")
                        files[path] = data
                        lfs[path] = str(oid)
                        record.lfs[path] = str(oid)
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                        lfs.pop(value["path"], None)
                        record.deleted.append(value["path"])
                    elif item["key"] == "header":
                        record.summary = str(value.get("summary", ""))
                    else:
                        return self._error(400, "BadRequest", f"stand-in cannot apply {item['key']!r}")
                sha = repo.commit(files, branch=revision, lfs=lfs)
                record.sha = sha
                repo.log.append(record)
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": None})

        def _branch(self, repo: Repo, branch: str, payload: dict[str, Any]) -> None:
            with hub._lock:
                if branch in repo.branches:
                    return self._error(409, "BranchExists", f"branch {branch} already exists")
                start = repo.resolve(payload.get("startingPoint") or "main")
                if start is None:
                    return self._error(404, "RevisionNotFound", "no starting point")
                repo.branches[branch] = start
            self._json(200, {})

    return Handler
