//! The TLS settings of the database connection: libpq's `sslmode` names, the trusted CA
//! certificates of `PG_CA_B64`, and the client certificate and key of `PG_SSLCERT_B64` and
//! `PG_SSLKEY_B64` (libpq's `sslcert` and `sslkey`), parsed and checked while the configuration
//! loads.
//!
//! They live with the configuration rather than with the connection code so that config
//! depends on nothing above it: the connection code reads them from [`super::ReceiverConfig`]
//! and decides there how each mode is negotiated and verified.

use std::fmt;

use base64::Engine as _;
use native_tls::{Certificate, Identity, TlsConnector};

use super::private_key::Pkcs8Key;

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
        CaCertificates::parse(&decode_base64(text)?)
    }

    /// The certificates, for the TLS connector to trust.
    pub fn certificates(&self) -> &[Certificate] {
        &self.0
    }
}

/// Base64 as the `*_B64` settings hold it. Whitespace is ignored, so a value wrapped by
/// `base64` (76 columns) works as it is.
pub(super) fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    decode(text, true)
}

/// [`decode_base64`] for a private key: the reason does not quote the offending character.
pub(super) fn decode_secret_base64(text: &str) -> Result<Vec<u8>, String> {
    decode(text, false)
}

fn decode(text: &str, detailed: bool) -> Result<Vec<u8>, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|err| {
            if compact.starts_with("-----BEGIN") {
                "not base64 but PEM itself: give the base64 of the PEM text (base64 -w0 file.pem)"
                    .to_owned()
            } else if detailed {
                format!("not base64 ({err})")
            } else {
                "not base64".to_owned()
            }
        })
}

/// The client certificate that PostgreSQL's `cert` authentication (or `clientcert=verify-*`)
/// asks for: the certificate chain of `PG_SSLCERT_B64` with the private key of `PG_SSLKEY_B64`,
/// checked at load time to go together.
#[derive(Clone)]
pub struct ClientIdentity {
    identity: Identity,
    /// The client's certificate and the intermediates sent with it.
    certificates: usize,
}

/// The key is never shown; the certificates are public but long, so only counted.
impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.certificates)
            .field("key", &format_args!("<redacted>"))
            .finish()
    }
}

/// Which of the two inputs a [`ClientIdentity`] was refused for, and why. Reasons never contain
/// key material.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum IdentityError {
    Certificate(String),
    Key(String),
    /// Both are readable, but OpenSSL will not pair them (the key is not the certificate's, or
    /// the certificate is refused for its key size or signature).
    Mismatch(String),
}

impl ClientIdentity {
    /// `cert_pem` holds the client's certificate first, then any intermediates; `key_pem` its
    /// unencrypted private key as PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub(super) fn parse(cert_pem: &[u8], key_pem: &[u8]) -> Result<ClientIdentity, IdentityError> {
        let chain = Certificate::stack_from_pem(cert_pem)
            .map_err(|err| IdentityError::Certificate(format!("not a PEM certificate ({err})")))?;
        let Some(first) = chain.first() else {
            return Err(IdentityError::Certificate(
                "not a PEM certificate (no CERTIFICATE block)".to_owned(),
            ));
        };
        let key = Pkcs8Key::from_pem(key_pem).map_err(IdentityError::Key)?;
        let identity = Identity::from_pkcs8(cert_pem, &key.pem()).map_err(|err| {
            IdentityError::Key(format!("not a private key OpenSSL can read ({err})"))
        })?;
        // OpenSSL checks that a key belongs to the certificate when both are installed in a
        // context, and only if they are of one type (an RSA key beside an EC certificate is
        // kept apart, unused): check the type here, the rest by building a connector, so that
        // a wrong pair stops the start rather than failing every connection attempt.
        let first_der = first.to_der().map_err(|err| {
            IdentityError::Certificate(format!("not a certificate OpenSSL can encode ({err})"))
        })?;
        if key.same_type_as(&first_der) == Some(false) {
            return Err(IdentityError::Mismatch(
                "the key and the certificate are for different key types".to_owned(),
            ));
        }
        TlsConnector::builder()
            .identity(identity.clone())
            .build()
            .map_err(|err| IdentityError::Mismatch(err.to_string()))?;
        Ok(ClientIdentity {
            identity,
            certificates: chain.len(),
        })
    }

    /// The certificate and key, for the TLS connector to present.
    pub fn identity(&self) -> &Identity {
        &self.identity
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

    #[test]
    fn base64_that_is_pem_itself_gets_a_hint() {
        let err = decode_base64("-----BEGIN CERTIFICATE-----\nMAA=\n").expect_err("PEM");
        assert!(err.contains("base64 -w0"), "{err}");
    }

    /// Real keys from the openssl CLI (as the integration tests make theirs), in `dir`:
    /// `<name>.crt` self-signed with `<name>.key` (PKCS#8), plus the key in its traditional
    /// form as `<name>.trad` (PKCS#1 for RSA, SEC1 for EC).
    fn self_signed(
        dir: &std::path::Path,
        name: &str,
        newkey: &[&str],
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("the openssl command generates the test keys");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let (key, crt, trad) = (
            format!("{name}.key"),
            format!("{name}.crt"),
            format!("{name}.trad"),
        );
        let mut req = vec![
            "req",
            "-x509",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=client",
        ];
        req.extend_from_slice(newkey);
        req.extend_from_slice(&["-keyout", &key, "-out", &crt]);
        openssl(&req);
        openssl(&["pkey", "-in", &key, "-traditional", "-out", &trad]);
        let read = |file: &str| std::fs::read(dir.join(file)).expect("read generated file");
        (read(&crt), read(&key), read(&trad))
    }

    #[test]
    fn client_identity_takes_pkcs8_pkcs1_and_sec1_keys_and_refuses_a_foreign_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        let (ec_crt, ec_key, sec1) = self_signed(dir.path(), "ec", &ec);
        let (rsa_crt, rsa_key, pkcs1) = self_signed(dir.path(), "rsa", &["-newkey", "rsa:2048"]);
        assert!(sec1.starts_with(b"-----BEGIN EC PRIVATE KEY-----"));
        assert!(pkcs1.starts_with(b"-----BEGIN RSA PRIVATE KEY-----"));
        for (crt, key) in [
            (&ec_crt, &ec_key),
            (&ec_crt, &sec1),
            (&rsa_crt, &rsa_key),
            (&rsa_crt, &pkcs1),
        ] {
            let identity = ClientIdentity::parse(crt, key).expect("a matching pair");
            assert_eq!(
                format!("{identity:?}"),
                "ClientIdentity { certificates: 1, key: <redacted> }"
            );
        }
        // A chain: the client's certificate, then another one.
        let chain = [ec_crt.clone(), rsa_crt.clone()].concat();
        let identity = ClientIdentity::parse(&chain, &ec_key).expect("a chain");
        assert_eq!(identity.certificates, 2);

        let Err(IdentityError::Mismatch(reason)) = ClientIdentity::parse(&ec_crt, &pkcs1) else {
            panic!("a key of another type must be refused");
        };
        assert!(reason.contains("different key types"), "{reason}");
        let (_, other_ec_key, _) = self_signed(dir.path(), "other", &ec);
        let Err(IdentityError::Mismatch(reason)) = ClientIdentity::parse(&ec_crt, &other_ec_key)
        else {
            panic!("a key of another certificate must be refused");
        };
        assert!(reason.contains("key values mismatch"), "{reason}");
        let Err(IdentityError::Certificate(_)) = ClientIdentity::parse(b"hello", &ec_key) else {
            panic!("not a certificate");
        };
        let Err(IdentityError::Certificate(_)) = ClientIdentity::parse(&ec_key, &ec_key) else {
            panic!("a key is not a certificate");
        };
        // A readable structure that is not a key: OpenSSL's refusal, without the key's bytes.
        let fake = b"-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n";
        let Err(IdentityError::Key(reason)) = ClientIdentity::parse(&ec_crt, fake) else {
            panic!("not a key");
        };
        assert!(!reason.contains("MAMCAQA"), "{reason}");
    }
}
