//! Data directories that only their owner can read: the stores of both services hold
//! credentials (sealed) and identities, so directories are 0700 and files 0600.

use std::path::Path;

/// Creates `dir` (and its parents) if needed and makes it owner-only (0700).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Makes everything under `dir` owner-only: directories 0700, files 0600 (for data written
/// before the process set its umask, or by an older version). Returns the paths that could not
/// be changed, with why.
pub fn tighten_permissions(dir: &Path) -> Vec<(std::path::PathBuf, std::io::Error)> {
    use std::os::unix::fs::PermissionsExt;
    let mut failed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            failed.push((dir.to_path_buf(), e));
            return failed;
        }
    };
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let mode = if ft.is_dir() {
            0o700
        } else if ft.is_file() {
            0o600
        } else {
            continue;
        };
        if let Err(err) = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode))
        {
            failed.push((e.path(), err));
        }
        if ft.is_dir() {
            failed.extend(tighten_permissions(&e.path()));
        }
    }
    failed
}

/// Sets the process umask so that every file and directory it creates is owner-only. Call it
/// first thing in `main`.
pub fn owner_only_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn everything_becomes_owner_only() {
        let d = tempfile::tempdir().expect("tempdir");
        let data = d.path().join("data");
        std::fs::create_dir_all(data.join("db")).expect("mkdir");
        std::fs::write(data.join("db/conf"), b"x").expect("write");
        std::fs::set_permissions(data.join("db/conf"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        private_dir(&data).expect("private");
        assert!(tighten_permissions(&data).is_empty());
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&data.join("db")), 0o700);
        assert_eq!(mode(&data.join("db/conf")), 0o600);
    }
}
