//! The server's `/status` endpoint, read with a minimal HTTP/1.1 GET: the generator only needs
//! the `clients` count, to know when every client is registered, and the count of
//! notifications forwarded, to time the server's receiver. The same GET probes `/status` and
//! `/ready` as a health checker would, and reads a counter of `/metrics`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// How long a request may take.
const ANSWER_LIMIT: Duration = Duration::from_secs(5);
const NO_ANSWER: &str = "no answer within 5 s";

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
        self.document().await?[field]
            .as_u64()
            .ok_or_else(|| format!("no numeric {field:?} field"))
    }

    /// The whole status JSON.
    pub async fn document(&self) -> Result<serde_json::Value, String> {
        let body = timeout(ANSWER_LIMIT, self.get())
            .await
            .map_err(|_| NO_ANSWER.to_owned())??;
        serde_json::from_str(&body).map_err(|err| format!("not JSON: {err}"))
    }

    /// The server's `epoch` field: a new one starts whenever its LISTEN connection is
    /// re-established.
    pub async fn epoch(&self) -> Result<String, String> {
        self.document().await?["epoch"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "no \"epoch\" field".to_owned())
    }

    async fn get(&self) -> Result<String, String> {
        let (status, head, body) = self.request(&self.path).await?;
        if status != 200 {
            let status_line = head.lines().next().unwrap_or_default();
            return Err(format!("answered {status_line:?}"));
        }
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return Ok(dechunk(&body));
        }
        Ok(body)
    }

    /// A counter of the server's `/metrics` (OpenMetrics text), by its full name
    /// (`..._total`).
    pub async fn metric(&self, name: &str) -> Result<f64, String> {
        let (status, _, body) = timeout(ANSWER_LIMIT, self.request("/metrics"))
            .await
            .map_err(|_| NO_ANSWER.to_owned())??;
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        body.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| format!("/metrics has no {name}"))
    }

    /// The sum of a counter of `/metrics` over all its labels (`name{…} value` lines), 0 when
    /// no labelled line exists yet (a family is empty until first counted).
    pub async fn metric_sum(&self, name: &str) -> Result<f64, String> {
        let (status, _, body) = timeout(ANSWER_LIMIT, self.request("/metrics"))
            .await
            .map_err(|_| NO_ANSWER.to_owned())??;
        if status != 200 {
            return Err(format!("/metrics answered {status}"));
        }
        Ok(body
            .lines()
            .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
            .filter_map(|rest| {
                rest.split_once("} ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .sum())
    }

    /// GETs `path` on this server, as a health probe does (a new connection each time); returns
    /// the status code.
    pub async fn probe(&self, path: &str) -> Result<u16, String> {
        self.request(path).await.map(|(status, _, _)| status)
    }

    /// One request on a new connection: the status code, the head and the body.
    async fn request(&self, path: &str) -> Result<(u16, String, String), String> {
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|err| err.to_string())?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\n\r\n",
            self.host, self.port
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
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("no status code in {head:?}"))?;
        Ok((status, head.to_owned(), body.to_owned()))
    }

    /// Polls until at most `want` clients are registered (the others' connections have been
    /// seen to close); returns the last count seen.
    pub async fn wait_for_clients_at_most(
        &self,
        want: u64,
        limit: Duration,
    ) -> Result<u64, String> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.clients().await;
            match &seen {
                Ok(seen) if *seen <= want => return Ok(*seen),
                Err(why) if why != NO_ANSWER => return Err(why.clone()),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(match seen {
                    Ok(seen) => {
                        format!("{seen} clients still registered after {limit:?}, {want} wanted")
                    }
                    Err(why) => format!("{why}, still after {limit:?}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until at least `want` clients are registered; returns the last count seen. A
    /// server busy with thousands of connections may leave a poll unanswered for a while: that
    /// one is retried until the limit, any other failure ends the wait.
    pub async fn wait_for_clients(&self, want: u64, limit: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.clients().await;
            match &seen {
                Ok(seen) if *seen >= want => return Ok(*seen),
                Err(why) if why != NO_ANSWER => return Err(why.clone()),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(match seen {
                    Ok(seen) => format!("{seen} of {want} clients registered after {limit:?}"),
                    Err(why) => format!("{why}, still after {limit:?}"),
                });
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
