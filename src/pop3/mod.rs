//! The POP3 protocol, no I/O: the wire format (commands, responses, body framing) from the
//! `popgate-wire` crate, which the demo server shares, plus CAPA rewriting, the session
//! tracker, the SASL PLAIN/LOGIN decoder and every `-ERR` text popgate writes itself.

pub use popgate_wire::{command, printable, response};

pub(crate) mod capa;
pub(crate) mod replies;
pub(crate) mod sasl;
pub mod tracker;
