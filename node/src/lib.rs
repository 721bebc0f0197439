//! The `peerbuild` binary's library: the command line, the build engine that runs buildspecs
//! through the `sandbox` crate, and the data directory that keeps builds and their logs.

pub mod batch;
pub mod cache_cli;
pub mod cli;
pub mod data_dir;
pub mod engine;
pub mod events;
pub mod ids;
pub mod pool;
pub mod records;
pub mod render;
pub mod reporter;
pub mod run;
pub mod settings;
pub mod source;
pub mod store;
pub mod submit;
pub mod users;
