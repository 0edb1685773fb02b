//! The POP3 protocol, no I/O: the wire format (commands, responses, body framing) from the
//! `popgate-wire` crate, which the demo server shares, plus CAPA rewriting and the session
//! tracker.

pub use popgate_wire::{command, printable, response};

pub(crate) mod capa;
pub mod tracker;
