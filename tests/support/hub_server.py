"""A loopback, in-memory server speaking the part of the Hugging Face Hub HTTP API that uploads and downloads use.

For tests only: it binds 127.0.0.1 on a free port, holds repos in memory, answers every upload as a "regular"
(non-LFS) file, and serves ``resolve`` downloads with the headers huggingface_hub checks (commit, ETag, size).
Point the real client at it with ``HF_ENDPOINT`` (set before huggingface_hub is imported) or ``endpoint=``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class _Repo:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.sha = hashlib.sha1(b"init").hexdigest()
        self.commits: list[dict] = []
        self.private = None


class HubState:
    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []


def _handler(state: HubState, endpoint_ref: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        # -------------------------------------------------------------- helpers
        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            hdrs = {"Content-Length": str(len(body))}
            hdrs.update(headers or {})
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.end_headers()
            if not head and not getattr(self, "_is_head", False) and body:
                self.wfile.write(body)

        def _json(self, code: int, obj, headers: dict | None = None):
            self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                return self.rfile.read(length)
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            return b""

        @staticmethod
        def _split_repo(parts: list[str]) -> tuple[str, list[str]]:
            return "/".join(parts[:2]), parts[2:]

        # -------------------------------------------------------------- verbs
        def do_HEAD(self):
            self._get(head=True)

        def do_GET(self):
            self._get(head=False)

        def _get(self, head: bool):
            self._is_head = head
            path = unquote(urlparse(self.path).path)
            state.requests.append(("HEAD" if head else "GET", path))
            parts = [p for p in path.split("/") if p]
            if parts[:2] == ["api", "whoami-v2"]:
                return self._json(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = self._split_repo(parts[2:])
                repo = state.repos.get(repo_id)
                if repo is None:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if not rest or rest[0] == "revision":
                    return self._json(200, {
                        "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                        "siblings": [{"rfilename": f, "size": len(b)} for f, b in sorted(repo.files.items())],
                        "tags": [], "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
                    })
                if rest[0] == "tree":
                    return self._json(200, [
                        {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for f, b in sorted(repo.files.items())
                    ])
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = "/".join(parts[:2])
                filename = "/".join(parts[4:])
                repo = state.repos.get(repo_id)
                if repo is None:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if filename not in repo.files:
                    return self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                data = repo.files[filename]
                etag = '"' + hashlib.sha256(data).hexdigest() + '"'
                return self._send(200, data, {"X-Repo-Commit": repo.sha, "ETag": etag,
                                              "Content-Type": "application/octet-stream"}, head=head)
            return self._json(404, {"error": f"unsupported GET {path}"})

        def do_POST(self):
            self._is_head = False
            path = unquote(urlparse(self.path).path)
            state.requests.append(("POST", path))
            body = self._body()
            parts = [p for p in path.split("/") if p]
            endpoint = endpoint_ref[0]
            if parts[:3] == ["api", "repos", "create"]:
                payload = json.loads(body or b"{}")
                repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}" if "/" not in payload["name"] else payload["name"]
                with state.lock:
                    if repo_id in state.repos:
                        return self._json(409, {"error": "You already created this model repo", "url": f"{endpoint}/{repo_id}"})
                    state.repos[repo_id] = _Repo()
                    state.repos[repo_id].private = payload.get("visibility") == "private" or payload.get("private")
                return self._json(200, {"url": f"{endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
            if parts[:2] == ["api", "validate-yaml"]:
                return self._json(200, {})
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, rest = self._split_repo(parts[2:])
                repo = state.repos.get(repo_id)
                if repo is None:
                    return self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if rest[0] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ], "commitOid": repo.sha})
                if rest[0] == "commit":
                    header, added, deleted = {}, {}, []
                    for line in body.splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "header":
                            header = item["value"]
                        elif item["key"] == "file":
                            added[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] in ("deletedFile", "deletedFolder"):
                            deleted.append(item["value"]["path"])
                        else:
                            return self._json(400, {"error": f"unsupported commit item {item['key']}"})
                    with state.lock:
                        for p in deleted:
                            repo.files = {k: v for k, v in repo.files.items() if k != p and not k.startswith(p + "/")}
                        repo.files.update(added)
                        repo.sha = hashlib.sha1((repo.sha + json.dumps(sorted(added))).encode() + b"".join(added.values())).hexdigest()
                        repo.commits.append({"summary": header.get("summary"), "description": header.get("description"),
                                             "revision": rest[1] if len(rest) > 1 else None, "files": sorted(added)})
                    return self._json(200, {"commitUrl": f"{endpoint}/{repo_id}/commit/{repo.sha}",
                                            "commitOid": repo.sha, "success": True, "pullRequestUrl": None})
                if rest[0] == "paths-info":
                    return self._json(200, [])
            return self._json(404, {"error": f"unsupported POST {path}"})

    return Handler


class LoopbackHub:
    """Starts the server in a daemon thread: ``with LoopbackHub() as hub: hub.endpoint``."""

    def __init__(self):
        self.state = HubState()
        self._endpoint_ref = [""]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state, self._endpoint_ref))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._endpoint_ref[0] = self.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
