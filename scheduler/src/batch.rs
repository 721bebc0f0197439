//! The order in which a batch build's members run: a dependency graph (`build-graph`'s
//! `depend-on`; no edges for the other batch forms) run with at most `slots` members at once.
//!
//! Decisions, as the docs state them:
//! - A member starts once every member it depends on has succeeded, or failed with
//!   `ignore-failure` (an ignored failure counts as done).
//! - A member whose dependency failed (without `ignore-failure`), or was itself blocked or
//!   stopped, never starts: it ends `Blocked`, naming that dependency.
//! - With `fast-fail`, the first failure that is not ignored stops every running member and
//!   starts no new one.
//! - The batch succeeds when every member succeeded or failed with `ignore-failure`.

/// A member as the graph needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub depends_on: Vec<usize>,
    pub ignore_failure: bool,
}

/// Where a member stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberState {
    Waiting,
    Running,
    Succeeded,
    Failed,
    /// Not started because a dependency did not complete.
    Blocked {
        dependency: usize,
    },
    /// Stopped by fast-fail (while running or before it started).
    Stopped,
}

impl MemberState {
    fn is_final(&self) -> bool {
        !matches!(self, MemberState::Waiting | MemberState::Running)
    }
}

/// How a member's run ended, as reported by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    /// The caller stopped it (after a `Stop` action).
    Stopped,
}

/// What the caller must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Start(usize),
    /// Stop a running member (fast-fail); the caller reports `Outcome::Stopped` when it ends.
    Stop(usize),
    /// A member will never run; shown to the user.
    Block {
        member: usize,
        dependency: usize,
    },
    Finished {
        succeeded: bool,
    },
}

/// Errors in the graph itself, found before anything runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphError {
    UnknownDependency { member: usize, dependency: usize },
    Cycle { members: Vec<usize> },
}

/// The batch's state.
#[derive(Clone, Debug)]
pub struct BatchGraph {
    members: Vec<Member>,
    states: Vec<MemberState>,
    slots: usize,
    fast_fail: bool,
    stopping: bool,
    finished: bool,
}

impl BatchGraph {
    /// Checks the graph and returns it with nothing started; call [`BatchGraph::start`] next.
    pub fn new(members: Vec<Member>, slots: usize, fast_fail: bool) -> Result<Self, GraphError> {
        check_graph(&members)?;
        let states = vec![MemberState::Waiting; members.len()];
        Ok(BatchGraph {
            members,
            states,
            slots: slots.max(1),
            fast_fail,
            stopping: false,
            finished: false,
        })
    }

    pub fn state(&self, member: usize) -> &MemberState {
        &self.states[member]
    }

    /// The first actions: members with no dependencies, up to the slot count.
    pub fn start(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        self.advance(&mut actions);
        actions
    }

    /// A member ended. Reports for members that are not running are ignored.
    pub fn finished(&mut self, member: usize, outcome: Outcome) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.states.get(member) != Some(&MemberState::Running) {
            return actions;
        }
        self.states[member] = match outcome {
            Outcome::Succeeded => MemberState::Succeeded,
            Outcome::Failed => MemberState::Failed,
            Outcome::Stopped => MemberState::Stopped,
        };
        if outcome == Outcome::Failed
            && self.fast_fail
            && !self.members[member].ignore_failure
            && !self.stopping
        {
            self.stopping = true;
            for (index, state) in self.states.iter_mut().enumerate() {
                match state {
                    MemberState::Running => actions.push(Action::Stop(index)),
                    MemberState::Waiting => *state = MemberState::Stopped,
                    _ => {}
                }
            }
        }
        self.advance(&mut actions);
        actions
    }

    fn running(&self) -> usize {
        self.states
            .iter()
            .filter(|s| **s == MemberState::Running)
            .count()
    }

    /// Blocks what can no longer run, starts what may, and reports the end once all is final.
    fn advance(&mut self, actions: &mut Vec<Action>) {
        if !self.stopping {
            self.block_unreachable(actions);
            for index in 0..self.members.len() {
                if self.running() >= self.slots {
                    break;
                }
                if self.states[index] == MemberState::Waiting && self.ready(index) {
                    self.states[index] = MemberState::Running;
                    actions.push(Action::Start(index));
                }
            }
        }
        if !self.finished && self.states.iter().all(MemberState::is_final) {
            self.finished = true;
            actions.push(Action::Finished {
                succeeded: self.succeeded(),
            });
        }
    }

    fn completed(&self, member: usize) -> bool {
        match self.states[member] {
            MemberState::Succeeded => true,
            MemberState::Failed => self.members[member].ignore_failure,
            _ => false,
        }
    }

    fn ready(&self, member: usize) -> bool {
        self.members[member]
            .depends_on
            .iter()
            .all(|d| self.completed(*d))
    }

    fn block_unreachable(&mut self, actions: &mut Vec<Action>) {
        // Blocking one member can block its dependents, so repeat until nothing changes; each
        // pass blocks at least one member or stops, so this ends.
        loop {
            let blocked = (0..self.members.len()).find_map(|index| {
                if self.states[index] != MemberState::Waiting {
                    return None;
                }
                self.members[index]
                    .depends_on
                    .iter()
                    .find(|d| self.states[**d].is_final() && !self.completed(**d))
                    .map(|d| (index, *d))
            });
            let Some((member, dependency)) = blocked else {
                return;
            };
            self.states[member] = MemberState::Blocked { dependency };
            actions.push(Action::Block { member, dependency });
        }
    }

    fn succeeded(&self) -> bool {
        (0..self.members.len()).all(|index| self.completed(index))
    }
}

pub(crate) fn check_graph(members: &[Member]) -> Result<(), GraphError> {
    for (member, m) in members.iter().enumerate() {
        if let Some(&dependency) = m.depends_on.iter().find(|d| **d >= members.len()) {
            return Err(GraphError::UnknownDependency { member, dependency });
        }
    }
    // Depth-first search with colours: 0 unvisited, 1 on the current path, 2 done.
    let mut colour = vec![0u8; members.len()];
    let mut path = Vec::new();
    for root in 0..members.len() {
        if let Some(cycle) = find_cycle(members, root, &mut colour, &mut path) {
            return Err(GraphError::Cycle { members: cycle });
        }
    }
    Ok(())
}

fn find_cycle(
    members: &[Member],
    node: usize,
    colour: &mut [u8],
    path: &mut Vec<usize>,
) -> Option<Vec<usize>> {
    match colour[node] {
        2 => return None,
        1 => {
            let start = path.iter().position(|n| *n == node).unwrap_or(0);
            return Some(path[start..].to_vec());
        }
        _ => {}
    }
    colour[node] = 1;
    path.push(node);
    for &next in &members[node].depends_on {
        if let Some(cycle) = find_cycle(members, next, colour, path) {
            return Some(cycle);
        }
    }
    path.pop();
    colour[node] = 2;
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn member(depends_on: &[usize], ignore_failure: bool) -> Member {
        Member {
            depends_on: depends_on.to_vec(),
            ignore_failure,
        }
    }

    /// Runs a script of outcomes: each step finishes the lowest-numbered running member with the
    /// outcome given for it, and the whole log of actions is compared.
    fn check(
        members: Vec<Member>,
        slots: usize,
        fast_fail: bool,
        outcomes: &[Outcome],
        expected: Expect,
    ) {
        let mut graph = BatchGraph::new(members, slots, fast_fail).expect("valid graph");
        let mut log = vec![format!("start -> {:?}", graph.start())];
        let mut outcomes = outcomes.iter();
        while let Some(running) =
            (0..graph.members.len()).find(|i| graph.states[*i] == MemberState::Running)
        {
            let outcome = if graph.stopping {
                Outcome::Stopped
            } else {
                *outcomes.next().unwrap_or(&Outcome::Succeeded)
            };
            log.push(format!(
                "{running} {outcome:?} -> {:?}",
                graph.finished(running, outcome)
            ));
        }
        expected.assert_eq(&log.join("\n"));
    }

    #[test]
    fn list_runs_within_slots() {
        check(
            vec![member(&[], false), member(&[], false), member(&[], false)],
            2,
            false,
            &[],
            expect![[r#"
                start -> [Start(0), Start(1)]
                0 Succeeded -> [Start(2)]
                1 Succeeded -> []
                2 Succeeded -> [Finished { succeeded: true }]"#]],
        );
    }

    #[test]
    fn failed_dependency_blocks_dependents_transitively() {
        check(
            vec![
                member(&[], false),
                member(&[0], false),
                member(&[1], false),
                member(&[], false),
            ],
            4,
            false,
            &[Outcome::Failed],
            expect![[r#"
                start -> [Start(0), Start(3)]
                0 Failed -> [Block { member: 1, dependency: 0 }, Block { member: 2, dependency: 1 }]
                3 Succeeded -> [Finished { succeeded: false }]"#]],
        );
    }

    #[test]
    fn ignored_failure_lets_dependents_run() {
        check(
            vec![member(&[], true), member(&[0], false)],
            4,
            true,
            &[Outcome::Failed],
            expect![[r#"
                start -> [Start(0)]
                0 Failed -> [Start(1)]
                1 Succeeded -> [Finished { succeeded: true }]"#]],
        );
    }

    #[test]
    fn fast_fail_stops_running_and_waiting_members() {
        check(
            vec![member(&[], false), member(&[], false), member(&[], false)],
            2,
            true,
            &[Outcome::Failed],
            expect![[r#"
                start -> [Start(0), Start(1)]
                0 Failed -> [Stop(1)]
                1 Stopped -> [Finished { succeeded: false }]"#]],
        );
    }

    #[test]
    fn late_and_duplicate_reports_are_ignored() {
        let mut graph = BatchGraph::new(vec![member(&[], false)], 1, false).expect("valid");
        graph.start();
        assert_eq!(
            graph.finished(0, Outcome::Succeeded),
            vec![Action::Finished { succeeded: true }]
        );
        assert_eq!(graph.finished(0, Outcome::Failed), vec![]);
        assert_eq!(graph.finished(7, Outcome::Failed), vec![]);
    }

    #[test]
    fn bad_graphs_are_refused() {
        let cycle = BatchGraph::new(
            vec![
                member(&[2], false),
                member(&[0], false),
                member(&[1], false),
            ],
            1,
            false,
        );
        assert_eq!(
            cycle.err(),
            Some(GraphError::Cycle {
                members: vec![0, 2, 1]
            })
        );
        let unknown = BatchGraph::new(vec![member(&[5], false)], 1, false);
        assert_eq!(
            unknown.err(),
            Some(GraphError::UnknownDependency {
                member: 0,
                dependency: 5
            })
        );
    }

    #[test]
    fn empty_batch_finishes_at_once() {
        let mut graph = BatchGraph::new(vec![], 1, false).expect("valid");
        assert_eq!(graph.start(), vec![Action::Finished { succeeded: true }]);
    }
}
