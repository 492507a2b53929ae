//! A private bpffs instance: pins made under it never meet the host's /sys/fs/bpf or
//! another test's, and unmounting it (on drop, also on panic) frees them all at once.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

/// A bpffs mounted on a directory it created; unmounted and the directory removed on drop.
#[derive(Debug)]
pub struct PrivateBpffs {
    path: PathBuf,
}

impl PrivateBpffs {
    /// Mounts on a fresh directory under the system temp dir, named after `purpose`.
    pub fn mount(purpose: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "epx-{purpose}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Self::mount_at(path)
    }

    /// Mounts on `path`, which must not exist yet.
    pub fn mount_at(path: PathBuf) -> Result<Self> {
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let target = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: every argument is a NUL-terminated string that outlives the call.
        let mounted = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if mounted != 0 {
            let error = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(error).with_context(|| format!("mounting bpffs at {}", path.display()));
        }
        Ok(Self { path })
    }

    /// An empty directory at `path` (which must not exist yet) where someone else — the
    /// daemon under test — is to mount a bpffs. Dropping it unmounts whatever is mounted
    /// there and removes the directory.
    pub fn expect_at(path: PathBuf) -> Result<Self> {
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// Whether a bpffs is mounted right here (not merely somewhere above).
    pub fn is_mounted(&self) -> bool {
        let target = self.path.to_string_lossy();
        std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
            mounts.lines().any(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                fields.get(1) == Some(&&*target) && fields.get(2) == Some(&"bpf")
            })
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let Ok(target) = CString::new(self.path.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: a NUL-terminated path. MNT_DETACH: pins still open elsewhere go when closed.
        // EINVAL: nothing is mounted here (an `expect_at` directory nobody mounted on).
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        {
            eprintln!(
                "proxy-lab: cannot unmount {}: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            );
            return;
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
