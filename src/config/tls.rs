//! The TLS settings of the database connection: libpq's `sslmode` names and the trusted CA
//! certificates of `PG_CA_B64`, parsed and checked while the configuration loads.
//!
//! They live with the configuration rather than with the connection code so that config
//! depends on nothing above it: the connection code reads them from [`super::ReceiverConfig`]
//! and decides there how each mode is negotiated and verified.

use std::fmt;

use base64::Engine as _;
use native_tls::Certificate;

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

    /// `PG_CA_B64`'s form: base64 of a PEM bundle or of one DER certificate. Whitespace is
    /// ignored, so a value wrapped by `base64` (76 columns) works as it is.
    pub fn parse_base64(text: &str) -> Result<CaCertificates, String> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|err| format!("not base64 ({err})"))?;
        CaCertificates::parse(&bytes)
    }

    /// The certificates, for the TLS connector to trust.
    pub fn certificates(&self) -> &[Certificate] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mode_names_in_any_case() {
        assert_eq!(SslMode::parse("Verify-Full"), Ok(SslMode::VerifyFull));
        assert!(SslMode::parse("bogus").is_err());
    }

    #[test]
    fn rejects_what_is_not_a_certificate() {
        assert!(CaCertificates::parse(b"hello").is_err());
        assert!(CaCertificates::parse(b"-----BEGIN CERTIFICATE-----\nxx\n").is_err());
    }

    #[test]
    fn rejects_what_is_not_base64() {
        let err = CaCertificates::parse_base64("!!!").expect_err("not base64");
        assert!(err.starts_with("not base64"), "{err}");
    }
}
