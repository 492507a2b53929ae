//! The XDP program on the external devices (`--xdp native|generic|off`): attaching it with
//! pinned links beside the tc ones, keeping XDP_EGRESS equal to the devices it runs on
//! natively, and running frames through it with BPF_PROG_TEST_RUN.
//!
//! The XDP program runs the tc program's packet path before the kernel builds an skb, so
//! outside traffic to backends on other nodes is translated and sent back out (XDP_TX)
//! without entering the stack; what it decides it marks in the frame's metadata, so the tc
//! program on the same device lets those packets through untouched, and what it cannot do
//! it leaves untouched to tc (see proxy-ebpf's `xdp` module).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{MapData, xdp::DevMapHash};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::{TestRun as _, TestRunOptions, Xdp, XdpMode as AttachMode};
use aya::sys::SyscallError;
use proxy_common::XDP_DECIDED;
use tracing::warn;

use crate::netlink::Device;

/// `--xdp`: how the XDP program is attached to the external devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// In the driver, before any skb exists; a device whose driver has no native XDP gets
    /// generic XDP instead (logged).
    Native,
    /// In the kernel's generic receive path (works on every device; after the skb is built).
    Generic,
    /// No XDP program: the tc program does everything.
    Off,
}

/// How the program ended up attached to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attached {
    Native,
    Generic,
}

impl Attached {
    fn name(self) -> &'static str {
        match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
        }
    }

    fn attach_mode(self) -> AttachMode {
        match self {
            Attached::Native => AttachMode::Driver,
            Attached::Generic => AttachMode::Skb,
        }
    }
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The pin of a device's XDP link: the mode is in the name, because a link cannot change
/// mode (a new mode means a new link).
pub fn link_pin_name(device: &Device, attached: Attached) -> String {
    format!("xdp-{}-{}-{}", attached.name(), device.index, device.name)
}

/// Attaches `program` to `device` as `mode` asks, pinning the link in `links_dir`. A link
/// already pinned in that mode (a previous daemon's) gets the program swapped in
/// atomically; one in the other mode is released first (tc does everything meanwhile:
/// XDP only ever takes work off it).
pub fn attach(
    program: &mut Xdp,
    links_dir: &Path,
    device: &Device,
    mode: XdpMode,
) -> Result<Option<Attached>> {
    let pin = |attached| links_dir.join(link_pin_name(device, attached));
    let wanted = match mode {
        XdpMode::Off => {
            for attached in [Attached::Native, Attached::Generic] {
                remove_pin(&pin(attached))?;
            }
            return Ok(None);
        }
        XdpMode::Native => Attached::Native,
        XdpMode::Generic => Attached::Generic,
    };
    if replace(program, &pin(wanted), device)? {
        return Ok(Some(wanted));
    }
    let other = match wanted {
        Attached::Native => Attached::Generic,
        Attached::Generic => Attached::Native,
    };
    remove_pin(&pin(other))?;
    let attached = match new_link(program, device, wanted) {
        Ok(link) => {
            pin_link(link, &pin(wanted))?;
            wanted
        }
        Err(error) if wanted == Attached::Native => {
            warn!(
                device = %device.name,
                error = format!("{error:#}"),
                "the driver has no native XDP: generic XDP instead"
            );
            pin_link(new_link(program, device, Attached::Generic)?, &pin(other))?;
            Attached::Generic
        }
        Err(error) => return Err(error),
    };
    Ok(Some(attached))
}

/// Swaps `program` into the link pinned at `pin`, if there is one.
fn replace(program: &mut Xdp, pin: &Path, device: &Device) -> Result<bool> {
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => {
            let link = FdLink::from(pinned)
                .try_into()
                .context("pinned link is not an XDP link")?;
            let id = program
                .attach_to_link(link)
                .with_context(|| format!("replacing the XDP program on {}", device.name))?;
            let link: FdLink = program.take_link(id)?.try_into()?;
            // The old pin still holds the same link; keep it.
            drop(link);
            Ok(true)
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(false)
        }
        Err(error) => Err(error).with_context(|| format!("opening pin {}", pin.display())),
    }
}

fn new_link(program: &mut Xdp, device: &Device, attached: Attached) -> Result<FdLink> {
    let id = program
        .attach_to_if_index(device.index, attached.attach_mode())
        .with_context(|| format!("attaching XDP ({attached}) to {}", device.name))?;
    program
        .take_link(id)?
        .try_into()
        .with_context(|| format!("the XDP link of {} is not a bpf_link", device.name))
}

fn pin_link(link: FdLink, pin: &Path) -> Result<()> {
    let _ = fs::remove_file(pin);
    link.pin(pin)
        .with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}

/// Removes a pin (detaching its link once nothing else holds it); absent is fine.
fn remove_pin(pin: &Path) -> Result<()> {
    match fs::remove_file(pin) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(error).with_context(|| format!("removing {}", pin.display()))
        }
        _ => Ok(()),
    }
}

/// The pins the XDP links of `attached` devices live at.
pub fn link_pins<'a>(
    links_dir: &'a Path,
    attached: impl IntoIterator<Item = (&'a Device, Attached)> + 'a,
) -> impl Iterator<Item = PathBuf> + 'a {
    attached
        .into_iter()
        .map(move |(device, mode)| links_dir.join(link_pin_name(device, mode)))
}

/// Makes XDP_EGRESS hold exactly the devices the program runs on natively: the ones a
/// packet may be redirected to from XDP.
pub fn set_egress(map: &mut DevMapHash<&mut MapData>, native: &[u32]) -> Result<()> {
    let present: Vec<u32> = map.keys().collect::<Result<_, _>>()?;
    for ifindex in present.iter().filter(|index| !native.contains(index)) {
        map.remove(*ifindex)
            .with_context(|| format!("removing ifindex {ifindex} from XDP_EGRESS"))?;
    }
    for ifindex in native.iter().filter(|index| !present.contains(index)) {
        map.insert(*ifindex, *ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to XDP_EGRESS"))?;
    }
    Ok(())
}

/// What an XDP program did with a frame under BPF_PROG_TEST_RUN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpRun {
    /// The XDP action (`XDP_PASS` 2, `XDP_TX` 3, `XDP_DROP` 1, `XDP_REDIRECT` 4).
    pub action: u32,
    /// The frame's metadata said [`XDP_DECIDED`]: tc would let it through untouched.
    pub decided: bool,
    /// The frame as the program left it (without its metadata).
    pub frame: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// `struct xdp_md`, the context a test run takes and gives back.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// Runs `frame` through a loaded XDP program as if it arrived on `ingress_ifindex` (0: the
/// test run's default, loopback).
pub fn run_frame(program: &Xdp, frame: &[u8], ingress_ifindex: u32) -> Result<XdpRun> {
    let context = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex,
        ..XdpMd::default()
    };
    let mut context_out = XdpMd::default();
    // Room for the metadata in front of the frame.
    let mut output = vec![0; frame.len() + 64];
    // SAFETY: XdpMd is plain integers without padding; the kernel reads and writes its
    // bytes, and both stay alive across the call.
    let (context_in, context_out_bytes) = unsafe {
        (
            std::slice::from_raw_parts((&raw const context).cast::<u8>(), size_of::<XdpMd>()),
            std::slice::from_raw_parts_mut((&raw mut context_out).cast::<u8>(), size_of::<XdpMd>()),
        )
    };
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: Some(context_in),
            ctx_out: Some(context_out_bytes),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    output.truncate(result.data_size_out as usize);
    // The output starts at the metadata; the context says where the frame begins.
    let meta_len = (context_out.data as usize).min(output.len());
    let decided = output[..meta_len]
        .get(..4)
        .is_some_and(|mark| u32::from_ne_bytes(mark.try_into().expect("4 bytes")) == XDP_DECIDED);
    Ok(XdpRun {
        action: result.return_value,
        decided,
        frame: output.split_off(meta_len),
    })
}
