//! The held body of one retrieved message ([`Spool`]) and the streaming un-stuffer that
//! turns its wire bytes into the message the scanners get ([`Unstuffer`]).

use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncWrite, AsyncWriteExt as _};

use crate::config::scan::ScanConfig;

/// Reads from a spool (for the client and the scanners) go in pieces of this size; a file
/// spool is written in pieces of about this size too.
pub(crate) const CHUNK: usize = 64 << 10;

/// The body of a message held for scanning, as on the wire: dot-stuffed, CRLF line ends,
/// without the `.CRLF` terminator line.
///
/// It is kept in memory up to `[scan] spool_memory`; a body that grows past it goes, whole, to
/// a file made in `spool_dir` (mode 0600, unlinked as soon as it is created, so nothing is
/// left behind whatever happens to popgate). Reads are positional, so several scanners read
/// one spool at once (`&Spool`). After an error from [`Spool::write`] the spool is incomplete:
/// the message cannot be delivered from it.
#[derive(Debug)]
pub struct Spool {
    /// The bytes after the file's end: all of the body while it is in memory.
    tail: Vec<u8>,
    /// The file, once the body outgrew memory.
    file: Option<Arc<std::fs::File>>,
    /// Bytes of the body in the file (`tail` follows them).
    file_len: u64,
    /// `spool_memory`.
    memory_limit: u64,
    /// `spool_dir`.
    dir: PathBuf,
    /// Where the bytes spooled are counted (`popgate_scan_spooled_bytes_total`).
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The memory all spools of the process share, if bounded; `reserved` of it is this
    /// spool's (its `tail` while in memory), given back when it goes to a file or is dropped.
    budget: Option<Arc<MemoryBudget>>,
    reserved: u64,
}

/// The memory the in-memory spools of all sessions may hold together: past it, a new body
/// goes to a file at once, as if it were larger than `spool_memory` (so that many sessions
/// held at once by a slow scanner do not each hold `spool_memory` in memory).
#[derive(Debug)]
pub(crate) struct MemoryBudget {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

impl MemoryBudget {
    /// A budget of `limit` octets.
    pub(crate) fn new(limit: u64) -> MemoryBudget {
        MemoryBudget {
            limit,
            used: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Take `n` octets, if they are left.
    fn take(&self, n: u64) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        self.used
            .fetch_update(AcqRel, std::sync::atomic::Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    /// Give back `n` octets taken.
    fn give(&self, n: u64) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }

    /// Octets taken now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Run blocking file I/O off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

impl Spool {
    /// An empty spool with the `[scan]` settings `spool_memory` and `spool_dir`.
    pub fn new(config: &ScanConfig) -> Spool {
        Spool {
            tail: Vec::new(),
            file: None,
            file_len: 0,
            memory_limit: config.spool_memory.0,
            dir: config.spool_dir.clone(),
            metrics: None,
            budget: None,
            reserved: 0,
        }
    }

    /// The same, its memory part taken from `budget` (shared by the spools of the process).
    pub(crate) fn within(mut self, budget: Arc<MemoryBudget>) -> Spool {
        self.budget = Some(budget);
        self
    }

    /// Give back the memory budget this spool holds.
    fn release(&mut self) {
        if let Some(b) = &self.budget {
            b.give(self.reserved);
        }
        self.reserved = 0;
    }

    /// The same, counting the bytes spooled into `metrics`.
    pub(crate) fn with_metrics(
        config: &ScanConfig,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Spool {
        let mut s = Spool::new(config);
        s.metrics = metrics;
        s
    }

    /// Append wire bytes of the body. The first write that takes the body past
    /// `spool_memory` moves it to a file; from then on everything goes there.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            let n = data.len() as u64;
            if self.tail.len() as u64 + n <= self.memory_limit
                && self.budget.as_ref().is_none_or(|b| b.take(n))
            {
                self.reserved += n;
                self.tail.extend_from_slice(data);
                return Ok(());
            }
            let dir = self.dir.clone();
            let file = blocking(move || {
                let file = match tempfile::tempfile_in(&dir) {
                    // `spool_dir` is made when first needed (not by `popgate check`).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        use std::os::unix::fs::DirBuilderExt as _;
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o700)
                            .create(&dir)?;
                        tempfile::tempfile_in(&dir)?
                    }
                    other => other?,
                };
                // An O_TMPFILE file gets 0666 less the umask: make it the owner's alone.
                file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
                Ok(file)
            })
            .await?;
            self.file = Some(Arc::new(file));
            self.count_file(self.tail.len() as u64);
            // The memory part is on its way to the file (at most a chunk stays in memory).
            self.release();
        }
        self.tail.extend_from_slice(data);
        self.count_file(data.len() as u64);
        if self.tail.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    fn count_file(&self, n: u64) {
        if let Some(m) = &self.metrics {
            m.scan_spooled("file", n);
        }
    }

    /// Write the tail to the file (a file spool only).
    async fn flush(&mut self) -> io::Result<()> {
        let Some(file) = self.file.clone() else {
            return Ok(());
        };
        if self.tail.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.tail);
        let offset = self.file_len;
        let mut buf = blocking(move || file.write_all_at(&buf, offset).map(|()| buf)).await?;
        self.file_len += buf.len() as u64;
        if buf.capacity() > 2 * CHUNK {
            // The memory part moved out: do not keep `spool_memory` allocated.
            buf = Vec::with_capacity(CHUNK + CHUNK / 2);
        }
        buf.clear();
        self.tail = buf;
        Ok(())
    }

    /// Octets spooled (wire bytes).
    pub fn len(&self) -> u64 {
        self.file_len + self.tail.len() as u64
    }

    /// Whether nothing is spooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the body went to a file.
    pub fn on_disk(&self) -> bool {
        self.file.is_some()
    }

    /// Write the spooled wire bytes, in order, to `w` (for the client); returns how many.
    pub async fn copy_to<W: AsyncWrite + Unpin>(&self, w: &mut W) -> io::Result<u64> {
        let mut buf = Vec::new();
        let mut offset = 0;
        while offset < self.file_len {
            buf = self.read_file(offset, buf).await?;
            w.write_all(&buf).await?;
            offset += buf.len() as u64;
        }
        w.write_all(&self.tail).await?;
        Ok(self.len())
    }

    /// Up to [`CHUNK`] bytes of the file from `offset` (< `file_len`), into `buf`.
    async fn read_file(&self, offset: u64, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let Some(file) = self.file.clone() else {
            return Err(io::Error::other("spool: no file"));
        };
        let n = (self.file_len - offset).min(CHUNK as u64) as usize;
        buf.resize(n, 0);
        blocking(move || file.read_exact_at(&mut buf, offset).map(|()| buf)).await
    }

    /// Up to [`CHUNK`] wire bytes from `offset` into `buf` (cleared first; empty at the end).
    pub(crate) async fn read_at(&self, offset: u64, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        if offset < self.file_len {
            return self.read_file(offset, buf).await;
        }
        let mut buf = buf;
        buf.clear();
        let start = usize::try_from(offset - self.file_len)
            .unwrap_or(usize::MAX)
            .min(self.tail.len());
        let end = start.saturating_add(CHUNK).min(self.tail.len());
        buf.extend_from_slice(&self.tail[start..end]);
        Ok(buf)
    }

    /// Cut the file short behind the spool's back, so that reads fail (tests of readers).
    #[cfg(test)]
    pub(crate) fn break_file(&self) {
        if let Some(f) = &self.file {
            f.set_len(0).unwrap();
        }
    }

    /// A reader of the message as the scanners get it: un-stuffed.
    pub(crate) fn unstuffed(&self) -> Unstuffed<'_> {
        Unstuffed {
            spool: self,
            offset: 0,
            unstuffer: Unstuffer::default(),
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.release();
        if let Some(m) = &self.metrics
            && self.file.is_none()
            && !self.tail.is_empty()
        {
            m.scan_spooled("memory", self.tail.len() as u64);
        }
    }
}

/// Reads a [`Spool`] un-stuffed, in pieces; each reader has its own position.
#[derive(Debug)]
pub(crate) struct Unstuffed<'a> {
    spool: &'a Spool,
    offset: u64,
    unstuffer: Unstuffer,
}

impl Unstuffed<'_> {
    /// The next piece (at most [`CHUNK`] bytes, never empty) into `buf`, or `None` at the end.
    pub(crate) async fn next(&mut self, buf: Vec<u8>) -> io::Result<Option<Vec<u8>>> {
        let mut buf = buf;
        loop {
            buf = self.spool.read_at(self.offset, buf).await?;
            if buf.is_empty() {
                return Ok(None);
            }
            self.offset += buf.len() as u64;
            self.unstuffer.apply(&mut buf);
            if !buf.is_empty() {
                return Ok(Some(buf));
            }
        }
    }
}

/// Removes the dot-stuffing of a multi-line body: a `.` at the start of a line (after a line
/// feed, or at the very start) is dropped. Fed piece by piece; a piece may end anywhere.
#[derive(Debug, Clone)]
pub(crate) struct Unstuffer {
    /// The next byte starts a line.
    line_start: bool,
}

impl Default for Unstuffer {
    fn default() -> Self {
        Unstuffer { line_start: true }
    }
}

impl Unstuffer {
    /// Un-stuff the next piece in place.
    pub(crate) fn apply(&mut self, buf: &mut Vec<u8>) {
        let n = buf.len();
        let (mut read, mut write) = (0, 0);
        while read < n {
            if self.line_start && buf[read] == b'.' {
                read += 1;
                self.line_start = false;
                continue;
            }
            let end = memchr::memchr(b'\n', &buf[read..]).map_or(n, |i| read + i + 1);
            self.line_start = buf[end - 1] == b'\n';
            if write != read {
                buf.copy_within(read..end, write);
            }
            write += end - read;
            read = end;
        }
        buf.truncate(write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ByteSize;

    fn config(memory: u64, dir: &std::path::Path) -> ScanConfig {
        ScanConfig {
            spool_memory: ByteSize(memory),
            spool_dir: dir.to_owned(),
            ..ScanConfig::default()
        }
    }

    /// Un-stuffing `wire` fed in pieces of `size` bytes.
    fn unstuff_in_pieces(wire: &[u8], size: usize) -> Vec<u8> {
        let mut u = Unstuffer::default();
        let mut out = Vec::new();
        for piece in wire.chunks(size) {
            let mut buf = piece.to_vec();
            u.apply(&mut buf);
            out.extend_from_slice(&buf);
        }
        out
    }

    #[test]
    fn unstuffer_removes_a_leading_dot_of_every_line_at_every_piece_size() {
        let wire = b".leading\r\n..two dots\r\nmid.dle\r\n.\r\n...\r\n\r\n.x\nbare.lf\n..\r\nend.";
        let want = b"leading\r\n.two dots\r\nmid.dle\r\n\r\n..\r\n\r\nx\nbare.lf\n.\r\nend.";
        for size in 1..=wire.len() {
            assert_eq!(
                unstuff_in_pieces(wire, size),
                want.to_vec(),
                "piece size {size}"
            );
        }
    }

    #[test]
    fn unstuffer_leaves_a_body_without_leading_dots_alone() {
        let wire = b"Subject: x\r\n\r\nno dots here. none. at all.\r\n";
        for size in 1..=wire.len() {
            assert_eq!(unstuff_in_pieces(wire, size), wire.to_vec());
        }
    }

    /// A body with leading dots, long lines and short ones.
    fn body(len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 100);
        let mut i = 0u32;
        while v.len() < len {
            i += 1;
            if i.is_multiple_of(3) {
                v.extend_from_slice(b"..");
            }
            let line = format!("line {i} {}\r\n", "x".repeat((i as usize * 37) % 300));
            v.extend_from_slice(line.as_bytes());
        }
        v.truncate(len);
        v
    }

    async fn read_unstuffed(spool: &Spool) -> Vec<u8> {
        let mut r = spool.unstuffed();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(b) = r.next(buf).await.unwrap() {
            assert!(!b.is_empty() && b.len() <= CHUNK);
            out.extend_from_slice(&b);
            buf = b;
        }
        out
    }

    async fn spool_of(wire: &[u8], piece: usize, cfg: &ScanConfig) -> Spool {
        let mut s = Spool::new(cfg);
        for p in wire.chunks(piece) {
            s.write(p).await.unwrap();
        }
        s
    }

    #[tokio::test]
    async fn a_small_body_stays_in_memory_and_copies_out_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(1 << 20, dir.path());
        let wire = body(100_000);
        for piece in [1, 7, 4096, 100_000] {
            let s = spool_of(&wire, piece, &cfg).await;
            assert!(!s.on_disk());
            assert_eq!(s.len(), wire.len() as u64);
            let mut out = Vec::new();
            assert_eq!(s.copy_to(&mut out).await.unwrap(), wire.len() as u64);
            assert_eq!(out, wire);
            assert_eq!(
                read_unstuffed(&s).await,
                unstuff_in_pieces(&wire, wire.len())
            );
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_body_over_spool_memory_goes_whole_to_an_unlinked_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(10_000, dir.path());
        let wire = body(300_001);
        for piece in [1000, 9_999, 10_001, 65_536, 300_001] {
            let mut s = Spool::new(&cfg);
            let mut written = 0;
            for p in wire.chunks(piece) {
                s.write(p).await.unwrap();
                written += p.len();
                assert_eq!(s.on_disk(), written > 10_000, "piece {piece} at {written}");
            }
            assert_eq!(s.len(), wire.len() as u64);
            // Created in spool_dir and unlinked at once: nothing to see there.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
            let mut out = Vec::new();
            assert_eq!(s.copy_to(&mut out).await.unwrap(), wire.len() as u64);
            assert!(out == wire, "piece {piece}: copy differs");
            let want = unstuff_in_pieces(&wire, wire.len());
            assert!(read_unstuffed(&s).await == want, "piece {piece}");
        }
    }

    #[tokio::test]
    async fn spools_past_the_process_memory_budget_go_to_disk_and_give_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(1000, dir.path());
        let budget = Arc::new(MemoryBudget::new(2500));
        let wire = body(900);
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = Spool::new(&cfg).within(budget.clone());
            for p in wire.chunks(100) {
                s.write(p).await.unwrap();
            }
            held.push(s);
        }
        // Two fit in 2500 octets; the third went to a file, whole and intact.
        let on_disk: Vec<bool> = held.iter().map(Spool::on_disk).collect();
        assert_eq!(on_disk, [false, false, true]);
        assert_eq!(budget.used(), 1800);
        let mut out = Vec::new();
        held[2].copy_to(&mut out).await.unwrap();
        assert_eq!(out, wire);
        // A spool that outgrows spool_memory gives its share back when it goes to a file.
        let mut big = Spool::new(&cfg).within(budget.clone());
        big.write(&wire[..600]).await.unwrap();
        assert_eq!(budget.used(), 2400);
        big.write(&wire).await.unwrap();
        assert!(big.on_disk());
        assert_eq!(budget.used(), 1800);
        held.clear();
        drop(big);
        assert_eq!(budget.used(), 0, "every spool gave its memory back");
        let mut s = Spool::new(&cfg).within(budget.clone());
        s.write(&wire).await.unwrap();
        assert!(!s.on_disk());
    }

    #[tokio::test]
    async fn a_file_spool_is_mode_0600() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(10, dir.path());
        let s = spool_of(&body(1000), 100, &cfg).await;
        let meta = s.file.as_ref().unwrap().metadata().unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn several_readers_read_one_spool_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(1000, dir.path());
        let wire = body(200_000);
        let s = spool_of(&wire, 3000, &cfg).await;
        let want = unstuff_in_pieces(&wire, 1);
        let (a, b, c) = tokio::join!(read_unstuffed(&s), read_unstuffed(&s), async {
            let mut out = Vec::new();
            s.copy_to(&mut out).await.unwrap();
            out
        });
        assert!(a == want && b == want && c == wire);
    }

    #[tokio::test]
    async fn a_missing_spool_dir_is_made_0700_when_first_needed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("a/spool");
        let cfg = config(10, &spool_dir);
        let mut s = Spool::new(&cfg);
        s.write(b"0123456789").await.unwrap();
        assert!(!spool_dir.exists(), "not while the body fits in memory");
        s.write(b"x").await.unwrap();
        assert!(s.on_disk());
        let mode = std::fs::metadata(&spool_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[tokio::test]
    async fn an_unusable_spool_dir_is_an_error_when_the_body_outgrows_memory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        let cfg = config(10, &file.join("spool"));
        let mut s = Spool::new(&cfg);
        s.write(b"0123456789").await.unwrap();
        assert!(s.write(b"x").await.is_err());
    }
}
