//! The RAM tier's bookkeeping: which experts are resident, their bytes against the budget, and the
//! eviction order. Not thread-safe by itself; the store keeps it under a mutex.
//!
//! Keys are dense indices (`layer * experts + expert`), so per-key state is plain vectors. Uses are
//! counted for every key, resident or not, so that an expert that comes back after an eviction
//! comes back with its history ([`Eviction::Lfru`]). Every `age_period` uses all counts are
//! halved. The eviction order is a sorted set of `(score, last use, key)` over the residents:
//! score = use count under LFRU, 0 under LRU (so LRU orders by last use alone, and LFRU breaks ties
//! by last use).

use crate::options::Eviction;
use std::collections::BTreeSet;

pub(crate) struct Cache<V> {
    policy: Eviction,
    budget: u64,
    bytes: u64,
    peak: u64,
    resident: usize,
    evictions: u64,
    clock: u64,
    age_period: u64,
    since_age: u64,
    uses: Vec<u32>,
    last: Vec<u64>,
    slots: Vec<Option<(V, u64)>>,
    order: BTreeSet<(u32, u64, usize)>,
}

impl<V: Clone> Cache<V> {
    /// A cache for keys `0..keys` holding at most `budget` bytes.
    pub fn new(keys: usize, budget: u64, policy: Eviction, age_period: u64) -> Self {
        Cache {
            policy,
            budget,
            bytes: 0,
            peak: 0,
            resident: 0,
            evictions: 0,
            clock: 0,
            age_period: age_period.max(1),
            since_age: 0,
            uses: vec![0; keys],
            last: vec![0; keys],
            slots: (0..keys).map(|_| None).collect(),
            order: BTreeSet::new(),
        }
    }

    fn rank(&self, key: usize) -> (u32, u64, usize) {
        let score = match self.policy {
            Eviction::Lfru => self.uses[key],
            Eviction::Lru => 0,
        };
        (score, self.last[key], key)
    }

    /// Counts a use of `key`; its value if resident.
    pub fn touch(&mut self, key: usize) -> Option<V> {
        self.clock += 1;
        let resident = self.slots[key].is_some();
        if resident {
            self.order.remove(&self.rank(key));
        }
        self.uses[key] = self.uses[key].saturating_add(1);
        self.last[key] = self.clock;
        if resident {
            self.order.insert(self.rank(key));
        }
        self.since_age += 1;
        if self.since_age >= self.age_period {
            self.age();
        }
        self.get(key)
    }

    /// Halves every use count.
    fn age(&mut self) {
        self.since_age = 0;
        for u in &mut self.uses {
            *u /= 2;
        }
        if self.policy == Eviction::Lfru {
            let keys: Vec<usize> = self.order.iter().map(|&(_, _, k)| k).collect();
            self.order = keys.into_iter().map(|k| self.rank(k)).collect();
        }
    }

    /// The value of `key` if resident, no use counted.
    pub fn get(&self, key: usize) -> Option<V> {
        self.slots[key].as_ref().map(|(v, _)| v.clone())
    }

    pub fn contains(&self, key: usize) -> bool {
        self.slots[key].is_some()
    }

    /// Makes `value` (`bytes` long) resident as the most recent use of `key`, evicting in order
    /// until it fits; the evicted values go to `evicted` (for the caller to drop outside its
    /// lock). Nothing is evicted, and `false` returned, if it could never fit the budget.
    pub fn insert(&mut self, key: usize, value: V, bytes: u64, evicted: &mut Vec<V>) -> bool {
        if bytes > self.budget {
            return false;
        }
        if self.slots[key].is_some() {
            return true;
        }
        while self.bytes + bytes > self.budget {
            let (_, _, victim) = self.order.pop_first().expect("resident bytes imply a resident entry");
            let (v, b) = self.slots[victim].take().expect("ordered keys are resident");
            evicted.push(v);
            self.bytes -= b;
            self.resident -= 1;
            self.evictions += 1;
        }
        self.clock += 1;
        self.last[key] = self.clock;
        self.slots[key] = Some((value, bytes));
        self.order.insert(self.rank(key));
        self.bytes += bytes;
        self.resident += 1;
        self.peak = self.peak.max(self.bytes);
        true
    }

    /// Drops `key` from the residents without counting an eviction; its value if it was
    /// resident. Its use history stays.
    pub fn remove(&mut self, key: usize) -> Option<V> {
        let (value, bytes) = self.slots[key].take()?;
        self.order.remove(&self.rank(key));
        self.bytes -= bytes;
        self.resident -= 1;
        Some(value)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn peak(&self) -> u64 {
        self.peak
    }

    pub fn resident(&self) -> usize {
        self.resident
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Zeroes the eviction count and restarts the peak from what is resident now.
    pub fn reset_counters(&mut self) {
        self.evictions = 0;
        self.peak = self.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: Eviction, budget: u64, pattern: &[usize]) -> Cache<usize> {
        let mut c = Cache::new(8, budget, policy, 1 << 20);
        for &k in pattern {
            if c.touch(k).is_none() {
                c.insert(k, k, 10, &mut Vec::new());
            }
            assert!(c.bytes() <= budget);
        }
        c
    }

    fn residents(c: &Cache<usize>) -> Vec<usize> {
        (0..8).filter(|&k| c.contains(k)).collect()
    }

    #[test]
    fn lru_drops_the_least_recent_lfru_the_least_used() {
        let pattern = [0, 0, 0, 1, 2];
        assert_eq!(residents(&run(Eviction::Lru, 20, &pattern)), [1, 2]);
        assert_eq!(residents(&run(Eviction::Lfru, 20, &pattern)), [0, 2]);
        // Equal counts: the least recent goes, as under LRU.
        assert_eq!(residents(&run(Eviction::Lfru, 20, &[0, 1, 2])), [1, 2]);
    }

    #[test]
    fn uses_are_remembered_across_evictions_and_age() {
        let mut c: Cache<usize> = Cache::new(4, 10, Eviction::Lfru, 6);
        for k in [0, 0, 0, 0] {
            if c.touch(k).is_none() {
                c.insert(k, k, 10, &mut Vec::new());
            }
        }
        assert_eq!(c.uses[0], 4);
        c.touch(1);
        c.insert(1, 1, 10, &mut Vec::new()); // evicts 0, a single slot
        assert!(!c.contains(0) && c.contains(1));
        assert_eq!(c.uses[0], 4, "an evicted expert keeps its count");
        c.touch(2); // the sixth use: every count is halved
        assert_eq!((c.uses[0], c.uses[1], c.uses[2]), (2, 0, 0));
        assert_eq!(c.evictions(), 1);
    }

    #[test]
    fn remove_drops_a_resident_without_an_eviction() {
        let mut c = run(Eviction::Lfru, 30, &[0, 0, 1, 2]);
        assert_eq!(c.remove(0), Some(0));
        assert_eq!(c.remove(0), None);
        assert_eq!(c.remove(5), None);
        assert_eq!((residents(&c), c.bytes(), c.evictions()), (vec![1, 2], 20, 0));
        assert_eq!(c.uses[0], 2, "its uses stay");
        // The freed room takes the next one without evicting.
        c.touch(3);
        assert!(c.insert(3, 3, 10, &mut Vec::new()));
        assert_eq!((residents(&c), c.evictions()), (vec![1, 2, 3], 0));
    }

    #[test]
    fn too_big_or_zero_budget_keeps_nothing() {
        let mut c: Cache<usize> = Cache::new(2, 0, Eviction::Lru, 100);
        assert!(!c.insert(0, 0, 1, &mut Vec::new()));
        assert_eq!((c.bytes(), c.resident()), (0, 0));
        let mut c: Cache<usize> = Cache::new(2, 15, Eviction::Lru, 100);
        assert!(c.insert(0, 0, 10, &mut Vec::new()));
        assert!(!c.insert(1, 1, 16, &mut Vec::new()));
        assert!(c.contains(0), "an expert that can't fit evicts nothing");
    }
}
