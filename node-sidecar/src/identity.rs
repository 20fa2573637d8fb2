//! The node's identity key: read from a key file, created with mode 0600 when missing, or read
//! from a read-only Kubernetes Secret mount (never written there).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use resultity_protocol::NodeKeypair;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("key file {path} is accessible to all users (mode {mode:o}); chmod 600 it")]
    TooOpen { path: PathBuf, mode: u32 },
}

/// Loads the node key at `path`, creating a fresh one (0600) if the file does not exist.
/// Kubernetes Secret volumes default to mode 0644; the operator mounts them 0440 owned by
/// root and the pod's `fsGroup` (the only way a non-root sidecar can read them), so group
/// read is accepted, but a world-readable key is refused rather than silently used.
pub fn load_or_create(path: &Path) -> Result<NodeKeypair, IdentityError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            check_mode(path)?;
            NodeKeypair::from_key_file_text(&text).map_err(|e| IdentityError::Invalid {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(source) => Err(IdentityError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn check_mode(path: &Path) -> Result<(), IdentityError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path)
            .map_err(|source| IdentityError::Io {
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o007 != 0 {
            return Err(IdentityError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

fn create(path: &Path) -> Result<NodeKeypair, IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let key = NodeKeypair::generate().map_err(|e| IdentityError::Invalid {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io)?;
    }
    let mut opts = fs::OpenOptions::new();
    // create_new: two sidecars racing on one volume must not overwrite each other's key.
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(key.to_key_file_text().as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/node.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.id(), b.id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn refuses_open_permissions_and_garbage() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(IdentityError::TooOpen { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o440)).unwrap();
        assert!(
            load_or_create(&path).is_ok(),
            "0440 via fsGroup (the operator Secret mount) is fine"
        );
        let bad = dir.path().join("bad.key");
        fs::write(&bad, "nonsense").unwrap();
        fs::set_permissions(&bad, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&bad),
            Err(IdentityError::Invalid { .. })
        ));
    }
}
