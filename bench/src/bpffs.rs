//! A private bpffs instance for the maps a measurement loads, so its pins never meet the
//! host's /sys/fs/bpf or another run's; unmounted on drop (also on panic), which frees them.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

pub struct PrivateBpffs {
    path: PathBuf,
}

impl PrivateBpffs {
    pub fn mount() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "epx-bench-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let bpffs = Self { path };
        let target = CString::new(bpffs.path.as_os_str().as_bytes())?;
        // SAFETY: every argument is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mount -t bpf bpf {}: {}",
                bpffs.path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(bpffs)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path. Failing (not mounted) is harmless.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
