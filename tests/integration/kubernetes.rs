//! The Kubernetes manifests in `_resources/kubernetes/`: every file parses, and what they assume
//! about the server is what the server and its image do. The ports, probe paths, user id, grace
//! period and proxy timeouts are read from the manifests and checked against the image's
//! `config.toml`, the Dockerfile, the configuration loader and a running server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use yaml_rust2::{Yaml, YamlLoader};

use crate::harness::{PgCluster, Server, ServerOpts, free_port, http_get, ws_connect};

/// One document of a manifest file.
struct Manifest {
    file: String,
    doc: Yaml,
}

impl Manifest {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn manifest_dir() -> PathBuf {
    repo_root().join("_resources").join("kubernetes")
}

/// Every document of every `*.yaml`/`*.yml` file in the manifest directory, files in name order.
/// Empty documents (a stray `---`) are skipped.
fn manifests() -> Result<Vec<Manifest>> {
    let dir = manifest_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| {
        p.extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
    });
    files.sort();
    ensure!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut out = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .expect("read_dir entries have a file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {file}"))?;
        let docs = YamlLoader::load_from_str(&text).with_context(|| format!("parse {file}"))?;
        ensure!(
            docs.iter().any(|d| !d.is_null()),
            "{file} holds no document"
        );
        out.extend(
            docs.into_iter()
                .filter(|d| !d.is_null())
                .map(|doc| Manifest {
                    file: file.clone(),
                    doc,
                }),
        );
    }
    Ok(out)
}

/// The one object of `kind` among the manifests.
fn the<'a>(manifests: &'a [Manifest], kind: &str) -> Result<&'a Manifest> {
    let found: Vec<&Manifest> = manifests.iter().filter(|m| m.kind() == kind).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] => bail!("no {kind} among the manifests"),
        many => bail!(
            "{} objects of kind {kind}: {:?}",
            many.len(),
            many.iter().map(|m| &m.file).collect::<Vec<_>>()
        ),
    }
}

/// The Deployment's only container.
fn container(deployment: &Manifest) -> Result<&Yaml> {
    let containers = deployment.doc["spec"]["template"]["spec"]["containers"]
        .as_vec()
        .context("Deployment: spec.template.spec.containers is not a list")?;
    ensure!(
        containers.len() == 1,
        "Deployment: expected one container, found {}",
        containers.len()
    );
    Ok(&containers[0])
}

/// A string-to-string map (labels, selectors, annotations); `None` if absent or not all strings.
fn string_map(yaml: &Yaml) -> Option<BTreeMap<String, String>> {
    yaml.as_hash()?
        .iter()
        .map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect()
}

/// The container's literal `env` values (`value:`), by name.
fn literal_env(container: &Yaml) -> BTreeMap<String, String> {
    container["env"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(|var| {
            let value = match &var["value"] {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                _ => return None,
            };
            Some((var["name"].as_str()?.to_string(), value))
        })
        .collect()
}

/// The `env` entry named `name`.
fn env_var<'a>(container: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    container["env"]
        .as_vec()?
        .iter()
        .find(|var| var["name"].as_str() == Some(name))
}

/// A probe's or Service's port (a number or the name of a container port) as a number.
fn resolve_port(container: &Yaml, port: &Yaml) -> Result<i64> {
    match port {
        Yaml::Integer(n) => Ok(*n),
        Yaml::String(name) => container["ports"]
            .as_vec()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
            .with_context(|| format!("no container port named {name:?}")),
        other => bail!("not a port: {other:?}"),
    }
}

/// The image's `config.toml` (the file the container runs with).
fn image_config_path() -> PathBuf {
    repo_root().join("config.toml")
}

/// `key` of `[section]` in the image's config.toml, names compared case-insensitively as the
/// server does.
fn image_config_value(section: &str, key: &str) -> Result<toml::Value> {
    let text = std::fs::read_to_string(image_config_path()).context("read config.toml")?;
    let table: toml::Table = text.parse().context("config.toml is not valid TOML")?;
    let (_, section_table) = table
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(section))
        .with_context(|| format!("config.toml has no [{section}]"))?;
    section_table
        .as_table()
        .and_then(|t| t.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)))
        .map(|(_, v)| v.clone())
        .with_context(|| format!("config.toml has no {section}.{key}"))
}

/// The configuration a replica runs with: the image's config.toml, overridden by the
/// Deployment's literal environment, loaded by the server's own loader (Secret values are not
/// known here and stay unset).
fn pod_config(container: &Yaml) -> Result<vulcan_stream::Config> {
    let env = literal_env(container);
    let loaded = vulcan_stream::Config::load(Some(&image_config_path()), &|name| {
        env.get(name).filter(|v| !v.is_empty()).cloned()
    })
    .context("the image's config.toml with the Deployment's environment does not load")?;
    Ok(loaded.config)
}

#[test]
fn every_manifest_parses_and_names_its_object() -> Result<()> {
    let manifests = manifests()?;
    for m in &manifests {
        ensure!(
            m.doc["apiVersion"].as_str().is_some_and(|s| !s.is_empty()),
            "{}: a document without apiVersion",
            m.file
        );
        ensure!(!m.kind().is_empty(), "{}: a document without kind", m.file);
        ensure!(
            !m.name().is_empty(),
            "{}: {} without metadata.name",
            m.file,
            m.kind()
        );
    }
    for kind in [
        "Deployment",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "Secret",
    ] {
        the(&manifests, kind)?;
    }
    Ok(())
}

#[test]
fn probes_service_and_server_agree_on_the_port() -> Result<()> {
    let manifests = manifests()?;
    let deployment = the(&manifests, "Deployment")?;
    let service = the(&manifests, "Service")?;
    let container = container(deployment)?;

    let liveness = &container["livenessProbe"]["httpGet"];
    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(liveness["path"].as_str(), Some("/status"), "liveness path");
    assert_eq!(readiness["path"].as_str(), Some("/ready"), "readiness path");
    let liveness_port = resolve_port(container, &liveness["port"]).context("livenessProbe")?;
    let readiness_port = resolve_port(container, &readiness["port"]).context("readinessProbe")?;

    let service_ports = service.doc["spec"]["ports"]
        .as_vec()
        .context("Service: spec.ports is not a list")?;
    ensure!(service_ports.len() == 1, "Service: expected one port");
    assert_eq!(service_ports[0]["port"].as_i64(), Some(80), "Service port");
    let target = &service_ports[0]["targetPort"];
    let target_port = resolve_port(container, target).context("Service targetPort")?;

    let file_port = image_config_value("Sender", "HTTPPort")?
        .as_integer()
        .context("config.toml: Sender.HTTPPort is not an integer")?;
    let pod_port = i64::from(pod_config(container)?.sender.port);

    assert_eq!(liveness_port, target_port, "liveness probe vs Service");
    assert_eq!(readiness_port, target_port, "readiness probe vs Service");
    assert_eq!(
        target_port, file_port,
        "Service targets a port other than config.toml's HTTPPort"
    );
    assert_eq!(
        pod_port, file_port,
        "the Deployment's PORT moves the server off config.toml's HTTPPort"
    );

    let annotations = string_map(&deployment.doc["spec"]["template"]["metadata"]["annotations"])
        .context("pod template annotations")?;
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&file_port.to_string()),
        "Prometheus scrapes another port"
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    Ok(())
}

/// The probe paths, the metrics path and the Ingress path, requested from the real binary run
/// with the image's config.toml and the Deployment's environment (database and port pointed at
/// the test's own).
#[tokio::test(flavor = "multi_thread")]
async fn the_running_server_answers_the_paths_the_manifests_use() -> Result<()> {
    let manifests = manifests()?;
    let deployment = the(&manifests, "Deployment")?;
    let ingress = the(&manifests, "Ingress")?;
    let container = container(deployment)?;
    let liveness = container["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .context("livenessProbe path")?;
    let readiness = container["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .context("readinessProbe path")?;
    let metrics = string_map(&deployment.doc["spec"]["template"]["metadata"]["annotations"])
        .and_then(|a| a.get("prometheus.io/path").cloned())
        .context("prometheus.io/path annotation")?;
    let stream = ingress.doc["spec"]["rules"][0]["http"]["paths"][0]["path"]
        .as_str()
        .context("Ingress path")?;
    let config = std::fs::read_to_string(image_config_path())?;

    let pod_opts = |pg_port: u16| {
        let mut opts = ServerOpts::new().config(config.clone());
        opts.env.extend(literal_env(container));
        opts.env("PG_CHANNEL", "kubernetes-paths")
            .env("PORT", "0")
            .env("PG_HOST", "127.0.0.1")
            .env("PG_PORT", pg_port)
            .env("PG_DB", crate::harness::DB_NAME)
            .env("PG_USER", "postgres")
            .env("PG_SSLMODE", "disable")
    };

    // No database: alive, not ready.
    let down = Server::spawn(pod_opts(free_port()).no_wait_ready()).await?;
    let resp = http_get(down.port(), liveness).await?;
    assert_eq!(
        resp.status, 200,
        "liveness {liveness} without a database: {resp:?}"
    );
    let resp = http_get(down.port(), readiness).await?;
    assert_eq!(
        resp.status, 503,
        "readiness {readiness} without a database: {resp:?}"
    );
    drop(down);

    // With the database: ready once LISTEN is active.
    let pg = PgCluster::shared().await;
    let up = Server::spawn(pod_opts(pg.port()).no_wait_ready()).await?;
    up.wait_http(|r| r.status == 200, readiness, "readiness 200")
        .await?;
    let resp = http_get(up.port(), liveness).await?;
    assert_eq!(resp.status, 200, "liveness {liveness}: {resp:?}");
    let resp = http_get(up.port(), &metrics).await?;
    assert_eq!(resp.status, 200, "metrics {metrics}: {resp:?}");
    assert!(
        resp.text().contains("vulcan_stream_listener_up"),
        "{metrics} is not the Prometheus text: {resp:?}"
    );
    ws_connect(up.port(), stream)
        .await
        .with_context(|| format!("websocket on the Ingress path {stream}"))?;
    Ok(())
}

#[test]
fn database_secrets_come_from_the_secret() -> Result<()> {
    let manifests = manifests()?;
    let deployment = the(&manifests, "Deployment")?;
    let secret = the(&manifests, "Secret")?;
    let container = container(deployment)?;
    for name in ["PG_PASSWORD", "PG_CA_B64"] {
        let var = env_var(container, name).with_context(|| format!("no env {name}"))?;
        ensure!(
            var["value"].is_badvalue(),
            "{name} has a literal value in the Deployment"
        );
        let secret_ref = &var["valueFrom"]["secretKeyRef"];
        let ref_name = secret_ref["name"]
            .as_str()
            .with_context(|| format!("{name}: no valueFrom.secretKeyRef.name"))?;
        let key = secret_ref["key"]
            .as_str()
            .with_context(|| format!("{name}: no valueFrom.secretKeyRef.key"))?;
        assert_eq!(
            ref_name,
            secret.name(),
            "{name} refers to another Secret than the example"
        );
        let in_example = ["stringData", "data"]
            .iter()
            .any(|field| !secret.doc[*field][key].is_badvalue());
        ensure!(
            in_example,
            "the example Secret has no key {key} (for {name})"
        );
    }
    Ok(())
}

#[test]
fn containers_run_as_the_image_user_without_privileges() -> Result<()> {
    let manifests = manifests()?;
    let deployment = the(&manifests, "Deployment")?;
    let pod = &deployment.doc["spec"]["template"]["spec"]["securityContext"];
    let container = container(deployment)?;
    let ctx = &container["securityContext"];
    // A container setting overrides the pod's.
    let effective = |key: &str| {
        if ctx[key].is_badvalue() {
            &pod[key]
        } else {
            &ctx[key]
        }
    };

    assert_eq!(
        effective("runAsNonRoot").as_bool(),
        Some(true),
        "runAsNonRoot"
    );
    assert_eq!(
        ctx["readOnlyRootFilesystem"].as_bool(),
        Some(true),
        "readOnlyRootFilesystem"
    );
    assert_eq!(
        ctx["allowPrivilegeEscalation"].as_bool(),
        Some(false),
        "allowPrivilegeEscalation"
    );
    let dropped: Vec<&str> = ctx["capabilities"]["drop"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(Yaml::as_str)
        .collect();
    assert_eq!(dropped, ["ALL"], "capabilities.drop");
    assert_eq!(
        effective("seccompProfile")["type"].as_str(),
        Some("RuntimeDefault"),
        "seccompProfile"
    );

    // runAsNonRoot needs a numeric user; it must be the one the image was built for.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile"))?;
    let user = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("USER "))
        .next_back()
        .context("Dockerfile has no USER")?; // the last USER is the runtime stage's
    let uid: i64 = user
        .split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .with_context(|| format!("Dockerfile USER {user:?} is not numeric"))?;
    assert_eq!(effective("runAsUser").as_i64(), Some(uid), "runAsUser");
    Ok(())
}

#[test]
fn resources_are_requested_and_limited() -> Result<()> {
    let manifests = manifests()?;
    let container = container(the(&manifests, "Deployment")?)?;
    for bound in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            let value = &container["resources"][bound][resource];
            ensure!(
                value.as_str().is_some() || value.as_i64().is_some(),
                "resources.{bound}.{resource} missing"
            );
        }
    }
    Ok(())
}

#[test]
fn pods_outlive_the_server_shutdown_grace() -> Result<()> {
    let manifests = manifests()?;
    let deployment = the(&manifests, "Deployment")?;
    let grace = deployment.doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .context("terminationGracePeriodSeconds")?;
    let server_grace = i64::try_from(vulcan_stream::SHUTDOWN_GRACE.as_secs())?;
    ensure!(
        grace > server_grace,
        "terminationGracePeriodSeconds {grace} does not exceed the server's {server_grace} s"
    );
    Ok(())
}

#[test]
fn ingress_routes_the_stream_and_outlasts_the_ping_interval() -> Result<()> {
    let manifests = manifests()?;
    let deployment = the(&manifests, "Deployment")?;
    let service = the(&manifests, "Service")?;
    let ingress = the(&manifests, "Ingress")?;
    let config = pod_config(container(deployment)?)?;

    // Timeouts: the file's PingInterval, as the pod runs it (PING_INTERVAL would override it).
    let file_ping = image_config_value("Sender", "PingInterval")?
        .as_integer()
        .context("config.toml: Sender.PingInterval is not an integer")?;
    let ping = i64::try_from(config.sender.ping_interval.as_secs())?;
    assert_eq!(ping, file_ping, "the pod's ping interval vs config.toml");
    let annotations =
        string_map(&ingress.doc["metadata"]["annotations"]).context("Ingress annotations")?;
    for key in [
        "nginx.ingress.kubernetes.io/proxy-read-timeout",
        "nginx.ingress.kubernetes.io/proxy-send-timeout",
    ] {
        let timeout: i64 = annotations
            .get(key)
            .with_context(|| format!("no {key}"))?
            .parse()
            .with_context(|| format!("{key} is not a number of seconds"))?;
        ensure!(
            timeout > ping,
            "{key} = {timeout} s does not exceed the ping interval ({ping} s)"
        );
    }
    assert_eq!(
        ingress.doc["spec"]["ingressClassName"].as_str(),
        Some("nginx")
    );
    ensure!(
        !ingress.doc["spec"]["tls"][0]["secretName"].is_badvalue(),
        "Ingress has no TLS section"
    );

    // Routing: the websocket path to the Service's port.
    let paths = ingress.doc["spec"]["rules"][0]["http"]["paths"]
        .as_vec()
        .context("Ingress: spec.rules[0].http.paths")?;
    ensure!(paths.len() == 1, "Ingress: expected one path");
    let path = &paths[0];
    assert_eq!(
        path["path"].as_str(),
        Some(format!("/{}", config.sender.stream_path).as_str()),
        "Ingress path vs the server's stream path"
    );
    let backend = &path["backend"]["service"];
    assert_eq!(backend["name"].as_str(), Some(service.name()));
    let service_port = &service.doc["spec"]["ports"][0];
    let by_name = backend["port"]["name"].as_str().is_some()
        && backend["port"]["name"].as_str() == service_port["name"].as_str();
    let by_number = backend["port"]["number"].as_i64().is_some()
        && backend["port"]["number"].as_i64() == service_port["port"].as_i64();
    ensure!(
        by_name || by_number,
        "Ingress backend port {:?} is not the Service's port",
        backend["port"]
    );
    Ok(())
}

#[test]
fn service_and_disruption_budget_select_the_deployments_pods() -> Result<()> {
    let manifests = manifests()?;
    let deployment = the(&manifests, "Deployment")?;
    let pod_labels = string_map(&deployment.doc["spec"]["template"]["metadata"]["labels"])
        .context("pod template labels")?;
    let selects_pods = |what: &str, selector: &Yaml| -> Result<()> {
        let selector = string_map(selector).with_context(|| format!("{what} selector"))?;
        ensure!(!selector.is_empty(), "{what} selector is empty");
        for (key, value) in &selector {
            ensure!(
                pod_labels.get(key) == Some(value),
                "{what} selects {key}={value}, the pods have {pod_labels:?}"
            );
        }
        Ok(())
    };
    selects_pods(
        "Deployment",
        &deployment.doc["spec"]["selector"]["matchLabels"],
    )?;
    selects_pods(
        "Service",
        &the(&manifests, "Service")?.doc["spec"]["selector"],
    )?;
    let pdb = the(&manifests, "PodDisruptionBudget")?;
    selects_pods(
        "PodDisruptionBudget",
        &pdb.doc["spec"]["selector"]["matchLabels"],
    )?;

    let replicas = deployment.doc["spec"]["replicas"]
        .as_i64()
        .context("replicas")?;
    let min_available = pdb.doc["spec"]["minAvailable"]
        .as_i64()
        .context("PodDisruptionBudget minAvailable")?;
    assert_eq!(min_available, 1);
    ensure!(
        min_available < replicas,
        "minAvailable {min_available} leaves no replica evictable of {replicas}"
    );
    Ok(())
}
