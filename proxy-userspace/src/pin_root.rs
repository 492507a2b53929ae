//! The pin directory (`--bpffs-root`): on a bpffs, and owned by one daemon at a time.
//!
//! Pins only outlive the daemon on a bpffs. When the directory is not on one, the daemon
//! mounts a bpffs where Cilium does — on the pin root's parent (`/sys/fs/bpf` for the
//! default root), as long as that is an empty directory — and otherwise says exactly what
//! to do. Two daemons on the same pins would fight over every map entry and link, so the
//! pin directory is locked (`flock`, released by the kernel however the daemon ends); a
//! second daemon, and `ebpf-proxy cleanup`, are refused with the pid of the holder.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tracing::info;

/// `statfs` magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The pin directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct PinRoot {
    /// Holds the `flock`.
    _lock: File,
}

impl PinRoot {
    /// Makes sure `root` exists on a bpffs (mounting one on its parent if needed) and
    /// takes it for this daemon.
    pub fn prepare(root: &Path) -> Result<Self> {
        ensure_bpffs(root)?;
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(PinRoot { _lock: lock(root)? })
    }
}

/// Fails with the holder's pid if a daemon holds `root`; nothing to check if it is absent.
pub fn ensure_unused(root: &Path) -> Result<()> {
    if root.exists() {
        lock(root)?;
    }
    Ok(())
}

/// Where `root` (or its nearest existing ancestor) lives: the filesystem magic and the
/// directory checked.
fn filesystem_of(root: &Path) -> Result<(i64, PathBuf)> {
    let existing = root
        .ancestors()
        .find(|path| path.exists())
        .unwrap_or(Path::new("/"));
    Ok((statfs_magic(existing)?, existing.to_path_buf()))
}

fn ensure_bpffs(root: &Path) -> Result<()> {
    let (magic, existing) = filesystem_of(root)?;
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    let mount_point = root
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .ok_or_else(|| {
            anyhow!(
                "--bpffs-root {} has no parent to mount a bpffs on",
                root.display()
            )
        })?;
    let what_to_do = format!(
        "mount one with `mount -t bpf bpf {}` (on a node: at boot, e.g. systemd's \
         sys-fs-bpf.mount; in a pod: mount the host's bpffs there, hostPath /sys/fs/bpf), or \
         pass --bpffs-root under a bpffs",
        mount_point.display()
    );
    std::fs::create_dir_all(mount_point)
        .with_context(|| format!("{} is not on a bpffs; {what_to_do}", root.display()))?;
    let empty = std::fs::read_dir(mount_point)
        .with_context(|| format!("reading {}", mount_point.display()))?
        .next()
        .is_none();
    if !empty {
        bail!(
            "{} is not on a bpffs ({} is on filesystem 0x{magic:x}), and {} is not empty, so \
             no bpffs is mounted over it: {what_to_do}",
            root.display(),
            existing.display(),
            mount_point.display()
        );
    }
    mount_bpffs(mount_point).with_context(|| {
        format!(
            "{} is not on a bpffs and mounting one at {} failed (it needs CAP_SYS_ADMIN): \
             {what_to_do}",
            root.display(),
            mount_point.display()
        )
    })?;
    info!(
        mount_point = %mount_point.display(),
        "bpffs was not mounted: mounted one, as Cilium does (mount it at boot so that pins \
         never depend on the daemon)"
    );
    Ok(())
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let target = CString::new(target.as_os_str().as_bytes())?;
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
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn statfs_magic(path: &Path) -> Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a writable statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_type as i64)
}

/// Takes the exclusive lock on the directory `root`, without waiting.
fn lock(root: &Path) -> Result<File> {
    let directory = File::open(root).with_context(|| format!("opening {}", root.display()))?;
    // SAFETY: flock on an open descriptor we own.
    if unsafe { libc::flock(directory.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(directory);
    }
    let error = io::Error::last_os_error();
    if error.kind() != io::ErrorKind::WouldBlock {
        return Err(error).with_context(|| format!("locking {}", root.display()));
    }
    let holder = lock_holder(&directory)
        .map(|pid| format!(" (pid {pid})"))
        .unwrap_or_default();
    bail!(
        "another ebpf-proxy daemon{holder} holds the pins at {}: one daemon per pin \
         directory; stop it first, or give this one its own --bpffs-root",
        root.display()
    )
}

/// The pid that holds an flock on `file`, from `/proc/locks`
/// (`N: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF`, device numbers in hex).
fn lock_holder(file: &File) -> Option<u32> {
    let metadata = file.metadata().ok()?;
    let dev = metadata.dev();
    let wanted = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        metadata.ino()
    );
    parse_lock_holder(&std::fs::read_to_string("/proc/locks").ok()?, &wanted)
}

fn parse_lock_holder(locks: &str, wanted: &str) -> Option<u32> {
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `->` marks a waiter, which shifts the fields by one.
        match fields.as_slice() {
            [_, "FLOCK", _, "WRITE", pid, file, ..] if *file == wanted => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 412 fe:00:5465460 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 29070 00:28:3687549 0 EOF\n\
                     3: FLOCK  ADVISORY  READ 27947 fe:00:10133506 0 EOF\n";
        assert_eq!(parse_lock_holder(locks, "00:28:3687549"), Some(29070));
        assert_eq!(
            parse_lock_holder(locks, "fe:00:5465460"),
            None,
            "not an flock"
        );
        assert_eq!(parse_lock_holder(locks, "00:28:1"), None);
    }

    /// Two holders in one process behave like two daemons: flock locks belong to the open
    /// file, so the second open is refused while the first is held, and admitted once it
    /// is dropped.
    #[test]
    fn a_held_pin_root_is_refused_with_the_holder() {
        let dir = std::env::temp_dir().join(format!("ebpf-proxy-pin-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock(&dir).unwrap();
        let refused = lock(&dir).unwrap_err().to_string();
        assert!(
            refused.contains("another ebpf-proxy daemon")
                && refused.contains(&format!("(pid {})", std::process::id())),
            "{refused}"
        );
        assert!(ensure_unused(&dir).is_err());
        drop(held);
        ensure_unused(&dir).unwrap();
        std::fs::remove_dir(&dir).unwrap();
    }
}
