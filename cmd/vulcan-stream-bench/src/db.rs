//! The PostgreSQL side: connection settings, publisher connections, the channel name and
//! how a message is published.

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

use crate::error::BenchError;
use crate::options::DbArgs;

/// How the publishers hand a message to the server: the server's `PG_SOURCE`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `pg_notify(channel, payload)`: a server in notify mode LISTENs on the channel.
    #[default]
    Notify,
    /// `vulcan_stream.publish(channel, payload)`: a row of the durable table, which a server in
    /// table mode reads (the schema must exist: `vulcan-stream migrate`).
    Table,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Notify => "notify",
            Source::Table => "table",
        }
    }

    /// One message per statement: `$1` the channel, `$2` the payload.
    pub fn one_sql(self) -> &'static str {
        match self {
            Source::Notify => "SELECT pg_notify($1, $2)",
            Source::Table => "SELECT vulcan_stream.publish($1, $2)",
        }
    }

    /// Many messages in one statement, in array order: `$2` the payloads. In table mode this is
    /// the batched publish of a high-rate publisher: one statement, one commit, many rows.
    pub fn batch_sql(self) -> &'static str {
        match self {
            Source::Notify => "SELECT count(pg_notify($1, p)) FROM unnest($2::text[]) AS p",
            Source::Table => {
                "SELECT count(vulcan_stream.publish($1, p)) FROM unnest($2::text[]) AS p"
            }
        }
    }
}

/// Where the publishers and the bare listener connect.
#[derive(Debug, Clone)]
pub struct Db {
    pub config: tokio_postgres::Config,
    /// `host:port/dbname`, for messages (never the password).
    pub target: String,
    pub channel: String,
    pub source: Source,
}

impl Db {
    /// From the command line's database options.
    pub fn from_args(args: &DbArgs) -> Result<Db, BenchError> {
        let mut db = Db::new(args.db.as_deref(), args.channel.as_deref())?;
        db.source = args.source;
        Ok(db)
    }

    /// From a libpq-style connection string, or else from the server's own environment
    /// variables (PG_HOST, PG_PORT, PG_DB, PG_USER, PG_PASSWORD or PG_PWD, PG_CHANNEL).
    pub fn new(conninfo: Option<&str>, channel: Option<&str>) -> Result<Db, BenchError> {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let config = match conninfo {
            Some(s) => s
                .parse::<tokio_postgres::Config>()
                .map_err(|err| BenchError::Usage(format!("--db: {err}")))?,
            None => {
                let mut config = tokio_postgres::Config::new();
                config.host(env("PG_HOST").as_deref().unwrap_or("127.0.0.1"));
                let port = env("PG_PORT").unwrap_or_else(|| "5432".to_owned());
                config.port(port.parse().map_err(|_| {
                    BenchError::Usage(format!("PG_PORT={port:?} is not a port number"))
                })?);
                config.user(env("PG_USER").as_deref().unwrap_or("postgres"));
                config.dbname(env("PG_DB").as_deref().unwrap_or("stream"));
                if let Some(password) = env("PG_PASSWORD").or_else(|| env("PG_PWD")) {
                    config.password(password);
                }
                config
            }
        };
        let channel = channel
            .map(str::to_owned)
            .or_else(|| env("PG_CHANNEL"))
            .unwrap_or_else(|| "events".to_owned());
        if channel.is_empty() {
            return Err(BenchError::Usage("--channel must not be empty".to_owned()));
        }
        let host = config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".to_owned());
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let target = format!(
            "{host}:{port}/{}",
            config.get_dbname().unwrap_or("(default database)")
        );
        Ok(Db {
            config,
            target,
            channel,
            source: Source::Notify,
        })
    }

    /// Opens a connection whose messages are driven by a background task (used by
    /// publishers, which need no notifications).
    pub async fn connect(&self) -> Result<Client, BenchError> {
        let (client, connection) =
            self.config
                .connect(NoTls)
                .await
                .map_err(|err| BenchError::Database {
                    target: self.target.clone(),
                    cause: format!("{err:#}"),
                })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// `LISTEN` on the channel, quoted as an identifier (so `My-Events` works).
    pub fn listen_sql(&self) -> String {
        format!("LISTEN \"{}\"", self.channel.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_and_channels() {
        let db = Db::new(
            Some("host=db port=6543 user=u dbname=d password=secret"),
            Some("My\"Events"),
        )
        .expect("valid");
        assert_eq!(db.target, "db:6543/d");
        assert_eq!(db.listen_sql(), r#"LISTEN "My""Events""#);
        assert!(matches!(
            Db::new(Some("port=notaport"), None),
            Err(BenchError::Usage(_))
        ));
        assert!(matches!(
            Db::new(Some("host=x"), Some("")),
            Err(BenchError::Usage(_))
        ));
    }
}
