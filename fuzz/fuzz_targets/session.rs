//! A whole session: the session machine (the hop, in routing mode the front, and the routed
//! login's upstream dialogue: greeting, STLS to the server, the replay; for some inputs first
//! the connect phase of a `connect` rule's delay, with client bytes kept for the start) driven as the driver
//! drives it, by a scripted client and a model server, every chunking and timer firing decoded from the
//! input (`src/proxy/sim.rs`, behind the `fuzzing` feature).
//!
//! Invariants, checked on every run by the simulator (a violation panics): under require-tls
//! no credential goes upstream before the client's TLS handshake (no PASS/APOP/AUTH line, no
//! SASL answer, no byte of the marked secrets, raw or base64); no body terminator reaches the
//! client that the server did not send (a cut body never arrives complete); server replies
//! reach the client in command order and never answer a command popgate injected; no panic;
//! the session ends within a bounded number of steps once the input is used up.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    popgate::fuzzing::run(data);
});
