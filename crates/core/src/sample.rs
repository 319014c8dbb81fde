//! Token sampling: penalties, temperature, top-k / top-p / min-p filtering and a seeded draw.
//!
//! The order follows transformers' logits processors (and vLLM): penalties on the raw logits,
//! then temperature, then top-k, top-p (on the top-k survivors, renormalised) and min-p, then a
//! draw from the renormalised survivors. `temperature <= 0` (or `top_k == 1`) is greedy argmax of
//! the penalised logits. Ties always go to the lowest token id, so every choice is reproducible.
//!
//! Penalties (llama.cpp `llama_sampler_penalties` / OpenAI):
//! * repetition (`!= 1`): for each token present in `history`, a positive logit is divided by the
//!   penalty and a negative one multiplied by it;
//! * presence: `presence_penalty` is subtracted once from every token present in `history`;
//! * frequency: `count * frequency_penalty` is subtracted, `count` being the occurrences in
//!   `history`.
//!
//! The caller decides the window: pass the generated tokens (OpenAI) or the last N tokens of the
//! context (llama.cpp's `penalty_last_n`).

use std::collections::BinaryHeap;

/// Sampling settings. The default is greedy decoding with every filter and penalty off.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `<= 0` means greedy argmax.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability sums to at
    /// least `top_p`; `>= 1` disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the top probability; `<= 0` disables.
    pub min_p: f32,
    /// Multiplicative penalty for tokens already seen; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already seen; 0 disables.
    pub presence_penalty: f32,
    /// Subtracted `count` times from the logit of every token already seen; 0 disables.
    pub frequency_penalty: f32,
    /// Seed of the sampler's PRNG.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (the default).
    pub fn greedy() -> Self {
        Self::default()
    }

    /// True when [`Sampler::sample`] reduces to an argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature <= 0.0 || self.top_k == 1
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// A small seeded PRNG: xoshiro256** seeded through splitmix64. Not cryptographic; stable across
/// platforms and versions, so a seed always gives the same token sequence.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// An index drawn with probability `weights[i] / total` (`total` their sum): the first whose
    /// running sum passes a uniform draw, else the last with a positive weight (rounding); `None`
    /// where no weight is positive.
    fn draw(&mut self, weights: &[f64], total: f64) -> Option<usize> {
        let mut u = self.next_f64() * total;
        let mut last = None;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                last = Some(i);
                if u < w {
                    return Some(i);
                }
                u -= w;
            }
        }
        last
    }
}

/// Index of the largest logit; ties go to the lowest id, NaNs are ignored. Returns 0 for an empty
/// slice or one with no comparable value.
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value (`f32::max` passes over NaNs), then its first position: two passes that
    // vectorise, where one with a branch per value took 1.4 ms for a vocabulary of 248320.
    let max = lane_max(logits);
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// The largest value, NaNs ignored (`-inf` for none), over eight independent lanes so that the
/// compiler vectorises it.
fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = values.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// A candidate in sampling order: `Less` is more likely (a higher logit, then a lower id), so
/// that a `BinaryHeap` of them has the least likely on top.
#[derive(Clone, Copy, Debug)]
struct Ranked(u32, f32);

impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.1.total_cmp(&self.1).then(self.0.cmp(&o.0))
    }
}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Ranked {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o).is_eq()
    }
}

impl Eq for Ranked {}

/// The `k` most likely of the finite logits, in no order: one pass keeping the best `k` in a heap,
/// where most logits are turned away by one comparison with the worst kept (O(n) in practice,
/// against a selection over all of them).
fn select_top_k(logits: &[f32], k: usize, heap: &mut BinaryHeap<Ranked>, out: &mut Vec<(u32, f32)>) {
    heap.clear();
    // The logit of the worst kept once `k` are kept: later ids lose ties, so only a strictly
    // higher logit displaces it.
    let mut worst = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l <= worst {
            continue;
        }
        if heap.len() < k {
            heap.push(Ranked(i as u32, l));
            if heap.len() < k {
                continue;
            }
        } else if let Some(mut top) = heap.peek_mut() {
            *top = Ranked(i as u32, l);
        }
        worst = heap.peek().map_or(f32::NEG_INFINITY, |r| r.1);
    }
    out.extend(heap.drain().map(|Ranked(i, l)| (i, l)));
}

/// The mass of all the tokens (summed in id order) and a logit below which none matters to a
/// top-p cut at `top_p` of it: the tokens above it hold at least that much (with a margin for the
/// order of summation), so the ranked prefix whose running mass reaches it lies above (`-inf`
/// where no such logit was found). The floor comes from a histogram of the masses in bins of 1/8
/// logit below the maximum, filled in the same pass.
fn mass_and_top_p_floor(logits: &[f32], max: f32, top_p: f64) -> (f64, f32) {
    const PER_UNIT: f32 = 8.0;
    const BINS: usize = 512;
    let mut bins = [0f64; BINS];
    let mut total = 0.0;
    for &l in logits {
        let w = ((l - max) as f64).exp();
        total += w;
        let b = ((max - l) * PER_UNIT) as usize;
        if b < BINS {
            bins[b] += w;
        }
    }
    let need = top_p * total * (1.0 + 1e-9);
    let mut mass = 0.0;
    for (b, m) in bins.iter().enumerate() {
        mass += m;
        if mass >= need {
            // One bin lower than needed: the rounding of the bin index is not the comparison's.
            return (total, max - (b + 2) as f32 / PER_UNIT);
        }
    }
    (total, f32::NEG_INFINITY)
}

/// Applies the repetition / presence / frequency penalties of `params` in place. Ids in `history`
/// outside `logits` are ignored. `counts` is scratch: a count per vocabulary id, all zero between
/// calls. Counting in it costs O(history), where sorting the history took a long conversation a
/// millisecond a token.
fn apply_penalties_with(logits: &mut [f32], history: &[u32], params: &SamplingParams, counts: &mut Vec<u32>) {
    if !params.has_penalties() || history.is_empty() {
        return;
    }
    counts.resize(logits.len(), 0);
    for &t in history {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1;
        }
    }
    // Each seen token once, at its first occurrence: its count taken and reset to zero.
    for &t in history {
        let Some(c) = counts.get_mut(t as usize) else { continue };
        let n = std::mem::take(c);
        if n == 0 {
            continue;
        }
        let l = &mut logits[t as usize];
        let rp = params.repetition_penalty;
        if rp != 1.0 {
            *l = if *l > 0.0 { *l / rp } else { *l * rp };
        }
        *l -= n as f32 * params.frequency_penalty + params.presence_penalty;
    }
}

/// Applies the repetition / presence / frequency penalties of `params` to `logits` in place.
pub fn apply_penalties(logits: &mut [f32], history: &[u32], params: &SamplingParams) {
    apply_penalties_with(logits, history, params, &mut Vec::new());
}

/// Stateful sampler: holds the parameters, the PRNG and scratch buffers.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    counts: Vec<u32>,
    cand: Vec<(u32, f32)>,
    weights: Vec<f64>,
    heap: BinaryHeap<Ranked>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng, counts: Vec::new(), cand: Vec::new(), weights: Vec::new(), heap: BinaryHeap::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// True when [`sample`](Self::sample) is the argmax of the logits as they come (greedy, no
    /// penalties), which a backend can find without handing the logits over.
    pub fn is_argmax(&self) -> bool {
        self.params.is_greedy() && !self.params.has_penalties()
    }

    /// Restarts the PRNG from `seed` (also stored in the parameters).
    pub fn reseed(&mut self, seed: u64) {
        self.params.seed = seed;
        self.rng = Rng::new(seed);
    }

    /// Picks the next token. `logits` (one per vocabulary id) is modified in place: penalties and
    /// temperature are applied to it. `history` holds the tokens the penalties look at.
    ///
    /// A vocabulary of 248320 (Qwen3.5) is walked a few times at most: nothing sorts more than
    /// the tokens a filter can keep (a full sort for top-p alone took 30 ms a token, ten times a
    /// decode step on the GPU).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        apply_penalties_with(logits, history, p, &mut self.counts);
        if p.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        for l in logits.iter_mut() {
            *l = if l.is_nan() { f32::NEG_INFINITY } else { *l * inv_t };
        }
        let max = lane_max(logits);
        if !max.is_finite() {
            // Everything masked (or NaN): nothing to draw from; +inf logits: pick among them like
            // greedy would.
            return argmax(logits);
        }
        let weight = |l: f32| ((l - max) as f64).exp();
        let weights = &mut self.weights;
        weights.clear();

        let top_k = p.top_k > 0 && p.top_k < logits.len();
        if !top_k && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Plain softmax draw in id order, no ranking needed.
            weights.extend(logits.iter().map(|&l| weight(l)));
            let total: f64 = weights.iter().sum();
            return self.rng.draw(weights, total).map_or(0, |i| i as u32);
        }

        // The candidates: the top-k, or every token above what the top-p and min-p cuts can keep.
        // min-p keeps tokens with exp(l - max) >= min_p: a suffix of the ranking goes, so dropping
        // it before the ranking does not change the top-p prefix sums of the others.
        let cand = &mut self.cand;
        cand.clear();
        let min_p_floor = if p.min_p > 0.0 { max + p.min_p.min(1.0).ln() } else { f32::NEG_INFINITY };
        let top_p = p.top_p.max(0.0) as f64;
        // top-p is relative to the mass of the top-k survivors (summed in id order).
        let kept_mass = if top_k {
            select_top_k(logits, p.top_k, &mut self.heap, cand);
            cand.sort_unstable_by_key(|&(i, _)| i);
            let mass = cand.iter().map(|&(_, l)| weight(l)).sum();
            cand.retain(|&(_, l)| l >= min_p_floor);
            mass
        } else {
            let (mass, top_p_floor) =
                if p.top_p < 1.0 { mass_and_top_p_floor(logits, max, top_p) } else { (0.0, f32::NEG_INFINITY) };
            let floor = min_p_floor.max(top_p_floor);
            let kept = logits.iter().enumerate().filter(|&(_, &l)| l > f32::NEG_INFINITY && l >= floor);
            cand.extend(kept.map(|(i, &l)| (i as u32, l)));
            mass
        };
        let target = top_p * kept_mass;
        cand.sort_unstable_by_key(|&(i, l)| Ranked(i, l));

        weights.extend(cand.iter().map(|&(_, l)| weight(l)));
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = weights.len();
            for (i, &w) in weights.iter().enumerate() {
                cum += w;
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            weights.truncate(keep.max(1));
        }
        let total: f64 = weights.iter().sum();
        let i = self.rng.draw(weights, total).unwrap_or(weights.len() - 1);
        cand[i].0
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;
    use super::*;
    use proptest::prelude::*;

    /// Distinct logits: a random key per id plus a tiny id-dependent offset.
    fn distinct_logits(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(0u16..200, 2..max_len)
            .prop_map(|keys| keys.iter().enumerate().map(|(i, &k)| k as f32 * 0.05 - 5.0 + i as f32 * 1e-4).collect())
    }

    /// Token ids by descending logit (ascending id on ties) and their softmax probabilities.
    fn ranked(logits: &[f32], temperature: f32) -> (Vec<u32>, Vec<f64>) {
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
        let max = logits[ids[0] as usize] as f64 / temperature as f64;
        let w: Vec<f64> = ids.iter().map(|&i| (logits[i as usize] as f64 / temperature as f64 - max).exp()).collect();
        let s: f64 = w.iter().sum();
        (ids, w.into_iter().map(|x| x / s).collect())
    }

    /// The sampler as first written (a plain loop for the argmax, every finite token ranked by a
    /// full sort), with the top-k mass summed in id order: what `Sampler::sample` must equal.
    fn reference_sample(p: &SamplingParams, rng: &mut Rng, logits: &mut [f32], history: &[u32]) -> u32 {
        let argmax = |logits: &[f32]| {
            let (mut best, mut best_v, mut found) = (0usize, f32::NEG_INFINITY, false);
            for (i, &v) in logits.iter().enumerate() {
                if !v.is_nan() && (!found || v > best_v) {
                    (best, best_v, found) = (i, v, true);
                }
            }
            best as u32
        };
        apply_penalties(logits, history, p);
        if p.is_greedy() {
            return argmax(logits);
        }
        let mut max = f32::NEG_INFINITY;
        for l in logits.iter_mut() {
            *l = if l.is_nan() { f32::NEG_INFINITY } else { *l * (1.0 / p.temperature) };
            max = max.max(*l);
        }
        if !max.is_finite() {
            return argmax(logits);
        }
        let weight = |l: f32| ((l - max) as f64).exp();
        if !((p.top_k > 0 && p.top_k < logits.len()) || p.top_p < 1.0 || p.min_p > 0.0) {
            let total: f64 = logits.iter().map(|&l| weight(l)).sum();
            let mut u = rng.next_f64() * total;
            let mut last = 0;
            for (i, &l) in logits.iter().enumerate() {
                let w = weight(l);
                if w > 0.0 {
                    last = i as u32;
                    if u < w {
                        return i as u32;
                    }
                    u -= w;
                }
            }
            return last;
        }
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().filter(|&(_, &l)| l > f32::NEG_INFINITY).map(|(i, &l)| (i as u32, l)).collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.sort_by(order);
            cand.truncate(p.top_k);
            cand.sort_by_key(|&(i, _)| i);
        }
        let kept_mass: f64 = cand.iter().map(|&(_, l)| weight(l)).sum();
        if p.min_p > 0.0 {
            let min_logit = max + p.min_p.min(1.0).ln();
            cand.retain(|&(_, l)| l >= min_logit);
        }
        cand.sort_by(order);
        let mut weights: Vec<f64> = cand.iter().map(|&(_, l)| weight(l)).collect();
        if p.top_p < 1.0 {
            let target = p.top_p.max(0.0) as f64 * kept_mass;
            let mut cum = 0.0;
            let keep = weights.iter().position(|&w| {
                cum += w;
                cum >= target
            });
            weights.truncate(keep.map_or(weights.len(), |i| i + 1));
        }
        let total: f64 = weights.iter().sum();
        let mut u = rng.next_f64() * total;
        for (i, &w) in weights.iter().enumerate() {
            if u < w {
                return cand[i].0;
            }
            u -= w;
        }
        cand[weights.len() - 1].0
    }

    /// Logits of a large vocabulary: a few levels (ties), a spread, masked and NaN entries.
    fn vocabulary_logits() -> impl Strategy<Value = Vec<f32>> {
        let value = prop_oneof![
            6 => -8.0f32..8.0,
            2 => prop::sample::select(vec![-1.0f32, 0.0, 2.5, 4.0]),
            1 => Just(f32::NEG_INFINITY),
            1 => Just(f32::NAN),
        ];
        prop::collection::vec(value, 1..4000)
    }

    #[test]
    fn argmax_ties_go_to_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    /// Where `is_argmax` holds, a backend may pick the token itself; with a penalty it must not:
    /// the penalised draw differs from the plain argmax.
    #[test]
    fn argmax_only_without_penalties() {
        let greedy = Sampler::new(SamplingParams::greedy());
        assert!(greedy.is_argmax());
        let hot = SamplingParams { temperature: 0.8, ..SamplingParams::default() };
        assert!(!Sampler::new(hot).is_argmax());
        let penalised = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() };
        let mut s = Sampler::new(penalised);
        assert!(!s.is_argmax());
        let mut logits = [1.0, 3.0, 2.0];
        assert_eq!(argmax(&logits), 1);
        assert_eq!(s.sample(&mut logits, &[1]), 2, "token 1's logit halved by the penalty");
    }

    #[test]
    fn default_is_greedy() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        let mut s = Sampler::new(p);
        assert_eq!(s.sample(&mut [0.1, 0.5, 0.5, -2.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_sequence() {
        let p = SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.9, seed: 1234, ..Default::default() };
        let logits: Vec<f32> = (0..200).map(|i| ((i * 37 % 101) as f32) * 0.03).collect();
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..64).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        let a = run(&p);
        assert_eq!(a, run(&p));
        assert!(a.iter().any(|&t| t != a[0]), "sampling at T=1 should vary");
        let other = run(&SamplingParams { seed: 99, ..p.clone() });
        assert_ne!(a, other);
        // reseed restarts the stream.
        let mut s = Sampler::new(p.clone());
        let first: Vec<u32> = (0..8).map(|_| s.sample(&mut logits.clone(), &[])).collect();
        s.reseed(1234);
        let again: Vec<u32> = (0..8).map(|_| s.sample(&mut logits.clone(), &[])).collect();
        assert_eq!(first, again);
    }

    #[test]
    fn rng_is_stable() {
        // Pinned values: changing the generator changes every seeded run.
        let mut r = Rng::new(0);
        let v: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        let mut r2 = Rng::new(0);
        assert_eq!(v, (0..3).map(|_| r2.next_u64()).collect::<Vec<_>>());
        let x = Rng::new(7).next_f64();
        assert!((0.0..1.0).contains(&x));
    }

    #[test]
    fn draws_follow_softmax() {
        // p(1) = 2/3 at T = 1.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: 5, ..Default::default() });
        let n = 30_000;
        let ones = (0..n).filter(|_| s.sample(&mut [0.0, 2f32.ln()], &[]) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 2.0 / 3.0).abs() < 0.015, "frequency {f}");
        // Temperature 2 flattens: logits 0, 2 ln 2 → p(1) = 2/3 again.
        let mut s = Sampler::new(SamplingParams { temperature: 2.0, seed: 6, ..Default::default() });
        let ones = (0..n).filter(|_| s.sample(&mut [0.0, 2.0 * 2f32.ln()], &[]) == 1).count();
        let f = ones as f64 / n as f64;
        assert!((f - 2.0 / 3.0).abs() < 0.015, "frequency {f}");
    }

    #[test]
    fn masked_logits_never_drawn() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: 3, ..Default::default() });
        for _ in 0..200 {
            let t = s.sample(&mut [f32::NEG_INFINITY, 0.0, f32::NAN, 0.0, f32::NEG_INFINITY], &[]);
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn repetition_penalty_hand_cases() {
        let p = SamplingParams { repetition_penalty: 1.5, ..Default::default() };
        let mut s = Sampler::new(p.clone());
        // Positive logit divided: 1.0 / 1.5 = 0.667 < 0.9.
        assert_eq!(s.sample(&mut [1.0, 0.9], &[]), 0);
        assert_eq!(s.sample(&mut [1.0, 0.9], &[0]), 1);
        // Negative logit multiplied: -1.0 * 1.5 = -1.5 < -1.2.
        assert_eq!(s.sample(&mut [-1.0, -1.2], &[0]), 1);
        // Applied once per distinct token, however often it was seen.
        let mut l = [2.0, 1.0];
        apply_penalties(&mut l, &[0, 0, 0], &p);
        assert_eq!(l, [2.0 / 1.5, 1.0]);
        // Ids outside the vocabulary are ignored.
        let mut l = [2.0, 1.0];
        apply_penalties(&mut l, &[7], &p);
        assert_eq!(l, [2.0, 1.0]);
    }

    #[test]
    fn presence_vs_frequency_hand_cases() {
        let history = [0, 0, 0];
        // Frequency: 1.0 - 3 * 0.1 = 0.7 < 0.8.
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.1, ..Default::default() });
        assert_eq!(s.sample(&mut [1.0, 0.8, 0.0], &history), 1);
        // Presence: 1.0 - 0.1 = 0.9 > 0.8, subtracted once only.
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.1, ..Default::default() });
        assert_eq!(s.sample(&mut [1.0, 0.8, 0.0], &history), 0);
        // Presence 0.3 → 0.7 < 0.8.
        let mut s = Sampler::new(SamplingParams { presence_penalty: 0.3, ..Default::default() });
        assert_eq!(s.sample(&mut [1.0, 0.8, 0.0], &history), 1);
        // Both, exact values.
        let p = SamplingParams { presence_penalty: 0.5, frequency_penalty: 0.25, ..Default::default() };
        let mut l = [1.0, 1.0, 1.0];
        apply_penalties(&mut l, &[2, 0, 2], &p);
        assert_eq!(l, [1.0 - 0.25 - 0.5, 1.0, 1.0 - 0.5 - 0.5]);
        // Negative presence penalty encourages repeats.
        let mut s = Sampler::new(SamplingParams { presence_penalty: -0.5, ..Default::default() });
        assert_eq!(s.sample(&mut [0.0, 0.4], &[0]), 0);
    }

    #[test]
    fn penalties_apply_before_sampling_too() {
        // Without a penalty token 0 (logit 5) dominates at T = 0.1; a huge repetition penalty
        // (5 / 100 = 0.05) sends it far below token 1.
        let p = SamplingParams { temperature: 0.1, seed: 1, ..Default::default() };
        let mut s = Sampler::new(p.clone());
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [5.0, 4.0, -30.0], &[0]), 0);
        }
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 100.0, ..p });
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [5.0, 4.0, -30.0], &[0]), 1);
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 1, seed: 9, ..Default::default() });
        for _ in 0..50 {
            assert_eq!(s.sample(&mut [0.0, 0.3, 0.3, 0.1], &[]), 1);
        }
    }

    proptest! {
        #[test]
        fn sample_equals_the_reference(
            logits in vocabulary_logits(),
            t in prop::sample::select(vec![0.0f32, 0.3, 0.7, 1.0, 2.5]),
            top_k in prop::sample::select(vec![0usize, 1, 5, 20, 300, 5000]),
            top_p in prop::sample::select(vec![1.0f32, 0.0, 0.5, 0.9, 0.99]),
            min_p in prop::sample::select(vec![0.0f32, 0.05, 0.5]),
            repetition_penalty in prop::sample::select(vec![1.0f32, 1.3]),
            history in prop::collection::vec(0u32..4000, 0..20),
            seed in any::<u64>(),
        ) {
            let p = SamplingParams { temperature: t, top_k, top_p, min_p, repetition_penalty, seed, ..Default::default() };
            let mut s = Sampler::new(p.clone());
            let mut rng = Rng::new(seed);
            for _ in 0..4 {
                let got = s.sample(&mut logits.clone(), &history);
                prop_assert_eq!(got, reference_sample(&p, &mut rng, &mut logits.clone(), &history));
            }
        }

        #[test]
        fn penalties_equal_the_sorted_count(
            logits in prop::collection::vec(-5.0f32..5.0, 1..300),
            history in prop::collection::vec(0u32..400, 0..200),
            repetition_penalty in prop::sample::select(vec![1.0f32, 1.3, 0.8]),
            presence_penalty in prop::sample::select(vec![0.0f32, 0.5, -0.2]),
            frequency_penalty in prop::sample::select(vec![0.0f32, 0.25]),
        ) {
            let p = SamplingParams { repetition_penalty, presence_penalty, frequency_penalty, ..Default::default() };
            // The first version: the history sorted, each run of one id penalised once.
            let mut want = logits.clone();
            if p.has_penalties() {
                let mut seen: Vec<u32> = history.iter().copied().filter(|&t| (t as usize) < want.len()).collect();
                seen.sort_unstable();
                for run in seen.chunk_by(|a, b| a == b) {
                    let l = &mut want[run[0] as usize];
                    if repetition_penalty != 1.0 {
                        *l = if *l > 0.0 { *l / repetition_penalty } else { *l * repetition_penalty };
                    }
                    *l -= run.len() as f32 * frequency_penalty + presence_penalty;
                }
            }
            let mut counts = Vec::new();
            for _ in 0..2 {
                // Twice with the same scratch: it must be all zero again after a call.
                let mut got = logits.clone();
                apply_penalties_with(&mut got, &history, &p, &mut counts);
                prop_assert_eq!(&got, &want);
            }
        }

        #[test]
        fn greedy_is_argmax(logits in prop::collection::vec(-50.0f32..50.0, 1..300), seed in any::<u64>()) {
            let mut s = Sampler::new(SamplingParams { seed, ..Default::default() });
            let want = argmax(&logits);
            prop_assert_eq!(s.sample(&mut logits.clone(), &[]), want);
            // The first maximum wins.
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            prop_assert_eq!(want as usize, logits.iter().position(|&v| v == m).unwrap());
        }

        #[test]
        fn temperature_zero_ignores_filters(
            logits in prop::collection::vec(-20.0f32..20.0, 1..100),
            top_k in 0usize..10, top_p in 0.0f32..1.0, min_p in 0.0f32..1.0, seed in any::<u64>(),
            t in prop::sample::select(vec![0.0f32, -1.0]),
        ) {
            let mut s = Sampler::new(SamplingParams { temperature: t, top_k, top_p, min_p, seed, ..Default::default() });
            for _ in 0..3 {
                prop_assert_eq!(s.sample(&mut logits.clone(), &[]), argmax(&logits));
            }
        }

        #[test]
        fn top_k_never_picks_excluded(logits in distinct_logits(80), k in 1usize..10, seed in any::<u64>(), t in 0.2f32..3.0) {
            let (ranked, _) = ranked(&logits, t);
            let allowed = &ranked[..k.min(ranked.len())];
            let mut s = Sampler::new(SamplingParams { temperature: t, top_k: k, seed, ..Default::default() });
            for _ in 0..20 {
                let tok = s.sample(&mut logits.clone(), &[]);
                prop_assert!(allowed.contains(&tok), "picked {} outside top-{} {:?}", tok, k, allowed);
            }
        }

        #[test]
        fn top_p_never_picks_excluded(logits in distinct_logits(80), top_p in 0.0f32..1.0, seed in any::<u64>(), t in 0.2f32..3.0) {
            let (ranked, probs) = ranked(&logits, t);
            let mut s = Sampler::new(SamplingParams { temperature: t, top_p, seed, ..Default::default() });
            for _ in 0..20 {
                let tok = s.sample(&mut logits.clone(), &[]);
                let r = ranked.iter().position(|&x| x == tok).unwrap();
                // Kept iff the more likely tokens alone do not reach top_p yet.
                let before: f64 = probs[..r].iter().sum();
                prop_assert!(r == 0 || before < top_p as f64 + 1e-6, "rank {} has {} before it, top_p {}", r, before, top_p);
            }
        }

        #[test]
        fn min_p_never_picks_excluded(logits in distinct_logits(80), min_p in 0.0f32..1.0, seed in any::<u64>(), t in 0.2f32..3.0) {
            let (ranked, probs) = ranked(&logits, t);
            let mut s = Sampler::new(SamplingParams { temperature: t, min_p, seed, ..Default::default() });
            for _ in 0..20 {
                let tok = s.sample(&mut logits.clone(), &[]);
                let r = ranked.iter().position(|&x| x == tok).unwrap();
                prop_assert!(probs[r] >= min_p as f64 * probs[0] * (1.0 - 1e-5), "p {} < {} * {}", probs[r], min_p, probs[0]);
            }
        }

        #[test]
        fn combined_filters_never_pick_excluded(
            logits in distinct_logits(120), k in 1usize..20, top_p in 0.05f32..1.0, min_p in 0.0f32..0.5,
            seed in any::<u64>(), t in 0.2f32..3.0,
        ) {
            let (ranked, probs) = ranked(&logits, t);
            let mut s = Sampler::new(SamplingParams { temperature: t, top_k: k, top_p, min_p, seed, ..Default::default() });
            let k = k.min(ranked.len());
            let top_k_mass: f64 = probs[..k].iter().sum();
            for _ in 0..20 {
                let tok = s.sample(&mut logits.clone(), &[]);
                let r = ranked.iter().position(|&x| x == tok).unwrap();
                prop_assert!(r < k);
                // top-p acts on the top-k survivors, renormalised.
                let before: f64 = probs[..r].iter().sum::<f64>() / top_k_mass;
                prop_assert!(r == 0 || before < top_p as f64 + 1e-6);
                prop_assert!(probs[r] >= min_p as f64 * probs[0] * (1.0 - 1e-5));
            }
        }

        #[test]
        fn filters_keep_the_top_token_reachable(logits in distinct_logits(50), seed in any::<u64>()) {
            // Extreme settings still leave a valid choice: the most likely token.
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 3, top_p: 0.0, min_p: 1.0, seed, ..Default::default() });
            prop_assert_eq!(s.sample(&mut logits.clone(), &[]), argmax(&logits));
        }
    }
}
