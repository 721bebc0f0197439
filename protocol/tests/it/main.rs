//! Integration tests for the protocol crate: the buildspec parser, checked through snapshots.
//!
//! Update the snapshots with `UPDATE_EXPECT=1 cargo test -p protocol`.

mod buildspec;
