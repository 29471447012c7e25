//! The client's private key in the one form native-tls reads: PEM `PRIVATE KEY` (unencrypted
//! PKCS#8).
//!
//! native-tls's `Identity::from_pkcs8` refuses any other PEM label, while libpq, whose `sslkey`
//! files operators bring along, also reads the traditional forms OpenSSL writes: PKCS#1
//! (`RSA PRIVATE KEY`) and SEC1 (`EC PRIVATE KEY`, often after an `EC PARAMETERS` block). Both
//! are wrapped here into PKCS#8 without touching the key itself: PKCS#8 is a header naming the
//! algorithm around the very same bytes. Only the wrapping is parsed (the outer DER structure
//! and, for EC, which curve); whether the key is sound is left to OpenSSL, when native-tls
//! loads it.
//!
//! It also tells which type of key (RSA, EC, ...) a key and a certificate are for: OpenSSL
//! checks that a key belongs to the certificate only when both are of one type, and otherwise
//! keeps them apart unused until a handshake fails.
//!
//! No message here contains key material: reasons name the form, never bytes of the key.

use base64::Engine as _;

/// `rsaEncryption` (1.2.840.113549.1.1.1) with its NULL parameters: PKCS#8's
/// AlgorithmIdentifier for a PKCS#1 key.
const RSA_ALGORITHM: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];
/// The OID `id-ecPublicKey` (1.2.840.10045.2.1); the curve follows it as the parameters.
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// DER tags used below.
const SEQUENCE: u8 = 0x30;
const OCTET_STRING: u8 = 0x04;
/// `[0]`, constructed: SEC1's optional curve parameters.
const SEC1_PARAMETERS: u8 = 0xa0;

/// The OID `rsaEncryption` and `id-RSASSA-PSS` (1.2.840.113549.1.1.10): both RSA keys.
const RSA_OIDS: [&[u8]; 2] = [
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
    &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a],
];

/// An unencrypted PKCS#8 `PrivateKeyInfo` (DER).
pub(super) struct Pkcs8Key(Vec<u8>);

impl Pkcs8Key {
    /// The first private key of a PEM text, in PKCS#8, PKCS#1 or SEC1.
    pub(super) fn from_pem(pem: &[u8]) -> Result<Pkcs8Key, String> {
        let text = std::str::from_utf8(pem).map_err(|_| "not a PEM private key (not text)")?;
        let (form, der) = first_key_block(text)?;
        Ok(Pkcs8Key(match form {
            KeyForm::Pkcs8 => der,
            KeyForm::Pkcs1 => wrap_rsa(&der)?,
            KeyForm::Sec1 => wrap_ec(&der)?,
            KeyForm::Encrypted => {
                return Err("the private key is encrypted; give it unencrypted \
                            (openssl pkey -in key.pem -out pkcs8.pem)"
                    .to_owned());
            }
        }))
    }

    /// The PEM document native-tls reads.
    pub(super) fn pem(&self) -> Vec<u8> {
        encode_pem("PRIVATE KEY", &self.0)
    }

    /// The OID (content bytes) of the key's algorithm, when the structure can be read.
    fn algorithm(&self) -> Option<&[u8]> {
        let info = whole_sequence(&self.0).ok()?;
        let (_version, _, rest) = read_tlv(info).ok()?;
        algorithm_oid(rest)
    }

    /// Whether the certificate (DER) is for a key of this key's type. `None` when either
    /// structure cannot be read: OpenSSL then has the last word.
    pub(super) fn same_type_as(&self, certificate: &[u8]) -> Option<bool> {
        let family = |oid: &[u8]| {
            if RSA_OIDS.contains(&oid) {
                RSA_OIDS[0].to_vec()
            } else {
                oid.to_vec()
            }
        };
        let key = self.algorithm()?;
        let cert = certificate_key_algorithm(certificate)?;
        Some(family(key) == family(cert))
    }
}

/// The OID of the key in a certificate's `SubjectPublicKeyInfo`.
fn certificate_key_algorithm(der: &[u8]) -> Option<&[u8]> {
    let certificate = whole_sequence(der).ok()?;
    let (_, tbs, _) = read_tlv(certificate).ok()?;
    let mut fields = tbs;
    // `[0] version` is optional; then serial, signature, issuer, validity, subject.
    if fields.first() == Some(&0xa0) {
        fields = read_tlv(fields).ok()?.2;
    }
    for _ in 0..5 {
        fields = read_tlv(fields).ok()?.2;
    }
    let (_, spki, _) = read_tlv(fields).ok()?;
    algorithm_oid(spki)
}

/// The OID that opens the `AlgorithmIdentifier` at the start of `der`.
fn algorithm_oid(der: &[u8]) -> Option<&[u8]> {
    let (_, algorithm, _) = read_tlv(der).ok()?;
    match read_tlv(algorithm).ok()? {
        (0x06, oid, _) => Some(oid),
        _ => None,
    }
}

/// The private key forms a PEM block can hold, by its label.
#[derive(Clone, Copy)]
enum KeyForm {
    /// `PRIVATE KEY`
    Pkcs8,
    /// `RSA PRIVATE KEY`
    Pkcs1,
    /// `EC PRIVATE KEY`
    Sec1,
    /// `ENCRYPTED PRIVATE KEY`, or a traditional label with a legacy `Proc-Type` header.
    Encrypted,
}

/// The form and the DER bytes of the first private key block; blocks with other labels
/// (`EC PARAMETERS`, certificates) are skipped.
fn first_key_block(text: &str) -> Result<(KeyForm, Vec<u8>), String> {
    const LABELS: [(&str, KeyForm); 4] = [
        ("PRIVATE KEY", KeyForm::Pkcs8),
        ("RSA PRIVATE KEY", KeyForm::Pkcs1),
        ("EC PRIVATE KEY", KeyForm::Sec1),
        ("ENCRYPTED PRIVATE KEY", KeyForm::Encrypted),
    ];
    let mut rest = text;
    while let Some(at) = rest.find("-----BEGIN ") {
        let after = &rest[at + "-----BEGIN ".len()..];
        let Some(end_of_label) = after.find("-----") else {
            break;
        };
        let label = &after[..end_of_label];
        let body_and_more = &after[end_of_label + "-----".len()..];
        let end_line = format!("-----END {label}-----");
        let Some(body_end) = body_and_more.find(&end_line) else {
            // The label is not repeated: in a damaged file it could be anything, the key too.
            return Err("not a PEM private key (a BEGIN line without its END line)".to_owned());
        };
        rest = &body_and_more[body_end + end_line.len()..];
        let Some(&(_, form)) = LABELS.iter().find(|(known, _)| *known == label) else {
            continue;
        };
        let body = &body_and_more[..body_end];
        // RFC 1421 headers (`Name: value`) precede a blank line; only legacy encrypted keys
        // have them.
        let (headers, base64_text) = match body.find(':') {
            Some(_) => body
                .split_once("\n\n")
                .or_else(|| body.split_once("\r\n\r\n"))
                .unwrap_or((body, "")),
            None => ("", body),
        };
        if headers.contains("ENCRYPTED") {
            return Ok((KeyForm::Encrypted, Vec::new()));
        }
        let compact: String = base64_text.chars().filter(|c| !c.is_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| format!("not a PEM private key (the {label} block is not base64)"))?;
        return Ok((form, der));
    }
    Err(
        "not a PEM private key (no PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block; \
         PKCS#8, PKCS#1 and SEC1 are read)"
            .to_owned(),
    )
}

/// PKCS#1 `RSAPrivateKey` → PKCS#8 `PrivateKeyInfo { 0, rsaEncryption, OCTET STRING key }`.
fn wrap_rsa(der: &[u8]) -> Result<Vec<u8>, String> {
    whole_sequence(der).map_err(|why| format!("not an RSA private key ({why})"))?;
    Ok(private_key_info(RSA_ALGORITHM, der))
}

/// SEC1 `ECPrivateKey { 1, key, [0] curve, [1] public key }` → PKCS#8 with the curve moved into
/// the AlgorithmIdentifier (the SEC1 structure goes in unchanged; OpenSSL accepts the curve in
/// both places).
fn wrap_ec(der: &[u8]) -> Result<Vec<u8>, String> {
    let not_ec = |why: &str| format!("not an EC private key ({why})");
    let mut fields = whole_sequence(der).map_err(not_ec)?;
    let mut curve = None;
    while !fields.is_empty() {
        let (tag, content, rest) = read_tlv(fields).map_err(not_ec)?;
        if tag == SEC1_PARAMETERS {
            // The content is one ECParameters value (usually the curve's OID), the same CHOICE
            // that PKCS#8's AlgorithmIdentifier takes.
            let (_, _, after) = read_tlv(content).map_err(not_ec)?;
            if !after.is_empty() {
                return Err(not_ec("trailing bytes in the curve parameters"));
            }
            curve = Some(content);
        }
        fields = rest;
    }
    let curve = curve.ok_or_else(|| {
        "the EC private key does not name its curve; convert it to PKCS#8 \
         (openssl pkey -in key.pem -out pkcs8.pem)"
            .to_owned()
    })?;
    let mut algorithm = EC_PUBLIC_KEY_OID.to_vec();
    algorithm.extend_from_slice(curve);
    Ok(private_key_info(&tlv(SEQUENCE, &algorithm), der))
}

/// `PrivateKeyInfo ::= SEQUENCE { version 0, algorithm, privateKey OCTET STRING }`.
fn private_key_info(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut content = vec![0x02, 0x01, 0x00];
    content.extend_from_slice(algorithm);
    content.extend_from_slice(&tlv(OCTET_STRING, key));
    tlv(SEQUENCE, &content)
}

/// The content of `der` if it is exactly one SEQUENCE.
fn whole_sequence(der: &[u8]) -> Result<&[u8], &'static str> {
    match read_tlv(der)? {
        (SEQUENCE, content, []) => Ok(content),
        (SEQUENCE, _, _) => Err("trailing bytes"),
        _ => Err("not a DER SEQUENCE"),
    }
}

/// One DER value: its tag, its content and what follows it. Only low tag numbers and definite
/// lengths of up to four bytes, which is all a key uses.
fn read_tlv(der: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    const TRUNCATED: &str = "truncated DER";
    let (&tag, rest) = der.split_first().ok_or(TRUNCATED)?;
    if tag & 0x1f == 0x1f {
        return Err("unexpected DER tag");
    }
    let (&first, mut rest) = rest.split_first().ok_or(TRUNCATED)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return Err("unsupported DER length");
        }
        let bytes = rest.get(..count).ok_or(TRUNCATED)?;
        rest = &rest[count..];
        bytes
            .iter()
            .fold(0usize, |len, &byte| (len << 8) | usize::from(byte))
    };
    let content = rest.get(..len).ok_or(TRUNCATED)?;
    Ok((tag, content, &rest[len..]))
}

/// A DER value with a definite length in its shortest form.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A PEM document: base64 in 64-column lines between the BEGIN and END lines.
fn encode_pem(label: &str, der: &[u8]) -> Vec<u8> {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The PKCS#8 DER of a PEM text, through the PEM document that native-tls is given.
    fn pkcs8_der(pem: &[u8]) -> Vec<u8> {
        let pem = Pkcs8Key::from_pem(pem).expect("a key").pem();
        let text = std::str::from_utf8(&pem).expect("PEM is text");
        let body: String = text
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .collect();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("base64 body")
    }

    fn pem(label: &str, der: &[u8]) -> String {
        String::from_utf8(encode_pem(label, der)).expect("PEM is text")
    }

    /// A SEC1 structure of the right shape (the key bytes are not a real key: only the
    /// wrapping is checked here; real keys are loaded by the integration tests).
    fn sec1(with_curve: bool) -> Vec<u8> {
        let mut content = vec![0x02, 0x01, 0x01];
        content.extend(tlv(OCTET_STRING, &[7; 32]));
        if with_curve {
            // prime256v1 (1.2.840.10045.3.1.7)
            let p256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
            content.extend(tlv(SEC1_PARAMETERS, &p256));
        }
        content.extend(tlv(0xa1, &[0x03, 0x02, 0x00, 0x04]));
        tlv(SEQUENCE, &content)
    }

    #[test]
    fn lengths_are_encoded_in_their_shortest_form() {
        assert_eq!(tlv(0x04, &[1, 2]), [0x04, 0x02, 1, 2]);
        assert_eq!(tlv(0x04, &[0; 0x80])[..3], [0x04, 0x81, 0x80]);
        assert_eq!(tlv(0x04, &[0; 0x1234])[..4], [0x04, 0x82, 0x12, 0x34]);
        let long = tlv(0x30, &[9; 300]);
        assert_eq!(read_tlv(&long), Ok((0x30, &[9u8; 300][..], &[][..])));
    }

    #[test]
    fn pkcs8_passes_through() {
        let der = private_key_info(RSA_ALGORITHM, &tlv(SEQUENCE, &[0x02, 0x01, 0x00]));
        // Leading text and other blocks do not matter; native-tls needs the BEGIN line first.
        let text = format!("key for x\n{}", pem("PRIVATE KEY", &der));
        assert_eq!(pkcs8_der(text.as_bytes()), der);
    }

    #[test]
    fn pkcs1_is_wrapped_with_the_rsa_algorithm() {
        let pkcs1 = tlv(SEQUENCE, &[0x02, 0x01, 0x00, 0x02, 0x01, 0x05]);
        let out = pkcs8_der(pem("RSA PRIVATE KEY", &pkcs1).as_bytes());
        let (tag, info, rest) = read_tlv(&out).expect("outer");
        assert_eq!((tag, rest), (SEQUENCE, &[][..]));
        let mut expected = vec![0x02, 0x01, 0x00];
        expected.extend_from_slice(RSA_ALGORITHM);
        expected.extend(tlv(OCTET_STRING, &pkcs1));
        assert_eq!(info, expected);
    }

    #[test]
    fn sec1_is_wrapped_with_its_curve_after_ec_parameters() {
        let key = sec1(true);
        let text = format!(
            "{}{}",
            pem("EC PARAMETERS", &[0x06, 0x01, 0x00]),
            pem("EC PRIVATE KEY", &key)
        );
        let out = pkcs8_der(text.as_bytes());
        let info = whole_sequence(&out).expect("outer");
        let (_, _, rest) = read_tlv(info).expect("version");
        let (tag, algorithm, rest) = read_tlv(rest).expect("algorithm");
        assert_eq!(tag, SEQUENCE);
        assert!(algorithm.starts_with(EC_PUBLIC_KEY_OID));
        assert_eq!(
            &algorithm[EC_PUBLIC_KEY_OID.len()..],
            [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        );
        assert_eq!(read_tlv(rest), Ok((OCTET_STRING, &key[..], &[][..])));
    }

    #[test]
    fn what_cannot_be_wrapped_is_refused_with_the_reason() {
        let refused = |text: String| match Pkcs8Key::from_pem(text.as_bytes()) {
            Ok(_) => panic!("{text} must be refused"),
            Err(reason) => reason,
        };
        assert!(refused(pem("EC PRIVATE KEY", &sec1(false))).contains("does not name its curve"));
        assert!(refused(pem("ENCRYPTED PRIVATE KEY", &[0x30, 0x00])).contains("encrypted"));
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                      DEK-Info: AES-128-CBC,00\n\nMAA=\n-----END RSA PRIVATE KEY-----\n";
        assert!(refused(legacy.to_owned()).contains("encrypted"));
        assert!(refused(pem("CERTIFICATE", &[0x30, 0x00])).contains("no PRIVATE KEY"));
        assert!(refused("hello".to_owned()).contains("no PRIVATE KEY"));
        assert!(refused(pem("RSA PRIVATE KEY", &[0x02, 0x01, 0x00])).contains("not an RSA"));
        assert!(refused(pem("RSA PRIVATE KEY", &[0x30, 0x05, 0x00])).contains("truncated"));
        let unterminated = "-----BEGIN PRIVATE KEY-----\nMAA=\n";
        assert!(refused(unterminated.to_owned()).contains("without its END line"));
        let not_base64 = "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n";
        assert!(refused(not_base64.to_owned()).contains("not base64"));
    }
}
