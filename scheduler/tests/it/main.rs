//! The scheduler's integration tests, one binary: placement decisions and their explanations,
//! the state machine's handling of failures, fairness, and simulation sweeps over many seeds.

mod machine;
mod placement;
mod sim;
mod support;
