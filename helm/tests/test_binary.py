"""The built binary reads what the chart renders (needs MESSENGER_BIN,
a built `messenger`; skipped otherwise)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import tomllib

import pytest

from conftest import ROOT, SCENARIOS, merged, render

pytestmark = pytest.mark.skipif(not os.environ.get("MESSENGER_BIN"),
                                reason="MESSENGER_BIN (a built messenger) is not set")

TESTDATA = ROOT / "crates" / "platform" / "src" / "auth" / "testdata"

# Keys the chart sets itself (from the values outside `config`, or per pod);
# values.schema.json refuses them under `config`.
CHART_OWNED = {
    "data_dir", "admin", "tracing.otlp_endpoint", "tracing.sample_ratio", "auth.development", "auth.hs256_secret", "auth.public_key_file", "auth.jwks_file",
    "tls.public_cert_file", "tls.public_key_file", "tls.cluster_ca_file", "tls.cluster_cert_file",
    "tls.cluster_key_file", "tls.cluster_domain", "tls.insecure_cluster_plaintext",
    "discovery.backend", "discovery.message", "discovery.presence", "discovery.media", "discovery.notify",
    "discovery.advertise_host", "discovery.etcd.endpoints",
    "gateway.listen", "gateway.internal_listen", "gateway.web.listen", "gateway.advertise_internal",
    "gateway.gateway_id",
    "message.listen", "message.database", "scylla.nodes", "scylla.username", "scylla.password",
    "message.cache.redis.url", "presence.listen", "presence.redis.url",
    "media.listen", "media.database", "media.s3.embedded", "media.s3.embedded_listen",
    "media.s3.embedded_origin_secret", "media.s3.endpoint", "media.s3.public_endpoint", "media.s3.region",
    "media.s3.bucket", "media.s3.force_path_style", "media.s3.access_key_id", "media.s3.secret_access_key",
    "media.cdn.secret", "media.cdn.secret_file", "media.cdn.private_key_file",
    "notify.listen", "notify.database", "notify.apns.apps", "notify.apns.ca_file", "notify.fcm.apps",
    "notify.fcm.ca_file", "notify.web_push.vapid_key_file",
}


def environment() -> dict[str, str]:
    """The binary reads every MESSENGER_* variable as configuration (and
    refuses unknown ones, such as MESSENGER_BIN): none may leak in."""
    return {key: value for key, value in os.environ.items() if not key.startswith("MESSENGER_")}


def run(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.abspath(os.environ["MESSENGER_BIN"]), *args], capture_output=True, text=True,
                          env=environment(), cwd=cwd, timeout=60)


def check(role: str, text: str, tmp_path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """`config --check` on a role's rendered TOML. The files the pods mount
    and validation reads (the JWKS) are put under tmp, and the paths moved there."""
    etc = tmp_path / role / "etc"
    (etc / "auth").mkdir(parents=True)
    (etc / "auth" / "jwks.json").write_text((TESTDATA / "jwks.json").read_text())
    path = tmp_path / role / "messenger.toml"
    path.write_text(text.replace("/etc/messenger/", f"{etc}/"))
    return run("--config", str(path), "config", "--check", cwd=tmp_path)


def test_rendered_config_loads_in_the_binary(scenario, tmp_path):
    name, rendered = scenario
    for role, text in rendered.config_files().items():
        result = check(role, text, tmp_path)
        assert result.returncode == 0, f"{name} {role}: {result.stderr or result.stdout}"


def test_backend_tls_from_secrets_loads_in_the_binary(tmp_path):
    """external.*.tls on every backend of the production shape: the tls
    tables the chart writes (scylla.tls, presence.redis.tls,
    message.cache.redis.tls, discovery.etcd.tls, with client certificates
    and server names) are settings the binary knows and accepts, in every
    role's file and the migrate Job's. The certificate files themselves are
    read when a connection is made, not by the check."""
    tls = {"enabled": True, "existingSecret": "backend-tls", "certKey": "tls.crt", "keyKey": "tls.key"}
    values = merged(SCENARIOS["production"], {"external": {
        "scylla": {"tls": {**tls, "serverName": "scylla.internal"}},
        "redis": {"tls": tls},
        "etcd": {"endpoints": ["https://etcd-0.etcd:2379", "etcd-1.etcd:2379"], "tls": tls},
    }})
    rendered = render(values)
    files = rendered.config_files()
    (migrate,) = [c for c in rendered.kind("ConfigMap") if c["metadata"]["name"].endswith("-migrate")]
    files["migrate"] = migrate["data"]["migrate.toml"]
    for role, text in files.items():
        assert "/etc/messenger/backend-tls/" in text, role
        result = check(role, text, tmp_path)
        assert result.returncode == 0, f"{role}: {result.stderr or result.stdout}"


def test_the_binary_refuses_what_the_check_should_catch(tmp_path):
    """`config --check` can fail: a key the service does not know."""
    text = render().config_files()["gateway"]
    assert "[server]\n" in text
    result = check("gateway", text.replace("[server]\n", "[server]\nmax_concurent_streams = 1\n"), tmp_path)
    assert result.returncode != 0 and "max_concurent_streams" in result.stderr + result.stdout


def without_chart_owned(table: dict, prefix: str = "") -> dict:
    kept = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if path not in CHART_OWNED:
            kept[key] = without_chart_owned(value, f"{path}.") if isinstance(value, dict) else value
    return kept


def test_every_setting_the_binary_prints_passes_through_the_chart(tmp_path):
    """`messenger config` prints every key with its default. All but the
    chart's own must be accepted by values.schema.json under `config` (names
    and types), and rendered back they must load in the binary: the schema
    and the service's settings cannot drift apart unnoticed."""
    printed = run("config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    rendered = render({"config": without_chart_owned(tomllib.loads(printed.stdout))})
    for role, text in rendered.config_files().items():
        result = check(role, text, tmp_path)
        assert result.returncode == 0, f"{role}: {result.stderr or result.stdout}"
