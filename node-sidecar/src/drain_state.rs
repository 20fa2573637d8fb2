//! The drained marker in the state directory.
//!
//! A node drained for its pod's removal must not rejoin the network when its container
//! restarts before the pod is gone (a crash, an OOM kill). The marker records the pod it was
//! written for: the same pod (a container restart) starts drained, another pod (a new one
//! reusing the volume, or a replacement) starts fresh. Without a pod identity a restart and a
//! fresh start look alike, so no marker is kept: a plain process restart rejoins.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the marker inside the state directory.
pub const FILE: &str = "drained.json";

/// Largest marker read back; anything larger is not one this sidecar wrote.
const MAX_BYTES: u64 = 4096;

/// What the marker keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainedMarker {
    /// The pod (its UID) that drained.
    pub pod_uid: String,
    /// Whether the node also left the network.
    pub deregistered: bool,
    /// When the drain ended (ms since the epoch).
    pub drained_at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DrainStateError {
    #[error("cannot write the drained marker {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The marker this pod wrote before a restart, if any. A marker of another pod, or one that
/// cannot be read, is removed: this is a fresh start.
pub fn load(dir: &Path, pod_uid: Option<&str>) -> Option<DrainedMarker> {
    let path = dir.join(FILE);
    let marker = read(&path);
    match (marker, pod_uid) {
        (Some(m), Some(uid)) if m.pod_uid == uid => Some(m),
        (None, _) if !path.exists() => None,
        _ => {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a drained marker of another pod");
            } else {
                tracing::info!("drained marker of another pod removed: a new pod starts fresh");
            }
            None
        }
    }
}

fn read(path: &Path) -> Option<DrainedMarker> {
    let file = std::fs::File::open(path).ok()?;
    if file.metadata().ok()?.len() > MAX_BYTES {
        return None;
    }
    serde_json::from_reader(std::io::BufReader::new(file)).ok()
}

/// Writes the marker atomically (a temporary file renamed over it, both synced).
pub fn store(dir: &Path, marker: &DrainedMarker) -> Result<(), DrainStateError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(marker).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| DrainStateError::Write { path, source })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn marker(uid: &str) -> DrainedMarker {
        DrainedMarker {
            pod_uid: uid.into(),
            deregistered: true,
            drained_at_ms: 7,
        }
    }

    #[test]
    fn the_same_pod_finds_its_marker_and_another_pod_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), Some("a")), None);
        store(dir.path(), &marker("a")).unwrap();
        assert_eq!(load(dir.path(), Some("a")), Some(marker("a")));
        // A restart of the same container again.
        assert_eq!(load(dir.path(), Some("a")), Some(marker("a")));
        // A new pod: fresh start, and the marker is gone for good.
        assert_eq!(load(dir.path(), Some("b")), None);
        assert!(!dir.path().join(FILE).exists());
        assert_eq!(load(dir.path(), Some("a")), None);
    }

    #[test]
    fn without_a_pod_identity_or_with_a_garbled_marker_the_start_is_fresh() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), &marker("a")).unwrap();
        assert_eq!(load(dir.path(), None), None);
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert_eq!(load(dir.path(), Some("a")), None);
        assert!(!dir.path().join(FILE).exists());
    }
}
