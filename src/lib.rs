//! vulcan-stream: PostgreSQL LISTEN/NOTIFY to websocket broadcast.
