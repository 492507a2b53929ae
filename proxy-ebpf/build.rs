//! Rebuild when bpf-linker changes: it is the linker of this crate's bpf target. And tell
//! it to let LLVM expand memset like memcpy, inline.
fn main() {
    let bpf_linker =
        which::which("bpf-linker").expect("bpf-linker not found in PATH: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
    // bpf-linker passes LLVM `--bpf-expand-memcpy-in-order` by default, which keeps memcpy
    // inline but turns off the inline expansion of memset: every zeroed struct or array
    // becomes a call to a byte loop, which the verifier walks byte by byte at every visit
    // (a quarter of the ingress program's verification). Without it, LLVM writes zeroes
    // with plain stores.
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
