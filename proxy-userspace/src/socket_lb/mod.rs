//! Socket-level load balancing (`--socket-lb`): attaches the cgroup programs of the
//! datapath's object (`epx_connect4`, `epx_sendmsg4`, `epx_recvmsg4`, `epx_getpeername4`,
//! their `*6` twins for IPv6 sockets, `epx_sock_release`, see proxy-ebpf's `sock`) to the
//! cgroup v2 hierarchy.
//!
//! Their links are pinned under `<bpffs root>/sock-links/<program>`, like the tc links, so
//! the datapath keeps translating while the daemon restarts; a restarted daemon swaps its
//! program into each pinned link atomically (`BPF_LINK_UPDATE`), so no `connect()` goes
//! untranslated in between. A pinned link to another cgroup (`--cgroup-root` changed) is
//! released and a new one made; `--socket-lb off` releases them all.
//!
//! [`terminate`] closes the node's connected UDP sockets whose backend left.

pub mod terminate;

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::Ebpf;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, Program};
use clap::ValueEnum;
use tracing::info;

use proxy_common::sock_programs;

/// Which sockets are balanced at the socket (`--socket-lb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SocketLbMode {
    /// The node's own processes (sockets in the daemon's network namespace), which no tc
    /// program sees: host-network pods, the kubelet, anything on the node.
    Host,
    /// Pods' TCP connections too: translated once at `connect()` instead of per packet.
    All,
    /// None: host-network processes do not reach Services.
    Off,
}

impl fmt::Display for SocketLbMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SocketLbMode::Host => "host",
            SocketLbMode::All => "all",
            SocketLbMode::Off => "off",
        })
    }
}

/// The programs attached to the cgroup, in the order they are attached: the reverse
/// translations first, so no translated socket ever misses its way back.
pub const PROGRAMS: [&str; 9] = [
    sock_programs::SOCK_RELEASE,
    sock_programs::RECVMSG4,
    sock_programs::RECVMSG6,
    sock_programs::GETPEERNAME4,
    sock_programs::GETPEERNAME6,
    sock_programs::SENDMSG4,
    sock_programs::SENDMSG6,
    sock_programs::CONNECT4,
    sock_programs::CONNECT6,
];

/// The directory of the socket programs' link pins under the bpffs root.
pub fn links_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join("sock-links")
}

/// Where cgroup v2 is mounted, from `/proc/self/mountinfo`: the unified hierarchy's root
/// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
pub fn unified_root() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount(&mountinfo).ok_or_else(|| {
        anyhow!(
            "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup, or pass \
             --cgroup-root); --socket-lb off runs without one"
        )
    })
}

/// The cgroup the socket programs attach to: `flag` (`--cgroup-root`), or the unified
/// hierarchy's root where it is mounted. A `flag` naming the cgroup mount of a hybrid host
/// (`/sys/fs/cgroup`, a tmpfs holding the v1 controllers and `unified`) means its
/// `unified` directory, so one `--cgroup-root` (the DaemonSet's mount of the host's
/// `/sys/fs/cgroup`) fits both kinds of host. Anything else that is no cgroup v2 directory
/// is refused: attached there, the programs would see no socket.
pub fn cgroup_root(flag: Option<&Path>) -> Result<PathBuf> {
    let Some(path) = flag else {
        return unified_root();
    };
    if is_cgroup2(path)? {
        return Ok(path.to_owned());
    }
    let unified = path.join("unified");
    if is_cgroup2(&unified).unwrap_or(false) {
        return Ok(unified);
    }
    bail!(
        "--cgroup-root {}: not a cgroup v2 directory, nor holding one at unified/ (a hybrid \
         host's); give the cgroup2 mount of the host (or a cgroup below it)",
        path.display()
    )
}

/// Whether `path` is a directory of a cgroup v2 file system.
fn is_cgroup2(path: &Path) -> Result<bool> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a zeroed statfs is valid; statfs writes into it.
    let mut stat = unsafe { std::mem::zeroed::<libc::statfs>() };
    // SAFETY: `c_path` is a NUL-terminated path that outlives the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("{}", path.display()));
    }
    Ok(stat.f_type == libc::CGROUP2_SUPER_MAGIC)
}

/// The first cgroup2 mount point in a mountinfo text (octal escapes decoded).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, filesystem) = line.split_once(" - ")?;
        if filesystem.split(' ').next()? != "cgroup2" {
            return None;
        }
        mount.split(' ').nth(4).map(unescape_mount_path)
    })
}

/// Undoes mountinfo's `\ooo` escapes (spaces, tabs, newlines and backslashes in paths).
fn unescape_mount_path(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut path = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|digits| {
            bytes[i] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match escape
            .and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok())
        {
            Some(byte) => {
                path.push(byte);
                i += 4;
            }
            None => {
                path.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&path))
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`), which the programs
/// compare with each socket's to tell the node's own sockets.
pub fn own_netns_cookie() -> Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .context("opening a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error())
            .context("reading SO_NETNS_COOKIE (Linux 5.14 or later)");
    }
    Ok(cookie)
}

/// The cgroup id of a cgroup v2 directory (its inode number).
fn cgroup_id(cgroup: &Path) -> Result<u64> {
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("reading {}", cgroup.display()))?
        .ino())
}

/// Loads the socket programs of `ebpf` and attaches them to `cgroup`, swapping them into
/// links pinned under `links_dir` when those are attached there already.
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, links_dir: &Path) -> Result<()> {
    fs::create_dir_all(links_dir).with_context(|| format!("creating {}", links_dir.display()))?;
    let cgroup_file =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let target = cgroup_id(cgroup)?;
    for name in PROGRAMS {
        let pin = links_dir.join(name);
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
        load(program).with_context(|| format!("loading {name}"))?;
        if let Some(link) = pinned_link(&pin)? {
            if link_cgroup_id(link.as_fd())? == target {
                link_update(link.as_fd(), program_fd(program)?)
                    .with_context(|| format!("replacing the program of {}", pin.display()))?;
                continue;
            }
            info!(pin = %pin.display(), cgroup = %cgroup.display(), "released a socket link of another cgroup");
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
        let link = attach_new(program, &cgroup_file)
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        link.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
    }
    Ok(())
}

/// Loads one of the socket programs into the kernel (the verifier checks it here).
pub fn load(program: &mut Program) -> Result<()> {
    match program {
        Program::CgroupSockAddr(program) => program.load()?,
        Program::CgroupSock(program) => program.load()?,
        other => bail!("not a cgroup socket program: {:?}", other.prog_type()),
    }
    Ok(())
}

fn program_fd(program: &Program) -> Result<BorrowedFd<'_>> {
    Ok(program.fd()?.as_fd())
}

fn attach_new(program: &mut Program, cgroup: &fs::File) -> Result<FdLink> {
    // Links are always multi-attach: other programs on the cgroup (a CNI's) stay.
    Ok(match program {
        Program::CgroupSockAddr(program) => {
            let id = program.attach(cgroup, CgroupAttachMode::Single)?;
            program.take_link(id)?.try_into()?
        }
        Program::CgroupSock(program) => {
            let id = program.attach(cgroup, CgroupAttachMode::Single)?;
            program.take_link(id)?.try_into()?
        }
        other => bail!("not a cgroup socket program: {:?}", other.prog_type()),
    })
}

/// The pinned link at `pin`, if there is one.
fn pinned_link(pin: &Path) -> Result<Option<OwnedFd>> {
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    // SAFETY: a zeroed bpf_attr is valid.
    let mut attr = unsafe { std::mem::zeroed::<aya_obj::generated::bpf_attr>() };
    // `path` outlives the call.
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    match bpf(aya_obj::generated::bpf_cmd::BPF_OBJ_GET, &mut attr) {
        // SAFETY: BPF_OBJ_GET returns a new file descriptor we own.
        Ok(fd) => Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("opening pin {}", pin.display())),
    }
}

/// The cgroup a cgroup link is attached to.
fn link_cgroup_id(link: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: zeroed values of plain C structs; the kernel writes at most `info_len` bytes.
    let mut info = unsafe { std::mem::zeroed::<aya_obj::generated::bpf_link_info>() };
    let mut attr = unsafe { std::mem::zeroed::<aya_obj::generated::bpf_attr>() };
    attr.info.bpf_fd = link.as_raw_fd() as u32;
    attr.info.info = (&raw mut info) as u64;
    attr.info.info_len = size_of_val(&info) as u32;
    bpf(
        aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD,
        &mut attr,
    )
    .context("reading a pinned socket link's info")?;
    // SAFETY: the kernel filled the cgroup member for a cgroup link; for another link the
    // id read is meaningless and simply does not match.
    Ok(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
}

/// Swaps `program` into `link` atomically (BPF_LINK_UPDATE).
fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: a zeroed bpf_attr is valid.
    let mut attr = unsafe { std::mem::zeroed::<aya_obj::generated::bpf_attr>() };
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = program.as_raw_fd() as u32;
    bpf(aya_obj::generated::bpf_cmd::BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

/// The bpf system call (aya keeps its own wrappers private).
fn bpf(
    cmd: aya_obj::generated::bpf_cmd,
    attr: &mut aya_obj::generated::bpf_attr,
) -> io::Result<i64> {
    // SAFETY: `attr` is a valid bpf_attr of the size passed, initialised for `cmd`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_mut(attr),
            size_of::<aya_obj::generated::bpf_attr>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_hierarchy_is_found_where_it_is_mounted() {
        let hybrid = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 24 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let escaped = "36 24 0:31 / /run/my\\040cgroup rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mount(escaped),
            Some(PathBuf::from("/run/my cgroup"))
        );
        let v1_only = "32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(v1_only), None);
    }

    #[test]
    fn a_cgroup_root_must_be_a_cgroup_v2_directory() {
        let error = cgroup_root(Some(&std::env::temp_dir())).expect_err("a tmpfs directory");
        assert!(
            format!("{error:#}").contains("not a cgroup v2 directory"),
            "{error:#}"
        );
        // On a machine with cgroup v2 (this one is hybrid: /sys/fs/cgroup/unified).
        if let Ok(root) = unified_root() {
            assert_eq!(cgroup_root(Some(&root)).unwrap(), root);
            if root.ends_with("unified")
                && let Some(hybrid) = root.parent()
            {
                assert_eq!(cgroup_root(Some(hybrid)).unwrap(), root);
            }
        }
    }

    #[test]
    fn the_modes_read_as_the_flag_spells_them() {
        for mode in [SocketLbMode::Host, SocketLbMode::All, SocketLbMode::Off] {
            assert_eq!(SocketLbMode::from_str(&mode.to_string(), false), Ok(mode));
        }
    }
}
