"""A local stand-in for the Hugging Face Hub HTTP API: just the calls `llmq.hub.push` makes through the
real huggingface_hub client (test helper, not part of the package).

huggingface_hub >= 1.x uploads through Xet whenever `hf_xet` is installed; tests set
`constants.HF_HUB_DISABLE_XET = True` so large files take the LFS path served here. Small files are
answered "regular" by preupload (inlined as base64 in the commit), the rest "lfs" (batch API + PUT + verify).

    POST /api/repos/create                            create a repo (409 if it exists)
    GET  /api/models/{ns}/{name}[/revision/{rev}]     repo info (asked after a 401/403 on create)
    POST /api/models/{ns}/{name}/branch/{branch}      create a branch from main (409 if it exists)
    POST /api/validate-yaml                           README.md metadata check (always valid)
    POST /api/models/{ns}/{name}/preupload/{rev}      upload mode per file: "regular" or "lfs"
    POST /{ns}/{name}.git/info/lfs/objects/batch      LFS batch API (basic transfer: upload + verify)
    PUT  /__lfs/{oid}                                 LFS object upload (sha256 and size checked)
    POST /__lfs/verify                                LFS verify
    POST /api/models/{ns}/{name}/commit/{rev}         ndjson commit: header, file (base64), lfsFile (oid)
    GET  /api/whoami-v2                               who the token belongs to

Every /api and .git call needs `Authorization: Bearer <token>` (401 otherwise). `fail_status` (with
`fail_on`, a path substring) answers that HTTP status instead; `drop_on` closes the connection without
an answer. Every request is recorded in `requests` as (method, path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

BAD_TOKEN = "Invalid credentials in Authorization header"


class FakeHub:
    """`with FakeHub(tmp_path, token="hf_x") as hub:` then point HF_ENDPOINT at `hub.endpoint`."""

    def __init__(self, root: Path, token: str, lfs_threshold: int = 1024, user: str = "fake-user") -> None:
        self.root, self.token, self.lfs_threshold, self.user = Path(root), token, lfs_threshold, user
        self.fail_status: int | None = None
        self.fail_on = ""
        self.drop_on: str | None = None
        self.requests: list[tuple[str, str]] = []
        self.commits: list[dict[str, Any]] = []
        self.repos: dict[str, dict[str, Any]] = {}  # repo_id -> {"private", "branches": {name: [paths]}}
        self.auth_headers: list[str] = []  # every Authorization header received
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- what arrived ----------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Committed files of a branch: path -> bytes."""
        base = self._branch_dir(repo_id, revision)
        return {p.relative_to(base).as_posix(): p.read_bytes()
                for p in sorted(base.rglob("*")) if p.is_file()}

    def _branch_dir(self, repo_id: str, revision: str) -> Path:
        return self.root / "repos" / repo_id / revision.replace("/", "%2F")

    def _object(self, oid: str) -> Path:
        return self.root / "lfs" / oid


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log on stderr
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    # --- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, data: Any = None, headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(data if data is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _handle(self, method: str) -> None:
        hub = self.hub
        path = urlsplit(self.path).path
        body = self._body()
        auth = self.headers.get("Authorization")
        with hub.lock:
            hub.requests.append((method, path))
            if auth:
                hub.auth_headers.append(auth)
        if hub.drop_on is not None and hub.drop_on in path:
            self.close_connection = True  # no status line at all: the client sees a dropped connection
            return
        if hub.fail_status is not None and hub.fail_on in path:
            return self._error(hub.fail_status, BAD_TOKEN if hub.fail_status == 401 else "refused")
        needs_auth = not (path.startswith("/__lfs/") and method == "PUT") and path != "/api/validate-yaml"
        if needs_auth and auth != f"Bearer {hub.token}":
            return self._error(401, BAD_TOKEN)
        parts = [unquote(p) for p in path.strip("/").split("/")]
        try:
            self._route(method, path, parts, body)
        except (KeyError, ValueError, TypeError) as e:
            self._error(400, f"bad request: {type(e).__name__}: {e}")

    def _route(self, method: str, path: str, parts: list[str], body: bytes) -> None:
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._send(200, {"errors": [], "warnings": []})
        if method == "GET" and path == "/api/whoami-v2":
            return self._send(200, {"type": "user", "name": hub.user, "orgs": []})
        if method == "PUT" and parts[0] == "__lfs":
            return self._lfs_put(parts[1], body)
        if method == "POST" and path == "/__lfs/verify":
            req = json.loads(body)
            p = hub._object(req["oid"])
            ok = p.is_file() and p.stat().st_size == req["size"]
            return self._send(200, {}) if ok else self._error(404, "object not found")
        if method == "POST" and len(parts) == 6 and parts[1].endswith(".git") and parts[2:] == [
                "info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "Repository not found", "RepoNotFound")
            if method == "GET" and (not rest or rest[0] == "revision"):
                branch = rest[1] if rest else "main"
                if branch not in repo["branches"]:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                return self._send(200, {"id": repo_id, "modelId": repo_id, "private": repo["private"],
                                        "sha": repo["sha"].get(branch, "0" * 40),
                                        "siblings": [{"rfilename": f} for f in repo["branches"][branch]]})
            if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                with hub.lock:
                    if rest[1] in repo["branches"]:
                        return self._error(409, "Reference already exists")
                    repo["branches"][rest[1]] = list(repo["branches"]["main"])
                    src, dst = hub._branch_dir(repo_id, "main"), hub._branch_dir(repo_id, rest[1])
                    dst.mkdir(parents=True, exist_ok=True)
                    for f in repo["branches"]["main"]:
                        (dst / f).parent.mkdir(parents=True, exist_ok=True)
                        (dst / f).write_bytes((src / f).read_bytes())
                return self._send(200, {})
            if method == "POST" and len(rest) == 2 and rest[0] in ("preupload", "commit"):
                if rest[1] not in repo["branches"]:
                    return self._error(404, "Invalid rev id", "RevisionNotFound")
                if rest[0] == "preupload":
                    return self._preupload(json.loads(body))
                return self._commit(repo_id, rest[1], body)
        return self._error(404, f"no route for {method} {path}")

    # --- endpoints -------------------------------------------------------------------------------
    def _create_repo(self, req: dict[str, Any]) -> None:
        hub = self.hub
        repo_id = f"{req.get('organization') or hub.user}/{req['name']}"
        with hub.lock:
            if repo_id in hub.repos:  # the Hub's 409 carries the url too; exist_ok relies on it
                msg = "You already created this model repo"
                url = f"{hub.endpoint}/{repo_id}"
                return self._send(409, {"error": msg, "url": url}, {"X-Error-Message": msg})
            private = req.get("private", req.get("visibility") == "private")
            hub.repos[repo_id] = {"private": bool(private), "branches": {"main": []}, "sha": {}}
            hub._branch_dir(repo_id, "main").mkdir(parents=True, exist_ok=True)
        self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

    def _preupload(self, req: dict[str, Any]) -> None:
        files = []
        for f in req["files"]:
            lfs = f["size"] > self.hub.lfs_threshold or f["path"].endswith((".safetensors", ".bin"))
            mode = "lfs" if lfs else "regular"
            files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False})
        self._send(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, repo_id: str, req: dict[str, Any]) -> None:
        hub = self.hub
        if repo_id not in hub.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        objects = []
        for obj in req["objects"]:
            item: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            p = hub._object(obj["oid"])
            if not (p.is_file() and p.stat().st_size == obj["size"]):  # already stored: no actions
                item["actions"] = {"upload": {"href": f"{hub.endpoint}/__lfs/{obj['oid']}"},
                                   "verify": {"href": f"{hub.endpoint}/__lfs/verify"}}
            objects.append(item)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 of the body does not match the object id")
        p = self.hub._object(oid)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{oid}.{uuid.uuid4().hex}.part")
        tmp.write_bytes(body)
        tmp.replace(p)
        self._send(200, {})

    def _commit(self, repo_id: str, branch: str, body: bytes) -> None:
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        staged: dict[str, bytes] = {}
        for item in lines:
            key, v = item["key"], item["value"]
            if key == "file":
                assert v.get("encoding") == "base64"
                staged[v["path"]] = base64.b64decode(v["content"])
            elif key == "lfsFile":
                p = hub._object(v["oid"])
                if not p.is_file() or (v.get("size") is not None and p.stat().st_size != v["size"]):
                    return self._error(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                staged[v["path"]] = p.read_bytes()
            elif key != "header":
                return self._error(400, f"unsupported commit operation {key!r}")
        oid = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        with hub.lock:  # all files land together, or none do
            base = hub._branch_dir(repo_id, branch)
            for path, data in staged.items():
                (base / path).parent.mkdir(parents=True, exist_ok=True)
                (base / path).write_bytes(data)
            repo = hub.repos[repo_id]
            repo["branches"][branch] = sorted(set(repo["branches"][branch]) | set(staged))
            repo["sha"][branch] = oid
            hub.commits.append({"repo_id": repo_id, "revision": branch, "summary": header.get("summary"),
                                "files": sorted(staged)})
        self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})
