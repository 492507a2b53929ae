//! The kernel programs live in `main.rs` (built for bpfel-unknown-none). This empty
//! library lets proxy-userspace name the crate as a build-dependency, which is how
//! aya-build finds and rebuilds it.
#![no_std]
