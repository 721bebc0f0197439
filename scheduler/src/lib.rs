//! peerbuild's scheduling decisions as sans-IO state machines: callers feed events and carry out
//! the actions returned. Nothing here reads the clock, spawns, or does I/O, so every decision can
//! be replayed exactly in tests and simulations.

pub mod batch;
