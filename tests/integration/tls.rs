//! TLS to PostgreSQL: every `PG_SSLMODE` against a cluster with `ssl = on` whose certificate is
//! signed by a CA generated here with the openssl CLI, for the server and the test client; and
//! client certificates (`PG_SSLCERT_B64`, `PG_SSLKEY_B64`) for a role that the cluster lets in
//! only with one (`cert` authentication).
//!
//! The listener's backend is found in `pg_stat_activity` by its application name and its last
//! query (`LISTEN "<channel>"`, unique per test), and `pg_stat_ssl` tells whether it is encrypted.
//! A refused connection must leave the service serving: `/status` 200 with `listener:
//! connecting`, `/ready` 503, new websocket clients accepted, retries going on, and exactly one
//! WARN line naming the cause, never the password.

use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use tokio::sync::OnceCell;

use crate::harness::{
    CLIENT_BIN, PgCluster, PgTlsOpts, Server, ServerOpts, http_get, next_event, run_bin,
};

/// Set as `PG_PASSWORD` everywhere here: it must never show up in any output.
const PASSWORD_MARKER: &str = "pw-marker-5Qx9-never-logged";
/// A role that must authenticate with a password (scram) on the TLS cluster.
const PW_USER: &str = "vulcan_pw";
const PW_RIGHT: &str = "right-pw-7Tg2-never-logged";
/// A role that must present a client certificate with its name as CN, signed by the test CA.
const CERT_USER: &str = "vulcan_cert";

/// Test certificates (PEM text): two unrelated CAs, two server certificates signed by the first
/// one, and client certificates for [`CERT_USER`].
struct Pki {
    ca: String,
    other_ca: String,
    /// `CN=localhost`, SAN `DNS:localhost, IP:127.0.0.1`.
    localhost_cert: String,
    localhost_key: String,
    /// `CN=db.example`, SAN `DNS:db.example` only.
    db_example_cert: String,
    db_example_key: String,
    /// `CN=vulcan_cert`, signed by `ca`, EC key in PKCS#8 and in SEC1 (`EC PRIVATE KEY`).
    client_cert: String,
    client_key: String,
    client_key_sec1: String,
    /// The same with an RSA key, in PKCS#1 (`RSA PRIVATE KEY`).
    client_rsa_cert: String,
    client_rsa_key_pkcs1: String,
    /// `CN=vulcan_cert`, signed by `other_ca`.
    foreign_cert: String,
    foreign_key: String,
}

/// `openssl req -newkey` options for a P-256 key and for an RSA key.
const EC_KEY: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
const RSA_KEY: &[&str] = &["-newkey", "rsa:2048"];

/// Runs `openssl args` in `dir`; a missing openssl is a clear failure, not a skip.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = match Command::new("openssl").args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(err) if err.kind() == ErrorKind::NotFound => bail!(
            "the `openssl` command is needed to generate the test certificates and was not \
             found on PATH (Debian: apt-get install openssl)"
        ),
        Err(err) => return Err(err).context("run openssl"),
    };
    ensure!(
        out.status.success(),
        "openssl {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A self-signed CA `<name>.crt`/`<name>.key` in `dir`.
fn make_ca(dir: &Path, name: &str, subject: &str) -> Result<()> {
    openssl(
        dir,
        &[
            &["req", "-x509", "-new"],
            EC_KEY,
            &[
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
                "-days",
                "2",
                "-subj",
                subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    )
}

/// A server certificate `<name>.crt`/`<name>.key` for `cn` with `san`, signed by CA `ca`.
fn make_server_cert(dir: &Path, ca: &str, name: &str, cn: &str, san: &str) -> Result<()> {
    let usage = format!("extendedKeyUsage = serverAuth\nsubjectAltName = {san}\n");
    make_cert(dir, ca, name, cn, EC_KEY, &usage)
}

/// A client certificate `<name>.crt`/`<name>.key` for `cn`, signed by CA `ca`, with the key
/// also in OpenSSL's traditional form (SEC1 or PKCS#1) as `<name>.trad.key`.
fn make_client_cert(dir: &Path, ca: &str, name: &str, cn: &str, newkey: &[&str]) -> Result<()> {
    make_cert(dir, ca, name, cn, newkey, "extendedKeyUsage = clientAuth\n")?;
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            &format!("{name}.key"),
            "-traditional",
            "-out",
            &format!("{name}.trad.key"),
        ],
    )
}

/// A certificate `<name>.crt`/`<name>.key` (PKCS#8) for `cn`, signed by CA `ca`, with a key
/// made by `newkey` and the extensions `usage` beside the end-entity constraints.
fn make_cert(
    dir: &Path,
    ca: &str,
    name: &str,
    cn: &str,
    newkey: &[&str],
    usage: &str,
) -> Result<()> {
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!(
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             {usage}"
        ),
    )?;
    openssl(
        dir,
        &[
            &["req", "-new"],
            newkey,
            &[
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        ]
        .concat(),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &ext,
        ],
    )
}

fn generate_pki() -> Result<Pki> {
    let dir = tempfile::Builder::new().prefix("vulcan-pki-").tempdir()?;
    let d = dir.path();
    make_ca(d, "ca", "/CN=vulcan-stream test CA")?;
    make_ca(d, "other-ca", "/CN=unrelated test CA")?;
    make_server_cert(
        d,
        "ca",
        "localhost",
        "localhost",
        "DNS:localhost, IP:127.0.0.1",
    )?;
    make_server_cert(d, "ca", "db-example", "db.example", "DNS:db.example")?;
    make_client_cert(d, "ca", "client", CERT_USER, EC_KEY)?;
    make_client_cert(d, "ca", "client-rsa", CERT_USER, RSA_KEY)?;
    make_client_cert(d, "other-ca", "foreign", CERT_USER, EC_KEY)?;
    let read =
        |name: &str| std::fs::read_to_string(d.join(name)).with_context(|| format!("read {name}"));
    Ok(Pki {
        ca: read("ca.crt")?,
        other_ca: read("other-ca.crt")?,
        localhost_cert: read("localhost.crt")?,
        localhost_key: read("localhost.key")?,
        db_example_cert: read("db-example.crt")?,
        db_example_key: read("db-example.key")?,
        client_cert: read("client.crt")?,
        client_key: read("client.key")?,
        client_key_sec1: read("client.trad.key")?,
        client_rsa_cert: read("client-rsa.crt")?,
        client_rsa_key_pkcs1: read("client-rsa.trad.key")?,
        foreign_cert: read("foreign.crt")?,
        foreign_key: read("foreign.key")?,
    })
}

/// Generated once per test process (the temporary directory is gone afterwards; the PEM text
/// is kept).
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| generate_pki().expect("generate test certificates with openssl"))
}

/// `PG_CA_B64`'s form of a PEM bundle.
fn b64(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem)
}

/// The two TLS clusters, started together on first use (initdb dominates the cost).
struct TlsClusters {
    /// Serves the `localhost` certificate; role [`PW_USER`] must give a password, role
    /// [`CERT_USER`] a client certificate signed by the test CA.
    localhost: PgCluster,
    /// Serves the `db.example` certificate.
    db_example: PgCluster,
}

async fn start_localhost_cluster() -> Result<PgCluster> {
    let pki = pki();
    let pg = PgCluster::private_tls(&PgTlsOpts {
        cert_pem: pki.localhost_cert.clone(),
        key_pem: pki.localhost_key.clone(),
        // The certificate rules name their role: the harness itself connects as `postgres`
        // without TLS, through initdb's `trust` rule.
        hba_first: vec![
            format!("host all {PW_USER} 127.0.0.1/32 scram-sha-256"),
            format!("hostssl all {CERT_USER} 127.0.0.1/32 cert clientcert=verify-full"),
            format!("host all {CERT_USER} 127.0.0.1/32 reject"),
        ],
        client_ca_pem: Some(pki.ca.clone()),
    })
    .await
    .context("start the TLS cluster (localhost certificate)")?;
    pg.connect("postgres")
        .await?
        .batch_execute(&format!(
            "CREATE ROLE {PW_USER} LOGIN PASSWORD '{PW_RIGHT}'; CREATE ROLE {CERT_USER} LOGIN"
        ))
        .await
        .context("create the password and certificate roles")?;
    Ok(pg)
}

async fn start_db_example_cluster() -> Result<PgCluster> {
    let pki = pki();
    PgCluster::private_tls(&PgTlsOpts {
        cert_pem: pki.db_example_cert.clone(),
        key_pem: pki.db_example_key.clone(),
        hba_first: Vec::new(),
        client_ca_pem: None,
    })
    .await
    .context("start the TLS cluster (db.example certificate)")
}

async fn tls_clusters() -> &'static TlsClusters {
    static CLUSTERS: OnceCell<TlsClusters> = OnceCell::const_new();
    CLUSTERS
        .get_or_init(|| async {
            // Separate tasks: initdb blocks its thread.
            pki();
            let localhost = tokio::spawn(start_localhost_cluster());
            let db_example = tokio::spawn(start_db_example_cluster());
            let (localhost, db_example) = (localhost.await, db_example.await);
            TlsClusters {
                localhost: localhost.expect("task").expect("TLS cluster"),
                db_example: db_example.expect("task").expect("TLS cluster"),
            }
        })
        .await
}

async fn localhost_db() -> &'static PgCluster {
    &tls_clusters().await.localhost
}

async fn db_example_db() -> &'static PgCluster {
    &tls_clusters().await.db_example
}

/// A server on `pg` with `PG_HOST=host`, `PG_SSLMODE=mode`, the password marker, and debug logs
/// (the receiver logs each retry at debug).
fn tls_opts(pg: &PgCluster, channel: &str, host: &str, mode: &str) -> ServerOpts {
    ServerOpts::with_db(pg, channel)
        .env("PG_HOST", host)
        .env("PG_SSLMODE", mode)
        .env("PG_PASSWORD", PASSWORD_MARKER)
        .env("LOG_LEVEL", "debug")
        // The health query would replace `LISTEN "<channel>"` as the backend's last query,
        // which is how [`listener_ssl`] finds it.
        .env("PG_HEALTH_INTERVAL", 3600)
}

/// Whether the backend LISTENing on `channel` for application `vulcan-stream` uses TLS, and its
/// TLS version.
async fn listener_ssl(pg: &PgCluster, channel: &str) -> Result<(bool, Option<String>)> {
    let client = pg.client().await?;
    let listen = format!("LISTEN \"{channel}\"");
    let rows = client
        .query(
            "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'vulcan-stream' AND a.query = $1",
            &[&listen],
        )
        .await
        .context("query pg_stat_ssl")?;
    ensure!(
        rows.len() == 1,
        "expected one vulcan-stream backend with query {listen:?}, found {}",
        rows.len()
    );
    Ok((rows[0].get(0), rows[0].get(1)))
}

/// The server is ready, its LISTEN backend has `ssl = encrypted`, and a NOTIFY reaches a client.
async fn assert_listening(
    server: &Server,
    pg: &PgCluster,
    channel: &str,
    encrypted: bool,
) -> Result<()> {
    let (ssl, version) = listener_ssl(pg, channel).await?;
    assert_eq!(
        ssl, encrypted,
        "pg_stat_ssl.ssl of the listener on {channel:?} (TLS version {version:?})"
    );
    if encrypted {
        assert!(
            version.as_deref().is_some_and(|v| v.starts_with("TLS")),
            "TLS version {version:?}"
        );
    }
    let mut ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    let payload = format!(r#"{{"action":"tls","check_id":"{channel}"}}"#);
    pg.notify(channel, &payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);
    let stderr = server.stderr();
    assert!(
        !stderr.contains(PASSWORD_MARKER),
        "password in stderr:\n{stderr}"
    );
    Ok(())
}

/// What OpenSSL says (lowercased) when the chain does not lead to a trusted CA.
const CHAIN_REFUSED: &str = "certificate verify failed";

/// Lines of `text` at WARN that report a failed connection attempt.
fn connect_warnings(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.contains(" WARN ") && l.contains("cannot connect"))
        .collect()
}

/// The server could not connect and keeps serving: it retried (at least two more attempts after
/// the first), logged exactly one WARN about it containing one of `causes` (lowercase), never
/// the password, and `/status`, `/ready`, `/stream` and `/metrics` answer as they should while
/// the listener is down. Returns the WARN line.
async fn assert_refused(server: &Server, causes: &[&str]) -> Result<String> {
    let text = server
        .wait_log(|t| t.contains("(attempt 3)"))
        .await
        .context("waiting for the third connection attempt")?;
    let warnings = connect_warnings(&text);
    assert_eq!(
        warnings.len(),
        1,
        "expected exactly one WARN about the failed connection:\n{text}"
    );
    let warning = warnings[0].to_owned();
    let lower = warning.to_lowercase();
    assert!(
        causes.iter().any(|c| lower.contains(c)),
        "WARN line does not name the cause (one of {causes:?}): {warning}"
    );
    assert!(
        !text.contains(PASSWORD_MARKER),
        "password in stderr:\n{text}"
    );

    let status = server.status().await?;
    assert_eq!(status["listener"], "connecting", "{status}");
    let ready = http_get(server.port(), "/ready").await?;
    assert_eq!(ready.status, 503, "/ready: {ready:?}");
    assert_eq!(server.metric("vulcan_stream_listener_up").await?, 0.0);
    let _ws = server.ws().await?;
    server.wait_for_clients(1).await?;
    // Still down after all that: the refusal is not a transient.
    assert_eq!(server.status().await?["listener"], "connecting");
    Ok(warning)
}

// ---------------------------------------------------------------------------------------------
// The server binary
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn disable_connects_without_tls() -> Result<()> {
    let pg = localhost_db().await;
    let channel = "tls-disable";
    let server = Server::spawn(tls_opts(pg, channel, "127.0.0.1", "disable")).await?;
    assert_listening(&server, pg, channel, false).await
}

/// A CA with `disable` is not an error (the original accepted it), but it is not used in
/// silence either: one warning says so.
#[tokio::test(flavor = "multi_thread")]
async fn disable_with_a_ca_connects_without_tls_and_warns_that_the_ca_is_unused() -> Result<()> {
    let pg = localhost_db().await;
    let channel = "tls-disable-ca";
    let opts = tls_opts(pg, channel, "127.0.0.1", "disable").env("PG_CA_B64", b64(&pki().ca));
    let server = Server::spawn(opts).await?;
    assert_listening(&server, pg, channel, false).await?;
    let stderr = server.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("PG_CA_B64"))
        .collect();
    ensure!(
        warnings.len() == 1 && warnings[0].contains("sslmode is disable"),
        "one warning about the unused CA: {stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn prefer_allow_and_require_connect_encrypted_without_a_ca() -> Result<()> {
    let pg = localhost_db().await;
    // `allow` is documented (src/pg.rs) to behave as `prefer`: TLS when offered.
    for mode in ["prefer", "allow", "require"] {
        let channel = format!("tls-{mode}");
        let server = Server::spawn(tls_opts(pg, &channel, "127.0.0.1", mode))
            .await
            .with_context(|| format!("sslmode {mode}"))?;
        assert_listening(&server, pg, &channel, true)
            .await
            .with_context(|| format!("sslmode {mode}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_ca_with_the_right_ca_connects() -> Result<()> {
    let pg = localhost_db().await;
    let channel = "tls-verify-ca";
    // 127.0.0.1 on purpose: verify-ca checks the chain, not the name.
    let opts = tls_opts(pg, channel, "127.0.0.1", "verify-ca").env("PG_CA_B64", b64(&pki().ca));
    let server = Server::spawn(opts).await?;
    assert_listening(&server, pg, channel, true).await
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_ca_with_a_wrong_ca_is_refused_and_the_server_keeps_serving() -> Result<()> {
    let pg = localhost_db().await;
    let opts = tls_opts(pg, "tls-verify-ca-wrong", "localhost", "verify-ca")
        .env("PG_CA_B64", b64(&pki().other_ca))
        .no_wait_ready();
    let server = Server::spawn(opts).await?;
    assert_refused(&server, &[CHAIN_REFUSED]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_ca_without_a_ca_uses_the_system_roots_and_is_refused() -> Result<()> {
    let pg = localhost_db().await;
    let opts = tls_opts(pg, "tls-verify-ca-no-ca", "localhost", "verify-ca").no_wait_ready();
    let server = Server::spawn(opts).await?;
    assert_refused(&server, &[CHAIN_REFUSED]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_connects_when_the_host_is_in_the_certificate() -> Result<()> {
    let pg = localhost_db().await;
    // The certificate names DNS:localhost and IP:127.0.0.1.
    for (channel, host) in [
        ("tls-verify-full-name", "localhost"),
        ("tls-verify-full-ip", "127.0.0.1"),
    ] {
        let opts = tls_opts(pg, channel, host, "verify-full").env("PG_CA_B64", b64(&pki().ca));
        let server = Server::spawn(opts)
            .await
            .with_context(|| format!("verify-full, PG_HOST={host}"))?;
        assert_listening(&server, pg, channel, true)
            .await
            .with_context(|| format!("verify-full, PG_HOST={host}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_host_not_in_the_certificate() -> Result<()> {
    let pg = db_example_db().await;
    let ca = b64(&pki().ca);
    // The chain is good: verify-ca accepts this certificate on 127.0.0.1 ...
    let channel = "tls-db-example-verify-ca";
    let opts = tls_opts(pg, channel, "127.0.0.1", "verify-ca").env("PG_CA_B64", &ca);
    let server = Server::spawn(opts).await?;
    assert_listening(&server, pg, channel, true).await?;
    // ... but the certificate is for db.example only, so verify-full refuses 127.0.0.1 and
    // localhost, naming the host name as the cause.
    // OpenSSL names the check by the kind of host.
    for (host, cause) in [
        ("127.0.0.1", "(ip address mismatch)"),
        ("localhost", "(hostname mismatch)"),
    ] {
        let opts = tls_opts(pg, "tls-db-example-verify-full", host, "verify-full")
            .env("PG_CA_B64", &ca)
            .no_wait_ready();
        let server = Server::spawn(opts).await?;
        assert_refused(&server, &[cause])
            .await
            .with_context(|| format!("verify-full, PG_HOST={host}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn require_against_a_server_without_tls_is_refused() -> Result<()> {
    // The shared cluster runs with ssl = off.
    let pg = PgCluster::shared().await;
    let opts = tls_opts(pg, "tls-require-no-ssl", "127.0.0.1", "require").no_wait_ready();
    let server = Server::spawn(opts).await?;
    assert_refused(&server, &["server does not support tls"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn require_with_a_ca_verifies_the_chain_as_libpq_does() -> Result<()> {
    let pg = localhost_db().await;
    let channel = "tls-require-right-ca";
    let opts = tls_opts(pg, channel, "127.0.0.1", "require").env("PG_CA_B64", b64(&pki().ca));
    let server = Server::spawn(opts).await?;
    assert_listening(&server, pg, channel, true).await?;

    let opts = tls_opts(pg, "tls-require-wrong-ca", "127.0.0.1", "require")
        .env("PG_CA_B64", b64(&pki().other_ca))
        .no_wait_ready();
    let server = Server::spawn(opts).await?;
    assert_refused(&server, &[CHAIN_REFUSED]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_is_refused_with_an_authentication_cause() -> Result<()> {
    let pg = localhost_db().await;
    let opts = tls_opts(pg, "tls-wrong-password", "localhost", "verify-full")
        .env("PG_CA_B64", b64(&pki().ca))
        .env("PG_USER", PW_USER)
        .no_wait_ready();
    let server = Server::spawn(opts).await?;
    assert_refused(&server, &["password authentication failed"]).await?;

    // The right password connects; it is not logged either.
    let channel = "tls-right-password";
    let opts = tls_opts(pg, channel, "localhost", "verify-full")
        .env("PG_CA_B64", b64(&pki().ca))
        .env("PG_USER", PW_USER)
        .env("PG_PASSWORD", PW_RIGHT);
    let server = Server::spawn(opts).await?;
    let rows = pg
        .client()
        .await?
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = $1 AND a.query = $2",
            &[&PW_USER, &format!("LISTEN \"{channel}\"")],
        )
        .await?;
    assert_eq!(rows.len(), 1, "one listener backend for {PW_USER}");
    assert!(rows[0].get::<_, bool>(0), "listener not encrypted");
    let stderr = server.stderr();
    assert!(!stderr.contains(PW_RIGHT), "password in stderr:\n{stderr}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Client certificates
// ---------------------------------------------------------------------------------------------

/// A server connecting as [`CERT_USER`] with verify-full, presenting `identity` (certificate and
/// key, PEM) if given.
fn cert_opts(pg: &PgCluster, channel: &str, identity: Option<(&str, &str)>) -> ServerOpts {
    let opts = tls_opts(pg, channel, "localhost", "verify-full")
        .env("PG_CA_B64", b64(&pki().ca))
        .env("PG_USER", CERT_USER);
    match identity {
        Some((cert, key)) => opts
            .env("PG_SSLCERT_B64", b64(cert))
            .env("PG_SSLKEY_B64", b64(key)),
        None => opts,
    }
}

/// The subject of the client certificate that the backend LISTENing on `channel` was given.
async fn listener_client_dn(pg: &PgCluster, channel: &str) -> Result<Option<String>> {
    let rows = pg
        .client()
        .await?
        .query(
            "SELECT s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = $1 AND a.query = $2",
            &[&CERT_USER, &format!("LISTEN \"{channel}\"")],
        )
        .await
        .context("query pg_stat_ssl.client_dn")?;
    ensure!(
        rows.len() == 1,
        "one listener backend for {CERT_USER} on {channel:?}"
    );
    Ok(rows[0].get(0))
}

/// Neither the key's PEM body nor its base64 appears in `text`.
fn assert_key_not_in(text: &str, key_pem: &str) {
    let body_line = key_pem.lines().nth(1).expect("a PEM key has a body");
    assert!(
        !text.contains(body_line) && !text.contains(&b64(key_pem)[..40]),
        "private key material in the output:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_lets_its_role_in_whatever_the_key_form() -> Result<()> {
    let pg = localhost_db().await;
    let pki = pki();
    for (n, (form, cert, key)) in [
        ("EC key in PKCS#8", &pki.client_cert, &pki.client_key),
        ("EC key in SEC1", &pki.client_cert, &pki.client_key_sec1),
        (
            "RSA key in PKCS#1",
            &pki.client_rsa_cert,
            &pki.client_rsa_key_pkcs1,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let channel = format!("tls-client-cert-{n}");
        let opts = cert_opts(pg, &channel, Some((cert, key)));
        let server = Server::spawn(opts.clone()).await.context(form)?;
        let ready = http_get(server.port(), "/ready").await?;
        assert_eq!(ready.status, 200, "{form}: /ready {ready:?}");
        assert_listening(&server, pg, &channel, true)
            .await
            .context(form)?;
        assert_eq!(
            listener_client_dn(pg, &channel).await?,
            Some(format!("/CN={CERT_USER}")),
            "{form}"
        );
        assert_key_not_in(&server.stderr(), key);

        if n == 0 {
            // The test client takes the same settings, the certificate included.
            let mut env = opts.env.clone();
            env.insert("PORT".into(), server.port().to_string());
            let env = env.into_iter().collect::<Vec<_>>();
            let out = run_bin(CLIENT_BIN, &["--timeout", "10"], &env, CLIENT_GUARD).await?;
            assert_eq!(out.code, Some(0), "test client with a certificate: {out:?}");
            assert_key_not_in(&format!("{}{}", out.stdout, out.stderr), key);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_client_certificate_the_role_is_refused() -> Result<()> {
    let pg = localhost_db().await;
    let opts = cert_opts(pg, "tls-no-client-cert", None).no_wait_ready();
    let server = Server::spawn(opts).await?;
    assert_refused(&server, &["connection requires a valid client certificate"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_from_another_ca_is_refused() -> Result<()> {
    let pg = localhost_db().await;
    let identity = (pki().foreign_cert.as_str(), pki().foreign_key.as_str());
    let opts = cert_opts(pg, "tls-foreign-client-cert", Some(identity)).no_wait_ready();
    let server = Server::spawn(opts).await?;
    // TLS 1.3: the server's alert, or the reset that follows it when that arrives first (see
    // `pg::describe_connect_error`); either way one WARN.
    assert_refused(&server, &["alert unknown ca", "refuses the certificate"]).await?;
    assert_key_not_in(&server.stderr(), identity.1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The test client
// ---------------------------------------------------------------------------------------------

/// Guard well above every timeout the client is given.
const CLIENT_GUARD: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn test_client_verifies_the_database_certificate() -> Result<()> {
    let pg = localhost_db().await;
    let channel = "tls-test-client";
    let server_opts =
        tls_opts(pg, channel, "localhost", "verify-full").env("PG_CA_B64", b64(&pki().ca));
    let server = Server::spawn(server_opts.clone()).await?;
    // The client takes the server's configuration, its own sslmode and CA, and PORT.
    let client_env = |mode: &str, ca: Option<&str>, pg_port: u16| {
        let mut env = server_opts.env.clone();
        env.insert("PORT".into(), server.port().to_string());
        env.insert("PG_PORT".into(), pg_port.to_string());
        env.insert("PG_SSLMODE".into(), mode.into());
        env.remove("PG_CA_B64");
        if let Some(ca) = ca {
            env.insert("PG_CA_B64".into(), b64(ca));
        }
        env.into_iter().collect::<Vec<_>>()
    };
    let run = |env: Vec<(String, String)>| async move {
        let out = run_bin(CLIENT_BIN, &["--timeout", "10"], &env, CLIENT_GUARD).await?;
        for text in [&out.stdout, &out.stderr] {
            assert!(
                !text.contains(PASSWORD_MARKER),
                "password in output: {out:?}"
            );
        }
        anyhow::Ok(out)
    };

    let out = run(client_env("verify-ca", Some(&pki().ca), pg.port())).await?;
    assert_eq!(out.code, Some(0), "verify-ca with the right CA: {out:?}");

    let out = run(client_env("verify-ca", Some(&pki().other_ca), pg.port())).await?;
    assert_eq!(out.code, Some(1), "verify-ca with a wrong CA: {out:?}");
    assert!(
        out.stderr.to_lowercase().contains(CHAIN_REFUSED),
        "no certificate cause: {out:?}"
    );
    assert_eq!(
        out.stderr.trim_end().lines().count(),
        1,
        "one line: {out:?}"
    );
    assert!(
        out.elapsed < Duration::from_secs(10),
        "a refused database must fail at once, not at the timeout: {out:?}"
    );

    // The shared cluster has ssl = off.
    let plain = PgCluster::shared().await;
    let out = run(client_env("require", None, plain.port())).await?;
    assert_eq!(out.code, Some(1), "require against ssl = off: {out:?}");
    Ok(())
}
