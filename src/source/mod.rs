//! Where messages come from: the PostgreSQL `LISTEN` connection ([`notify`], the default), or
//! the durable table ([`table`], whose schema is [`schema`]); both reach PostgreSQL through
//! [`pg`] (connection options, libpq's sslmodes on native-tls).
//!
//! A source hands payloads to the [`crate::stream`] and reports whether it is live; it knows
//! nothing of clients.

pub mod notify;
pub mod pg;
pub mod schema;
pub mod table;
