//! peerbuild's end-to-end tests, one binary: each module drives the real `peerbuild` binary.

mod batch;
mod conformance;
mod pool;
mod pool_cache;
mod processes;
mod records;
mod refusals;
mod remote;
mod sandbox_docker;
mod sandbox_namespace;
mod sandbox_wasm;
mod store;
mod tidy;
