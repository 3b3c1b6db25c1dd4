"""A small stand-in for the Hugging Face Hub, for push and pull tests on 127.0.0.1 without network.

It implements the HTTP endpoints that `huggingface_hub` calls for `whoami`, `create_repo`, `upload_folder` /
`push_to_hub` (preupload always answers "regular", so files travel base64 inside the NDJSON commit: no LFS, no Xet),
`model_info` / `repo_info`, `list_repo_files` / `list_repo_tree`, `get_paths_info`, `list_repo_refs`, file downloads
(`resolve`, HEAD and GET, with `ETag` and `X-Repo-Commit`) and `/api/validate-yaml`.

Repositories live on disk under `root`: `<root>/<type>s/<namespace>/<name>/` holds `repo.json` (owner namespace,
privacy, branch heads) and `commits/<sha>/`, a full copy of the files at that commit. Only the `main` branch exists.

Permissions follow the Hub: every token belongs to a user who may write to their own namespace and to their
organisations'; writing elsewhere is 403; an unknown or private-and-not-yours repository is 404 with
`X-Error-Code: RepoNotFound`; a missing file is 404 with `X-Error-Code: EntryNotFound`.

Point the clients at it with `HF_ENDPOINT=http://127.0.0.1:PORT` (huggingface_hub reads it when first imported) and
a token of one of its users in `HF_TOKEN`. In Python: `HubServer(root, {"hf_token": User("alice")}).start()`; on its
own: `python -m modeling_vltp.testing_hub --port 8090 --root /tmp/hub --token hf_alice=alice:testorg`.

[`run_without_package`] runs a script in a fresh Python in which this package cannot be imported, to check that what
was pushed loads with `trust_remote_code=True` alone.
"""

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
_API_REPO = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
    r"(?:/(?P<action>revision|tree|refs|preupload|commit|paths-info)(?:/(?P<revision>[^/]+)(?:/(?P<path>.*))?)?)?$"
)
_RESOLVE = re.compile(
    r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$"
)


@dataclass
class User:
    name: str
    orgs: list[str] = field(default_factory=list)

    def can_write(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


class HubError(Exception):
    """An error reply: HTTP status, message, and the `X-Error-Code` huggingface_hub maps to its exception types."""

    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class RepoStore:
    """Repositories on disk; one folder per commit (fine for the tiny checkpoints tests push)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    def _repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id

    def meta(self, repo_type: str, repo_id: str) -> dict | None:
        meta_file = self._repo_dir(repo_type, repo_id) / "repo.json"
        return json.loads(meta_file.read_text()) if meta_file.exists() else None

    def create(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create an empty repository with one empty commit on `main`; False if it exists already."""
        with self._lock:
            if self.meta(repo_type, repo_id) is not None:
                return False
            sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
            repo_dir = self._repo_dir(repo_type, repo_id)
            (repo_dir / "commits" / sha).mkdir(parents=True)
            meta = {"private": private, "branches": {"main": sha}}
            (repo_dir / "repo.json").write_text(json.dumps(meta))
            return True

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> tuple[str, Path]:
        """The commit sha and snapshot folder of a branch name or commit sha."""
        meta = self.meta(repo_type, repo_id)
        sha = meta["branches"].get(revision, revision)
        snapshot = self._repo_dir(repo_type, repo_id) / "commits" / sha
        if not re.fullmatch(r"[0-9a-f]{40}", sha) or not snapshot.is_dir():
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, snapshot

    def commit(self, repo_type: str, repo_id: str, revision: str, additions: dict[str, bytes], deletions: list[str]):
        """Apply a commit on top of `revision` (a branch) and move the branch to it; returns the new sha."""
        with self._lock:
            meta = self.meta(repo_type, repo_id)
            if revision not in meta["branches"]:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            _, parent = self.resolve(repo_type, repo_id, revision)
            sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
            snapshot = parent.parent / sha
            shutil.copytree(parent, snapshot)
            for path in deletions:
                target = snapshot / path
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            for path, content in additions.items():
                target = snapshot / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
            meta["branches"][revision] = sha
            (self._repo_dir(repo_type, repo_id) / "repo.json").write_text(json.dumps(meta))
            return sha


def _safe_relative_path(path: str) -> str:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return "/".join(parts)


def _tree_entries(snapshot: Path, prefix: str, recursive: bool) -> list[dict]:
    base = snapshot / prefix if prefix else snapshot
    if not base.is_dir():
        raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
    children = sorted(base.rglob("*") if recursive else base.iterdir())
    return [_path_info(snapshot, child) for child in children]


def _path_info(snapshot: Path, path: Path) -> dict:
    relative = path.relative_to(snapshot).as_posix()
    if path.is_dir():
        return {"type": "directory", "oid": hashlib.sha1(relative.encode()).hexdigest(), "size": 0, "path": relative}
    content = path.read_bytes()
    return {"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": relative}


class HubRequestHandler(BaseHTTPRequestHandler):
    server: "HubServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean; the server records requests instead
        pass

    # -- plumbing ----------------------------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.server.requests.append((method, path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        try:
            self._route(method, path, query, body)
        except HubError as error:
            self._send_error(error, head=method == "HEAD")

    def _route(self, method, path, query, body):
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return self._send_json({"errors": [], "warnings": []})
        if match := _API_REPO.match(path):
            return self._repo_api(method, match, query, body)
        if (match := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            return self._resolve(method, match)
        raise HubError(404, f"No such endpoint: {method} {path}")

    def _send_json(self, payload, status: int = 200):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: HubError, head: bool):
        # huggingface_hub reads the error code and message from the headers; a HEAD reply must carry no body.
        data = b"" if head else json.dumps({"error": error.message}).encode()
        self.send_response(error.status)
        if error.error_code:
            self.send_header("X-Error-Code", error.error_code)
        self.send_header("X-Error-Message", error.message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # -- auth and repositories -------------------------------------------------------------------------------

    def _user(self) -> User | None:
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        if token is None:
            return None
        if token not in self.server.users:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.server.users[token]

    def _readable_repo(self, repo_type: str, repo_id: str) -> dict:
        meta = self.server.store.meta(repo_type, repo_id)
        user = self._user()
        namespace = repo_id.split("/")[0]
        if meta is None or (meta["private"] and not (user and user.can_write(namespace))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return meta

    def _writable_repo(self, repo_type: str, repo_id: str) -> dict:
        meta = self._readable_repo(repo_type, repo_id)
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repository")
        if not user.can_write(repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}: it belongs to another namespace")
        return meta

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.server.url}/{prefix}{repo_id}"

    def _whoami(self):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        orgs = [{"name": org, "type": "org", "roleInOrg": "write"} for org in user.orgs]
        self._send_json(
            {
                "type": "user",
                "name": user.name,
                "fullname": user.name,
                "orgs": orgs,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, payload: dict):
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        namespace = payload.get("organization") or user.name
        repo_id = f"{namespace}/{payload['name']}"
        url = self._repo_url(repo_type, repo_id)
        if not user.can_write(namespace):
            raise HubError(403, f"You don't have the rights to create a repository under the namespace {namespace!r}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        if not self.server.store.create(repo_type, repo_id, private):
            # huggingface_hub reads "url" from the 409 reply as well when `exist_ok=True`.
            return self._send_json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    # -- /api/{type}s/{namespace}/{name}/... -----------------------------------------------------------------

    def _repo_api(self, method, match, query, body):
        repo_type, repo_id = match["type"][:-1], match["repo"]
        action, revision = match["action"], match["revision"] or "main"
        if action is None or action == "revision":
            if method != "GET":
                raise HubError(405, "Method not allowed")
            return self._info(repo_type, repo_id, revision)
        if action == "refs":
            meta = self._readable_repo(repo_type, repo_id)
            branches = [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in meta["branches"].items()
            ]
            return self._send_json({"branches": branches, "tags": [], "converts": []})
        if action == "tree":
            self._readable_repo(repo_type, repo_id)
            _, snapshot = self.server.store.resolve(repo_type, repo_id, revision)
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            prefix = _safe_relative_path(match["path"]) if match["path"] else ""
            return self._send_json(_tree_entries(snapshot, prefix, recursive))
        if action == "paths-info":
            return self._paths_info(repo_type, repo_id, revision, body)
        if action == "preupload":
            return self._preupload(repo_type, repo_id, revision, json.loads(body))
        return self._commit(repo_type, repo_id, revision, body)

    def _info(self, repo_type, repo_id, revision):
        meta = self._readable_repo(repo_type, repo_id)
        sha, snapshot = self.server.store.resolve(repo_type, repo_id, revision)
        siblings = [
            {"rfilename": entry["path"], "size": entry["size"]}
            for entry in _tree_entries(snapshot, "", True)
            if entry["type"] == "file"
        ]
        self._send_json(
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "private": meta["private"],
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _paths_info(self, repo_type, repo_id, revision, body):
        self._readable_repo(repo_type, repo_id)
        _, snapshot = self.server.store.resolve(repo_type, repo_id, revision)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        found = [snapshot / _safe_relative_path(path) for path in paths]
        self._send_json([_path_info(snapshot, path) for path in found if path.exists()])

    def _preupload(self, repo_type, repo_id, revision, payload):
        self._writable_repo(repo_type, repo_id)
        _, snapshot = self.server.store.resolve(repo_type, repo_id, revision)
        files = []
        for file in payload.get("files", []):
            existing = snapshot / _safe_relative_path(file["path"])
            oid = git_blob_sha(existing.read_bytes()) if existing.is_file() else None
            files.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": files})

    def _commit(self, repo_type, repo_id, revision, body):
        self._writable_repo(repo_type, repo_id)
        additions, deletions = {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                additions[_safe_relative_path(value["path"])] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(_safe_relative_path(value["path"]))
            elif key != "header":
                raise HubError(400, f"This stand-in Hub does not support {key!r} commit operations (no LFS).")
        sha = self.server.store.commit(repo_type, repo_id, revision, additions, deletions)
        self._send_json(
            {
                "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{sha}",
                "commitOid": sha,
                "pullRequestUrl": None,
            }
        )

    # -- /{namespace}/{name}/resolve/{revision}/{path} -------------------------------------------------------

    def _resolve(self, method, match):
        repo_type = (match["type"] or "models")[:-1]
        repo_id = match["repo"]
        self._readable_repo(repo_type, repo_id)
        sha, snapshot = self.server.store.resolve(repo_type, repo_id, match["revision"])
        file = snapshot / _safe_relative_path(match["path"])
        if not file.is_file():
            raise HubError(404, "Entry not found", "EntryNotFound")
        content = file.read_bytes()
        self.send_response(200)
        self.send_header("ETag", f'"{git_blob_sha(content)}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(content)


class HubServer(ThreadingHTTPServer):
    """The stand-in Hub. `users` maps tokens to users; `requests` records every (method, path) served."""

    daemon_threads = True

    def __init__(self, root: Path, users: dict[str, User], host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), HubRequestHandler)
        self.store = RepoStore(root)
        self.users = users
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; stop with `shutdown()` then `server_close()`."""
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-stand-in", daemon=True
        )
        thread.start()
        return thread


# Put first on `sys.meta_path` of the child process: it refuses `modeling_vltp` however the package is installed
# (editable installs put it on every path); the remote-code copies live in `transformers_modules.*`.
_HIDE_PACKAGE = textwrap.dedent("""\
    import importlib.abc, sys

    class _HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_vltp" or name.startswith("modeling_vltp."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)

    sys.meta_path.insert(0, _HidePackage())
""")


def run_without_package(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run Python `code` with `args` in `sys.argv[1:]` in a fresh `python -I` (no `PYTHONPATH`, no current folder on
    `sys.path`) in which `modeling_vltp` cannot be imported, as for someone without this package. The environment is
    passed on (so `HF_ENDPOINT`, `HF_HOME` and `HF_TOKEN` reach it); output is captured as text, and a non-zero exit
    raises `subprocess.CalledProcessError` with it."""
    return subprocess.run(
        [sys.executable, "-I", "-c", _HIDE_PACKAGE + code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder the repositories are stored in")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--token", action="append", default=[], metavar="TOKEN=USER[:ORG,ORG]", help="a token, its user and their orgs"
    )
    args = parser.parse_args()
    users = {}
    for spec in args.token:
        token, _, user = spec.partition("=")
        name, _, orgs = user.partition(":")
        users[token] = User(name, [org for org in orgs.split(",") if org])
    server = HubServer(args.root, users, args.host, args.port)
    print(f"Serving a stand-in Hub at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
