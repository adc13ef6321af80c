//! The monitoring component (`deploy/kubernetes/monitoring/`), held to the service it watches:
//! promtool checks the PrometheusRule's rules and runs their unit tests
//! (`tests/monitoring/alerts_test.yaml`), in which every alert fires; every alert has a
//! severity, a summary, a description and a runbook section in the README; and every PromQL
//! expression of the rules and of the Grafana dashboard parses, and names only metrics and
//! labels the real binary exports (scraped from two replicas: one on Redis with a callers
//! policy, a client secret file and calls of several outcomes, one with TLS), and only reasons
//! the proto's `ErrorReason` has. promtool is Debian's `prometheus` package, which `make test`
//! installs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::certs::{Ca, SecretMount};
use common::process::ServiceProcess;
use common::redis_server::RedisServer;
use common::tools::{run_to_end, tool};
use common::{CLIENT_ID, FakeCognito, forgot};
use password_recovery::error::ErrorReason;
use password_recovery::proto::v1::ForgotPasswordRequest;
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};
use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn component(name: &str) -> PathBuf {
    root().join("deploy/kubernetes/monitoring").join(name)
}

fn promtool() -> PathBuf {
    tool(
        "promtool",
        "apt-get install prometheus (Debian's package ships promtool)",
    )
}

fn prometheus_rule() -> Value {
    let text = std::fs::read_to_string(component("prometheusrule.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(component("dashboard.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every rule of the PrometheusRule, alerts and recording rules alike.
fn rules() -> Vec<Value> {
    let rule = prometheus_rule();
    rule["spec"]["groups"]
        .as_sequence()
        .expect("spec.groups")
        .iter()
        .flat_map(|group| group["rules"].as_sequence().expect("rules").clone())
        .collect()
}

fn alerts() -> Vec<Value> {
    rules()
        .into_iter()
        .filter(|rule| rule.get("alert").is_some())
        .collect()
}

fn name_of(alert: &Value) -> String {
    alert["alert"].as_str().unwrap().to_owned()
}

#[test]
fn promtool_checks_the_rules_and_every_alert_fires_in_their_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let spec = serde_yaml::to_string(&prometheus_rule()["spec"]).unwrap();
    std::fs::write(dir.path().join("rules.yaml"), spec).unwrap();
    let tests = root().join("tests/monitoring/alerts_test.yaml");
    std::fs::copy(&tests, dir.path().join("alerts_test.yaml")).unwrap();

    let (ok, out) = run_to_end(
        Command::new(promtool())
            .args(["check", "rules", "rules.yaml"])
            .current_dir(dir.path()),
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run_to_end(
        Command::new(promtool())
            .args(["test", "rules", "alerts_test.yaml"])
            .current_dir(dir.path()),
    );
    assert!(ok, "promtool test rules:\n{out}");

    // Each alert is seen to fire by at least one case.
    let cases: Value = serde_yaml::from_str(&std::fs::read_to_string(&tests).unwrap()).unwrap();
    let fired: BTreeSet<String> = cases["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|test| {
            test["alert_rule_test"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|case| {
            case["exp_alerts"]
                .as_sequence()
                .is_some_and(|expected| !expected.is_empty())
        })
        .map(|case| case["alertname"].as_str().unwrap().to_owned())
        .collect();
    let names: BTreeSet<String> = alerts().iter().map(name_of).collect();
    let untested: Vec<&String> = names.difference(&fired).collect();
    assert!(
        untested.is_empty(),
        "alerts no case sees fire: {untested:?}"
    );
}

/// The `####` headings of the README's "### Alerts" section.
fn runbook_headings() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let section = readme
        .split("\n### Alerts\n")
        .nth(1)
        .expect("the README's Alerts section");
    let section = section.split("\n## ").next().unwrap();
    let section = section.split("\n### ").next().unwrap();
    section
        .lines()
        .filter_map(|line| line.strip_prefix("#### "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_alert_says_how_bad_what_and_where_its_runbook_is() {
    let headings = runbook_headings();
    let mut names = BTreeSet::new();
    for alert in alerts() {
        let name = name_of(&alert);
        assert!(names.insert(name.clone()), "{name} twice");
        let severity = alert["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        for annotation in ["summary", "description"] {
            let text = alert["annotations"][annotation]
                .as_str()
                .unwrap_or_default();
            assert!(!text.trim().is_empty(), "{name}: no {annotation}");
        }
        assert_eq!(
            alert["annotations"]["runbook_url"].as_str(),
            Some(format!("README.md#{}", name.to_lowercase()).as_str()),
            "{name}"
        );
        assert!(headings.contains(&name), "README has no runbook for {name}");
    }
    let stale: Vec<&String> = headings.difference(&names).collect();
    assert!(stale.is_empty(), "runbooks of no alert: {stale:?}");
}

#[test]
fn the_component_lists_its_manifests_and_provisions_the_dashboard() {
    let text = std::fs::read_to_string(component("kustomization.yaml")).unwrap();
    let kustomization: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(kustomization["kind"], "Component");
    let resources: BTreeSet<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        resources,
        BTreeSet::from(["prometheusrule.yaml", "servicemonitor.yaml"])
    );
    let generator = &kustomization["configMapGenerator"][0];
    assert_eq!(generator["options"]["labels"]["grafana_dashboard"], "1");
    let files = format!("{:?}", generator["files"]);
    assert!(files.contains("dashboard.json"), "{files}");

    // The ServiceMonitor scrapes the Service's metrics port at the server's path.
    let text = std::fs::read_to_string(component("servicemonitor.yaml")).unwrap();
    let monitor: Value = serde_yaml::from_str(&text).unwrap();
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    assert_eq!(endpoint["path"], "/metrics");
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/service.yaml")).unwrap();
    let service: Value = serde_yaml::from_str(&text).unwrap();
    assert!(
        service["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|port| port["name"] == "metrics")
    );
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .unwrap()
    {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key:?}");
    }
}

/// What the scrape exports: each series name and the labels seen on it.
type Exported = BTreeMap<String, BTreeSet<String>>;

fn exported(scrapes: &[String]) -> Exported {
    let mut exported = Exported::new();
    for line in scrapes.iter().flat_map(|s| s.lines()) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').unwrap().0;
        let (name, mut rest) = series.split_once('{').unwrap_or((series, ""));
        let labels = exported.entry(name.to_owned()).or_default();
        // `name="value",…}`; values are quoted and may hold escaped quotes.
        while let Some((label, after)) = rest.split_once("=\"") {
            labels.insert(label.trim_start_matches(',').to_owned());
            let mut escaped = false;
            let end = after
                .char_indices()
                .find(|&(_, c)| {
                    let closes = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map(|(i, _)| i)
                .expect("a closed value");
            rest = &after[end + 1..];
        }
    }
    exported
}

/// Labels Prometheus adds to every series it scrapes through the ServiceMonitor.
const TARGET_LABELS: [&str; 7] = [
    "namespace",
    "pod",
    "job",
    "instance",
    "service",
    "endpoint",
    "container",
];

/// Every metric selector of `expr` and every label it groups or matches by.
#[derive(Default)]
struct Uses {
    selectors: Vec<VectorSelector>,
    grouping: BTreeSet<String>,
}

fn walk(expr: &Expr, uses: &mut Uses) {
    let modifier = |m: &LabelModifier, uses: &mut Uses| {
        uses.grouping.extend(m.labels().labels.iter().cloned());
    };
    match expr {
        Expr::Aggregate(aggregate) => {
            if let Some(m) = &aggregate.modifier {
                modifier(m, uses);
            }
            walk(&aggregate.expr, uses);
            if let Some(param) = &aggregate.param {
                walk(param, uses);
            }
        }
        Expr::Unary(unary) => walk(&unary.expr, uses),
        Expr::Binary(binary) => {
            if let Some(m) = binary.modifier.as_ref().and_then(|m| m.matching.as_ref()) {
                modifier(m, uses);
            }
            walk(&binary.lhs, uses);
            walk(&binary.rhs, uses);
        }
        Expr::Paren(paren) => walk(&paren.expr, uses),
        Expr::Subquery(subquery) => walk(&subquery.expr, uses),
        Expr::VectorSelector(selector) => uses.selectors.push(selector.clone()),
        Expr::MatrixSelector(matrix) => uses.selectors.push(matrix.vs.clone()),
        Expr::Call(call) => {
            for arg in &call.args.args {
                walk(arg, uses);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The values a matcher on `label` allows, when it lists them (`a`, or `a|b|c`).
fn listed_values(matcher: &Matcher) -> Option<Vec<String>> {
    match &matcher.op {
        MatchOp::Equal | MatchOp::NotEqual => Some(vec![matcher.value.clone()]),
        MatchOp::Re(_) | MatchOp::NotRe(_) => {
            let plain = matcher
                .value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|');
            plain.then(|| matcher.value.split('|').map(str::to_owned).collect())
        }
    }
}

/// The problems of one PromQL expression (`origin` says where it is) against `exported`.
fn check_expression(origin: &str, promql: &str, exported: &Exported) -> Vec<String> {
    let expr = match parser::parse(promql) {
        Ok(expr) => expr,
        Err(err) => return vec![format!("{origin}: does not parse: {err}\n  {promql}")],
    };
    let mut uses = Uses::default();
    walk(&expr, &mut uses);
    let mut problems = Vec::new();
    let mut known_labels: BTreeSet<String> = TARGET_LABELS.map(str::to_owned).into();
    known_labels.insert("le".into());
    let reasons: BTreeSet<String> = (1..)
        .map_while(|n| ErrorReason::try_from(n).ok())
        .map(|r| r.as_str_name().to_owned())
        .collect();
    for selector in &uses.selectors {
        let name = selector.name.clone().or_else(|| {
            selector
                .matchers
                .matchers
                .iter()
                .find(|m| m.name == "__name__")
                .map(|m| m.value.clone())
        });
        let Some(name) = name else {
            problems.push(format!("{origin}: a selector without a metric name"));
            continue;
        };
        // `up` is Prometheus's own, about the target.
        let labels = match (name.as_str(), exported.get(&name)) {
            ("up", _) => BTreeSet::new(),
            (_, Some(labels)) => labels.clone(),
            (_, None) => {
                problems.push(format!("{origin}: {name} is not exported"));
                continue;
            }
        };
        known_labels.extend(labels.iter().cloned());
        for matcher in &selector.matchers.matchers {
            let label = &matcher.name;
            if label != "__name__" && !labels.contains(label) && !TARGET_LABELS.contains(&&**label)
            {
                problems.push(format!("{origin}: {name} has no label {label}"));
            }
            if label == "reason" && name.starts_with("grpc_server_handled") {
                for value in listed_values(matcher).unwrap_or_default() {
                    if !reasons.contains(&value) {
                        problems.push(format!("{origin}: {value} is no ErrorReason"));
                    }
                }
            }
        }
    }
    for label in &uses.grouping {
        if !known_labels.contains(label) {
            problems.push(format!("{origin}: groups by {label}, which no metric has"));
        }
    }
    problems
}

/// The dashboard's expressions, with Grafana's variables as a query would have them.
fn dashboard_expressions() -> Vec<(String, String)> {
    let dashboard = dashboard();
    let mut found = Vec::new();
    let mut panels: Vec<serde_json::Value> =
        dashboard["panels"].as_array().cloned().unwrap_or_default();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        let title = panel["title"].as_str().unwrap_or("?").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                found.push((format!("panel {title:?}"), expr.to_owned()));
            }
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let query = variable["query"]
            .as_str()
            .or_else(|| variable["query"]["query"].as_str());
        // label_values(metric, label): the metric selector, and its label grouped by.
        if let Some(inner) = query.and_then(|q| q.strip_prefix("label_values(")) {
            let (metric, label) = inner.trim_end_matches(')').rsplit_once(',').unwrap();
            let expr = format!("count by ({}) ({})", label.trim(), metric.trim());
            found.push((format!("variable {}", variable["name"]), expr));
        }
    }
    let grafana = |expr: &str| {
        expr.replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("${client}", ".*")
            .replace("$client", ".*")
            .replace("${namespace}", ".*")
            .replace("$namespace", ".*")
    };
    found
        .into_iter()
        .map(|(origin, expr)| (origin, grafana(&expr)))
        .collect()
}

async fn scrapes() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, common::CLIENT_SECRET).unwrap();
    let key = dir.path().join("username-hash-key");
    std::fs::write(&key, "monitoring-username-hash-key-0123456789").unwrap();
    let callers = dir.path().join("callers.toml");
    std::fs::write(&callers, "[callers.anonymous]\nclients = [\"default\"]\n").unwrap();
    let cognito = FakeCognito::start().await;
    let redis = RedisServer::start().await;
    let (secret, callers, key) = (
        secret.to_str().unwrap(),
        callers.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let fleet = ServiceProcess::start(&[
        ("COGNITO_CLIENT_ID", CLIENT_ID),
        ("COGNITO_CLIENT_SECRET_FILE", secret),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL", cognito.url.as_str()),
        ("RATE_LIMIT_REDIS_URL", redis.url.as_str()),
        ("USERNAME_HASH_KEY_FILE", key),
        ("CALLERS_FILE", callers),
    ])
    .await;
    let mut client = fleet.client().await;
    // A delivery, a retry answered from memory, a refusal with its reason.
    let with_id = ForgotPasswordRequest {
        request_id: "0b5e7c1a-2f4d-4c8e-9a6b-3d1f5e7a9c2b".into(),
        ..forgot("monitoring@example.com")
    };
    client.forgot_password(with_id.clone()).await.unwrap();
    client.forgot_password(with_id).await.unwrap();
    client.forgot_password(forgot("")).await.unwrap_err();

    let ca = Ca::new("monitoring-ca");
    let mount = SecretMount::new(&ca.server("localhost"), None);
    let tls = ServiceProcess::against(
        &cognito,
        &[
            ("TLS_CERT_FILE", mount.cert().to_str().unwrap()),
            ("TLS_KEY_FILE", mount.key().to_str().unwrap()),
        ],
    )
    .await;
    vec![fleet.scrape().await, tls.scrape().await]
}

#[tokio::test]
async fn every_expression_parses_and_names_only_what_the_binary_exports() {
    let exported = exported(&scrapes().await);
    let mut expressions: Vec<(String, String)> = rules()
        .iter()
        .map(|rule| {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            (
                format!("rule {name}"),
                rule["expr"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let panels = dashboard_expressions();
    assert!(panels.len() >= 20, "{} dashboard expressions", panels.len());
    expressions.extend(panels);
    let problems: Vec<String> = expressions
        .iter()
        .flat_map(|(origin, expr)| check_expression(origin, expr, &exported))
        .collect();
    assert!(
        problems.is_empty(),
        "{}\n\nexported: {exported:#?}",
        problems.join("\n")
    );

    // The check finds what it is for.
    for wrong in [
        "rate(grpc_server_handled_totl[5m])",
        "sum by (reason) (rate(cognito_requests_total[5m]))",
        r#"grpc_server_handled_total{reason="RATE_LIMITTED"}"#,
        r#"cognito_request_seconds_bucket{client="x"}"#,
    ] {
        assert!(
            !check_expression("probe", wrong, &exported).is_empty(),
            "{wrong} passed"
        );
    }
}
