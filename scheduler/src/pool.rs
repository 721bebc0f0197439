//! The coordinator's view of the pool, indexed for placement: peers grouped into constraint
//! classes (equal capabilities), per class the peers with a free slot ordered by availability,
//! a map from input digests to the peers holding them, and durations learned per task and class.
//! A placement looks at a bounded number of peers, never at all of them.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::ops::Bound;
use std::sync::Arc;

use crate::fast_hash::FastMap;
use crate::ids::{Attempt, InputId, Millis, PeerId, TaskId, TaskKey};
use crate::model::{
    Capabilities, Explanation, Heartbeat, Input, MAX_HELD_INPUTS, NearMiss, Requirements, Unmet,
    Unsatisfiable,
};

pub(crate) type ClassId = u32;
pub(crate) type ReqId = u32;

/// How many holders of a task's inputs one placement looks at. Bounds the time of a decision
/// when an input is held by thousands of peers; the rest of the pool is reached through each
/// class's availability order.
const HOLDERS_SCANNED: usize = 24;
/// How many of the most available peers of each matching class one placement weighs.
const TOP_PER_CLASS: usize = 2;
/// Learned durations kept, at most; beyond it new task kinds are not learned (a bound on memory
/// that a pool reaches only with a very large variety of tasks).
const MAX_DURATIONS: usize = 200_000;
/// Groups of closest peers, and peers per group, shown when a task cannot run anywhere.
const CLOSEST_SHOWN: usize = 3;
/// In `Pool::placeable`: the peer in this slot cannot take work now.
const NOT_PLACEABLE: ClassId = ClassId::MAX;

/// One peer as this coordinator sees it.
#[derive(Clone, Debug)]
pub(crate) struct PeerView {
    pub class: ClassId,
    pub total: u32,
    /// Slots in use by work that is not this coordinator's, as of the last heartbeat.
    pub others: u32,
    /// This coordinator's runs on the peer (offered or running): freed the moment they end.
    pub committed: u32,
    pub load_permille: u32,
    /// Sorted and deduplicated.
    pub holds: Vec<InputId>,
    pub last_seen: Millis,
    pub quarantined_until: Option<Millis>,
    /// When its runs failed where a later run of the same task succeeded.
    pub strikes: Vec<Millis>,
    /// This coordinator's live runs there.
    pub attempts: Vec<(TaskId, Attempt)>,
    /// Tasks waiting in the peer's own coordinator queue, as its heartbeat says.
    pub queued_tasks: u32,
    /// The key under which the peer sits in its class's `ready` set, if it does.
    indexed: Option<u32>,
    /// Its position in the pool's dense tables.
    slot: u32,
}

impl PeerView {
    pub fn free(&self) -> u32 {
        self.total
            .saturating_sub(self.others.saturating_add(self.committed))
    }

    fn available(&self) -> bool {
        self.free() > 0 && self.quarantined_until.is_none()
    }

    /// Higher is more available: the share of free slots counts twice as much as low load.
    fn availability(&self) -> u32 {
        2 * free_permille(self.free(), self.total) + (1000 - self.load_permille.min(1000))
    }

    fn holds(&self, input: InputId) -> bool {
        self.holds.binary_search(&input).is_ok()
    }
}

fn free_permille(free: u32, total: u32) -> u32 {
    if total == 0 {
        0
    } else {
        (u64::from(free) * 1000 / u64::from(total)) as u32
    }
}

#[derive(Debug)]
struct Class {
    capabilities: Arc<Capabilities>,
    /// Peers whose view is in this class, slots or not.
    peers: u32,
    /// When the class was last left empty, in `Pool::emptied` counts.
    emptied: u64,
    /// How long each kind of task took on this class, learned from its runs.
    durations: FastMap<TaskKey, u64>,
    /// Peers of the class with at least one slot (a node with `--slots 0` only coordinates).
    members: BTreeSet<PeerId>,
    /// Free slots over the available members.
    free_slots: u64,
    /// Available members, most available first, ties by peer id (so decisions are replayable).
    ready: BTreeSet<(Reverse<u32>, PeerId)>,
}

#[derive(Debug)]
struct RequirementSet {
    requirements: Requirements,
    /// Sorted: the classes that meet the requirements.
    classes: Vec<ClassId>,
}

/// A placement the pool proposes.
#[derive(Clone, Debug)]
pub(crate) struct Choice {
    pub peer: PeerId,
    pub explanation: Explanation,
}

/// How to pick among the peers that qualify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Held inputs, then free slots and load, then expected duration.
    Scored,
    /// Any qualifying peer, uniformly at random: the baseline the benchmarks compare against.
    /// Looks at every qualifying peer, so it is for small simulated pools only.
    Random,
}

#[derive(Debug, Default)]
pub(crate) struct Pool {
    peers: FastMap<PeerId, PeerView>,
    classes: Vec<Class>,
    class_ids: FastMap<Capabilities, ClassId>,
    /// Classes no peer is in: the ones a new class may take the place of once there are
    /// `max_classes`.
    unused_classes: BTreeSet<(u64, ClassId)>,
    /// Classes left empty so far: orders `unused_classes`, so the one unused longest goes
    /// first (a class whose only peer is restarting keeps what was learned of it).
    emptied: u64,
    /// Classes that took the place of another.
    replaced: u64,
    max_classes: usize,
    requirement_sets: Vec<RequirementSet>,
    requirement_ids: FastMap<Requirements, ReqId>,
    /// Dense positions for peers, so the hot holder scan reads small arrays instead of
    /// hashing: `slot_peers[slot]` is the peer in a slot, `placeable[slot]` its class while it
    /// can take work (`NOT_PLACEABLE` otherwise). Slots of departed peers are reused.
    slot_peers: Vec<PeerId>,
    placeable: Vec<ClassId>,
    free_slots_list: Vec<u32>,
    /// Unordered slots; a peer appears once per input it holds.
    holders: FastMap<InputId, Vec<u32>>,
    /// When peers were heard from, oldest first, entered at each heartbeat. An entry may be
    /// stale (the peer was heard from since, or left); stale entries are fixed when they reach
    /// the front, so hearing from a peer costs nothing here and the heap holds about one entry
    /// per heartbeat within a lease.
    liveness: BinaryHeap<Reverse<(Millis, PeerId)>>,
    /// Learned durations over all classes, for the bound.
    durations: usize,
    free_total: u64,
    /// Peers with at least one slot, and their slots.
    workers: usize,
    slots_total: u64,
    /// Other coordinators with tasks waiting, as their heartbeats say.
    waiting_coordinators: usize,
    /// Quarantines of peers that left, so a flaky peer cannot shed its quarantine by dropping
    /// out and rejoining. Each entry goes when the peer returns or its quarantine ends.
    departed_quarantines: FastMap<PeerId, Millis>,
}

impl Pool {
    pub fn new(max_classes: usize) -> Pool {
        Pool {
            max_classes,
            ..Pool::default()
        }
    }

    /// Peers that can run work (with at least one slot).
    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn slots_total(&self) -> u64 {
        self.slots_total
    }

    /// Classes held, in use or kept for a peer of that kind to come back to.
    pub fn classes(&self) -> usize {
        self.classes.len()
    }

    /// Classes that took the place of one no peer was in.
    pub fn classes_replaced(&self) -> u64 {
        self.replaced
    }

    pub fn waiting_coordinators(&self) -> usize {
        self.waiting_coordinators
    }

    fn take_slot(&mut self, peer: PeerId) -> u32 {
        match self.free_slots_list.pop() {
            Some(slot) => {
                self.slot_peers[slot as usize] = peer;
                slot
            }
            None => {
                self.slot_peers.push(peer);
                self.placeable.push(NOT_PLACEABLE);
                (self.slot_peers.len() - 1) as u32
            }
        }
    }

    pub fn peer(&self, peer: PeerId) -> Option<&PeerView> {
        self.peers.get(&peer)
    }

    pub fn free_total(&self) -> u64 {
        self.free_total
    }

    /// Interns a requirement set, so each distinct one is matched against the classes once.
    pub fn requirement_id(&mut self, requirements: &Requirements) -> ReqId {
        if let Some(id) = self.requirement_ids.get(requirements) {
            return *id;
        }
        let id = self.requirement_sets.len() as ReqId;
        let classes = (0..self.classes.len() as ClassId)
            .filter(|c| requirements.satisfied_by(&self.classes[*c as usize].capabilities))
            .collect();
        self.requirement_sets.push(RequirementSet {
            requirements: requirements.clone(),
            classes,
        });
        self.requirement_ids.insert(requirements.clone(), id);
        debug_assert!(self.sets_match_classes());
        id
    }

    fn class_id(&mut self, capabilities: &Arc<Capabilities>) -> ClassId {
        if let Some(id) = self.class_ids.get(&**capabilities) {
            return *id;
        }
        let reused = if self.classes.len() >= self.max_classes {
            self.unused_classes.pop_first().map(|(_, id)| id)
        } else {
            None
        };
        // The class is counted in by the caller, at once: a reused one stays out of
        // `unused_classes`, a new one never goes in.
        let id = match reused {
            Some(id) => {
                let class = &mut self.classes[id as usize];
                debug_assert!(class.peers == 0 && class.members.is_empty());
                let old = std::mem::replace(&mut class.capabilities, Arc::clone(capabilities));
                self.durations -= class.durations.len();
                class.durations.clear();
                self.class_ids.remove(&*old);
                self.replaced += 1;
                id
            }
            None => {
                self.classes.push(Class {
                    capabilities: Arc::clone(capabilities),
                    peers: 0,
                    emptied: 0,
                    durations: FastMap::default(),
                    members: BTreeSet::new(),
                    free_slots: 0,
                    ready: BTreeSet::new(),
                });
                (self.classes.len() - 1) as ClassId
            }
        };
        for set in &mut self.requirement_sets {
            // Sorted: a new class's id is the highest, a reused one keeps its place.
            let listed = set.classes.binary_search(&id);
            match (listed, set.requirements.satisfied_by(capabilities)) {
                (Err(at), true) => set.classes.insert(at, id),
                (Ok(at), false) => {
                    set.classes.remove(at);
                }
                _ => {}
            }
        }
        self.class_ids.insert(Capabilities::clone(capabilities), id);
        debug_assert!(self.sets_match_classes());
        id
    }

    /// Moves a peer's view between classes in the counts that tell which classes are in use.
    fn count_in_class(&mut self, from: Option<ClassId>, to: Option<ClassId>) {
        if from == to {
            return;
        }
        if let Some(from) = from {
            let class = &mut self.classes[from as usize];
            class.peers -= 1;
            if class.peers == 0 {
                self.emptied += 1;
                class.emptied = self.emptied;
                self.unused_classes.insert((self.emptied, from));
            }
        }
        if let Some(to) = to {
            let class = &mut self.classes[to as usize];
            if class.peers == 0 {
                self.unused_classes.remove(&(class.emptied, to));
            }
            class.peers += 1;
        }
    }

    /// Whether each class is found by its capabilities, and every requirement set lists exactly
    /// the classes that meet it, in order. Checked (in debug builds) whenever a class or a set
    /// is made or reused, the only times this can change: checking it at every step would cost
    /// each step every class and set.
    fn sets_match_classes(&self) -> bool {
        let found = self.classes.iter().enumerate().all(|(index, class)| {
            self.class_ids.get(&*class.capabilities) == Some(&(index as ClassId))
        });
        found
            && self.requirement_sets.iter().all(|set| {
                let matching = (0..self.classes.len() as ClassId).filter(|c| {
                    let capabilities = &self.classes[*c as usize].capabilities;
                    set.requirements.satisfied_by(capabilities)
                });
                matching.eq(set.classes.iter().copied())
            })
    }

    fn matches(&self, requirement: ReqId, class: ClassId) -> bool {
        self.requirement_sets[requirement as usize]
            .classes
            .binary_search(&class)
            .is_ok()
    }

    /// Free slots this coordinator may use on peers that meet `requirement`.
    pub fn capacity(&self, requirement: ReqId) -> u64 {
        self.requirement_sets[requirement as usize]
            .classes
            .iter()
            .map(|c| self.classes[*c as usize].free_slots)
            .sum()
    }

    /// Whether any known peer meets `requirement`, busy or not.
    pub fn satisfiable(&self, requirement: ReqId) -> bool {
        self.requirement_sets[requirement as usize]
            .classes
            .iter()
            .any(|c| !self.classes[*c as usize].members.is_empty())
    }

    /// Why no peer meets `requirement`: the classes missing the fewest constraints.
    pub fn unsatisfiable(&self, requirement: ReqId) -> Unsatisfiable {
        let requirements = &self.requirement_sets[requirement as usize].requirements;
        // Classes that lack the fewest constraints, merged when they lack the same ones.
        let mut closest: Vec<(Vec<Unmet>, Vec<PeerId>)> = Vec::new();
        for class in self.classes.iter().filter(|c| !c.members.is_empty()) {
            let unmet = requirements.unmet(&class.capabilities);
            let fewest = closest.first().map_or(usize::MAX, |(u, _)| u.len());
            if unmet.len() < fewest {
                closest.clear();
            }
            if unmet.len() <= fewest {
                match closest.iter_mut().find(|(u, _)| *u == unmet) {
                    Some((_, peers)) => peers.extend(class.members.iter().copied()),
                    None => closest.push((unmet, class.members.iter().copied().collect())),
                }
            }
        }
        for (_, peers) in &mut closest {
            peers.sort();
        }
        // The largest groups first: they say the most about the pool.
        closest.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.1.cmp(&b.1)));
        Unsatisfiable {
            closest: closest
                .into_iter()
                .take(CLOSEST_SHOWN)
                .map(|(unmet, peers)| NearMiss {
                    unmet,
                    peer_count: peers.len() as u32,
                    peers: peers.into_iter().take(CLOSEST_SHOWN).collect(),
                })
                .collect(),
            pool_size: self.workers as u32,
        }
    }

    /// Takes in a heartbeat. `acknowledged` is how many of this coordinator's runs the peer knew
    /// of when it sent it (accepted or started), so the rest of its used slots are other work;
    /// `queued_tasks` is the demand of the peer's own coordinator (zero for this one's own node).
    /// Returns the peer's former class if the peer left it (its capabilities changed, or it
    /// stopped offering slots) and no peer is left in it.
    pub fn heartbeat(
        &mut self,
        now: Millis,
        heartbeat: &Heartbeat,
        acknowledged: u32,
        queued_tasks: u32,
    ) -> Option<ClassId> {
        let peer = heartbeat.peer;
        let previous = self.peers.get(&peer).map(|view| view.class);
        // Most heartbeats repeat the peer's capabilities: check its class before hashing.
        let known = previous.filter(|class| {
            let current = &self.classes[*class as usize].capabilities;
            Arc::ptr_eq(current, &heartbeat.capabilities) || **current == *heartbeat.capabilities
        });
        let class = match known {
            Some(class) => class,
            None => self.class_id(&heartbeat.capabilities),
        };
        let mut holds = heartbeat.holds.clone();
        holds.truncate(MAX_HELD_INPUTS);
        holds.sort_unstable();
        holds.dedup();
        let old_holds = match self.peers.get(&peer) {
            Some(_) => std::mem::take(&mut self.peers.get_mut(&peer).expect("present").holds),
            None => {
                let slot = self.take_slot(peer);
                self.peers.insert(
                    peer,
                    PeerView {
                        slot,
                        class,
                        total: 0,
                        others: 0,
                        committed: 0,
                        load_permille: 0,
                        holds: Vec::new(),
                        last_seen: now,
                        quarantined_until: None,
                        strikes: Vec::new(),
                        attempts: Vec::new(),
                        queued_tasks: 0,
                        indexed: None,
                    },
                );
                if let Some(until) = self.departed_quarantines.remove(&peer) {
                    self.peers
                        .get_mut(&peer)
                        .expect("inserted")
                        .quarantined_until = Some(until);
                }
                Vec::new()
            }
        };
        let slot = self.peers[&peer].slot;
        self.update_holders(slot, &old_holds, &holds);
        let (old_class, was_member) = {
            let view = &self.peers[&peer];
            (view.class, view.total > 0)
        };
        self.forget_membership(peer);
        self.count_in_class(previous, Some(class));
        let view = self.peers.get_mut(&peer).expect("present");
        view.queued_tasks = queued_tasks;
        if queued_tasks > 0 {
            self.waiting_coordinators += 1;
        }
        if heartbeat.total_slots > 0 {
            self.classes[class as usize].members.insert(peer);
            self.workers += 1;
            self.slots_total += u64::from(heartbeat.total_slots);
        }
        self.update(peer, |view| {
            view.class = class;
            view.total = heartbeat.total_slots;
            let used = heartbeat.total_slots.saturating_sub(heartbeat.free_slots);
            view.others = used.saturating_sub(acknowledged);
            view.load_permille = heartbeat.load_permille.min(1000);
            view.holds = holds;
            view.last_seen = now;
        });
        self.liveness.push(Reverse((now, peer)));
        let member = self.classes[class as usize].members.contains(&peer);
        let left = was_member && (old_class != class || !member);
        Some(old_class).filter(|old| left && self.classes[*old as usize].members.is_empty())
    }

    /// Takes a peer out of the pool-wide counts and its class's members, before a heartbeat
    /// puts it back as it now is, or before it leaves.
    fn forget_membership(&mut self, peer: PeerId) {
        let view = &self.peers[&peer];
        if view.queued_tasks > 0 {
            self.waiting_coordinators -= 1;
        }
        if view.total > 0 {
            self.classes[view.class as usize].members.remove(&peer);
            self.workers -= 1;
            self.slots_total -= u64::from(view.total);
        }
    }

    fn update_holders(&mut self, slot: u32, old: &[InputId], new: &[InputId]) {
        if old == new {
            return;
        }
        // Both lists are sorted: one merge pass finds what was dropped and what was added.
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            let next_old = old.get(i).copied();
            let next_new = new.get(j).copied();
            match (next_old, next_new) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), b) if b.is_none_or(|b| a < b) => {
                    self.remove_holder(a, slot);
                    i += 1;
                }
                (_, Some(b)) => {
                    self.holders.entry(b).or_default().push(slot);
                    j += 1;
                }
                _ => unreachable!("one of the lists has an element left"),
            }
        }
    }

    fn remove_holder(&mut self, input: InputId, slot: u32) {
        if let Some(holders) = self.holders.get_mut(&input) {
            if let Some(position) = holders.iter().position(|s| *s == slot) {
                holders.swap_remove(position);
            }
            if holders.is_empty() {
                self.holders.remove(&input);
            }
        }
    }

    /// Records that the peer is alive (a progress report, an acceptance).
    pub fn heard_from(&mut self, now: Millis, peer: PeerId) {
        if let Some(view) = self.peers.get_mut(&peer) {
            view.last_seen = view.last_seen.max(now);
        }
    }

    /// The peer heard from longest ago, if silent since before `deadline`.
    pub fn silent_since(&mut self, deadline: Millis) -> Option<(Millis, PeerId)> {
        while let Some(Reverse((entered, peer))) = self.liveness.peek().copied() {
            if entered >= deadline {
                return None;
            }
            self.liveness.pop();
            match self.peers.get(&peer) {
                // Left, or heard from since this entry: a later entry speaks for it.
                None => continue,
                Some(view) if view.last_seen > entered => {
                    self.liveness.push(Reverse((view.last_seen, peer)));
                }
                Some(view) => return Some((view.last_seen, peer)),
            }
        }
        None
    }

    /// Changes a peer and keeps the indexes in step. Every change to a peer's free slots, load or
    /// quarantine goes through here.
    pub fn update(&mut self, peer: PeerId, change: impl FnOnce(&mut PeerView)) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        self.unindex(peer);
        let view = self.peers.get_mut(&peer).expect("present");
        change(view);
        if view.available() {
            let key = view.availability();
            view.indexed = Some(key);
            let free = u64::from(view.free());
            self.placeable[view.slot as usize] = view.class;
            let class = &mut self.classes[view.class as usize];
            class.ready.insert((Reverse(key), peer));
            class.free_slots += free;
            self.free_total += free;
        }
    }

    fn unindex(&mut self, peer: PeerId) {
        let view = self.peers.get_mut(&peer).expect("present");
        if let Some(key) = view.indexed.take() {
            self.placeable[view.slot as usize] = NOT_PLACEABLE;
            let free = u64::from(view.free());
            let class = &mut self.classes[view.class as usize];
            class.ready.remove(&(Reverse(key), peer));
            class.free_slots -= free;
            self.free_total -= free;
        }
    }

    /// Forgets a peer; returns its view (with the runs it held) if it was known.
    pub fn remove(&mut self, peer: PeerId) -> Option<PeerView> {
        if !self.peers.contains_key(&peer) {
            return None;
        }
        self.unindex(peer);
        self.forget_membership(peer);
        let view = self.peers.remove(&peer).expect("present");
        self.count_in_class(Some(view.class), None);
        for input in &view.holds {
            self.remove_holder(*input, view.slot);
        }
        self.free_slots_list.push(view.slot);
        if let Some(until) = view.quarantined_until {
            self.departed_quarantines.insert(peer, until);
        }
        Some(view)
    }

    /// Whether the peer is in the pool, or away with its quarantine kept.
    pub fn remembers(&self, peer: PeerId) -> bool {
        self.peers.contains_key(&peer) || self.departed_quarantines.contains_key(&peer)
    }

    /// Ends a quarantine, whether the peer is in the pool or away.
    pub fn end_quarantine(&mut self, peer: PeerId, until: Millis) {
        if self.departed_quarantines.get(&peer) == Some(&until) {
            self.departed_quarantines.remove(&peer);
        }
        if self
            .peers
            .get(&peer)
            .is_some_and(|view| view.quarantined_until == Some(until))
        {
            self.update(peer, |view| view.quarantined_until = None);
        }
    }

    /// Peers that meet `requirement`, and how many of them are quarantined.
    pub fn qualified(&self, requirement: ReqId) -> (u32, u32) {
        let mut qualified = 0;
        let mut quarantined = 0;
        for class in &self.requirement_sets[requirement as usize].classes {
            for peer in &self.classes[*class as usize].members {
                qualified += 1;
                if self.peers[peer].quarantined_until.is_some() {
                    quarantined += 1;
                }
            }
        }
        (qualified, quarantined)
    }

    /// Whether a peer that just left was the last of a class some requirement relied on.
    pub fn class_emptied(&self, class: ClassId) -> bool {
        self.classes[class as usize].members.is_empty()
    }

    pub fn requirement_uses_class(&self, requirement: ReqId, class: ClassId) -> bool {
        self.matches(requirement, class)
    }

    pub fn expected_ms(&self, key: TaskKey, class: ClassId) -> Option<u64> {
        self.classes[class as usize].durations.get(&key).copied()
    }

    /// Learns from a finished run: a moving average that weighs the newest run a quarter.
    pub fn learn(&mut self, key: TaskKey, class: ClassId, duration_ms: u64) {
        let full = self.durations >= MAX_DURATIONS;
        let durations = &mut self.classes[class as usize].durations;
        match durations.get_mut(&key) {
            Some(average) => *average = (*average * 3 + duration_ms) / 4,
            None if !full => {
                durations.insert(key, duration_ms);
                self.durations += 1;
            }
            None => {}
        }
    }

    /// The best peer for a task, or `None` if no qualifying peer has a free slot. `exclude`
    /// holds peers already running the task; `spin` varies where the holder scan starts.
    pub fn choose(
        &self,
        requirement: ReqId,
        key: TaskKey,
        inputs: &[Input],
        exclude: &[PeerId],
        spin: u64,
    ) -> Option<Choice> {
        let mut candidates: Vec<PeerId> = Vec::with_capacity(HOLDERS_SCANNED + 8);
        let eligible = |slot: u32| {
            let class = self.placeable[slot as usize];
            class != NOT_PLACEABLE
                && self.matches(requirement, class)
                && !exclude.contains(&self.slot_peers[slot as usize])
        };
        self.holder_candidates(inputs, spin, &eligible, &mut candidates);
        for class in &self.requirement_sets[requirement as usize].classes {
            let ready = &self.classes[*class as usize].ready;
            // One descent per peer taken: cheaper than `iter()`, which finds both ends first.
            let mut next = ready.first();
            let mut taken = 0;
            while let Some(entry) = next {
                if !exclude.contains(&entry.1) {
                    candidates.push(entry.1);
                    taken += 1;
                    if taken == TOP_PER_CLASS {
                        break;
                    }
                }
                next = ready
                    .range((Bound::Excluded(entry), Bound::Unbounded))
                    .next();
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        self.best_of(key, inputs, &candidates)
    }

    fn holder_candidates(
        &self,
        inputs: &[Input],
        spin: u64,
        eligible: &impl Fn(u32) -> bool,
        candidates: &mut Vec<PeerId>,
    ) {
        let mut budget = HOLDERS_SCANNED;
        // Inputs come largest first (the scheduler sorts them), so the budget goes to the
        // holders of the inputs that are most expensive to fetch.
        for input in inputs {
            let Some(holders) = self.holders.get(&input.id) else {
                continue;
            };
            // Start each scan at a different point, so a popular input does not send every task
            // to the same few holders.
            let start = (spin % holders.len() as u64) as usize;
            let (front, back) = holders.split_at(start);
            for slot in back.iter().chain(front).take(budget) {
                budget -= 1;
                if eligible(*slot) {
                    candidates.push(self.slot_peers[*slot as usize]);
                }
            }
            if budget == 0 {
                return;
            }
        }
    }

    /// Uniformly random among all qualifying peers with a free slot (the baseline).
    pub fn choose_randomly(
        &self,
        requirement: ReqId,
        key: TaskKey,
        inputs: &[Input],
        exclude: &[PeerId],
        random: u64,
    ) -> Option<Choice> {
        let all: Vec<PeerId> = self.requirement_sets[requirement as usize]
            .classes
            .iter()
            .flat_map(|c| self.classes[*c as usize].ready.iter().map(|(_, p)| *p))
            .filter(|peer| !exclude.contains(peer))
            .collect();
        if all.is_empty() {
            return None;
        }
        let peer = all[(random % all.len() as u64) as usize];
        let mut choice = self.best_of(key, inputs, &[peer])?;
        choice.explanation.candidates = all.len() as u32;
        Some(choice)
    }

    fn best_of(&self, key: TaskKey, inputs: &[Input], candidates: &[PeerId]) -> Option<Choice> {
        let total_bytes: u64 = inputs.iter().map(|i| i.size_bytes).sum();
        let fastest = candidates
            .iter()
            .filter_map(|p| self.expected_ms(key, self.peers[p].class))
            .min();
        let mut best: Option<(i64, Explanation)> = None;
        for peer in candidates {
            let view = &self.peers[peer];
            let held_bytes: u64 = inputs
                .iter()
                .filter(|i| view.holds(i.id))
                .map(|i| i.size_bytes)
                .sum();
            let held_permille = (held_bytes * 1000)
                .checked_div(total_bytes)
                .map(|permille| permille as u32);
            let expected_ms = self.expected_ms(key, view.class);
            // A class with no past runs scores as well as the fastest known one, so new classes
            // get tried rather than starved.
            let speed_permille = match (expected_ms, fastest) {
                (Some(expected), Some(fastest)) => fastest * 1000 / expected.max(1),
                _ => 1000,
            };
            // Inputs weigh most (a transfer is the largest avoidable cost), then free slots and
            // load, then expected duration (DESIGN.md, "Scheduling").
            let score = 4 * i64::from(held_permille.unwrap_or(1000))
                + i64::from(view.availability())
                + speed_permille as i64;
            if best.as_ref().is_none_or(|(top, _)| score > *top) {
                best = Some((
                    score,
                    Explanation {
                        peer: *peer,
                        held_permille,
                        free_slots: view.free(),
                        total_slots: view.total,
                        load_permille: view.load_permille,
                        expected_ms,
                        candidates: candidates.len() as u32,
                        races: None,
                    },
                ));
            }
        }
        best.map(|(_, explanation)| Choice {
            peer: explanation.peer,
            explanation,
        })
    }

    /// Checks the indexes against the peers; a failure is a bug in this module.
    pub fn check(&self) -> Result<(), String> {
        let mut free_total = 0;
        let mut in_class = vec![0u32; self.classes.len()];
        for view in self.peers.values() {
            in_class[view.class as usize] += 1;
        }
        for (index, class) in self.classes.iter().enumerate() {
            let mut free = 0;
            for (Reverse(key), peer) in &class.ready {
                let view = self
                    .peers
                    .get(peer)
                    .ok_or_else(|| format!("{peer} indexed but gone"))?;
                if view.indexed != Some(*key) || view.class as usize != index {
                    return Err(format!("{peer} indexed under a stale key"));
                }
                free += u64::from(view.free());
            }
            if free != class.free_slots {
                return Err(format!(
                    "class {index}: free slots {free} != {}",
                    class.free_slots
                ));
            }
            free_total += free;
            if in_class[index] != class.peers
                || (class.peers == 0)
                    != self
                        .unused_classes
                        .contains(&(class.emptied, index as ClassId))
            {
                return Err(format!("class {index}: peers or unused set out of step"));
            }
        }
        if free_total != self.free_total {
            return Err(format!("free total {free_total} != {}", self.free_total));
        }
        for (peer, view) in &self.peers {
            if view.available() != view.indexed.is_some() {
                return Err(format!(
                    "{peer}: available {} but indexed {:?}",
                    view.available(),
                    view.indexed
                ));
            }
            if view.committed as usize != view.attempts.len() {
                return Err(format!(
                    "{peer}: committed {} but {} runs",
                    view.committed,
                    view.attempts.len()
                ));
            }
            let placeable = self.placeable[view.slot as usize];
            if self.slot_peers[view.slot as usize] != *peer
                || (placeable != NOT_PLACEABLE) != view.indexed.is_some()
            {
                return Err(format!("{peer}: dense tables out of step"));
            }
            if self.classes[view.class as usize].members.contains(peer) != (view.total > 0) {
                return Err(format!("{peer} missing from its class"));
            }
        }
        Ok(())
    }
}
