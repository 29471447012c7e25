//! The server's `/status` endpoint, read with a minimal HTTP/1.1 GET: the generator only needs
//! the `clients` count, to know when every client is registered, and the count of
//! notifications forwarded, to time the server's receiver.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// Where `/status` lives: host, port and path of a plain `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl StatusUrl {
    /// Parses `http://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<StatusUrl, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let (host, port) = split_host_port(authority, 80)
            .ok_or_else(|| format!("{url:?} has an invalid host or port"))?;
        Ok(StatusUrl { host, port, path })
    }

    /// `/status` beside a `ws://` stream URL.
    pub fn beside(ws_url: &str) -> Option<StatusUrl> {
        let rest = ws_url.strip_prefix("ws://")?;
        let authority = rest.split('/').next()?;
        let (host, port) = split_host_port(authority, 80)?;
        Some(StatusUrl {
            host,
            port,
            path: "/status".to_owned(),
        })
    }

    pub fn display(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            format!("http://{}:{}{}", self.host, self.port, self.path)
        }
    }

    /// The `clients` field of the status JSON.
    pub async fn clients(&self) -> Result<u64, String> {
        self.counter("clients").await
    }

    /// The `notifications_forwarded` field: how many notifications the server's receiver has
    /// handed to its fan-out.
    pub async fn forwarded(&self) -> Result<u64, String> {
        self.counter("notifications_forwarded").await
    }

    /// A numeric field of the status JSON.
    async fn counter(&self, field: &str) -> Result<u64, String> {
        let body = timeout(Duration::from_secs(5), self.get())
            .await
            .map_err(|_| "no answer within 5 s".to_owned())??;
        let value: serde_json::Value =
            serde_json::from_str(&body).map_err(|err| format!("not JSON: {err}"))?;
        value[field]
            .as_u64()
            .ok_or_else(|| format!("no numeric {field:?} field"))
    }

    async fn get(&self) -> Result<String, String> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| err.to_string())?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\r\n",
            self.path, self.host, self.port
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| err.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|err| err.to_string())?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| "malformed HTTP response".to_owned())?;
        let status_line = head.lines().next().unwrap_or_default();
        if !status_line.contains(" 200") {
            return Err(format!("answered {status_line:?}"));
        }
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Ok(dechunk(body));
        }
        Ok(body.to_owned())
    }

    /// Polls until at least `want` clients are registered; returns the last count seen.
    pub async fn wait_for_clients(&self, want: u64, limit: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.clients().await?;
            if seen >= want {
                return Ok(seen);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{seen} of {want} clients registered after {limit:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority.to_owned(), default_port)),
        None => None,
    }
}

/// Joins the chunks of a chunked body (enough for a small JSON document).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let s = StatusUrl::beside("ws://127.0.0.1:8080/stream").expect("ws url");
        assert_eq!(s.display(), "http://127.0.0.1:8080/status");
        let s = StatusUrl::beside("ws://[::1]:9/x").expect("ws url");
        assert_eq!((s.host.as_str(), s.port), ("::1", 9));
        assert_eq!(StatusUrl::beside("ws://host/x").map(|s| s.port), Some(80));
        assert!(StatusUrl::beside("wss://host/x").is_none());
        let s = StatusUrl::parse("http://localhost:81/st").expect("http url");
        assert_eq!(
            (s.host.as_str(), s.port, s.path.as_str()),
            ("localhost", 81, "/st")
        );
        assert!(StatusUrl::parse("localhost:81").is_err());
        assert!(StatusUrl::parse("http://localhost:x/").is_err());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
