//! Durable outbox: every result is on disk before it is sent and stays there until the network
//! confirms it, so a crash or a lost connection never loses a result (protocol §7.5).
//!
//! One file per result, named by a monotonically increasing sequence number so resends keep
//! completion order. Writes are atomic (temporary file, rename); a crash leaves either the
//! whole entry or nothing, and stray temporary files are removed on open. The entry holds the
//! result's fields; each (re)send signs them in the envelope of the session it goes out on.
//!
//! [`SyncPolicy`] decides when entries reach stable storage. `Always` fsyncs file and directory
//! before `put` returns (≈5 ms per result on a virtual disk). `Deferred` returns once the entry
//! is in the page cache — it survives a crash of the process, which is what kills sidecars —
//! and [`Outbox::sync`] makes every pending entry durable in one batch. A result lost to a
//! power cut before that batch is not lost to the network: its lease is still held and is
//! resent to the node on resume (protocol §7.6), which runs the job again.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use resultity_protocol::JobId;
use resultity_protocol::messages::ws::JobResult;

/// Largest outbox entry accepted when reading back (a result is bounded by the frame size).
const MAX_ENTRY_BYTES: u64 = 2 * 1024 * 1024;

/// Failures of the outbox's disk operations.
/// The largest sequence number an entry's name may carry (2⁶², more results than a node
/// can ever write), so `next_seq` never overflows.
const MAX_SEQ: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("outbox entry {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OutboxError + '_ {
    move |source| OutboxError::Io {
        path: path.to_owned(),
        source,
    }
}

/// When `put` makes an entry durable (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    Always,
    Deferred,
}

/// Makes every outbox write fail as a full disk does. Tests use it to reach the unwritable
/// state: they run as root, which writes through a read-only mode, so a real directory cannot
/// be made unwritable for them. Off unless a test switches it on.
#[derive(Debug, Clone, Default)]
pub struct WriteFault(Arc<AtomicBool>);

impl WriteFault {
    pub fn set(&self, failing: bool) {
        self.0.store(failing, Ordering::SeqCst);
    }

    fn check(&self, path: &Path) -> Result<(), OutboxError> {
        if self.0.load(Ordering::SeqCst) {
            return Err(io(path)(std::io::Error::from(
                std::io::ErrorKind::StorageFull,
            )));
        }
        Ok(())
    }
}

/// The durable result store.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    next_seq: u64,
    entries: BTreeMap<u64, JobResult>,
    policy: SyncPolicy,
    /// Entries renamed into place but not yet fsynced (Deferred policy).
    unsynced: Vec<u64>,
    fault: WriteFault,
}

impl Outbox {
    /// Opens (creating, mode 0700) the outbox directory and loads pending entries.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, OutboxError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        restrict_dir(&dir)?;
        let mut entries = BTreeMap::new();
        for item in fs::read_dir(&dir).map_err(io(&dir))? {
            let item = item.map_err(io(&dir))?;
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A write that never completed: it was never sent either.
                fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            let Some(seq) = name
                .strip_suffix(".result")
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            // Sequence numbers start at 1 and grow by one per result: a name past this bound
            // was not written by us, and would make the next sequence number overflow.
            if seq > MAX_SEQ {
                return Err(OutboxError::Corrupt {
                    path,
                    reason: format!("sequence number {seq} is over {MAX_SEQ}"),
                });
            }
            let len = item.metadata().map_err(io(&path))?.len();
            if len > MAX_ENTRY_BYTES {
                return Err(OutboxError::Corrupt {
                    path,
                    reason: format!("{len} bytes exceeds {MAX_ENTRY_BYTES}"),
                });
            }
            let bytes = fs::read(&path).map_err(io(&path))?;
            let result: JobResult =
                serde_json::from_slice(&bytes).map_err(|e| OutboxError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            entries.insert(seq, result);
        }
        let next_seq = entries.keys().next_back().map_or(1, |s| s + 1);
        Ok(Self {
            dir,
            next_seq,
            entries,
            policy: SyncPolicy::Always,
            unsynced: Vec::new(),
            fault: WriteFault::default(),
        })
    }

    /// Sets when `put` makes entries durable.
    pub fn with_policy(mut self, policy: SyncPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The switch that makes this outbox's writes fail (see [`WriteFault`]).
    pub fn write_fault(&self) -> WriteFault {
        self.fault.clone()
    }

    /// Whether a new entry could be written now: writes, fsyncs and removes a probe file the
    /// way `put` writes an entry. Used to notice that a full or read-only disk recovered.
    pub fn probe_writable(&self) -> Result<(), OutboxError> {
        // `.tmp`: a probe left by a crash is removed on the next open like a torn entry.
        let probe = self.dir.join("write-probe.tmp");
        self.fault.check(&probe)?;
        {
            let mut f = create_private(&probe)?;
            f.write_all(b"probe").map_err(io(&probe))?;
            f.sync_all().map_err(io(&probe))?;
        }
        fs::remove_file(&probe).map_err(io(&probe))
    }

    /// Makes every entry written under `Deferred` durable: one fsync per pending file and one
    /// of the directory, however many results completed meanwhile.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        for seq in std::mem::take(&mut self.unsynced) {
            if !self.entries.contains_key(&seq) {
                continue; // confirmed meanwhile
            }
            let path = self.path(seq);
            match File::open(&path).and_then(|f| f.sync_all()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        sync_dir(&self.dir)
    }

    /// Whether entries await [`Outbox::sync`].
    pub fn needs_sync(&self) -> bool {
        !self.unsynced.is_empty()
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.result"))
    }

    /// Writes `result` durably. Returns once it is on disk. A result for the same job and
    /// epoch already in the outbox is not written twice.
    pub fn put(&mut self, result: &JobResult) -> Result<(), OutboxError> {
        if self.contains(&result.job_id, result.lease_epoch) {
            return Ok(());
        }
        let seq = self.next_seq;
        let path = self.path(seq);
        let tmp = self.dir.join(format!("{seq:020}.tmp"));
        let bytes = serde_json::to_vec(result).map_err(|e| OutboxError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        {
            self.fault.check(&tmp)?;
            let mut f = create_private(&tmp)?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            if self.policy == SyncPolicy::Always {
                f.sync_all().map_err(io(&tmp))?;
            }
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        match self.policy {
            SyncPolicy::Always => sync_dir(&self.dir)?,
            SyncPolicy::Deferred => self.unsynced.push(seq),
        }
        self.next_seq += 1;
        self.entries.insert(seq, result.clone());
        Ok(())
    }

    /// Deletes the entry the network confirmed. Returns whether one was there (confirmations
    /// are idempotent: a repeated one is fine).
    pub fn confirm(&mut self, job_id: &JobId, lease_epoch: u64) -> Result<bool, OutboxError> {
        let Some(seq) = self
            .entries
            .iter()
            .find(|(_, r)| &r.job_id == job_id && r.lease_epoch == lease_epoch)
            .map(|(s, _)| *s)
        else {
            return Ok(false);
        };
        let path = self.path(seq);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        // A deletion lost to a power cut only resurrects a confirmed result, which is resent
        // and confirmed again; no need to wait for the disk under the deferred policy.
        if self.policy == SyncPolicy::Always {
            sync_dir(&self.dir)?;
        }
        self.entries.remove(&seq);
        Ok(true)
    }

    pub fn contains(&self, job_id: &JobId, lease_epoch: u64) -> bool {
        self.entries
            .values()
            .any(|r| &r.job_id == job_id && r.lease_epoch == lease_epoch)
    }

    pub fn get(&self, job_id: &JobId, lease_epoch: u64) -> Option<&JobResult> {
        self.entries
            .values()
            .find(|r| &r.job_id == job_id && r.lease_epoch == lease_epoch)
    }

    /// Pending results in completion order.
    pub fn pending(&self) -> impl Iterator<Item = &JobResult> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Creates a file only the owner can read (results may carry user data).
fn create_private(path: &Path) -> Result<File, OutboxError> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path).map_err(io(path))
}

fn restrict_dir(dir: &Path) -> Result<(), OutboxError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// Makes a rename or unlink durable: the directory entry itself must reach the disk.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use resultity_protocol::messages::{ModelRef, Usage};

    fn result(job: &str, epoch: u64) -> JobResult {
        let output = format!("out-{job}");
        JobResult {
            job_id: JobId::parse(job).unwrap(),
            lease_epoch: epoch,
            config_digest: None,
            model: ModelRef {
                id: "m".into(),
                revision: "r".into(),
            },
            output_digest: JobResult::digest_output(&output),
            output,
            usage: Usage::default(),
            runtime_ms: 1,
            completed_at_ms: 2,
            stream: None,
        }
    }

    #[test]
    fn survives_reopen_in_order_and_confirm_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        for i in 0..5 {
            ob.put(&result(&format!("j{i}"), 1)).unwrap();
        }
        ob.put(&result("j0", 1)).unwrap(); // duplicate: not written twice
        assert_eq!(ob.len(), 5);
        assert!(ob.confirm(&JobId::parse("j2").unwrap(), 1).unwrap());
        assert!(!ob.confirm(&JobId::parse("j2").unwrap(), 1).unwrap());
        assert!(
            !ob.confirm(&JobId::parse("j3").unwrap(), 9).unwrap(),
            "other epoch"
        );
        drop(ob);
        // A torn write from a crash is discarded on open.
        fs::write(dir.path().join("00000000000000000099.tmp"), b"{partial").unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        let ids: Vec<_> = ob.pending().map(|r| r.job_id.as_str().to_owned()).collect();
        assert_eq!(ids, ["j0", "j1", "j3", "j4"]);
        assert!(!dir.path().join("00000000000000000099.tmp").exists());
        ob.put(&result("j5", 1)).unwrap();
        assert_eq!(ob.pending().last().unwrap().job_id.as_str(), "j5");
    }

    #[test]
    fn deferred_entries_survive_reopen_and_sync_batches() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path())
            .unwrap()
            .with_policy(SyncPolicy::Deferred);
        for i in 0..3 {
            ob.put(&result(&format!("d{i}"), 1)).unwrap();
        }
        assert!(ob.needs_sync());
        assert!(ob.confirm(&JobId::parse("d1").unwrap(), 1).unwrap());
        ob.sync().unwrap();
        assert!(!ob.needs_sync());
        ob.sync().unwrap(); // nothing pending: a no-op
        drop(ob);
        // A process crash keeps what was renamed into place.
        let ob = Outbox::open(dir.path()).unwrap();
        let ids: Vec<_> = ob.pending().map(|r| r.job_id.as_str().to_owned()).collect();
        assert_eq!(ids, ["d0", "d2"]);
    }

    #[test]
    fn a_failing_write_keeps_nothing_and_the_probe_sees_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        ob.probe_writable().unwrap();
        let fault = ob.write_fault();
        fault.set(true);
        let err = ob.put(&result("f", 1)).unwrap_err();
        assert!(err.to_string().contains("outbox I/O on"), "{err}");
        assert!(!ob.contains(&JobId::parse("f").unwrap(), 1));
        assert!(ob.probe_writable().is_err());
        fault.set(false);
        ob.probe_writable().unwrap();
        ob.put(&result("f", 1)).unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            ["00000000000000000001.result"],
            "no probe left behind"
        );
    }

    #[test]
    fn corrupt_entry_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("00000000000000000001.result"), b"not json").unwrap();
        assert!(matches!(
            Outbox::open(dir.path()),
            Err(OutboxError::Corrupt { .. })
        ));
    }

    #[test]
    fn an_entry_named_past_the_sequence_bound_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let entry = serde_json::to_vec(&result("j1", 1)).unwrap();
        fs::write(dir.path().join(format!("{}.result", u64::MAX)), &entry).unwrap();
        let err = Outbox::open(dir.path()).map(|_| ()).unwrap_err();
        assert!(
            err.to_string()
                .contains("sequence number 18446744073709551615 is over"),
            "{err}"
        );
        // At the bound itself the outbox opens and takes the next result.
        fs::remove_file(dir.path().join(format!("{}.result", u64::MAX))).unwrap();
        fs::write(dir.path().join(format!("{MAX_SEQ:020}.result")), &entry).unwrap();
        let mut ob = Outbox::open(dir.path()).unwrap();
        ob.put(&result("j2", 1)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("outbox");
        let mut ob = Outbox::open(&sub).unwrap();
        ob.put(&result("j", 1)).unwrap();
        let mode = fs::metadata(&sub).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let f = fs::read_dir(&sub).unwrap().next().unwrap().unwrap().path();
        assert_eq!(fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
