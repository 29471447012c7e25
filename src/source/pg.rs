//! PostgreSQL connection options and TLS: libpq's six `sslmode`s on native-tls.
//!
//! tokio-postgres knows only disable/prefer/require and leaves certificate checks to the TLS
//! connector, so each libpq mode is mapped here to a pair (tokio-postgres mode, connector
//! strictness). Both the receiver and the test client connect through [`connect`], so they
//! share one meaning of every mode. A configured client certificate (libpq's `sslcert` and
//! `sslkey`) is presented whenever TLS is negotiated; the configuration refuses one with
//! `disable`.

use std::time::Duration;

use native_tls::TlsConnector;
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres::{Client, Connection, Socket};

use crate::config::{ReceiverConfig, SslMode};
use crate::error::Error;

/// How a connection applies each mode. Kept here rather than with [`SslMode`] because it
/// names tokio-postgres's types, which the configuration does not depend on.
impl SslMode {
    /// What tokio-postgres negotiates on the wire.
    fn wire(self) -> WireSslMode {
        match self {
            SslMode::Disable => WireSslMode::Disable,
            SslMode::Allow | SslMode::Prefer => WireSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireSslMode::Require,
        }
    }

    /// Whether the server's chain is checked, given whether a CA was configured.
    fn verifies_chain(self, has_ca: bool) -> bool {
        match self {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => false,
            SslMode::Require => has_ca,
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        }
    }
}

/// How long a connection attempt (TCP, TLS and authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive: a silently dead path is noticed by the kernel after about
/// idle + interval × retries = 30 + 10 × 3 s, even when no query is in flight.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

/// The connection future type both sides drive; it must be polled for notifications to arrive.
pub type PgConnection = Connection<Socket, postgres_native_tls::TlsStream<Socket>>;

/// Builds the TLS connector for a mode, with the client certificate if one is configured.
/// Kept separate from [`connect`] so that a broken TLS setup is found once at start rather
/// than on every reconnect.
pub fn tls_connector(cfg: &ReceiverConfig) -> Result<MakeTlsConnector, Error> {
    let mut builder = TlsConnector::builder();
    if let Some(client) = &cfg.client_identity {
        builder.identity(client.identity().clone());
    }
    if let Some(ca) = &cfg.ca {
        for cert in ca.certificates() {
            builder.add_root_certificate(cert.clone());
        }
    }
    let verify_chain = cfg.sslmode.verifies_chain(cfg.ca.is_some());
    builder.danger_accept_invalid_certs(!verify_chain);
    builder.danger_accept_invalid_hostnames(cfg.sslmode != SslMode::VerifyFull);
    let connector = builder.build().map_err(Error::Tls)?;
    Ok(MakeTlsConnector::new(connector))
}

/// The connection parameters, libpq-style, with keepalives on.
pub fn pg_config(cfg: &ReceiverConfig, application_name: &str) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .dbname(&cfg.dbname)
        .user(&cfg.user)
        .ssl_mode(cfg.sslmode.wire())
        .application_name(application_name)
        .connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES);
    if !cfg.password.is_empty() {
        pg.password(&cfg.password);
    }
    pg
}

/// Opens one connection. The caller must drive the returned [`PgConnection`].
pub async fn connect(
    cfg: &ReceiverConfig,
    tls: &MakeTlsConnector,
    application_name: &str,
) -> Result<(Client, PgConnection), tokio_postgres::Error> {
    pg_config(cfg, application_name).connect(tls.clone()).await
}

/// Quotes an identifier the way PostgreSQL's `quote_ident` does, so that a channel named
/// `My-Events` (or one containing `"`) is LISTENed to exactly as configured.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A failed connection attempt, described for log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectFailure {
    /// The cause, password-free (see [`describe_error`]).
    pub text: String,
    /// What every repeat of this failure has in common, so that it is reported once even when
    /// its text varies from one attempt to the next; otherwise the text itself.
    pub kind: String,
}

impl ConnectFailure {
    /// A failure that reads the same each time it happens.
    pub fn new(text: String) -> ConnectFailure {
        ConnectFailure {
            kind: text.clone(),
            text,
        }
    }
}

/// How a refused client certificate shows when the server's reset overtook its alert.
const DROPPED_BEFORE_AUTHENTICATION: &str = "the server dropped the connection before \
    authentication: with a client certificate under TLS 1.3, that is also how a server refuses \
    the certificate (its log says why)";

/// [`describe_error`] for a failed [`connect`], as one [`ConnectFailure`].
///
/// Under TLS 1.3 the server checks a client certificate after the client has finished its side
/// of the handshake and sent its startup message. A refusal then reaches the client as an alert
/// on its next read (`tlsv1 alert unknown ca`), or, when the reset that follows the alert gets
/// there first, as a bare reset: at random, from one attempt to the next. With a client
/// certificate configured, a connection lost before authentication therefore says what it
/// probably means, and both forms count as one failure.
pub fn describe_connect_error(err: &tokio_postgres::Error, cfg: &ReceiverConfig) -> ConnectFailure {
    let text = describe_error(err);
    // tokio-postgres does not expose its error kinds: `Io` is told by its message. `Connect`
    // (no TCP connection) and `Tls` (a handshake that failed, TLS 1.2's refusals included) say
    // other things.
    let dropped = err.is_closed() || err.to_string() == "error communicating with the server";
    if cfg.client_identity.is_some() && dropped {
        return ConnectFailure {
            text: format!("{text} ({DROPPED_BEFORE_AUTHENTICATION})"),
            kind: DROPPED_BEFORE_AUTHENTICATION.to_owned(),
        };
    }
    ConnectFailure::new(text)
}

/// A short, password-free description of a connection error's cause, for log lines.
pub fn describe_error(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    // Causes often repeat their own source's text (OpenSSL's errors do): keep each once.
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mode_maps_to_libpq_semantics() {
        let cases = [
            (SslMode::Disable, WireSslMode::Disable, false, false),
            (SslMode::Allow, WireSslMode::Prefer, false, false),
            (SslMode::Prefer, WireSslMode::Prefer, false, false),
            (SslMode::Require, WireSslMode::Require, false, true),
            (SslMode::VerifyCa, WireSslMode::Require, true, true),
            (SslMode::VerifyFull, WireSslMode::Require, true, true),
        ];
        for (mode, wire, without_ca, with_ca) in cases {
            assert_eq!(mode.wire(), wire, "{mode:?}");
            assert_eq!(
                mode.verifies_chain(false),
                without_ca,
                "{mode:?} without CA"
            );
            assert_eq!(mode.verifies_chain(true), with_ca, "{mode:?} with CA");
        }
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("My-Events"), "\"My-Events\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
