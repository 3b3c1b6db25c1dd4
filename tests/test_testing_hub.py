"""The stand-in Hub as the notebooks use it: through `HF_ENDPOINT` in a fresh process, and `run_without_package`."""

import os
import subprocess
import sys

import pytest

from modeling_vltp.testing import HubServer, User, run_without_package


def test_run_without_package_hides_the_package_and_passes_arguments_and_environment(monkeypatch):
    monkeypatch.setenv("VLTP_CHECK", "passed on")
    result = run_without_package("import os, sys; print(sys.argv[1:], os.environ['VLTP_CHECK'])", "a", "b")
    assert result.stdout.strip() == "['a', 'b'] passed on"
    with pytest.raises(subprocess.CalledProcessError) as error:
        run_without_package("import modeling_vltp")
    assert "No module named 'modeling_vltp' (hidden)" in error.value.stderr


def test_a_client_pointed_at_the_server_by_hf_endpoint_pushes_and_pulls(tmp_path, monkeypatch):
    server = HubServer(tmp_path / "hub", {"hf_token": User("alice")})
    server.start()
    try:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "home"), "HF_TOKEN": "hf_token"}
        script = (
            "from huggingface_hub import HfApi, hf_hub_download\n"
            "api = HfApi()\n"
            "api.create_repo('alice/notes')\n"
            "api.upload_file(path_or_fileobj=b'hello', path_in_repo='a.txt', repo_id='alice/notes')\n"
            "print(open(hf_hub_download('alice/notes', 'a.txt')).read())\n"
        )
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    finally:
        server.shutdown()
        server.server_close()
    assert result.stdout.strip() == "hello"
    assert ("POST", "/api/repos/create") in server.requests
