//! Signed tokens (JWT): accepted as a Bearer header, as `?token=` and as a websocket
//! subprotocol entry; verified with an HMAC secret or a public key of one algorithm; `exp`,
//! `nbf`, `aud` and the `channels` and `filter` claims enforced; the shared token still works;
//! and no token ever appears in the server's log.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use crate::harness::{
    Ending, PgCluster, RawWs, Server, ServerOpts, next_event, sse_connect, upgrade, ws_connect_with,
};

const SECRET: &str = "a-secret-of-the-issuer";
const AUDIENCE: &str = "vulcan-stream";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

fn hs256(claims: &Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

/// A token that says it needs no signature (`alg: none`), which must never be accepted.
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", b64.encode(claims.to_string()))
}

/// The status of a websocket upgrade of `path` with `extra` headers.
async fn status(server: &Server, path: &str, extra: &[(&str, &str)]) -> Result<(u16, String)> {
    let resp = upgrade(server.port(), path, extra).await?;
    Ok((resp.status, resp.text()))
}

#[tokio::test(flavor = "multi_thread")]
async fn hs256_tokens_are_accepted_where_clients_can_send_them_and_bad_ones_are_refused()
-> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "jwt-hs256";
    let opts = ServerOpts::with_db(pg, channel)
        .env("JWT_SECRET", SECRET)
        .env("JWT_AUDIENCE", AUDIENCE)
        .env("STREAM_TOKEN", "the-shared-token")
        .env("LOG_LEVEL", "debug");
    let server = Server::spawn(opts).await?;
    let exp = unix_now() + 600;
    let good = hs256(
        &json!({"exp": exp, "aud": AUDIENCE, "sub": "agent-1"}),
        SECRET,
    );
    let bearer = format!("Bearer {good}");

    let (code, _) = status(&server, "/stream", &[("Authorization", &bearer)]).await?;
    assert_eq!(code, 101, "Bearer");
    let (code, _) = status(&server, &format!("/stream?token={good}"), &[]).await?;
    assert_eq!(code, 101, "?token=");
    // A browser offers the token beside the protocol the server answers with; the 101 names
    // only that protocol, never the token.
    let offer = format!("vulcan-stream.v1, token.{good}");
    let resp = upgrade(
        server.port(),
        "/stream",
        &[("Sec-WebSocket-Protocol", offer.as_str())],
    )
    .await?;
    assert_eq!(resp.status, 101, "subprotocol: {resp:?}");
    assert_eq!(
        resp.header("sec-websocket-protocol"),
        Some("vulcan-stream.v1")
    );
    let (code, _) = status(&server, "/stream?token=the-shared-token", &[]).await?;
    assert_eq!(code, 101, "the shared token keeps working");

    let mut refused = vec![
        ("no token", String::new(), "a valid token is required"),
        (
            "expired",
            hs256(&json!({"exp": unix_now() - 60, "aud": AUDIENCE}), SECRET),
            "expired",
        ),
        (
            "not yet valid",
            hs256(
                &json!({"exp": exp, "nbf": unix_now() + 600, "aud": AUDIENCE}),
                SECRET,
            ),
            "not valid yet",
        ),
        (
            "another audience",
            hs256(&json!({"exp": exp, "aud": "someone-else"}), SECRET),
            "wrong audience",
        ),
        (
            "another secret",
            hs256(&json!({"exp": exp, "aud": AUDIENCE}), "not-the-secret"),
            "bad signature",
        ),
        ("not a token", "garbage".to_owned(), "not a signed token"),
        (
            "alg none",
            unsigned(&json!({"exp": exp, "aud": AUDIENCE})),
            "not a signed token",
        ),
    ];
    for (what, token, why) in refused.drain(..) {
        let path = if token.is_empty() {
            "/stream".to_owned()
        } else {
            format!("/stream?token={token}")
        };
        let (code, body) = status(&server, &path, &[]).await?;
        assert_eq!(code, 401, "{what}: {body}");
        ensure!(body.contains(why), "{what}: {body:?} should say {why:?}");
    }

    // Claims: a channel list without this channel is refused (403); a filter binds the client,
    // which may narrow it but not widen it, and a filter the server cannot apply is refused.
    let other_channel = hs256(
        &json!({"exp": exp, "aud": AUDIENCE, "channels": ["elsewhere"]}),
        SECRET,
    );
    let (code, body) = status(&server, &format!("/stream?token={other_channel}"), &[]).await?;
    assert_eq!(code, 403, "{body}");
    ensure!(body.contains("channels"), "{body}");
    let filtered = hs256(
        &json!({"exp": exp, "aud": AUDIENCE, "filter": {"agent_id": "A"}}),
        SECRET,
    );
    let (code, body) = status(&server, &format!("/stream?token={filtered}"), &[]).await?;
    assert_eq!(code, 101, "{body}");
    let narrowed = format!("/stream?token={filtered}&agent_id=A&action=abort");
    let (code, body) = status(&server, &narrowed, &[]).await?;
    assert_eq!(code, 101, "{body}");
    let widened = format!("/stream?token={filtered}&agent_id=B");
    let (code, body) = status(&server, &widened, &[]).await?;
    assert_eq!(code, 403, "{body}");
    ensure!(body.contains("agent_id=\"B\" is outside"), "{body}");
    let unknown_field = hs256(
        &json!({"exp": exp, "aud": AUDIENCE, "filter": {"team": "red"}}),
        SECRET,
    );
    let (code, body) = status(&server, &format!("/stream?token={unknown_field}"), &[]).await?;
    assert_eq!(code, 403, "{body}");
    ensure!(body.contains("\"team\""), "{body}");
    let this_channel = hs256(
        &json!({"exp": exp, "aud": AUDIENCE, "channels": [channel, "elsewhere"]}),
        SECRET,
    );
    let mut ws = ws_connect_with(
        server.port(),
        "/stream",
        &[("Authorization", &format!("Bearer {this_channel}"))],
    )
    .await?;
    server.wait_for_clients(1).await?;
    let payload = r#"{"action":"jwt"}"#;
    pg.notify(channel, payload).await?;
    assert_eq!(next_event(&mut ws).await?, payload);

    // Refusals were logged (at info), but never with a token.
    let log = server.stderr();
    ensure!(log.contains("refused"), "refusals are logged: {log}");
    for token in [&good, &other_channel, &filtered, &this_channel] {
        ensure!(!log.contains(token.as_str()), "a token in the log: {log}");
    }
    ensure!(
        !log.contains("the-shared-token"),
        "the shared token in the log"
    );
    Ok(())
}

/// A websocket client is closed with 4001 when its token expires, and an event stream ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_ends_when_its_token_expires() -> Result<()> {
    let pg = PgCluster::shared().await;
    let channel = "jwt-exp";
    let opts = ServerOpts::with_db(pg, channel).env("JWT_SECRET", SECRET);
    let server = Server::spawn(opts).await?;
    // Whole seconds: `exp` has no finer grain. Far enough ahead for both connections to be
    // admitted before it.
    let exp = unix_now() + 3;
    let token = hs256(&json!({ "exp": exp }), SECRET);
    let expires_at = UNIX_EPOCH + Duration::from_secs(exp);
    let mut ws = RawWs::connect_path(server.port(), &format!("/stream?token={token}")).await?;
    let mut events = sse_connect(server.port(), &format!("/stream?token={token}"), &[]).await?;
    server.wait_for_clients(2).await?;

    let (ending, _) = ws.read_to_end(Duration::from_secs(20)).await?;
    let ended = SystemTime::now();
    assert_eq!(ending, Ending::Close(Some(4001)), "the websocket's close");
    let late = ended
        .duration_since(expires_at)
        .context("closed before the token expired")?;
    ensure!(
        late < Duration::from_secs(2),
        "closed {late:?} after expiry"
    );
    let started = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await {
            Ok(Ok(None)) => break,
            Ok(Ok(Some(_))) => {}
            Ok(Err(err)) => bail!("the event stream failed instead of ending: {err}"),
            Err(_) => bail!("the event stream did not end"),
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "still streaming"
        );
    }
    server.wait_for_clients(0).await?;
    Ok(())
}

/// `openssl genpkey` with `args` into `dir/name`, and its public key into `dir/name.pub`.
fn key_pair(dir: &Path, name: &str, args: &[&str]) -> Result<(Vec<u8>, String)> {
    let private = dir.join(name);
    let public = dir.join(format!("{name}.pub"));
    let run = |args: Vec<&str>| -> Result<()> {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .context("run openssl (Debian: apt-get install openssl)")?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let private_path = private.to_str().context("path")?;
    let public_path = public.to_str().context("path")?;
    let mut generate = vec!["genpkey"];
    generate.extend_from_slice(args);
    generate.extend_from_slice(&["-out", private_path]);
    run(generate)?;
    run(vec![
        "pkey",
        "-in",
        private_path,
        "-pubout",
        "-out",
        public_path,
    ])?;
    Ok((std::fs::read(&private)?, std::fs::read_to_string(&public)?))
}

/// A public key verifies its own algorithm's tokens, given as PEM or as base64 of the PEM; a
/// token that names HS256 and is signed with the public key as a secret (the classic
/// algorithm confusion) is refused.
#[tokio::test(flavor = "multi_thread")]
async fn public_keys_verify_rs256_es256_and_eddsa_and_nothing_else() -> Result<()> {
    use base64::Engine as _;
    let pg = PgCluster::shared().await;
    let dir = tempfile::tempdir()?;
    let kinds: [(&str, &[&str], Algorithm); 3] = [
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Algorithm::RS256,
        ),
        (
            "p256",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Algorithm::ES256,
        ),
        ("ed25519", &["-algorithm", "ed25519"], Algorithm::EdDSA),
    ];
    for (i, (name, args, alg)) in kinds.into_iter().enumerate() {
        let (private, public) = key_pair(dir.path(), name, args)?;
        let encoding = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private)?,
            Algorithm::ES256 => EncodingKey::from_ec_pem(&private)?,
            _ => EncodingKey::from_ed_pem(&private)?,
        };
        // Every other kind given as base64, as an environment file would hold it.
        let configured = if i % 2 == 0 {
            public.clone()
        } else {
            base64::engine::general_purpose::STANDARD.encode(&public)
        };
        let channel = format!("jwt-{name}");
        let opts = ServerOpts::with_db(pg, &channel).env("JWT_PUBLIC_KEY", configured);
        let server = Server::spawn(opts).await?;
        let claims = json!({"exp": unix_now() + 600});
        let signed = encode(&Header::new(alg), &claims, &encoding)?;
        let (code, body) = status(&server, &format!("/stream?token={signed}"), &[]).await?;
        assert_eq!(code, 101, "{name}: {body}");
        let confused = hs256(&claims, &public);
        let (code, body) = status(&server, &format!("/stream?token={confused}"), &[]).await?;
        assert_eq!(code, 401, "{name}, HS256 with the public key: {body}");
        ensure!(body.contains("not accepted"), "{name}: {body}");
    }
    Ok(())
}
