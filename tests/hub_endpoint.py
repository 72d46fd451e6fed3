"""A local stand-in for the Hugging Face Hub HTTP API, for tests of the real client.

It answers exactly the requests ``huggingface_hub`` 2.x makes for downloads and uploads:

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: file bytes with ``X-Repo-Commit``,
  ``ETag`` and ``Content-Length``; 404s carry ``X-Error-Code`` (RepoNotFound,
  RevisionNotFound, EntryNotFound) like the real Hub so the client raises its typed errors;
- ``GET /api/models/{repo}[/revision/{revision}]`` (``repo_info``, first call of
  ``snapshot_download``) and ``GET /api/models/{repo}/tree/{revision}`` (file listing);
- ``POST /api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}``
  (every file "regular", so no LFS/Xet transfer is needed), ``/api/models/{repo}/commit/{rev}``
  (the ndjson commit with base64 file contents) and ``/api/models/{repo}/branch/{branch}``.

Repos live in memory as commits (path -> bytes). Binds 127.0.0.1 on a free port; use it as a
context manager so the server thread always stops.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    """Commits (sha -> files) and branches (name -> sha) of one model repo."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    private: bool = False

    def commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in files.items())).encode())
        sha = hashlib.sha1(f"{len(self.commits)}:{digest.hexdigest()}".encode()).hexdigest()  # 40 hex
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubStandIn:
    """In-memory hub served over HTTP; ``url`` is what ``HF_ENDPOINT`` should be set to."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_folder(self, repo_id: str, folder: Path, *, branch: str = "main") -> str:
        """Publish every file under ``folder`` as one commit on ``branch``; returns its sha."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        with self._lock:
            return self.repos.setdefault(repo_id, Repo()).commit(files, branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (for assertions)."""
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, f"no revision {revision} in {repo_id}"
        return repo.commits[sha]


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _route(self) -> list[str]:
            path = urlsplit(self.path).path
            with hub._lock:
                hub.requests.append((self.command, path))
            return [unquote(p) for p in path.strip("/").split("/")]

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
            return self._error(404, "NotFound", f"no route for {self.path}")

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
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_etag(data)}"', "Accept-Ranges": "bytes"}
            rng = self.headers.get("Range")
            if rng and self.command == "GET" and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, data[start:], headers, "application/octet-stream")
            return self._send(200, data, headers, "application/octet-stream")

        def _info(self, repo_id: str, repo: Repo, revision: str) -> None:
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            siblings = [{"rfilename": p} for p in sorted(repo.commits[sha])]
            self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

        def _tree(self, repo: Repo, revision: str, prefix: str) -> None:
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            entries = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(repo.commits[sha].items())
                if not prefix or p.startswith(prefix.rstrip("/") + "/")
            ]
            self._json(200, entries)

        # ---- uploads ----------------------------------------------------------------------
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
                        repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if parts == ["api", "validate-yaml"]:
                return self._json(200, {})
            if len(parts) >= 6 and parts[:2] == ["api", "models"]:
                repo = self._repo(parts[2], parts[3])
                if repo is None:
                    return None
                action, revision = parts[4], "/".join(parts[5:])
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})
                if action == "commit":
                    return self._commit(f"{parts[2]}/{parts[3]}", repo, revision, body)
                if action == "branch":
                    return self._branch(repo, revision, json.loads(body or b"{}"))
            return self._error(404, "NotFound", f"no route for {self.path}")

        def _commit(self, repo_id: str, repo: Repo, revision: str, body: bytes) -> None:
            with hub._lock:
                base = repo.resolve(revision)
                if base is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                files = dict(repo.commits[base])
                for line in body.splitlines():
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif item["key"] != "header":
                        return self._error(400, "BadRequest", f"stand-in cannot apply {item['key']!r}")
                sha = repo.commit(files, branch=revision)
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
