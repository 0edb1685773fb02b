//! The POP3 wire protocol: pure parsers over byte slices, no I/O.

pub mod capa;
pub mod command;
pub mod response;
