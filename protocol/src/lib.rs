//! peerbuild's shared language: the buildspec model and its parser, digests, trees and the pool's
//! wire messages, free of I/O and of any runtime, so every other crate (and a simulator) can use
//! it.

pub mod buildspec;
pub mod cas;
pub mod digest;
pub mod task;
pub mod tree;
pub mod wire;

pub use digest::Digest;
