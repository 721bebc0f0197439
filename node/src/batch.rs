//! Batch builds on this machine: the members a `batch` section describes, run in parallel up to
//! the slot limit in the order `scheduler::batch` decides, each with its own workspace, its
//! output prefixed with its identifier.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use protocol::buildspec::{Batch, BatchKind, BatchMember, Buildspec, MemberEnv};
use scheduler::batch::{Action, BatchGraph, Member, MemberState, Outcome};
use tokio::sync::watch;

use crate::engine::{Interrupt, Limits, OutputBudget};
use crate::events::{BuildResult, Event, Status};

/// A member as the batch section describes it, before it is prepared to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMember {
    pub identifier: String,
    /// Another buildspec in the source, or `None` for the batch's own.
    pub buildspec: Option<String>,
    pub ignore_failure: bool,
    pub env: MemberEnv,
    pub depend_on: Vec<String>,
    /// Variables the batch form adds (the fan-out index and count).
    pub extra_variables: Vec<(String, String)>,
    /// A line saying what this member is (a matrix combination), for the log.
    pub description: Option<String>,
}

/// Expands a batch section into its members, in order.
pub fn members(batch: &Batch) -> Vec<PlannedMember> {
    match &batch.kind {
        BatchKind::List(members) | BatchKind::Graph(members) => {
            members.iter().map(listed).collect()
        }
        BatchKind::Matrix(matrix) => {
            let buildspecs: Vec<Option<String>> = if matrix.buildspecs.is_empty() {
                vec![None]
            } else {
                matrix.buildspecs.iter().cloned().map(Some).collect()
            };
            let images = optional_axis(&matrix.images);
            let compute_types = optional_axis(&matrix.compute_types);
            let mut combinations: Vec<Vec<(String, String)>> = vec![Vec::new()];
            for (name, values) in &matrix.variables {
                combinations = combinations
                    .into_iter()
                    .flat_map(|combo| {
                        values.iter().map(move |value| {
                            let mut combo = combo.clone();
                            combo.push((name.clone(), value.clone()));
                            combo
                        })
                    })
                    .collect();
            }
            let mut planned = Vec::new();
            for buildspec in &buildspecs {
                for image in &images {
                    for compute_type in &compute_types {
                        for variables in &combinations {
                            let mut env = matrix.static_env.clone();
                            env.variables.extend(variables.iter().cloned());
                            if image.is_some() {
                                env.image = image.clone();
                            }
                            if compute_type.is_some() {
                                env.compute_type = compute_type.clone();
                            }
                            let description = describe(buildspec, image, compute_type, variables);
                            planned.push(PlannedMember {
                                identifier: format!("matrix_{}", planned.len() + 1),
                                buildspec: buildspec.clone(),
                                ignore_failure: matrix.static_ignore_failure,
                                env,
                                depend_on: Vec::new(),
                                extra_variables: Vec::new(),
                                description: Some(description),
                            });
                        }
                    }
                }
            }
            planned
        }
        BatchKind::Fanout(fanout) => (0..fanout.parallelism)
            .map(|index| PlannedMember {
                identifier: format!("fanout_{}", index + 1),
                buildspec: None,
                ignore_failure: fanout.ignore_failure,
                env: MemberEnv::default(),
                depend_on: Vec::new(),
                extra_variables: vec![
                    ("PEERBUILD_FANOUT_INDEX".into(), index.to_string()),
                    (
                        "PEERBUILD_FANOUT_COUNT".into(),
                        fanout.parallelism.to_string(),
                    ),
                ],
                description: Some(format!(
                    "fan-out member {} of {}",
                    index + 1,
                    fanout.parallelism
                )),
            })
            .collect(),
    }
}

fn listed(member: &BatchMember) -> PlannedMember {
    PlannedMember {
        identifier: member.identifier.clone(),
        buildspec: member.buildspec.clone(),
        ignore_failure: member.ignore_failure,
        env: member.env.clone(),
        depend_on: member.depend_on.clone(),
        extra_variables: Vec::new(),
        description: None,
    }
}

fn optional_axis(values: &[String]) -> Vec<Option<String>> {
    if values.is_empty() {
        vec![None]
    } else {
        values.iter().cloned().map(Some).collect()
    }
}

fn describe(
    buildspec: &Option<String>,
    image: &Option<String>,
    compute_type: &Option<String>,
    variables: &[(String, String)],
) -> String {
    let mut parts = Vec::new();
    if let Some(b) = buildspec {
        parts.push(format!("buildspec {b}"));
    }
    if let Some(i) = image {
        parts.push(format!("image {i}"));
    }
    if let Some(c) = compute_type {
        parts.push(format!("compute-type {c}"));
    }
    parts.extend(variables.iter().map(|(k, v)| format!("{k}={v}")));
    if parts.is_empty() {
        "matrix member".into()
    } else {
        parts.join(", ")
    }
}

/// The buildspec a member runs: its own file, or the batch's buildspec without its batch section.
pub fn member_buildspec(batch_buildspec: &Buildspec, own: Option<Buildspec>) -> Buildspec {
    let mut buildspec = own.unwrap_or_else(|| batch_buildspec.clone());
    buildspec.batch = None;
    buildspec
}

/// Runs a member to its result. Given the member's index and its own stop signal.
pub type MemberRunner<'a> =
    Box<dyn FnMut(usize, Limits) -> Pin<Box<dyn Future<Output = BuildResult> + 'a>> + 'a>;

/// A running member: resolves to its index and result.
type Running<'a> = Pin<Box<dyn Future<Output = (usize, BuildResult)> + 'a>>;

/// Runs the members in the order the batch graph decides, at most `slots` at once, and returns
/// every member's result in the batch's order.
pub async fn run_members(
    planned: &[PlannedMember],
    fast_fail: bool,
    slots: usize,
    limits: Limits,
    reporter: &crate::reporter::Reporter,
    mut runner: MemberRunner<'_>,
) -> Vec<BuildResult> {
    let index: HashMap<&str, usize> = planned
        .iter()
        .enumerate()
        .map(|(i, m)| (m.identifier.as_str(), i))
        .collect();
    let graph_members: Vec<Member> = planned
        .iter()
        .map(|m| Member {
            depends_on: m
                .depend_on
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect(),
            ignore_failure: m.ignore_failure,
        })
        .collect();
    // The parser refused unknown dependencies and cycles, so the graph is valid.
    let Ok(mut graph) = BatchGraph::new(graph_members, slots, fast_fail) else {
        return Vec::new();
    };
    let mut results: Vec<Option<BuildResult>> = vec![None; planned.len()];
    let mut stops: HashMap<usize, watch::Sender<Option<Interrupt>>> = HashMap::new();
    let mut pending: Vec<Running<'_>> = Vec::new();
    let mut actions = graph.start();
    let mut batch_stop = limits.stop.clone();
    // Once the batch is stopped (Ctrl-C, cancel, timeout), members that the graph starts
    // afterwards are stopped from the outset.
    let mut interrupted: Option<Interrupt> = None;
    loop {
        for action in std::mem::take(&mut actions) {
            match action {
                Action::Start(member) => {
                    let (sender, receiver) = watch::channel(interrupted);
                    stops.insert(member, sender);
                    let member_limits = Limits {
                        deadline: limits.deadline,
                        stop: receiver,
                        output: OutputBudget::new(limits.output.limit()),
                    };
                    let future = runner(member, member_limits);
                    pending.push(Box::pin(async move { (member, future.await) }));
                }
                Action::Stop(member) => {
                    if let Some(stop) = stops.get(&member) {
                        let _ = stop.send(Some(Interrupt::Stopped));
                    }
                }
                Action::Block { member, dependency } => {
                    reporter.emit(Event::Note {
                        member: Some(planned[member].identifier.clone()),
                        level: crate::events::Level::Warning,
                        message: format!(
                            "not started: it depends on {}, which did not succeed",
                            planned[dependency].identifier
                        ),
                    });
                }
                Action::Finished { .. } => {
                    return finish(planned, &graph, results, interrupted);
                }
            }
        }
        if pending.is_empty() {
            return finish(planned, &graph, results, interrupted);
        }
        let next = first_of(&mut pending);
        tokio::select! {
            (member, result) = next => {
                let outcome = match result.status {
                    Status::Succeeded => Outcome::Succeeded,
                    Status::Stopped => Outcome::Stopped,
                    _ => Outcome::Failed,
                };
                reporter.emit(Event::MemberFinished { result: Box::new(result.clone()) });
                results[member] = Some(result);
                stops.remove(&member);
                actions = graph.finished(member, outcome);
            }
            interrupt = crate::engine::stopped_signal(&mut batch_stop) => {
                interrupted = Some(interrupt);
                for stop in stops.values() {
                    let _ = stop.send(Some(interrupt));
                }
                // Keep waiting: each member ends promptly once told, and reports its result.
                batch_stop = watch::channel(None).1;
            }
        }
    }
}

/// Resolves when the first of the pending futures does, removing it from the list.
fn first_of<'a, 'b, T>(
    pending: &'b mut Vec<Pin<Box<dyn Future<Output = T> + 'a>>>,
) -> impl Future<Output = T> + 'b {
    std::future::poll_fn(move |cx| {
        for index in 0..pending.len() {
            if let std::task::Poll::Ready(value) = pending[index].as_mut().poll(cx) {
                drop(pending.swap_remove(index));
                return std::task::Poll::Ready(value);
            }
        }
        std::task::Poll::Pending
    })
}

/// Every member's result; members that never ran get a result that says why.
fn finish(
    planned: &[PlannedMember],
    graph: &BatchGraph,
    results: Vec<Option<BuildResult>>,
    interrupted: Option<Interrupt>,
) -> Vec<BuildResult> {
    results
        .into_iter()
        .enumerate()
        .map(|(index, result)| {
            result.unwrap_or_else(|| {
                let message = match graph.state(index) {
                    MemberState::Blocked { dependency } => format!(
                        "not started: depends on {}, which did not succeed",
                        planned[*dependency].identifier
                    ),
                    _ if interrupted.is_some() => "not started: the batch was stopped".to_owned(),
                    _ => "not started: the batch stopped (fast-fail)".to_owned(),
                };
                BuildResult {
                    member: Some(planned[index].identifier.clone()),
                    ..BuildResult::ended_early(String::new(), 0, Status::Stopped, message)
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(yaml: &str) -> Batch {
        let text =
            format!("version: 0.2\nbatch:\n{yaml}\nphases:\n  build:\n    commands: [true]\n");
        protocol::buildspec::parse("buildspec.yml", &text)
            .expect("valid")
            .batch
            .expect("has a batch")
    }

    #[test]
    fn matrix_makes_one_member_per_combination() {
        let planned = members(&batch(
            "  build-matrix:\n    dynamic:\n      buildspec: [a.yml, b.yml]\n      env:\n        variables:\n          V: [x, y, z]",
        ));
        let lines: Vec<String> = planned
            .iter()
            .map(|m| {
                format!(
                    "{} {}",
                    m.identifier,
                    m.description.clone().unwrap_or_default()
                )
            })
            .collect();
        expect_test::expect![[r#"
            matrix_1 buildspec a.yml, V=x
            matrix_2 buildspec a.yml, V=y
            matrix_3 buildspec a.yml, V=z
            matrix_4 buildspec b.yml, V=x
            matrix_5 buildspec b.yml, V=y
            matrix_6 buildspec b.yml, V=z"#]]
        .assert_eq(&lines.join("\n"));
    }

    #[test]
    fn fanout_tells_each_member_its_index() {
        let planned = members(&batch("  build-fanout:\n    parallelism: 3"));
        assert_eq!(planned.len(), 3);
        assert_eq!(planned[2].identifier, "fanout_3");
        assert_eq!(
            planned[2].extra_variables,
            vec![
                ("PEERBUILD_FANOUT_INDEX".to_owned(), "2".to_owned()),
                ("PEERBUILD_FANOUT_COUNT".to_owned(), "3".to_owned())
            ]
        );
    }
}
