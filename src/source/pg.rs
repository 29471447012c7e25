//! PostgreSQL connection options and TLS: libpq's six `sslmode`s on native-tls.
//!
//! tokio-postgres knows only disable/prefer/require and leaves certificate checks to the TLS
//! connector, so each libpq mode is mapped here to a pair (tokio-postgres mode, connector
//! strictness). Both the receiver and the test client connect through [`connect`], so they
//! share one meaning of every mode.

use std::fmt;
use std::time::Duration;

use native_tls::{Certificate, TlsConnector};
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::SslMode as WireSslMode;
use tokio_postgres::{Client, Connection, Socket};

use crate::config::ReceiverConfig;
use crate::error::Error;

/// libpq's `sslmode` values, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// libpq tries plain first; here, as `prefer`: TLS when the server offers it, unverified.
    Allow,
    /// TLS when the server offers it, certificate not verified.
    Prefer,
    /// TLS required; the chain is verified only when a CA is configured (then as `verify-ca`).
    Require,
    /// TLS required, chain verified against the configured CA or the system roots; any host name.
    VerifyCa,
    /// TLS required, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    /// Parses a libpq mode name (any case).
    pub fn parse(text: &str) -> Result<SslMode, String> {
        Ok(match text.trim().to_ascii_lowercase().as_str() {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => {
                return Err(
                    "not an sslmode (disable, allow, prefer, require, verify-ca, verify-full)"
                        .to_owned(),
                );
            }
        })
    }

    /// libpq's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

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

/// Trusted CA certificates decoded from `PG_CA_B64` (a PEM bundle or one DER certificate).
#[derive(Clone)]
pub struct CaCertificates(Vec<Certificate>);

impl fmt::Debug for CaCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaCertificates({} certificates)", self.0.len())
    }
}

impl CaCertificates {
    /// Accepts PEM (one or more `CERTIFICATE` blocks) or DER.
    pub fn parse(bytes: &[u8]) -> Result<CaCertificates, String> {
        let certs = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            Certificate::stack_from_pem(bytes)
                .map_err(|err| format!("not a PEM certificate ({err})"))?
        } else {
            vec![
                Certificate::from_der(bytes)
                    .map_err(|err| format!("not a PEM or DER certificate ({err})"))?,
            ]
        };
        if certs.is_empty() {
            return Err("not a PEM certificate (no CERTIFICATE block)".to_owned());
        }
        Ok(CaCertificates(certs))
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

/// Builds the TLS connector for a mode. Kept separate from [`connect`] so that a broken TLS
/// setup is found once at start rather than on every reconnect.
pub fn tls_connector(cfg: &ReceiverConfig) -> Result<MakeTlsConnector, Error> {
    let mut builder = TlsConnector::builder();
    if let Some(ca) = &cfg.ca {
        for cert in &ca.0 {
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
    fn parses_mode_names_in_any_case() {
        assert_eq!(SslMode::parse("Verify-Full"), Ok(SslMode::VerifyFull));
        assert!(SslMode::parse("bogus").is_err());
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("My-Events"), "\"My-Events\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn rejects_what_is_not_a_certificate() {
        assert!(CaCertificates::parse(b"hello").is_err());
        assert!(CaCertificates::parse(b"-----BEGIN CERTIFICATE-----\nxx\n").is_err());
    }
}
