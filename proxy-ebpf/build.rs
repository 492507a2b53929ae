//! Rebuild when bpf-linker changes: it is the linker of this crate's bpf target.
fn main() {
    let bpf_linker =
        which::which("bpf-linker").expect("bpf-linker not found in PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
