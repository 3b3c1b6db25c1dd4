"""Shared fixtures: Hub servers on 127.0.0.1 (our stand-in for pushes, olah for pulls) and pointing the Hub clients at
them."""

import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.hf_api
import pytest
import torch
import transformers.utils.hub
from huggingface_hub import constants

from modeling_vltp.conversion import import_segment_anything_modeling
from modeling_vltp.testing import HubServer, User

ALICE_TOKEN = "hf_alice_write_token"  # user "alice", member of the organisation "testorg"
BOB_TOKEN = "hf_bob_write_token"  # user "bob", no organisation


def use_hub_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache_dir: Path):
    """Point huggingface_hub and transformers, in this process, at `endpoint` with an empty cache in `cache_dir`.

    huggingface_hub reads `HF_ENDPOINT` once, at import time, into its constants and into the module-level `HfApi`
    behind `huggingface_hub.create_repo` & co.; transformers keeps an `HfApi` of its own. Setting the variable after
    the import changes none of them, so each is patched (and restored by `monkeypatch`). `HF_ENDPOINT` is set as well,
    for subprocesses. Any place left out would send requests to huggingface.co, which fails without network: the tests
    would fail, not pass silently.
    """
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", str(cache_dir))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir / "hub"))
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None, raising=False)


@pytest.fixture
def segment_anything():
    """Meta's `segment_anything.modeling`; the test is skipped where segment-anything is not installed."""
    modeling = import_segment_anything_modeling()
    if modeling is None:
        pytest.skip("segment-anything is not installed (pip install segment-anything)")
    return modeling


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: the tiny models are fastest on one thread, and more threads on a shared
    machine slow them down many times. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubServer:
    """The stand-in Hub (modeling_vltp.testing_hub) in a thread, with users alice (org testorg) and bob; the clients
    point at it and use alice's token unless told otherwise."""
    server = HubServer(tmp_path / "hub", {ALICE_TOKEN: User("alice", ["testorg"]), BOB_TOKEN: User("bob")})
    server.start()
    use_hub_endpoint(monkeypatch, server.url, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", ALICE_TOKEN)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class Olah:
    """An olah server (https://github.com/vtuber-plan/olah), offline, serving the git repositories under `mirrors`."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.mirrors = workdir / "mirrors"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def add_git_repo(self, repo_id: str, folder: Path) -> str:
        """Copy `folder` to `<mirrors>/models/<repo_id>`, commit it on `main` (the layout olah serves) and return the
        commit sha."""
        repo = self.mirrors / "models" / repo_id
        shutil.copytree(folder, repo)
        git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-C", str(repo)]
        for command in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "add checkpoint"]):
            subprocess.run(git + command, check=True)
        return subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()

    def start(self, timeout: float = 60.0):
        executable = shutil.which("olah-cli", path=str(Path(sys.executable).parent)) or shutil.which("olah-cli")
        if executable is None:
            pytest.skip("olah is not installed (pip install olah)")
        self.mirrors.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "olah.toml"
        # hf-netloc points at a closed loopback port: in offline mode olah never goes upstream, and if it tried, it
        # would fail here instead of reaching huggingface.co.
        config.write_text(
            textwrap.dedent(f"""\
                [basic]
                host = "127.0.0.1"
                port = {self.port}
                hf-scheme = "http"
                hf-netloc = "127.0.0.1:9"
                hf-lfs-netloc = "127.0.0.1:9"
                mirror-scheme = "http"
                mirror-netloc = "127.0.0.1:{self.port}"
                mirror-lfs-netloc = "127.0.0.1:{self.port}"
                repos-path = "{self.workdir / "cache"}"
                mirrors-path = ["{self.mirrors}"]

                [accessibility]
                offline = true
            """)
        )
        self.process = subprocess.Popen(
            [executable, "-c", str(config), "--log-path", str(self.workdir / "logs")],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"olah exited with code {self.process.returncode}: {self.process.stderr.read().decode()}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"olah did not start listening on {self.url} within {timeout:.0f} s")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def olah(tmp_path, monkeypatch) -> Olah:
    """A running olah server in offline mirror mode; the clients point at it. Add repositories with `add_git_repo`
    (olah reads the mirrors at request time)."""
    server = Olah(tmp_path / "olah")
    server.workdir.mkdir()
    server.start()
    use_hub_endpoint(monkeypatch, server.url, tmp_path / "hf_home")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield server
    finally:
        server.stop()
