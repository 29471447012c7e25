//! Test harness: a throwaway PostgreSQL cluster, the real binaries, a websocket client, a raw
//! HTTP/1.1 client and a Server-Sent Events client.
//!
//! Every wait is on an event (a log line, a readiness probe, a client count, a frame) bounded by a
//! deadline; deadlines only turn a hang into a failure.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OnceCell, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Failure guard for a single wait (a frame, a probe, a log line).
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Database the tests' servers use.
pub const DB_NAME: &str = "stream";
/// The server binary under test.
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_vulcan-stream");
/// The load generator's package and binary.
const BENCH: &str = "vulcan-stream-bench";
/// The test client binary under test.
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_vulcan-stream-test-client");
/// The text frame the server sends every PingInterval.
pub const PING: &str = r#"{"action":"ping"}"#;

/// How long PostgreSQL may take to accept connections (initdb and start on a slow machine).
const PG_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between readiness probes (a polled endpoint has no event to wait on).
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------------
// A TCP proxy the test controls
// ---------------------------------------------------------------------------------------------

/// What every connection of a [`Proxy`] obeys.
#[derive(Debug, Clone, Copy, Default)]
struct ProxyState {
    /// Bumped to drop every connection open at that moment.
    cuts: u64,
    /// Nothing is forwarded and nothing is closed, and new connections get no answer, until it
    /// is cleared: a network partition. TCP would hold the bytes and send them again after it,
    /// so held bytes are forwarded then, not lost.
    blackholed: bool,
}

/// A TCP proxy to a local port (a server, or PostgreSQL) whose connections the test can cut at
/// once, as a load balancer or a network blip would, or blackhole until it heals, as a network
/// partition would.
pub struct Proxy {
    port: u16,
    state: watch::Sender<ProxyState>,
}

impl Proxy {
    pub async fn start(target: u16) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (state, _) = watch::channel(ProxyState::default());
        let watcher = state.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let state = watcher.subscribe();
                tokio::spawn(proxy_connection(inbound, target, state));
            }
        });
        Ok(Proxy { port, state })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        self.state.send_modify(|s| s.cuts += 1);
    }

    /// Stops forwarding, without closing anything, until [`Proxy::heal`].
    pub fn blackhole(&self) {
        self.state.send_modify(|s| s.blackholed = true);
    }

    pub fn heal(&self) {
        self.state.send_modify(|s| s.blackholed = false);
    }
}

/// Waits while the proxy is blackholed; false once the connection is cut (or the proxy gone).
async fn proxy_open(state: &mut watch::Receiver<ProxyState>, cuts: u64) -> bool {
    loop {
        let now = *state.borrow_and_update();
        if now.cuts != cuts {
            return false;
        }
        if !now.blackholed {
            return true;
        }
        if state.changed().await.is_err() {
            return false;
        }
    }
}

/// Forwards one connection in both directions, obeying the proxy's state.
async fn proxy_connection(inbound: TcpStream, target: u16, mut state: watch::Receiver<ProxyState>) {
    let cuts = state.borrow().cuts;
    // A connection that arrives during a partition is not answered until it heals.
    if !proxy_open(&mut state, cuts).await {
        return;
    }
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let (from_client, to_client) = inbound.into_split();
    let (from_target, to_target) = outbound.into_split();
    tokio::select! {
        _ = proxy_pump(from_client, to_target, state.clone(), cuts) => {}
        _ = proxy_pump(from_target, to_client, state, cuts) => {}
    }
}

/// Copies `from` to `to`, reading and writing only while the proxy is open; ends at EOF, an
/// error or a cut.
async fn proxy_pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<ProxyState>,
    cuts: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !proxy_open(&mut state, cuts).await {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.changed() => continue,
        };
        if !proxy_open(&mut state, cuts).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// Directory holding `initdb` and `postgres`: `pg_config --bindir`, then PATH, then the highest
/// version under /usr/lib/postgresql. Panics when none is found: the suite needs a database and
/// must not pass by skipping.
fn pg_bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        let has_server =
            |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return dir;
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            if let Some(dir) = std::env::split_paths(&path).find(|d| has_server(d)) {
                return dir;
            }
        }
        let mut versioned: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let version = name
                    .split('.')
                    .map(|part| part.parse::<u32>().ok())
                    .collect::<Option<Vec<u32>>>()?;
                let bin = entry.path().join("bin");
                has_server(&bin).then_some((version, bin))
            })
            .collect();
        versioned.sort();
        match versioned.pop() {
            Some((_, dir)) => dir,
            None => panic!(
                "PostgreSQL server binaries (initdb, postgres) not found: tried `pg_config \
                 --bindir`, PATH and /usr/lib/postgresql/*/bin. Install the PostgreSQL server \
                 to run the integration tests."
            ),
        }
    })
}

/// PostgreSQL refuses to run as root: as root, initdb and postgres run as user `postgres`.
fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A port that was free a moment ago (bound on 127.0.0.1:0 and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Runs `argv` to completion (as `postgres` when root) and fails with its output on error.
fn run_pg_tool(cwd: &Path, argv: &[&std::ffi::OsStr]) -> Result<()> {
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c.args(argv);
        c
    } else {
        let mut c = Command::new(argv[0]);
        c.args(&argv[1..]);
        c
    };
    let out = cmd
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {argv:?}"))?;
    ensure!(
        out.status.success(),
        "{argv:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The reaper: runs postgres in the background and exits when it exits. A line on stdin stops
/// postgres: `stop` keeps the data directory; anything else, or EOF (the test process exited, even
/// if it was killed), also removes the cluster directory. SIGINT is PostgreSQL's fast shutdown: it
/// does not wait for clients to disconnect.
const REAPER: &str = r#"exec 3<&0
"$@" </dev/null & pid=$!
{ read -r cmd <&3; kill -INT "$pid"; [ "$cmd" = stop ]; } </dev/null & reader=$!
wait "$pid"; code=$?
kill "$reader" 2>/dev/null; wait "$reader"; how=$?
[ "$how" = 1 ] && rm -rf -- "$VULCAN_TEST_PG_DIR"
exit "$code""#;

/// A throwaway PostgreSQL cluster (trust auth, user `postgres`, database `stream`).
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    /// The running reaper (see [`REAPER`]) and the write end of its stdin; `None` while stopped.
    proc: Mutex<Option<(Child, ChildStdin)>>,
}

impl PgCluster {
    /// The cluster shared by every ordinary test of this process. Tests keep apart by channel.
    /// It lives until the process exits; the reaper then stops it and removes its directory.
    pub async fn shared() -> &'static PgCluster {
        static SHARED: OnceCell<PgCluster> = OnceCell::const_new();
        SHARED
            .get_or_init(|| async {
                PgCluster::private()
                    .await
                    .expect("start the shared PostgreSQL cluster")
            })
            .await
    }

    /// A cluster of its own, for a test that stops and starts the database.
    pub async fn private() -> Result<PgCluster> {
        let dir = tempfile::Builder::new()
            .prefix("vulcan-pg-")
            .tempdir()
            .context("create cluster directory")?;
        if running_as_root() {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .context("chown cluster directory")?;
            ensure!(
                status.success(),
                "chown postgres: {}: {status}",
                dir.path().display()
            );
        }
        let data = dir.path().join("data");
        run_pg_tool(
            dir.path(),
            &[
                pg_bindir().join("initdb").as_os_str(),
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let mut cluster = PgCluster {
            dir,
            port: free_port(),
            proc: Mutex::new(None),
        };
        // A port picked by bind-and-release can be taken before postgres binds it: retry.
        let mut attempt = 1;
        while let Err(err) = cluster.start().await {
            if attempt == 3 {
                return Err(err);
            }
            attempt += 1;
            cluster.port = free_port();
        }
        cluster.create_database(DB_NAME).await?;
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// libpq-style connection string for `dbname`.
    pub fn conn_str(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname} connect_timeout=5",
            self.port
        )
    }

    /// The environment pointing a binary at this cluster, database `stream`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("PG_HOST", "127.0.0.1".to_string()),
            ("PG_PORT", self.port.to_string()),
            ("PG_DB", DB_NAME.to_string()),
            ("PG_USER", "postgres".to_string()),
            ("PG_SSLMODE", "disable".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts postgres on this cluster's port and data directory; returns once it accepts
    /// connections.
    pub async fn start(&self) -> Result<()> {
        self.spawn_reaper()?;
        self.wait_accepting().await
    }

    fn spawn_reaper(&self) -> Result<()> {
        let mut guard = self.proc.lock().unwrap();
        ensure!(guard.is_none(), "cluster already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open postgres.log")?;
        let postgres = pg_bindir().join("postgres");
        let mut cmd = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "sh", "-c", REAPER, "sh"]);
            c
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", REAPER, "sh"]);
            c
        };
        cmd.arg(&postgres)
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .env("VULCAN_TEST_PG_DIR", self.dir.path())
            .current_dir(self.dir.path())
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd.spawn().context("spawn postgres")?;
        let stdin = child.stdin.take().expect("stdin is piped");
        *guard = Some((child, stdin));
        Ok(())
    }

    /// Retries a connection until postgres accepts it, failing at once if postgres exits.
    async fn wait_accepting(&self) -> Result<()> {
        let deadline = Instant::now() + PG_START_TIMEOUT;
        loop {
            {
                let mut guard = self.proc.lock().unwrap();
                let (child, _) = guard.as_mut().context("cluster stopped while starting")?;
                if let Some(status) = child.try_wait()? {
                    *guard = None;
                    bail!(
                        "postgres on port {} exited early ({status}):\n{}",
                        self.port,
                        self.log()
                    );
                }
            }
            match tokio_postgres::connect(&self.conn_str("postgres"), tokio_postgres::NoTls).await {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() > deadline => {
                    bail!(
                        "postgres on port {} not ready after {PG_START_TIMEOUT:?}: {err}\n{}",
                        self.port,
                        self.log()
                    )
                }
                Err(_) => tokio::time::sleep(PROBE_INTERVAL).await,
            }
        }
    }

    /// Stops postgres (fast shutdown), keeping the data directory; returns once it has exited.
    pub async fn stop(&self) -> Result<()> {
        let (mut child, mut stdin) = self
            .proc
            .lock()
            .unwrap()
            .take()
            .context("cluster not running")?;
        stdin.write_all(b"stop\n").context("signal the reaper")?;
        drop(stdin);
        let status =
            tokio::time::timeout(TIMEOUT, tokio::task::spawn_blocking(move || child.wait()))
                .await
                .context("postgres did not stop in time")???;
        ensure!(
            status.success(),
            "reaper exited with {status}:\n{}",
            self.log()
        );
        Ok(())
    }

    async fn create_database(&self, name: &str) -> Result<()> {
        let client = self.connect("postgres").await?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("create database {name}"))?;
        Ok(())
    }

    /// A client on `dbname`; its connection runs on the current runtime.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.conn_str(dbname), tokio_postgres::NoTls)
                .await
                .with_context(|| format!("connect to postgres on port {}", self.port))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// A client on database `stream`.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        self.connect(DB_NAME).await
    }

    /// `SELECT pg_notify(channel, payload)`, committed when this returns.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        notify(&self.client().await?, channel, payload).await
    }

    /// `count` notifications in one statement (one transaction), payload [`seq_payload`]`(i)`
    /// for i in 0..count, in that order.
    pub async fn notify_seq(&self, channel: &str, count: i32) -> Result<()> {
        self.client()
            .await?
            .execute(
                r#"SELECT pg_notify($1, format('{"action":"seq","seq":%s}', g))
                   FROM generate_series(0, $2 - 1) AS g"#,
                &[&channel, &count],
            )
            .await
            .with_context(|| format!("notify {count} on {channel}"))?;
        Ok(())
    }

    /// Replaces `pg_hba.conf` with `content` and asks postgres to reload it. A reload is
    /// asynchronous: the caller waits for its effect.
    pub async fn set_hba(&self, content: &str) -> Result<()> {
        let path = self.dir.path().join("data").join("pg_hba.conf");
        // Truncating the existing file keeps its owner (postgres) and mode.
        std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
        self.connect("postgres")
            .await?
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .context("pg_reload_conf")?;
        Ok(())
    }

    /// Pids of the backends whose `application_name` is `name`, oldest first.
    pub async fn backend_pids(&self, application_name: &str) -> Result<Vec<i32>> {
        let rows = self
            .connect("postgres")
            .await?
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
                 ORDER BY backend_start",
                &[&application_name],
            )
            .await
            .context("query pg_stat_activity")?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// Settings and files of a cluster that speaks TLS (see [`PgCluster::private_tls`]).
#[derive(Clone, Debug, Default)]
pub struct PgTlsOpts {
    /// The server certificate (PEM), installed as `ssl_cert_file`.
    pub cert_pem: String,
    /// Its private key (PEM), installed as `ssl_key_file` (mode 0600, owned by the server user).
    pub key_pem: String,
    /// `pg_hba.conf` lines placed before initdb's rules (which trust every local TCP client,
    /// with or without TLS), e.g. `host all alice 127.0.0.1/32 scram-sha-256`.
    pub hba_first: Vec<String>,
    /// The CA(s) that client certificates must lead to (PEM), installed as `ssl_ca_file`. The
    /// server then asks every TLS client for a certificate; clients without one still connect
    /// unless a `pg_hba.conf` rule demands it (`cert`, `clientcert=verify-full`).
    pub client_ca_pem: Option<String>,
}

impl PgCluster {
    /// A cluster of its own with `ssl = on`, listening on 127.0.0.1 only. Plain TCP stays
    /// allowed (initdb's `host all all 127.0.0.1/32 trust` rule matches both), so one cluster
    /// serves every sslmode; [`PgCluster::connect`] keeps working without TLS.
    pub async fn private_tls(opts: &PgTlsOpts) -> Result<PgCluster> {
        let cluster = PgCluster::private().await?;
        cluster.stop().await?;
        let data = cluster.dir.path().join("data");
        let client_ca = opts
            .client_ca_pem
            .as_ref()
            .map(|pem| ("client-ca.crt", pem));
        for (name, content) in [
            ("server.crt", &opts.cert_pem),
            ("server.key", &opts.key_pem),
        ]
        .into_iter()
        .chain(client_ca)
        {
            let path = data.join(name);
            std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("chmod 0600 {}", path.display()))?;
            if running_as_root() {
                let status = Command::new("chown")
                    .arg("postgres:")
                    .arg(&path)
                    .status()
                    .context("chown TLS file")?;
                ensure!(
                    status.success(),
                    "chown postgres: {}: {status}",
                    path.display()
                );
            }
        }
        let conf = data.join("postgresql.conf");
        let mut file = File::options()
            .append(true)
            .open(&conf)
            .with_context(|| format!("open {}", conf.display()))?;
        file.write_all(
            b"\n# vulcan-stream tests: TLS\n\
              ssl = on\n\
              ssl_cert_file = 'server.crt'\n\
              ssl_key_file = 'server.key'\n\
              listen_addresses = '127.0.0.1'\n",
        )
        .context("append TLS settings to postgresql.conf")?;
        if client_ca.is_some() {
            file.write_all(b"ssl_ca_file = 'client-ca.crt'\n")
                .context("append ssl_ca_file to postgresql.conf")?;
        }
        if !opts.hba_first.is_empty() {
            let hba = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba).context("read pg_hba.conf")?;
            let mut new = opts.hba_first.join("\n");
            new.push('\n');
            new.push_str(&old);
            // Rewritten in place: owner and mode stay.
            std::fs::write(&hba, new).context("write pg_hba.conf")?;
        }
        cluster.start().await?;
        Ok(cluster)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let taken = self.proc.get_mut().map(Option::take).unwrap_or(None);
        if let Some((mut child, stdin)) = taken {
            // EOF on the reaper's stdin stops postgres.
            drop(stdin);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
    }
}

/// The payload [`PgCluster::notify_seq`] sends as number `i`.
pub fn seq_payload(i: usize) -> String {
    format!(r#"{{"action":"seq","seq":{i}}}"#)
}

/// `SELECT pg_notify(channel, payload)` on an existing client.
pub async fn notify(client: &tokio_postgres::Client, channel: &str, payload: &str) -> Result<()> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .with_context(|| format!("notify on {channel}: {payload:?}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server binary
// ---------------------------------------------------------------------------------------------

/// How to start a server. Environment starts clean: only PATH and what is set here.
#[derive(Clone, Debug)]
pub struct ServerOpts {
    pub env: BTreeMap<String, String>,
    /// Content of a config file passed as the first argument.
    pub config: Option<String>,
    /// Arguments after the config file.
    pub args: Vec<String>,
    /// Wait for `/ready` = 200 before returning.
    pub wait_ready: bool,
    /// The open-files soft limit the process starts with (`RLIMIT_NOFILE`, hard limit kept);
    /// `None` inherits the test process's.
    pub open_files_soft: Option<u64>,
    /// Lowers the hard limit too (the server cannot raise past it).
    pub open_files_hard: Option<u64>,
}

impl ServerOpts {
    /// PORT=0, LOG_LEVEL=info, no database settings, waits for readiness.
    pub fn new() -> Self {
        ServerOpts {
            env: BTreeMap::new(),
            config: None,
            args: Vec::new(),
            wait_ready: true,
            open_files_soft: None,
            open_files_hard: None,
        }
        .env("PORT", "0")
        .env("LOG_LEVEL", "info")
    }

    /// [`ServerOpts::new`] plus the cluster's PG_* variables and PG_CHANNEL.
    pub fn with_db(pg: &PgCluster, channel: &str) -> Self {
        let mut opts = ServerOpts::new().env("PG_CHANNEL", channel);
        opts.env.extend(pg.env());
        opts
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    pub fn unset(mut self, key: &str) -> Self {
        self.env.remove(key);
        self
    }

    pub fn config(mut self, content: impl Into<String>) -> Self {
        self.config = Some(content.into());
        self
    }

    pub fn no_wait_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    /// Starts the server with this open-files soft limit (e.g. the usual default, 1024).
    pub fn open_files_soft_limit(mut self, soft: u64) -> Self {
        self.open_files_soft = Some(soft);
        self
    }

    /// Starts the server with this open-files limit, soft and hard (as `ulimit -n` sets it).
    pub fn open_files_limit(mut self, limit: u64) -> Self {
        self.open_files_soft = Some(limit);
        self.open_files_hard = Some(limit);
        self
    }
}

/// The server's stderr so far, and whether it has closed (the process is exiting).
#[derive(Default)]
struct Log {
    text: String,
    eof: bool,
}

/// A running `vulcan-stream`. Killed on drop, then its stderr is printed (shown when the test
/// fails).
pub struct Server {
    child: Child,
    port: u16,
    log: watch::Receiver<Log>,
    /// Leave stderr out on drop (see [`Server::quiet_on_drop`]).
    quiet: bool,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Spawns the server and waits for its `listening on` line (and `/ready` if asked).
    pub async fn spawn(opts: ServerOpts) -> Result<Server> {
        let dir = tempfile::tempdir().context("server temp dir")?;
        let mut cmd = Command::new(SERVER_BIN);
        if let Some(content) = &opts.config {
            let path = dir.path().join("config.toml");
            std::fs::write(&path, content).context("write config")?;
            cmd.arg(path);
        }
        cmd.args(&opts.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(&opts.env)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(soft) = opts.open_files_soft {
            set_open_files_limit(&mut cmd, soft, opts.open_files_hard);
        }
        let mut child = cmd.spawn().context("spawn vulcan-stream")?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = watch::channel(Log::default());
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        tx.send_modify(|log| log.text.push_str(&text));
                    }
                }
            }
            tx.send_modify(|log| log.eof = true);
        });
        let mut server = Server {
            child,
            port: 0,
            log: rx,
            quiet: false,
            _dir: dir,
        };
        let text = server
            .wait_log(|text| text.contains("listening on "))
            .await
            .context("waiting for the `listening on` line")?;
        server.port = parse_listening_port(&text)?;
        if opts.wait_ready {
            server.wait_ready().await?;
        }
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Leaves the server's stderr out when it is dropped: for a test run with `--nocapture`
    /// whose own output is the point, once that test has passed.
    pub fn quiet_on_drop(&mut self) {
        self.quiet = true;
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.log.borrow().text.clone()
    }

    /// Waits until stderr satisfies `pred`; fails if stderr closes first or on timeout.
    pub async fn wait_log(&self, pred: impl Fn(&str) -> bool) -> Result<String> {
        self.wait_log_within(TIMEOUT, pred).await
    }

    /// Polls `/ready` until it answers 200.
    pub async fn wait_ready(&self) -> Result<()> {
        self.wait_http(|r| r.status == 200, "/ready", "/ready = 200")
            .await
            .map(drop)
    }

    /// Polls `path` until `pred` holds for the response.
    pub async fn wait_http(
        &self,
        pred: impl Fn(&HttpResponse) -> bool,
        path: &str,
        what: &str,
    ) -> Result<HttpResponse> {
        self.wait_http_within(TIMEOUT, pred, path, what).await
    }

    pub async fn wait_http_within(
        &self,
        timeout: Duration,
        pred: impl Fn(&HttpResponse) -> bool,
        path: &str,
        what: &str,
    ) -> Result<HttpResponse> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = http_get(self.port, path).await;
            match last {
                Ok(resp) if pred(&resp) => return Ok(resp),
                _ if Instant::now() > deadline => {
                    bail!("no {what} within {timeout:?}; last answer: {last:?}")
                }
                _ => tokio::time::sleep(PROBE_INTERVAL).await,
            }
        }
    }

    /// Waits until `/ready` answers 200 (the LISTEN is active), within `timeout`; `what`
    /// names the moment in the failure message.
    pub async fn wait_ready_within(&self, timeout: Duration, what: &str) -> Result<()> {
        self.wait_http_within(timeout, |r| r.status == 200, "/ready", what)
            .await
            .map(drop)
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> Result<serde_json::Value> {
        let resp = http_get(self.port, "/status").await?;
        ensure!(resp.status == 200, "/status: {resp:?}");
        serde_json::from_slice(&resp.body).with_context(|| format!("/status body: {resp:?}"))
    }

    /// Polls `/status` until it reports `n` clients.
    pub async fn wait_for_clients(&self, n: u64) -> Result<()> {
        self.wait_http(
            |r| {
                r.status == 200
                    && serde_json::from_slice::<serde_json::Value>(&r.body)
                        .is_ok_and(|v| v["clients"].as_u64() == Some(n))
            },
            "/status",
            &format!("\"clients\":{n}"),
        )
        .await
        .map(drop)
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let resp = http_get(self.port, "/metrics").await?;
        ensure!(resp.status == 200, "/metrics: {resp:?}");
        Ok(resp.text())
    }

    /// The value of an unlabelled metric (sum over label sets if labelled).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics().await?;
        metric_value(&text, name).with_context(|| format!("metric {name} in:\n{text}"))
    }

    /// A websocket client on `/stream`.
    pub async fn ws(&self) -> Result<Ws> {
        ws_connect(self.port, "/stream").await
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        ensure!(
            rc == 0,
            "kill({}, {signal}): {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
        Ok(())
    }

    /// Waits for the process to exit (its stderr closing is the event).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut rx = self.log.clone();
        tokio::time::timeout(timeout, rx.wait_for(|log| log.eof))
            .await
            .with_context(|| format!("server still running after {timeout:?}"))?
            .ok();
        // Stderr is closed; the exit itself follows at once.
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "server still running after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// [`Server::wait_log`] with its own deadline.
    pub async fn wait_log_within(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let mut rx = self.log.clone();
        // The guard `wait_for` returns must go before `stderr()` locks again: a second read
        // lock waits behind the log reader thread's pending write lock, which waits for us.
        let res = tokio::time::timeout(timeout, rx.wait_for(|log| pred(&log.text) || log.eof))
            .await
            .map(|seen| seen.map(drop));
        let text = self.stderr();
        match res {
            Ok(_) if pred(&text) => Ok(text),
            Ok(_) => bail!("server stderr closed (process exited) first; stderr:\n{text}"),
            Err(_) => bail!("timed out after {timeout:?}; stderr:\n{text}"),
        }
    }

    /// The stderr lines containing every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.stderr()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Polls `/metrics` until metric `name` satisfies `pred`; returns its value.
    pub async fn wait_metric(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.metric(name).await?;
            if pred(value) {
                return Ok(value);
            }
            ensure!(
                Instant::now() < deadline,
                "{name} is still {value} after {timeout:?}"
            );
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Waits until at least `count` clients have been disconnected as too slow.
    pub async fn wait_slow_disconnects(&self, count: u64) -> Result<f64> {
        let name = "vulcan_stream_clients_disconnected_slow_total";
        self.wait_metric(name, TIMEOUT, |v| v >= count as f64).await
    }

    /// The process's resident set size and its peak, in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self) -> Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} in {path}"))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// How many descriptors the process has open (the entries of `/proc/<pid>/fd`).
    pub fn open_fds(&self) -> Result<usize> {
        let path = format!("/proc/{}/fd", self.pid());
        let entries = std::fs::read_dir(&path).with_context(|| format!("read {path}"))?;
        Ok(entries.count())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.quiet {
            return;
        }
        // Printed whether the test failed by panicking or by returning an error; the test
        // harness shows a test's output only when it fails.
        eprintln!(
            "--- vulcan-stream stderr (port {}) ---\n{}",
            self.port,
            self.stderr()
        );
    }
}

/// Makes `cmd`'s process start with an open-files soft limit of `soft`, and a hard limit of
/// `hard` when given (otherwise unchanged; `soft` is capped at it).
fn set_open_files_limit(cmd: &mut Command, soft: u64, hard: Option<u64>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and calls only getrlimit and
    // setrlimit, which are async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(hard) = hard {
                limit.rlim_max = hard.min(limit.rlim_max);
            }
            limit.rlim_cur = soft.min(limit.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Raises this process's open-files soft limit to its hard limit (for tests that open many
/// sockets); returns the new soft limit.
pub fn raise_own_open_files_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own; the resource is valid.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0,
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            ensure!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
                "setrlimit(RLIMIT_NOFILE, {}): {}",
                limit.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(limit.rlim_cur)
}

/// The port of the first `listening on <ip:port>` line.
fn parse_listening_port(text: &str) -> Result<u16> {
    let rest = text
        .split_once("listening on ")
        .map(|(_, rest)| rest)
        .context("no `listening on` line")?;
    let addr = rest.split_whitespace().next().unwrap_or_default();
    let addr = addr.trim_end_matches(|c: char| !c.is_ascii_digit());
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in `listening on {addr}`"))
}

/// The value of metric `name` in Prometheus text (summed over label sets).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = if let Some(labelled) = rest.strip_prefix('{') {
            labelled.split_once('}')?.1
        } else if rest.starts_with(' ') {
            rest
        } else {
            continue;
        };
        let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
        found = Some(found.unwrap_or(0.0) + value);
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Websocket client
// ---------------------------------------------------------------------------------------------

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to `ws://127.0.0.1:<port><path>`; returns after the 101.
pub async fn ws_connect(port: u16, path: &str) -> Result<Ws> {
    let url = format!("ws://127.0.0.1:{port}{path}");
    let (ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(url.as_str()))
        .await
        .with_context(|| format!("connect {url}: timeout"))?
        .with_context(|| format!("connect {url}"))?;
    Ok(ws)
}

/// Connects to `ws://127.0.0.1:<port><path>` with extra request headers (e.g. `Authorization`,
/// `Origin`); returns after the 101.
pub async fn ws_connect_with(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<Ws> {
    Ok(ws_handshake(port, path, headers).await?.0)
}

/// [`ws_connect_with`], returning the server's 101 response too (its headers).
pub async fn ws_handshake(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(
    Ws,
    tokio_tungstenite::tungstenite::handshake::client::Response,
)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let url = format!("ws://127.0.0.1:{port}{path}");
    let mut request = url.as_str().into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes())?,
            HeaderValue::from_str(value)?,
        );
    }
    tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .with_context(|| format!("connect {url}: timeout"))?
        .with_context(|| format!("connect {url} with {headers:?}"))
}

/// Reads messages until `pick` returns a value; fails after `timeout` naming `what`, on a
/// stream that ends, or when `pick` fails. Websocket-level pings are answered by the library
/// while reading.
async fn read_until<T>(
    ws: &mut Ws,
    timeout: Duration,
    what: &str,
    mut pick: impl FnMut(Message) -> Result<Option<T>>,
) -> Result<T> {
    let read = async {
        loop {
            let msg = ws
                .next()
                .await
                .context("websocket closed without a close frame")?
                .context("websocket read")?;
            if let Some(value) = pick(msg)? {
                return Ok(value);
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .with_context(|| format!("no {what} within {timeout:?}"))?
}

/// The next text frame, pings included.
pub async fn next_text_within(ws: &mut Ws, timeout: Duration) -> Result<String> {
    read_until(ws, timeout, "text frame", |msg| match msg {
        Message::Text(text) => Ok(Some(text.as_str().to_owned())),
        Message::Ping(_) | Message::Pong(_) => Ok(None),
        Message::Close(frame) => bail!("websocket closed: {frame:?}"),
        other => bail!("unexpected websocket message: {other:?}"),
    })
    .await
}

/// Whether a text frame is a heartbeat: the legacy `{"action":"ping"}` or a v1 ping event.
/// Each client's heartbeat comes at its own moment within the interval, so any read may meet
/// one.
pub fn is_heartbeat(text: &str) -> bool {
    text == PING || text.starts_with(r#"{"event":"ping","#)
}

/// The next text frame that is not a heartbeat (`{"action":"ping"}` or a v1 ping).
pub async fn next_event(ws: &mut Ws) -> Result<String> {
    next_event_within(ws, TIMEOUT).await
}

pub async fn next_event_within(ws: &mut Ws, timeout: Duration) -> Result<String> {
    read_until(
        ws,
        timeout,
        "text frame other than a ping",
        |msg| match msg {
            Message::Text(text) if is_heartbeat(text.as_str()) => Ok(None),
            Message::Text(text) => Ok(Some(text.as_str().to_owned())),
            Message::Ping(_) | Message::Pong(_) => Ok(None),
            Message::Close(frame) => bail!("websocket closed: {frame:?}"),
            other => bail!("unexpected websocket message: {other:?}"),
        },
    )
    .await
}

/// Reads until a close frame arrives, skipping pings; fails on any other frame.
pub async fn next_close(ws: &mut Ws) -> Result<Option<CloseFrame>> {
    read_until(ws, TIMEOUT, "close frame", |msg| match msg {
        Message::Close(frame) => Ok(Some(frame)),
        Message::Text(text) if text.as_str() == PING => Ok(None),
        Message::Ping(_) | Message::Pong(_) => Ok(None),
        other => bail!("expected a close frame, got {other:?}"),
    })
    .await
}

/// Sends a text frame from the client.
pub async fn ws_send(ws: &mut Ws, text: &str) -> Result<()> {
    ws.send(Message::text(text)).await.context("websocket send")
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events client
// ---------------------------------------------------------------------------------------------

pub use vulcan_stream::test_client::sse::{EventStream, Item as SseItem};

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub kind: String,
    pub id: Option<String>,
    pub data: String,
}

/// Opens `http://127.0.0.1:<port><path>` as an event stream, with extra request headers;
/// returns after the 200 (its head is in [`EventStream::headers`]).
pub async fn sse_connect(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<EventStream> {
    let url = format!("http://127.0.0.1:{port}{path}");
    tokio::time::timeout(TIMEOUT, EventStream::open(&url, headers))
        .await
        .with_context(|| format!("open {url}: timeout"))?
        .with_context(|| format!("open {url} with {headers:?}"))
}

/// The next item (event, comment or retry) within `timeout`; fails when the stream ends.
pub async fn sse_next_within(stream: &mut EventStream, timeout: Duration) -> Result<SseItem> {
    tokio::time::timeout(timeout, stream.next())
        .await
        .with_context(|| format!("nothing on the event stream within {timeout:?}"))?
        .context("event stream read")?
        .context("the event stream ended")
}

/// The next event, skipping comments (heartbeats) and `retry` fields.
pub async fn sse_event(stream: &mut EventStream) -> Result<SseEvent> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if let SseItem::Event { kind, id, data } = sse_next_within(stream, left).await? {
            return Ok(SseEvent { kind, id, data });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1
// ---------------------------------------------------------------------------------------------

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl fmt::Debug for HttpResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HTTP {} {:?} {:?}",
            self.status,
            self.headers,
            self.text()
        )
    }
}

/// `GET path` with `Connection: close`.
pub async fn http_get(port: u16, path: &str) -> Result<HttpResponse> {
    http_request(port, "GET", path, &[]).await
}

pub const UPGRADE_HEADERS: [(&str, &str); 4] = [
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// `GET path` with websocket upgrade headers and `extra` headers; the status is what matters.
pub async fn upgrade(port: u16, path: &str, extra: &[(&str, &str)]) -> Result<HttpResponse> {
    let mut headers = UPGRADE_HEADERS.to_vec();
    headers.extend_from_slice(extra);
    http_request(port, "GET", path, &headers).await
}

/// A request with extra header lines; `Connection: close` unless given.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    http_raw(port, req.as_bytes()).await
}

/// Sends `request` verbatim to 127.0.0.1:`port` and reads one response. The body is delimited by
/// Content-Length, chunked encoding, or EOF; a 1xx/204/304 response has none.
pub async fn http_raw(port: u16, request: &[u8]) -> Result<HttpResponse> {
    tokio::time::timeout(TIMEOUT, http_raw_inner(port, request))
        .await
        .with_context(|| format!("HTTP request to port {port}: timeout"))?
}

async fn http_raw_inner(port: u16, request: &[u8]) -> Result<HttpResponse> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connect 127.0.0.1:{port}"))?;
    stream.write_all(request).await?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        ensure!(
            n > 0,
            "connection closed before the response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut resp = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(resp);
    }
    if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().context("content-length")?;
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            ensure!(n > 0, "connection closed inside the body");
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        resp.body = rest;
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        stream.read_to_end(&mut rest).await?;
        resp.body = decode_chunked(&rest)?;
    } else {
        stream.read_to_end(&mut rest).await?;
        resp.body = rest;
    }
    Ok(resp)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").context("chunk size line")?;
        let size_line = std::str::from_utf8(&data[..line_end])?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("chunk size {size_line:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        ensure!(data.len() >= size + 2, "truncated chunk");
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// Running a binary to completion
// ---------------------------------------------------------------------------------------------

pub struct BinOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl fmt::Debug for BinOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code {:?} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `bin args` with only PATH and `env` set; killed (and an error) after `timeout`.
pub async fn run_bin<K: AsRef<str>, V: AsRef<str>>(
    bin: &str,
    args: &[&str],
    env: &[(K, V)],
    timeout: Duration,
) -> Result<BinOutput> {
    let started = Instant::now();
    let child = tokio::process::Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {bin}"))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{bin} {args:?} still running after {timeout:?} (killed)"))??;
    Ok(BinOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    })
}

// ---------------------------------------------------------------------------------------------
// Raw websocket client: the test decides when, and whether, it reads
// ---------------------------------------------------------------------------------------------

/// Websocket opcodes (RFC 6455 §5.2).
pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;

/// The request head of a valid websocket upgrade of `/stream`.
pub fn upgrade_request(port: u16) -> String {
    upgrade_request_of(port, "/stream")
}

/// [`upgrade_request`] of `path` (a query included).
pub fn upgrade_request_of(port: u16, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
}

/// The mask every raw client frame uses (clients must mask; the value does not matter).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The head of a client frame (FIN set, masked) announcing `len` payload bytes.
pub fn client_frame_head(opcode: u8, len: u64) -> Vec<u8> {
    let mut head = vec![0x80 | opcode];
    if len < 126 {
        head.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        head.push(0x80 | 126);
        head.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        head.push(0x80 | 127);
        head.extend_from_slice(&len.to_be_bytes());
    }
    head.extend_from_slice(&MASK);
    head
}

/// Masks (or unmasks) `data` in place, `offset` bytes into a payload.
pub fn apply_mask(data: &mut [u8], offset: usize) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte ^= MASK[(offset + i) % 4];
    }
}

/// A complete client frame: head and masked payload.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = client_frame_head(opcode, payload.len() as u64);
    let start = frame.len();
    frame.extend_from_slice(payload);
    apply_mask(&mut frame[start..], 0);
    frame
}

/// One frame from the server.
#[derive(Debug)]
pub struct RawFrame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The status code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// How a connection ended, seen from the reading side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A websocket close frame with this code (None: no code).
    Close(Option<u16>),
    /// End of stream, possibly in the middle of a frame.
    Eof,
    /// The connection was reset (or otherwise broke) while reading.
    Reset,
}

/// A websocket client on a bare TCP stream: it reads only when the test asks it to, and answers
/// nothing by itself (no pongs, no close echo).
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades a new connection to `/stream`; returns after the 101.
    pub async fn connect(port: u16) -> Result<RawWs> {
        RawWs::connect_path(port, "/stream").await
    }

    /// [`RawWs::connect`] to `path` (a query included).
    pub async fn connect_path(port: u16, path: &str) -> Result<RawWs> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .with_context(|| format!("connect 127.0.0.1:{port}"))?;
        RawWs::upgrade(stream, port, path).await
    }

    /// As [`RawWs::connect`] with the socket's receive buffer set to `bytes` before connecting,
    /// so that the window it advertises stays small and the server's writes back up early.
    pub async fn connect_with_recv_buffer(port: u16, bytes: u32) -> Result<RawWs> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(bytes)?;
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .with_context(|| format!("connect 127.0.0.1:{port}"))?;
        RawWs::upgrade(stream, port, "/stream").await
    }

    async fn upgrade(mut stream: TcpStream, port: u16, path: &str) -> Result<RawWs> {
        let handshake = async {
            stream
                .write_all(upgrade_request_of(port, path).as_bytes())
                .await?;
            let mut buf = Vec::new();
            loop {
                if let Some(pos) = find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
                    ensure!(
                        head.starts_with("HTTP/1.1 101"),
                        "upgrade refused: {head:?}"
                    );
                    return Ok(buf.split_off(pos + 4));
                }
                let mut chunk = [0u8; 1024];
                let n = stream.read(&mut chunk).await?;
                ensure!(n > 0, "connection closed during the upgrade");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        let buf = tokio::time::timeout(TIMEOUT, handshake)
            .await
            .context("websocket upgrade: timeout")??;
        Ok(RawWs { stream, buf })
    }

    /// The next frame from the server; `None` at end of stream. I/O errors are returned.
    pub async fn next_frame(&mut self) -> std::io::Result<Option<RawFrame>> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(frame));
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not part of a heartbeat (its text frame or its websocket Ping),
    /// which may come at any moment of the interval; `None` at end of stream.
    pub async fn next_data_frame(&mut self) -> std::io::Result<Option<RawFrame>> {
        loop {
            match self.next_frame().await? {
                Some(frame)
                    if frame.opcode == OP_PING
                        || (frame.opcode == OP_TEXT
                            && is_heartbeat(&String::from_utf8_lossy(&frame.payload))) => {}
                other => return Ok(other),
            }
        }
    }

    /// Reads until a close frame, end of stream or an error; returns how it ended and how many
    /// other frames came before. Fails after `timeout`.
    pub async fn read_to_end(&mut self, timeout: Duration) -> Result<(Ending, u64)> {
        let mut frames = 0;
        let read = async {
            loop {
                match self.next_frame().await {
                    Ok(Some(frame)) if frame.opcode == OP_CLOSE => {
                        return Ending::Close(frame.close_code());
                    }
                    Ok(Some(_)) => frames += 1,
                    Ok(None) => return Ending::Eof,
                    Err(_) => return Ending::Reset,
                }
            }
        };
        let ending = tokio::time::timeout(timeout, read)
            .await
            .with_context(|| format!("connection still open after {timeout:?}"))?;
        Ok((ending, frames))
    }
}

/// Parses one unmasked server frame at the start of `buf`: the frame and its length in bytes.
fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, mut pos) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let key: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
        pos += 4;
        Some(key)
    } else {
        None
    };
    let end = pos + usize::try_from(len).ok()?;
    let mut payload = buf.get(pos..end)?.to_vec();
    if let Some(key) = mask {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= key[i % 4];
        }
    }
    Some((
        RawFrame {
            opcode: b0 & 0x0f,
            payload,
        },
        end,
    ))
}

/// Reads and discards from `stream` until the peer closes it; returns the bytes received and
/// whether it ended with EOF ([`Ending::Eof`]) or an error ([`Ending::Reset`]). Fails after
/// `timeout`.
pub async fn read_until_closed(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    timeout: Duration,
) -> Result<(Vec<u8>, Ending)> {
    let mut received = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) => return Ending::Eof,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                Err(_) => return Ending::Reset,
            }
        }
    };
    let ending = tokio::time::timeout(timeout, read)
        .await
        .with_context(|| format!("connection still open after {timeout:?}"))?;
    Ok((received, ending))
}

/// Raises this process's open-files soft limit to at least `wanted` (up to the hard limit);
/// fails when the hard limit is lower.
pub fn ensure_open_files(wanted: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    ensure!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0,
        "getrlimit: {}",
        std::io::Error::last_os_error()
    );
    ensure!(
        limit.rlim_max >= wanted,
        "open-files hard limit {} is below the {wanted} this test needs",
        limit.rlim_max
    );
    if limit.rlim_cur < wanted {
        limit.rlim_cur = wanted;
        // SAFETY: setrlimit reads the struct we own; the soft limit stays within the hard one.
        ensure!(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// TCP sockets on local port `port` (from /proc/net/tcp and tcp6) in state `state` (kernel
/// code: 01 ESTABLISHED, 0A LISTEN), each with its receive queue (for a listener: connections
/// waiting to be accepted).
fn sockets_on_port(port: u16, state: &str) -> Result<Vec<u64>> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).with_context(|| format!("read {table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            if local_port == Some(port) && fields.get(3) == Some(&state) {
                let rx_queue = fields
                    .get(4)
                    .and_then(|queues| queues.split(':').nth(1))
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                    .unwrap_or(0);
                found.push(rx_queue);
            }
        }
    }
    Ok(found)
}

/// TCP connections in state ESTABLISHED whose local port is `port`: the server's side of its
/// connections, including those the kernel completed but the server has not accepted yet.
pub fn established_on_port(port: u16) -> Result<usize> {
    Ok(sockets_on_port(port, "01")?.len())
}

/// Connections waiting in the accept queue of the listener on `port`.
pub fn accept_queue_on_port(port: u16) -> Result<u64> {
    Ok(sockets_on_port(port, "0A")?.iter().sum())
}

/// Builds the load generator where this test's server binary was built; returns its
/// executable. The generator is the workspace's other package, so cargo gives this target no
/// `CARGO_BIN_EXE_vulcan-stream-bench`: it is built with the cargo that built the test, into
/// the same target directory and profile (reusing what the test's own build compiled), and
/// the executable cargo reports is run. Cargo's lock on the target directory serialises tests
/// that build it at once.
pub fn build_bench() -> Result<PathBuf> {
    // Cargo puts binaries in `<target dir>/<profile dir>/`, and the dev profile's dir is
    // `debug`.
    let server = Path::new(SERVER_BIN);
    let profile_dir = server.parent().context("the server binary's directory")?;
    let target_dir = profile_dir
        .parent()
        .context("the target directory above the server binary's")?;
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => bail!("no profile directory in {}", server.display()),
    };
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args([
            "build",
            "--locked",
            "--message-format=json-render-diagnostics",
        ])
        .args(["--package", BENCH, "--bin", BENCH, "--profile", profile])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    let output = cargo
        .output()
        .with_context(|| format!("running {cargo:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{cargo:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    // One JSON message a line; the binary's `compiler-artifact` names its executable.
    let executable = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == BENCH
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from));
    executable.with_context(|| format!("{cargo:?} reported no executable for {BENCH}:\n{stdout}"))
}
