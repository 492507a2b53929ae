//! The far end of each of the lab's wires runs a two-instruction XDP program that passes
//! everything: a veth schedules its receive work for frames the XDP program at its other
//! end sends back with XDP_TX only when it runs an XDP program itself (GRO alone queues
//! them until something else wakes the device: seconds). A NIC's XDP_TX simply transmits;
//! this makes a veth pair behave like that wire.

use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// `r0 = XDP_PASS; exit`.
const PROGRAM: [u64; 2] = [
    // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 2 (XDP_PASS).
    u64::from_le_bytes([0xb7, 0x00, 0, 0, 2, 0, 0, 0]),
    // BPF_JMP | BPF_EXIT.
    u64::from_le_bytes([0x95, 0x00, 0, 0, 0, 0, 0, 0]),
];

/// The leading fields of `union bpf_attr` for BPF_PROG_LOAD.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The leading fields of `union bpf_attr` for BPF_LINK_CREATE.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// An XDP_PASS program attached natively to a device of a lab namespace; detached when
/// dropped (its link's last file descriptor closes), or with the device.
#[derive(Debug)]
pub(crate) struct XdpPass {
    _link: OwnedFd,
}

impl XdpPass {
    /// Attaches to `device` in `ns`.
    pub(crate) fn attach(ns: &Netns, device: &str) -> Result<Self> {
        let program = load()?;
        // The ifindex and the link belong to the namespace of the thread that creates it.
        let device_name = std::ffi::CString::new(device)?;
        let link = ns.run(|| -> Result<OwnedFd> {
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(device_name.as_ptr()) };
            if ifindex == 0 {
                bail!("no device {device}: {}", std::io::Error::last_os_error());
            }
            let attr = LinkCreate {
                prog_fd: fd_number(&program),
                target_ifindex: ifindex,
                attach_type: BPF_XDP,
                flags: XDP_FLAGS_DRV_MODE,
            };
            bpf(BPF_LINK_CREATE, &attr).context("BPF_LINK_CREATE")
        })??;
        Ok(Self { _link: link })
    }
}

fn load() -> Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: PROGRAM.len() as u32,
        insns: PROGRAM.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_XDP,
        ..ProgLoad::default()
    };
    attr.prog_name[..8].copy_from_slice(b"lab_pass");
    bpf(BPF_PROG_LOAD, &attr).context("loading the lab's XDP_PASS program")
}

fn fd_number(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd() as u32
}

/// One `bpf()` command that returns a file descriptor.
fn bpf<T>(command: libc::c_long, attr: &T) -> Result<OwnedFd> {
    // SAFETY: `attr` outlives the call, its size is passed along, and the pointers inside
    // it point at data that lives as long.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
