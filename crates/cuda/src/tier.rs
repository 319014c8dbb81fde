//! The bookkeeping of the GPU-memory tier for routed experts: which experts are resident, their
//! bytes against the budget, and the eviction order. Pure data, no device: the tier in
//! `experts.rs` keeps it under a mutex and holds the device buffers as its values.
//!
//! Keys are `(layer, expert)`. Uses are counted for every key seen, resident or not, so that an
//! expert that comes back after an eviction comes back with its history. Every
//! `max(MIN_AGE_PERIOD, 8 x keys seen)` uses all counts are halved (ageing), so that yesterday's
//! favourites make room. The eviction order is a sorted set of `(uses, last use, key)` over the
//! residents: the least used expert goes first, ties to the least recently used one.

use std::collections::{BTreeSet, HashMap};

pub(crate) type Key = (usize, usize);

/// Uses between two ageings, at least.
const MIN_AGE_PERIOD: u64 = 1024;

struct Slot<V> {
    uses: u32,
    last: u64,
    value: Option<(V, u64)>,
}

pub(crate) struct Policy<V> {
    budget: u64,
    bytes: u64,
    resident: usize,
    evictions: u64,
    clock: u64,
    since_age: u64,
    min_age_period: u64,
    keys: HashMap<Key, Slot<V>>,
    order: BTreeSet<(u32, u64, Key)>,
}

impl<V: Clone> Policy<V> {
    pub fn new(budget: u64) -> Self {
        Self::with_age_period(budget, MIN_AGE_PERIOD)
    }

    pub fn with_age_period(budget: u64, min_age_period: u64) -> Self {
        Policy {
            budget,
            bytes: 0,
            resident: 0,
            evictions: 0,
            clock: 0,
            since_age: 0,
            min_age_period: min_age_period.max(1),
            keys: HashMap::new(),
            order: BTreeSet::new(),
        }
    }

    fn rank(key: Key, s: &Slot<V>) -> (u32, u64, Key) {
        (s.uses, s.last, key)
    }

    /// Counts a use of `key`; its value if resident.
    pub fn touch(&mut self, key: Key) -> Option<V> {
        self.clock += 1;
        let clock = self.clock;
        let s = self.keys.entry(key).or_insert(Slot { uses: 0, last: 0, value: None });
        let resident = s.value.is_some();
        if resident {
            self.order.remove(&Self::rank(key, s));
        }
        s.uses = s.uses.saturating_add(1);
        s.last = clock;
        if resident {
            self.order.insert(Self::rank(key, s));
        }
        let value = s.value.as_ref().map(|(v, _)| v.clone());
        self.since_age += 1;
        if self.since_age >= self.min_age_period.max(8 * self.keys.len() as u64) {
            self.age();
        }
        value
    }

    /// Halves every use count.
    fn age(&mut self) {
        self.since_age = 0;
        for s in self.keys.values_mut() {
            s.uses /= 2;
        }
        let residents: Vec<Key> = self.order.iter().map(|&(_, _, k)| k).collect();
        self.order = residents.into_iter().map(|k| Self::rank(k, &self.keys[&k])).collect();
    }

    /// The value of `key` if resident, counting no use.
    pub fn get(&self, key: Key) -> Option<V> {
        self.keys.get(&key).and_then(|s| s.value.as_ref()).map(|(v, _)| v.clone())
    }

    pub fn contains(&self, key: Key) -> bool {
        self.keys.get(&key).is_some_and(|s| s.value.is_some())
    }

    /// Evicts in order until `bytes` more fit the budget, the evicted values into `evicted`.
    /// False, evicting nothing, if `bytes` could never fit.
    pub fn make_room(&mut self, bytes: u64, evicted: &mut Vec<V>) -> bool {
        if bytes > self.budget {
            return false;
        }
        while self.bytes + bytes > self.budget {
            let (_, _, victim) = self.order.pop_first().expect("resident bytes imply a resident entry");
            let (v, b) = self.keys.get_mut(&victim).and_then(|s| s.value.take()).expect("ordered keys are resident");
            evicted.push(v);
            self.bytes -= b;
            self.resident -= 1;
            self.evictions += 1;
        }
        true
    }

    /// Makes `value` (`bytes` long) resident as the most recent use of `key`, evicting as
    /// needed. False, changing nothing, if it could never fit or `key` is already resident.
    pub fn insert(&mut self, key: Key, value: V, bytes: u64, evicted: &mut Vec<V>) -> bool {
        if self.contains(key) || !self.make_room(bytes, evicted) {
            return false;
        }
        self.clock += 1;
        let clock = self.clock;
        let s = self.keys.entry(key).or_insert(Slot { uses: 0, last: 0, value: None });
        s.last = clock;
        s.value = Some((value, bytes));
        self.order.insert(Self::rank(key, s));
        self.bytes += bytes;
        self.resident += 1;
        true
    }

    /// A new budget; what no longer fits is evicted into `evicted`.
    pub fn set_budget(&mut self, budget: u64, evicted: &mut Vec<V>) {
        self.budget = budget;
        let _ = self.make_room(0, evicted);
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn resident(&self) -> usize {
        self.resident
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn reset_counters(&mut self) {
        self.evictions = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `pattern` (expert ids of layer 0) through a policy of `budget` bytes, 10 per
    /// expert; returns the policy and the number of hits.
    fn run(budget: u64, pattern: &[usize]) -> (Policy<usize>, usize) {
        let mut p = Policy::new(budget);
        let mut hits = 0;
        for &k in pattern {
            if p.touch((0, k)).is_some() {
                hits += 1;
            } else {
                p.insert((0, k), k, 10, &mut Vec::new());
            }
            assert!(p.bytes() <= budget);
        }
        (p, hits)
    }

    fn residents(p: &Policy<usize>) -> Vec<usize> {
        (0..8).filter(|&k| p.contains((0, k))).collect()
    }

    #[test]
    fn the_least_used_goes_ties_to_the_least_recent() {
        let (p, hits) = run(20, &[0, 0, 0, 1, 2]);
        assert_eq!(residents(&p), [0, 2]);
        assert_eq!((hits, p.evictions()), (2, 1));
        let (p, _) = run(20, &[0, 1, 2]);
        assert_eq!(residents(&p), [1, 2], "equal counts: the least recent goes");
    }

    #[test]
    fn counts_survive_eviction_and_age() {
        let mut p: Policy<usize> = Policy::with_age_period(10, 6);
        for _ in 0..4 {
            if p.touch((0, 0)).is_none() {
                p.insert((0, 0), 0, 10, &mut Vec::new());
            }
        }
        p.touch((0, 1));
        let mut ev = Vec::new();
        assert!(p.insert((0, 1), 1, 10, &mut ev));
        assert_eq!(ev, [0]);
        assert_eq!(p.keys[&(0, 0)].uses, 4, "an evicted expert keeps its count");
        // Three keys seen: every max(6, 8 x 3) = 24 uses all counts are halved.
        for _ in 0..18 {
            p.touch((0, 2));
        }
        assert_eq!(p.keys[&(0, 2)].uses, 18);
        p.touch((0, 2)); // the 24th use
        assert_eq!((p.keys[&(0, 0)].uses, p.keys[&(0, 1)].uses, p.keys[&(0, 2)].uses), (2, 0, 9));
    }

    #[test]
    fn zero_or_small_budgets_keep_nothing_that_does_not_fit() {
        let (p, hits) = run(0, &[0, 0, 1, 1]);
        assert_eq!((hits, p.resident(), p.bytes()), (0, 0, 0));
        let (p, hits) = run(9, &[0, 0]);
        assert_eq!((hits, p.resident()), (0, 0));
        let mut p: Policy<usize> = Policy::new(15);
        assert!(p.insert((0, 0), 0, 10, &mut Vec::new()));
        assert!(!p.insert((0, 1), 1, 16, &mut Vec::new()));
        assert!(p.contains((0, 0)), "an expert that can't fit evicts nothing");
    }

    #[test]
    fn layers_are_separate_keys_and_budget_shrinks() {
        let mut p: Policy<usize> = Policy::new(100);
        for l in 0..3 {
            p.touch((l, 7));
            assert!(p.insert((l, 7), l, 10, &mut Vec::new()));
        }
        assert_eq!(p.resident(), 3);
        assert!(p.touch((1, 7)) == Some(1));
        let mut ev = Vec::new();
        p.set_budget(10, &mut ev);
        assert_eq!(ev, [0, 2], "the least used go first, then the least recent");
        assert!(p.contains((1, 7)));
        assert_eq!((p.bytes(), p.budget()), (10, 10));
    }
}
