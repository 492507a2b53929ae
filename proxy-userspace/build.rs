//! Builds the kernel programs (proxy-ebpf) for the bpf target and leaves the object in
//! OUT_DIR, where `EBPF_OBJECT` embeds it into the binary.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxy-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
