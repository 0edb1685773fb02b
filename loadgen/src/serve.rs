//! `popgate-load serve`: the demo POP3 server (popgate-demo) as a fast in-memory upstream with
//! many users, so that the session rate measures the proxy and not the server.

use std::net::SocketAddr;

use popgate_demo::{DemoServer, Mailbox, ServerOptions, sample_mailboxes};

/// The users and messages to serve.
#[derive(Debug, Clone)]
pub struct Mailboxes {
    /// Users are `{prefix}0` .. `{prefix}{users - 1}`.
    pub prefix: String,
    /// Number of users.
    pub users: usize,
    /// Password of every user.
    pub pass: String,
    /// The first this many users also hold message 2, of `big_bytes` octets (each user its own
    /// copy in memory: keep it small).
    pub big_users: usize,
    /// Size of the big message.
    pub big_bytes: usize,
}

/// A message of at least `bytes` octets: 72-octet CRLF lines, every 50th starting with a dot
/// (stuffed on the wire), as benches/retr_throughput.sh writes for Dovecot.
pub fn big_message(bytes: usize) -> Vec<u8> {
    let mut m = b"From: bench@example.org\r\nSubject: bench\r\n\r\n".to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ........\r\n";
    let mut i = 0usize;
    while m.len() < bytes {
        if i.is_multiple_of(50) {
            m.push(b'.');
        }
        m.extend_from_slice(line);
        i += 1;
    }
    m
}

/// Build the mailboxes: message 1 of every user is the demo's welcome message.
pub fn mailboxes(spec: &Mailboxes) -> Vec<Mailbox> {
    let small = sample_mailboxes()
        .into_iter()
        .next()
        .and_then(|m| m.messages.into_iter().next())
        .unwrap_or_else(|| b"Subject: small\r\n\r\nhello\r\n".to_vec());
    let big = (spec.big_users > 0).then(|| big_message(spec.big_bytes));
    (0..spec.users)
        .map(|i| {
            let mut msgs = vec![small.clone()];
            if i < spec.big_users
                && let Some(big) = &big
            {
                msgs.push(big.clone());
            }
            Mailbox::new(format!("{}{i}", spec.prefix), spec.pass.clone(), msgs)
        })
        .collect()
}

/// Serve until the process is killed; prints `listening on ADDR` first (for scripts and tests
/// that bind port 0).
pub async fn serve(bind: SocketAddr, spec: &Mailboxes) -> std::io::Result<()> {
    let srv = DemoServer::start(bind, ServerOptions::new(mailboxes(spec))).await?;
    println!("listening on {}", srv.local_addr());
    std::future::pending::<()>().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_message_size_and_stuffing() {
        let m = big_message(10_000);
        assert!(m.len() >= 10_000 && m.len() < 10_000 + 80);
        assert!(m.ends_with(b"\r\n"));
        assert!(m.windows(3).any(|w| w == b"\n.0"));
    }

    #[test]
    fn only_the_first_users_hold_the_big_message() {
        let spec = Mailboxes {
            prefix: "load".into(),
            users: 3,
            pass: "pass".into(),
            big_users: 1,
            big_bytes: 1000,
        };
        let m = mailboxes(&spec);
        let shape: Vec<(String, usize)> = m
            .iter()
            .map(|m| (m.user.clone(), m.messages.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("load0".into(), 2),
                ("load1".into(), 1),
                ("load2".into(), 1)
            ]
        );
    }
}
