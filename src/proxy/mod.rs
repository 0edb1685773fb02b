//! The per-session protocol core, with no I/O: every decision a hop between a client and the
//! server makes (what to forward, what to answer itself, when to start TLS, when to wait, when
//! and how to close) is taken here, over bytes the driver hands in, as [`Action`]s the driver
//! carries out. Sockets, TLS and timers live in `session`. The upstream's own dialogue before the
//! relay (greeting, STLS, XCLIENT, routing mode's login) is [`dialogue`].

pub(crate) mod connect;
pub(crate) mod dialogue;
pub(crate) mod front;
mod hop;
pub(crate) mod policy;

pub(crate) use hop::{Action, Hop, HopConfig, Marks, Observe};

#[cfg(test)]
mod tests;
