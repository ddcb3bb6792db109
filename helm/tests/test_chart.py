"""The chart, rendered as Helm renders it: lint, Kubernetes schemas, and the
properties the deployment relies on."""

from __future__ import annotations

import hashlib
import json
import re
import tomllib

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils
import pytest

from conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    SCENARIOS,
    Rendered,
    callers_in_code,
    chart_kube_version,
    lint,
    lint_problems,
    merged,
    render,
)

ROLES = ["gateway", "media", "message", "notify", "presence"]


# --- Helm and Kubernetes ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_helm_lint_strict_passes(name):
    assert lint_problems(lint(SCENARIOS[name], kube_version=f"v{chart_kube_version()}")) == []


def test_kube_version_below_the_declared_one_is_refused():
    major, minor, _ = chart_kube_version().split(".")
    with pytest.raises(helm.HelmRenderError, match="older than the chart supports"):
        render(kube_version=f"v{major}.{int(minor) - 1}.0")
    render(kube_version=f"v{kubernetes_validate.utils.latest_version()}")


def kubernetes_versions() -> list[str]:
    """The oldest version the chart declares and the newest the schemas know."""
    return sorted({chart_kube_version(), kubernetes_validate.utils.latest_version()})


@pytest.mark.parametrize("kube_version", kubernetes_versions())
def test_every_manifest_validates_strictly_against_kubernetes(scenario, kube_version):
    name, rendered = scenario
    assert rendered.objects, "nothing rendered"
    for obj in rendered.objects:
        label = f"{name}: {obj['__source']} {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(Rendered.clean(obj), kube_version, strict=True)
        except kubernetes_validate.utils.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{label} against {kube_version}: {path}: {error.message}")
        except kubernetes_validate.utils.SchemaNotFoundError as error:
            pytest.fail(f"{label}: {error.message}")


def test_strict_validation_refuses_an_unknown_field(default_render):
    """The validator really is strict: a misspelt field fails."""
    deployment = Rendered.clean(default_render.by_component("Deployment")["gateway"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.utils.ValidationError):
        kubernetes_validate.validate(deployment, chart_kube_version(), strict=True)


# --- The values schema ----------------------------------------------------------


def test_schema_closes_every_object():
    """Every object in values.schema.json refuses unknown keys, except maps
    whose keys are data (labels, roles, MIME types: their values are typed)
    and Kubernetes objects passed through (checked strictly after rendering)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and node.get("additionalProperties") is not False:
                typed_map = isinstance(node.get("additionalProperties"), dict) and "properties" not in node
                passed_through = "a Kubernetes object" in node.get("description", "")
                if not (typed_map or passed_through):
                    open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(schema, "")
    assert schema["additionalProperties"] is False
    assert open_objects == []


@pytest.mark.parametrize(
    "extra",
    [
        {"replicaCount": 2},
        {"roles": {"gateway": {"replica": 2}}},
        {"roles": {"gateway": {"ports": {"public": {"port": 7700, "listenKey": "gateway.listen",
                                                    "healthService": "x", "tls": True}}}}},
        {"defaults": {"resources": {"requests": {"gpu": 1}}}},
        {"external": {"redis": {"password": "secret"}}},
        {"tls": {"cluster": {"enable": True}}},
        # Service settings: unknown keys, and keys the chart owns.
        {"config": {"message": {"max_body_byte": 1}}},
        {"config": {"gateway": {"listen": "0.0.0.0:1"}}},
        {"config": {"discovery": {"message": ["elsewhere:7710"]}}},
        {"config": {"auth": {"development": True}}},
        {"config": {"media": {"s3": {"embedded": True}}}},
        {"config": {"scylla": {"nodes": ["db:9042"]}}},
        # The cluster's settings are scylla.*, shared by every store; message.scylla keeps the send path's.
        {"config": {"message": {"scylla": {"keyspace": "messenger"}}}},
        {"external": {"etcd": {"tls": {"enable": True}}}},
        {"config": {"server": {"drain_grace": "ten seconds"}}},
    ],
    ids=lambda extra: re.sub(r"[^a-z_.]+", ".", str(extra).lower()).strip("."),
)
def test_schema_refuses_unknown_and_chart_owned_keys(extra):
    with pytest.raises(helm.HelmValuesError):
        render(extra)
    assert lint_problems(lint(extra)), "lint accepted values the schema refuses"


@pytest.mark.parametrize(
    "values, reason",
    [
        ({"roles": {"media": {"replicas": 2, "persistence": {"enabled": False}}}}, "config.media.store to scylla"),
        ({"roles": {"message": {"replicas": 2, "persistence": {"enabled": False}}}}, "one writer"),
        ({"roles": {"presence": {"replicas": 2}}}, "in memory"),
        (
            {"config": {"message": {"store": "scylla"}}, "external": {"scylla": {"nodes": ["db:9042"]}},
             "roles": {"message": {"replicas": 2, "persistence": {"enabled": False}}}},
            "discovery.backend etcd",
        ),
        ({"discovery": {"backend": "etcd"}}, "external.etcd.endpoints"),
        ({"config": {"message": {"store": "scylla"}}}, "external.scylla.nodes"),
        ({"config": {"media": {"store": "scylla"}}}, "external.scylla.nodes"),
        ({"config": {"notify": {"store": "scylla"}}}, "external.scylla.nodes"),
        ({"roles": {"notify": {"replicas": 2, "persistence": {"enabled": False}}}}, "config.notify.store to scylla"),
        ({"push": {"vapidKeyKey": "vapid.pem"}}, "push.existingSecret"),
        ({"auth": {"jwksKey": ""}}, "verification key"),
        ({"tls": {"cluster": {"enabled": False, "insecurePlaintext": False}}}, "insecurePlaintext"),
        ({"tls": {"public": {"enabled": True}}}, "tls.public.existingSecret"),
        ({"roles": {"message": {"enabled": False}}}, "discovery.staticAddresses.message"),
        ({"external": {"scylla": {"tls": {"enabled": True}}}}, "external.scylla.tls.existingSecret is required"),
        ({"external": {"redis": {"tls": {"enabled": True, "existingSecret": "redis-tls", "certKey": "tls.crt"}}}},
         "external.redis.tls.certKey and keyKey go together"),
        ({"external": {"etcd": {"tls": {"keyKey": "tls.key"}}}}, "external.etcd.tls.certKey and keyKey go together"),
        ({"external": {"scylla": {"tls": {"enabled": True, "existingSecret": "scylla-tls"}}},
          "config": {"scylla": {"tls": {"ca_file": "/etc/ssl/certs/ca-certificates.crt"}}}},
         "config.scylla.tls: leave it out when external.scylla.tls is enabled"),
        ({"external": {"redis": {"tls": {"enabled": True, "existingSecret": "redis-tls"}}},
          "config": {"message": {"cache": {"redis": {"tls": {"ca_file": "/etc/ssl/ca.pem"}}}}}},
         "config.message.cache.redis.tls: leave it out when external.redis.tls is enabled"),
        ({"discovery": {"backend": "etcd"},
          "external": {"etcd": {"endpoints": ["etcd-0:2379", "http://etcd-1:2379"],
                                "tls": {"enabled": True, "existingSecret": "etcd-tls"}}}},
         "http://etcd-1:2379 is http:// but TLS to etcd is on: use https://"),
        ({"discovery": {"backend": "etcd"}, "external": {"etcd": {"endpoints": ["https://etcd-0:2379"]}}},
         "https://etcd-0:2379 is https:// but TLS to etcd is off"),
        ({"config": {"presence": {"backend": "redis"}}, "external": {"redis": {"url": "rediss://redis:6380"}}},
         "external.redis.url is rediss:// but external.redis.tls is off"),
    ],
)
def test_combinations_the_service_would_refuse_fail_to_render(values, reason):
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    assert reason in str(failure.value)


# --- Properties of the rendered objects --------------------------------------------


def test_one_deployment_per_enabled_role(scenario):
    _, rendered = scenario
    deployments = rendered.by_component("Deployment")
    assert sorted(deployments) == ROLES
    for role, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"][:3] == ["serve", "--service", role]


def test_network_policies_admit_exactly_the_callers_in_the_code(scenario):
    """Each internal port admits only the roles whose calls the service
    authorizes (its `fn callers()` rules); the public ports (gRPC and the
    browser port) admit anyone."""
    _, rendered = scenario
    expected = callers_in_code()
    assert set(expected) == set(ROLES)
    policies = rendered.by_component("NetworkPolicy")
    deployments = rendered.by_component("Deployment")
    assert sorted(policies) == ROLES
    for role, policy in policies.items():
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == role
        container_ports = {p["containerPort"]: p["name"]
                           for p in deployments[role]["spec"]["template"]["spec"]["containers"][0]["ports"]}
        covered = {}
        for rule in spec["ingress"]:
            (port,) = rule["ports"]
            covered[port["port"]] = rule.get("from")
        # The admin port is closed to the network unless metrics.scrapeFrom names a scraper.
        container_ports = {number: name for number, name in container_ports.items() if name != "admin"}
        assert set(covered) == set(container_ports), f"{role}: every gRPC port has exactly one rule, admin none"
        for number, peers in covered.items():
            if container_ports[number] in ("public", "web"):
                assert role == "gateway"
                assert peers is None, "the public ports are open (networkPolicy.publicFrom is empty)"
                continue
            assert peers is not None and len(peers) == 1, f"{role}:{number} admits only pods of this release"
            (peer,) = peers
            assert set(peer) == {"podSelector"}, f"{role}:{number}: no namespace or address peers"
            expressions = {e["key"]: set(e["values"]) for e in peer["podSelector"]["matchExpressions"]}
            assert expressions["app.kubernetes.io/instance"] == {RELEASE}
            assert expressions["app.kubernetes.io/component"] == expected[role], f"{role}:{number}"


def test_public_from_restricts_the_public_port_but_keeps_the_test_pod():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}
    rendered = render({"networkPolicy": {"publicFrom": [peer]}})
    policy = rendered.by_component("NetworkPolicy")["gateway"]
    public = [rule for rule in policy["spec"]["ingress"] if rule["ports"][0]["port"] == 7700]
    assert public[0]["from"][0] == peer
    assert public[0]["from"][1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"


def test_metrics_are_scraped_only_from_the_configured_peers_and_by_service_monitors():
    scraper = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    rendered = render({"metrics": {"scrapeFrom": [scraper], "serviceMonitor": {"enabled": True,
                                                                                "labels": {"release": "prom"}}}})
    for role, policy in rendered.by_component("NetworkPolicy").items():
        admin = [rule for rule in policy["spec"]["ingress"] if rule["ports"][0]["port"] == 9464]
        assert [rule["from"] for rule in admin] == [[scraper]], role
    monitors = rendered.by_component("ServiceMonitor")
    assert sorted(monitors) == ROLES
    for role, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert monitor["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "30s"}]
        selected = [svc for svc in rendered.kind("Service")
                    if all(svc["metadata"]["labels"].get(k) == v
                           for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
        assert any(port["name"] == "admin" and port["port"] == 9464
                   for svc in selected for port in svc["spec"]["ports"]), role
    assert not render({}).by_component("ServiceMonitor"), "off by default (it needs the operator's CRD)"


def containers_of(rendered: Rendered):
    for kind in ("Deployment", "Job"):
        for obj in rendered.kind(kind):
            yield obj, obj["spec"]["template"]["spec"]
    for pod in rendered.kind("Pod"):
        yield pod, pod["spec"]


def test_every_pod_is_hardened(scenario):
    _, rendered = scenario
    pods = list(containers_of(rendered))
    assert len(pods) >= 5
    for obj, spec in pods:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, name
        # Service links would put <SERVICE>_PORT variables in the environment:
        # with a release named "messenger" they are MESSENGER_*, which the
        # binary reads as (unknown) configuration keys and refuses.
        assert spec["enableServiceLinks"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert context["seccompProfile"]["type"] == "RuntimeDefault", name
            assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0, name
            assert container["resources"]["limits"]["memory"], name
            # Writable places are volumes: /tmp everywhere, data_dir for the services.
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            if obj["kind"] != "Pod":
                assert {"/tmp", "/var/lib/messenger"} <= mounts, name


def test_every_role_has_three_probes_on_its_health_service(default_render):
    """The gateway probes its plaintext public port by gRPC health; the other
    roles' probe ports are mutual TLS by default, so theirs go to /readyz and
    /livez on the admin port."""
    for role, deployment in default_render.by_component("Deployment").items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        ports = {port["containerPort"] for port in container["ports"]}
        if role != "gateway":
            assert_admin_probes(role, container)
            continue
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in container[probe], f"{role} {probe}: plaintext ports get native gRPC probes"
            assert container[probe]["grpc"]["port"] in ports
        service = container["readinessProbe"]["grpc"]["service"]
        assert re.fullmatch(r"messenger\.v1\.\w+Service", service), service
        assert container["startupProbe"]["grpc"]["service"] == service
        # The whole server: it stays SERVING while the named service drains.
        assert container["livenessProbe"]["grpc"]["service"] == ""
    gateway = default_render.by_component("Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"] == {"port": 7700, "service": "messenger.v1.GatewayService"}


def assert_admin_probes(role, container):
    ports = {port["containerPort"] for port in container["ports"]}
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        assert "grpc" not in container[probe] and "tcpSocket" not in container[probe], f"{role} {probe}"
        assert container[probe]["httpGet"] == {"port": 9464, "path": path}, f"{role} {probe}"
        assert 9464 in ports, role


def test_tls_ports_get_http_probes_on_the_admin_port(production_render):
    """The kubelet's gRPC probe speaks plaintext only: a TLS port's role is
    probed on its admin port (/readyz turns 503 from the start of a drain)."""
    for role, deployment in production_render.by_component("Deployment").items():
        assert_admin_probes(role, deployment["spec"]["template"]["spec"]["containers"][0])


def drain_seconds(toml_text: str) -> int:
    drain = tomllib.loads(toml_text).get("server", {}).get("drain_grace", "10s")
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return int(sum(int(n) * units[u] for n, u in re.findall(r"(\d+)\s*(ms|s|m|h)\b", drain)) + 0.999)


def test_grace_period_outlasts_prestop_sleep_and_drain(scenario):
    _, rendered = scenario
    configs = rendered.config_files()
    for role, deployment in rendered.by_component("Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        sleep = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert sleep >= 5, f"{role}: load balancers need time to stop sending"
        assert spec["terminationGracePeriodSeconds"] > sleep + drain_seconds(configs[role]), role


def test_config_toml_parses_and_matches_the_pods(scenario):
    name, rendered = scenario
    configs = rendered.config_files()
    assert sorted(configs) == ROLES
    services = {svc["metadata"]["name"]: svc for svc in rendered.kind("Service")}
    for role, text in configs.items():
        config = tomllib.loads(text)
        assert config["data_dir"] == "/var/lib/messenger"
        deployment = rendered.by_component("Deployment")[role]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        # The role's listeners are what the pod exposes.
        gateway = config["gateway"]
        listens = {gateway["listen"], gateway["internal_listen"], gateway["web"]["listen"]} if role == "gateway" \
            else {config[role]["listen"]}
        listens.add(config["admin"]["listen"])
        assert listens == {f"0.0.0.0:{port['containerPort']}" for port in container["ports"]}, role
        # The checksum annotation is this file's.
        checksum = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert checksum == hashlib.sha256(text.encode()).hexdigest(), role
        # Only the token-verifying role gets key files.
        assert ("jwks_file" in config["auth"]) == (role == "gateway"), role
        discovery = config["discovery"]
        if discovery["backend"] == "static":
            for other in ("message", "presence", "media"):
                (address,) = discovery[other]
                host, port = address.rsplit(":", 1)
                service = host.split(".")[0]
                assert host == f"{service}.{NAMESPACE}.svc.cluster.local"
                assert int(port) in [p["port"] for p in services[service]["spec"]["ports"]], address
        else:
            assert discovery["etcd"]["endpoints"], name
            env = {e["name"]: e for e in container["env"]}
            assert env["MESSENGER_DISCOVERY__ADVERTISE_HOST"]["value"] == "$(POD_IP)"
    gateway_env = {e["name"]: e for e in rendered.by_component("Deployment")["gateway"]
                   ["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert gateway_env["MESSENGER_GATEWAY__ADVERTISE_INTERNAL"]["value"] == "$(POD_IP):7701"


def test_config_renders_whole_numbers_as_integers():
    rendered = render({"config": {"media": {"quota_bytes": 68719476736, "allowed_types": {"image/png": 1048576}},
                                  "scylla": {"replication": {"strategy": "SimpleStrategy", "factor": 3}}}})
    config = tomllib.loads(rendered.config_files()["media"])
    assert config["media"]["quota_bytes"] == 68719476736
    assert config["media"]["allowed_types"]["image/png"] == 1048576
    assert config["scylla"]["replication"] == {"strategy": "SimpleStrategy", "factor": 3}


def test_production_wires_secrets_tls_and_external_stores(production_render):
    rendered = production_render
    configs = {role: tomllib.loads(text) for role, text in rendered.config_files().items()}
    for role, config in configs.items():
        assert config["tls"]["insecure_cluster_plaintext"] is False
        assert config["tls"]["cluster_cert_file"].startswith("/etc/messenger/cluster-tls/")
        assert config["message"]["store"] == "scylla"
        assert config["media"]["store"] == "scylla"
        assert config["scylla"]["nodes"] == ["scylla-client.scylla.svc.cluster.local:9042"], role
        assert "scylla" not in config["message"], f"{role}: the cluster's settings are the top-level [scylla]"
    assert configs["gateway"]["tls"]["public_cert_file"] == "/etc/messenger/public-tls/tls.crt"
    assert "public_cert_file" not in configs["message"]["tls"]
    deployments = rendered.by_component("Deployment")

    def env(role):
        return {e["name"]: e for e in deployments[role]["spec"]["template"]["spec"]["containers"][0]["env"]}

    def secret_of(variable):
        return variable["valueFrom"]["secretKeyRef"]["name"]

    assert secret_of(env("message")["MESSENGER_SCYLLA__PASSWORD"]) == "messenger-scylla"
    assert secret_of(env("media")["MESSENGER_SCYLLA__PASSWORD"]) == "messenger-scylla"
    assert secret_of(env("notify")["MESSENGER_SCYLLA__PASSWORD"]) == "messenger-scylla"
    assert "MESSENGER_SCYLLA__PASSWORD" not in env("gateway")
    assert secret_of(env("message")["MESSENGER_MESSAGE__CACHE__REDIS__URL"]) == "messenger-redis"
    assert secret_of(env("presence")["MESSENGER_PRESENCE__REDIS__URL"]) == "messenger-redis"
    assert secret_of(env("media")["AWS_SECRET_ACCESS_KEY"]) == "messenger-s3"
    assert "AWS_SECRET_ACCESS_KEY" not in env("gateway"), "credentials go only where they are used"
    assert env("gateway")["MESSENGER_TRACING__OTLP_ENDPOINT"]["value"].endswith(":4317")
    assert float(env("message")["MESSENGER_TRACING__SAMPLE_RATIO"]["value"]) == 0.01
    for role, deployment in deployments.items():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["cluster-tls"]["secret"]["secretName"] == f"{RELEASE}-messenger-{role}-cluster-tls"
        assert ("public-tls" in volumes) == (role == "gateway")
        assert ("auth" in volumes) == (role == "gateway")
    service = rendered.get("Service", f"{RELEASE}-messenger-gateway")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"


def test_push_credentials_reach_only_the_notify_pods_as_files_its_config_names(production_render):
    deployments = production_render.by_component("Deployment")
    notify = deployments["notify"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in notify["volumes"]}
    assert volumes["push"]["secret"]["secretName"] == "messenger-push"
    mounted = {item["path"] for item in volumes["push"]["secret"]["items"]}
    assert mounted == {"apns-com.example.chat.p8", "fcm-example-chat.json", "vapid.pem"}
    mounts = {m["name"]: m for m in notify["containers"][0]["volumeMounts"]}
    assert mounts["push"]["mountPath"] == "/etc/messenger/push" and mounts["push"]["readOnly"]
    for role, deployment in deployments.items():
        names = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert ("push" in names) == (role == "notify"), role
    config = tomllib.loads(production_render.config_files()["notify"])["notify"]
    assert config["store"] == "scylla"
    assert config["apns"]["apps"] == [{"bundle_id": "com.example.chat", "team_id": "ABCDE12345",
                                       "key_id": "KEY1234567",
                                       "key_file": "/etc/messenger/push/apns-com.example.chat.p8"}]
    assert config["fcm"]["apps"] == [{"project_id": "example-chat",
                                      "service_account_file": "/etc/messenger/push/fcm-example-chat.json"}]
    assert config["web_push"]["vapid_key_file"] == "/etc/messenger/push/vapid.pem"
    assert config["web_push"]["subject"].startswith("mailto:")


BACKEND_TLS_DIRS = {backend: f"/etc/messenger/backend-tls/{backend}" for backend in ("scylla", "redis", "etcd")}


def component(obj) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def backend_tls_mounts(rendered: Rendered) -> dict[str, dict[str, tuple[dict, dict]]]:
    """Pod (role, `migrate` or `test`) -> backend -> its TLS volume and mount."""
    mounts = {}
    for obj, spec in containers_of(rendered):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (container,) = spec["containers"]
        by_name = {m["name"]: m for m in container.get("volumeMounts", [])}
        found = {}
        for backend, directory in BACKEND_TLS_DIRS.items():
            mount = by_name.get(f"{backend}-tls")
            assert (mount is None) == (f"{backend}-tls" not in volumes), f"{component(obj)}: volume and mount go together"
            if mount:
                found[backend] = (volumes[f"{backend}-tls"], mount)
        assert not any(m["mountPath"].startswith("/etc/messenger/backend-tls/") for m in by_name.values()
                       if m["name"] not in {f"{b}-tls" for b in found}), component(obj)
        mounts[component(obj)] = found
    return mounts


def dotted(config: dict, path: str):
    for key in path.split("."):
        config = config.get(key, {})
    return config


BACKEND_TLS_TABLES = {"scylla": ["scylla"], "redis": ["presence.redis", "message.cache.redis"],
                      "etcd": ["discovery.etcd"]}


def test_no_backend_tls_secret_is_mounted_by_default(default_render):
    assert all(found == {} for found in backend_tls_mounts(default_render).values())
    for role, text in default_render.config_files().items():
        config = tomllib.loads(text)
        for tables in BACKEND_TLS_TABLES.values():
            assert all("tls" not in dotted(config, table) for table in tables), role


def test_production_values_reach_every_backend_over_tls(production_render):
    """values-production.yaml: Scylla, Redis and etcd each over TLS, their
    CA (and for Redis and etcd a client certificate) mounted where a process
    connects, and every role's file naming them."""
    mounts = backend_tls_mounts(production_render)
    assert set(mounts["migrate"]) == {"scylla"}
    assert set(mounts["presence"]) == {"redis", "etcd"}
    assert set(mounts["message"]) == {"scylla", "redis", "etcd"}
    for role, text in production_render.config_files().items():
        config = tomllib.loads(text)
        for backend, tables in BACKEND_TLS_TABLES.items():
            for table in tables:
                if table == "discovery.etcd" and role == "migrate":
                    continue
                tls = dotted(config, table).get("tls", {})
                assert tls.get("ca_file", "").startswith(BACKEND_TLS_DIRS[backend]), (role, table, tls)
        if role != "migrate":
            assert all(e.startswith("https://") for e in config["discovery"]["etcd"]["endpoints"]), role


def test_backend_tls_of_a_backend_no_role_uses_mounts_nothing():
    """Presence and the cache in memory (the defaults): external.redis.tls has no pod to go to."""
    rendered = render({"external": {"redis": {"tls": {"enabled": True, "existingSecret": "redis-tls"}}}})
    assert all(found == {} for found in backend_tls_mounts(rendered).values())
    assert "redis" not in tomllib.loads(rendered.config_files()["presence"])["presence"]


@pytest.mark.parametrize(
    "backend, pods",
    [
        ("scylla", {"message", "media", "notify", "migrate"}),
        ("redis", {"message", "presence"}),
        ("etcd", set(ROLES)),
    ],
)
def test_backend_tls_secret_is_mounted_into_the_pods_that_connect_and_named_in_config(backend, pods):
    """external.<backend>.tls: the Secret's named keys only, read-only at the
    backend's directory, in exactly the pods whose process connects to it;
    every role's file names them (each process validates every section),
    the migrate Job's too for Scylla."""
    tls = {"enabled": True, "existingSecret": f"{backend}-client", "caKey": "ca.pem", "certKey": "client.pem",
           "keyKey": "client-key.pem", "serverName": f"{backend}.internal"}
    # Production's own backend TLS off, so only this backend's shows.
    plain = {b: {"tls": {"enabled": False, "certKey": "", "keyKey": "", "serverName": ""}} for b in BACKEND_TLS_DIRS}
    plain["etcd"]["endpoints"] = ["etcd-0.etcd:2379"]
    values = merged(SCENARIOS["production"], {"external": plain}, {"external": {backend: {"tls": tls}}})
    if backend == "etcd":
        values["external"]["etcd"]["endpoints"] = ["https://etcd-0.etcd:2379", "etcd-1.etcd:2379"]
    rendered = render(values)
    for obj in rendered.objects:
        kubernetes_validate.validate(Rendered.clean(obj), chart_kube_version(), strict=True)
    directory = BACKEND_TLS_DIRS[backend]
    mounts = backend_tls_mounts(rendered)
    assert {pod for pod, found in mounts.items() if found} == pods
    for pod in pods:
        assert set(mounts[pod]) == {backend}, pod
        volume, mount = mounts[pod][backend]
        assert volume["secret"] == {"secretName": f"{backend}-client", "defaultMode": 0o440,
                                    "items": [{"key": key, "path": key}
                                              for key in ("ca.pem", "client.pem", "client-key.pem")]}, pod
        assert mount == {"name": f"{backend}-tls", "mountPath": directory, "readOnly": True}, pod
    expected = {"ca_file": f"{directory}/ca.pem", "cert_file": f"{directory}/client.pem",
                "key_file": f"{directory}/client-key.pem", "server_name": f"{backend}.internal"}
    files = rendered.config_files()
    if backend == "scylla":
        (migrate,) = [c for c in rendered.kind("ConfigMap") if c["metadata"]["name"].endswith("-migrate")]
        files["migrate"] = migrate["data"]["migrate.toml"]
    for name, text in files.items():
        config = tomllib.loads(text)
        for other, tables in BACKEND_TLS_TABLES.items():
            for table in tables:
                assert dotted(config, table).get("tls") == (expected if other == backend else None), f"{name} {table}"


def test_scylla_tls_and_credentials_reach_only_the_stores_on_scylla():
    """Only media on Scylla: its pods and the migrate Job get the cluster's
    CA and credentials (MESSENGER_SCYLLA__*), the message pods on SQLite none."""
    rendered = render({"config": {"media": {"store": "scylla"}},
                       "roles": {"media": {"persistence": {"enabled": False}}},
                       "external": {"scylla": {"nodes": ["db:9042"], "existingSecret": "db",
                                               "tls": {"enabled": True, "existingSecret": "db-ca"}}}})
    mounts = backend_tls_mounts(rendered)
    assert {pod for pod, found in mounts.items() if found} == {"media", "migrate"}
    volume, _ = mounts["migrate"]["scylla"]
    assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}], "no client certificate unless named"
    pods = {component(obj): spec for obj, spec in containers_of(rendered)}
    for pod, spec in pods.items():
        env = {e["name"] for e in spec["containers"][0].get("env", [])}
        assert ({"MESSENGER_SCYLLA__USERNAME", "MESSENGER_SCYLLA__PASSWORD"} <= env) == (pod in {"media", "migrate"}), pod
        assert not any(name.startswith("MESSENGER_MESSAGE__SCYLLA__") for name in env), pod
    config = tomllib.loads(rendered.config_files()["media"])
    assert config["scylla"]["tls"] == {"ca_file": "/etc/messenger/backend-tls/scylla/ca.crt"}
    assert config["scylla"]["nodes"] == ["db:9042"]


def test_production_scales_with_autoscalers_and_budgets(production_render):
    autoscalers = production_render.by_component("HorizontalPodAutoscaler")
    assert sorted(autoscalers) == ROLES
    assert production_render.kind("PersistentVolumeClaim") == [], "every store is external"
    budgets = production_render.by_component("PodDisruptionBudget")
    assert sorted(budgets) == ROLES
    for role, deployment in production_render.by_component("Deployment").items():
        assert ("replicas" in deployment["spec"]) == (role not in autoscalers), role
        assert autoscalers.get(role, {}).get("spec", {}).get("minReplicas", 2) >= 2
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


def test_migrate_job_is_a_pre_install_hook_only_for_scylla(default_render, production_render):
    assert default_render.kind("Job") == []
    (job,) = production_render.kind("Job")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MESSENGER_SCYLLA__USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "messenger-scylla"
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "migrate"
    (config,) = [c for c in production_render.kind("ConfigMap") if c["metadata"]["name"].endswith("-migrate")]
    assert config["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(config["metadata"]["annotations"]["helm.sh/hook-weight"]) < \
        int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    assert tomllib.loads(config["data"]["migrate.toml"])["message"]["store"] == "scylla"


def test_helm_test_pod_asks_the_gateway_for_health(scenario):
    name, rendered = scenario
    (pod,) = rendered.kind("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    args = pod["spec"]["containers"][0]["args"]
    service = rendered.get("Service", f"{RELEASE}-messenger-gateway")
    assert f"-addr={RELEASE}-messenger-gateway:{service['spec']['ports'][0]['port']}" in args
    assert "-service=messenger.v1.GatewayService" in args
    assert ("-tls" in args) == (name == "production")


def test_a_new_role_is_one_values_entry():
    """What adding a role (e.g. notify) takes: one `roles` entry. Rendered
    here only; the chart ships no such role."""
    notify = {"ports": {"internal": {"port": 7740, "listenKey": "notify.listen",
                                     "healthService": "messenger.v1.NotifyService", "callers": ["message"]}},
              "probePort": "internal"}
    rendered = render({"roles": {"notify": notify}})
    assert rendered.by_component("Deployment")["notify"]["spec"]["template"]["spec"]["containers"][0]["args"][2] \
        == "notify"
    assert rendered.get("Service", f"{RELEASE}-messenger-notify-internal")["spec"]["ports"][0]["port"] == 7740
    policy = rendered.by_component("NetworkPolicy")["notify"]
    peer = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"]
    assert {"message"} in [set(e["values"]) for e in peer]
    assert "notify" in rendered.by_component("PodDisruptionBudget")
    assert tomllib.loads(rendered.config_files()["notify"])["notify"]["listen"] == "0.0.0.0:7740"


def test_the_default_install_runs_internal_hops_over_mutual_tls(default_render, tmp_path):
    """With no PKI of one's own, the chart makes a cluster CA and a
    certificate per role valid for exactly `<role>.messenger.internal`, and
    every role's configuration turns mutual TLS on. OpenSSL checks the
    certificates independently of the Helm functions that made them."""
    import base64
    import subprocess

    configs = {role: tomllib.loads(text) for role, text in default_render.config_files().items()}
    for role, config in configs.items():
        assert config["tls"]["insecure_cluster_plaintext"] is False, role
        assert config["tls"]["cluster_ca_file"] == "/etc/messenger/cluster-tls/ca.crt", role
    ca = default_render.get("Secret", f"{RELEASE}-messenger-cluster-ca")
    assert ca["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(base64.b64decode(ca["data"]["ca.crt"]))
    for role in ROLES:
        secret = default_render.get("Secret", f"{RELEASE}-messenger-{role}-cluster-tls")
        volumes = {v["name"]: v for v in default_render.by_component("Deployment")[role]["spec"]["template"]["spec"]
                   ["volumes"]}
        assert volumes["cluster-tls"]["secret"]["secretName"] == secret["metadata"]["name"]
        assert base64.b64decode(secret["data"]["ca.crt"]) == ca_file.read_bytes(), role
        cert = tmp_path / f"{role}.pem"
        cert.write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
        assert b"PRIVATE KEY" in base64.b64decode(secret["data"]["tls.key"]), role
        verified = subprocess.run(["openssl", "verify", "-CAfile", str(ca_file), "-purpose", "sslclient", str(cert)],
                                  capture_output=True, text=True)
        assert verified.returncode == 0, f"{role}: {verified.stdout}{verified.stderr}"
        names = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(cert)],
                               capture_output=True, text=True, check=True).stdout
        assert re.findall(r"DNS:([^,\s]+)", names) == [f"{role}.messenger.internal"], f"{role}: {names}"


def test_bringing_your_own_cluster_certificates_generates_none(production_render):
    secrets = {obj["metadata"]["name"] for obj in production_render.kind("Secret")}
    assert not any(name.endswith("cluster-tls") or name.endswith("cluster-ca") for name in secrets), secrets


def test_the_gateway_service_carries_the_browser_port_beside_grpc():
    """Browsers reach the web app, its WebSocket and gRPC-Web on the gateway's
    web port (HTTP/1.1), through the same public Service as the gRPC port;
    `service.port` renumbers only the gRPC port."""
    def ports(values):
        (service,) = [svc for svc in render(values).kind("Service")
                      if svc["metadata"]["name"].endswith("-gateway")]
        return {port["name"]: port for port in service["spec"]["ports"]}

    plain = ports({"roles": {"gateway": {"service": {"port": 443}}}})
    assert (plain["public"]["port"], plain["public"]["appProtocol"]) == (443, "kubernetes.io/h2c")
    assert (plain["web"]["port"], plain["web"]["appProtocol"]) == (7780, "http")
    tls = ports({"tls": {"public": {"enabled": True, "existingSecret": "gateway-tls"}}})
    assert "appProtocol" not in tls["public"]
    assert tls["web"]["appProtocol"] == "https"
