//! The keys that verify signed tokens (JWT), parsed once at start so that a bad key stops the
//! server with a clear error instead of refusing every client.
//!
//! An HMAC secret verifies HS256 tokens only, and a public key only the one algorithm of its
//! kind (RS256 for RSA, ES256 for P-256, EdDSA for Ed25519): a token never chooses how it is
//! checked, so an RS256 public key can never be used as an HS256 secret.

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey};

use super::tls::decode_base64;

/// How signed tokens are verified.
#[derive(Clone)]
pub struct JwtKeys {
    /// `JwtSecret` / `JWT_SECRET`: verifies HS256.
    pub secret: Option<DecodingKey>,
    /// `JwtPublicKey` / `JWT_PUBLIC_KEY`, with the one algorithm it verifies.
    pub public: Option<(Algorithm, DecodingKey)>,
    /// `JwtAudience` / `JWT_AUDIENCE`: when set, a token's `aud` must name it.
    pub audience: Option<String>,
    /// `JwtIssuer` / `JWT_ISSUER`: when set, a token's `iss` must be it.
    pub issuer: Option<String>,
}

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKeys")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public", &self.public.as_ref().map(|(alg, _)| alg))
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// A public key in PEM, or the base64 of one (an environment file cannot hold line breaks):
/// RSA, P-256 or Ed25519, and the algorithm it verifies.
pub(super) fn parse_public_key(text: &str) -> Result<(Algorithm, DecodingKey), String> {
    let pem = if text.contains("-----BEGIN") {
        text.as_bytes().to_vec()
    } else {
        decode_base64(text).map_err(|reason| format!("neither PEM nor base64 of PEM: {reason}"))?
    };
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, key));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((Algorithm::EdDSA, key));
    }
    Err("not an RSA, P-256 or Ed25519 public key in PEM".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\n\
        MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
        -----END PUBLIC KEY-----\n";

    #[test]
    fn a_key_names_its_algorithm_in_pem_or_base64() {
        let (alg, _) = parse_public_key(ED25519_PUBLIC).expect("Ed25519");
        assert_eq!(alg, Algorithm::EdDSA);
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(ED25519_PUBLIC);
        let (alg, _) = parse_public_key(&b64).expect("base64 of the PEM");
        assert_eq!(alg, Algorithm::EdDSA);
        assert!(parse_public_key("not a key").is_err());
        assert!(
            parse_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
                .is_err()
        );
    }
}
