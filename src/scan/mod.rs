//! Content scanning (issue 23): the held body of a retrieved message ([`Spool`]) and the
//! scanners it is sent to (clamd, rspamd), each over its own protocol. A service with I/O: the
//! session driver feeds the spool and awaits the verdicts; the protocol core only decides what
//! they mean for the client (`docs/scanning.md`).

// Until `Scanners` (the next commits) uses all of the spool.
#[allow(dead_code)]
mod spool;

pub use spool::Spool;
