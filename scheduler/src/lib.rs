//! peerbuild's scheduling decisions as sans-IO state machines: callers feed events and carry out
//! the actions returned. Nothing here reads the clock, spawns, or does I/O, so every decision can
//! be replayed exactly in tests and simulations.
//!
//! - [`batch`]: the order in which one machine runs a batch's members.
//! - [`Scheduler`]: a coordinator's placement engine for the pool (`step(now, event) -> actions`).
//! - [`sim`]: a deterministic, seeded simulation of a pool driving [`Scheduler`]s.

pub mod batch;
mod fast_hash;
mod ids;
mod model;
mod pool;
pub mod rng;
mod scheduler;
pub mod sim;

pub use ids::{Attempt, BuildId, InputId, Millis, PeerId, SubmitterId, TaskId, TaskKey};
pub use model::{
    Action, BuildOutcome, BuildSpec, Capabilities, DeclineReason, Event, Explanation, FailReason,
    Guarantees, Heartbeat, Input, LossReason, MAX_HELD_INPUTS, NearMiss, RejectReason,
    Requirements, SandboxKind, TaskOutcome, TaskSpec, TaskStatus, Unmet, Unsatisfiable,
};
pub use pool::Policy;
pub use scheduler::{Config, Scheduler, Stats};
