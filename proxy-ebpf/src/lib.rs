//! The kernel programs live in the binary (`main.rs` and its modules, built for
//! bpfel-unknown-none). This empty library lets proxy-userspace name the crate as a
//! build-dependency, which is how aya-build finds and rebuilds it.
#![no_std]
