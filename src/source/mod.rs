//! Where messages come from. Today one source: the PostgreSQL `LISTEN` connection
//! ([`notify`]), reached through [`pg`] (connection options, libpq's sslmodes on native-tls).
//!
//! A source hands payloads to the [`crate::stream`] and reports whether it is live; it knows
//! nothing of clients.

pub mod notify;
pub mod pg;
