//! The per-session protocol core, with no I/O: every decision a hop between a client and the
//! server makes (what to forward, what to answer itself, when to start TLS, how long to hold a
//! reply, when and how to close) is taken here, over bytes and timer expiries the driver hands
//! in, as [`Output`]s the driver carries out and [`SessionEvent`]s it dispatches. Sockets, TLS,
//! clocks and the shared services (login penalty, audit, metrics) live in `session`.
//! The upstream's own dialogue before the relay (greeting, STLS, XCLIENT, routing mode's login)
//! is [`dialogue`]. [`Session`] is what the driver feeds: the hop, and in routing mode the
//! [`front`] with the hand-over between the two.

pub(crate) mod connect;
pub(crate) mod dialogue;
pub(crate) mod front;
mod hop;
mod output;
pub(crate) mod policy;
pub(crate) mod scan;
mod session;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod sim;

pub(crate) use hop::{Hop, HopConfig};
pub(crate) use output::{DeadMark, Marks, Output, SessionEvent, UpstreamEnd, UpstreamPurpose};
pub(crate) use scan::{ScanAction, ScanRequest};
pub(crate) use session::{Session, SessionStage};

#[cfg(test)]
mod tests;
