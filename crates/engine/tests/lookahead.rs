//! Reading ahead: while some expert lives on disk alone, each decoded token's layer asks the
//! store to start reading the experts the next layer's router picks (once per layer but the last,
//! for the next layer, and never for a prompt's several tokens); once every expert is in RAM it
//! asks nothing. A hint only: the logits are those of a model that never reads ahead.

mod common;

use common::fixture;
use moe_engine::{CpuBackend, Model};
use moe_store::{Budget, Expert, ExpertSource, ModelFiles, StoreError, StoreOptions, StoreStats};
use std::sync::{Arc, Mutex};

/// A store that records the prefetch hints it is given.
struct Recorder {
    inner: Arc<dyn ExpertSource>,
    hints: Mutex<Vec<(usize, Vec<usize>)>>,
}

impl ExpertSource for Recorder {
    fn expert(&self, layer: usize, expert: usize) -> Result<Expert, StoreError> {
        self.inner.expert(layer, expert)
    }
    fn prefetch(&self, layer: usize, experts: &[usize]) {
        self.hints.lock().unwrap().push((layer, experts.to_vec()));
        self.inner.prefetch(layer, experts)
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
    fn expert_bytes(&self) -> usize {
        self.inner.expert_bytes()
    }
    fn total_bytes(&self) -> usize {
        self.inner.total_bytes()
    }
}

fn recorded(ram_budget: Budget) -> (Model<CpuBackend>, Arc<Recorder>) {
    let opts = StoreOptions { ram_budget, ..Default::default() };
    let files = moe_store::open_with(&fixture("qwen35_moe"), &opts).unwrap();
    let rec = Arc::new(Recorder { inner: files.experts.clone(), hints: Mutex::new(Vec::new()) });
    let files = ModelFiles { experts: rec.clone(), ..files };
    (Model::load(&files, files.config.clone(), CpuBackend).unwrap(), rec)
}

#[test]
fn decoding_reads_the_next_layers_experts_ahead() {
    // No RAM tier: every expert stays on disk alone.
    let (model, rec) = recorded(Budget::Bytes(0));
    let (layers, k, experts) = (model.config.layers.len(), model.config.top_k, model.config.experts);
    let mut s = model.new_session();
    let mut logits = model.forward(&mut s, &[303, 211, 294, 53], true, false).unwrap().logits;
    // A prompt: each layer hints its own misses only.
    let hints = rec.hints.lock().unwrap().clone();
    assert_eq!(hints.iter().map(|(l, _)| *l).collect::<Vec<_>>(), (0..layers).collect::<Vec<_>>(), "{hints:?}");
    for token in [500, 250] {
        rec.hints.lock().unwrap().clear();
        logits.extend(model.forward(&mut s, &[token], true, false).unwrap().logits);
        let hints = rec.hints.lock().unwrap().clone();
        for layer in 1..layers {
            // Each layer but the last hints the next one's guess, then that layer its own misses.
            let ahead: Vec<&Vec<usize>> = hints.iter().filter(|(l, _)| *l == layer).map(|(_, ids)| ids).collect();
            assert_eq!(ahead.len(), 2, "layer {layer}: {hints:?}");
            let guess = ahead[0];
            let mut distinct = guess.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert!(guess.len() == k && distinct.len() == k && guess.iter().all(|&e| e < experts), "{guess:?}");
        }
        assert_eq!(hints.iter().filter(|(l, _)| *l == 0).count(), 1, "layer 0: its own misses only: {hints:?}");
    }

    // The same tokens from a model with every expert in RAM (so none on disk alone), which does
    // not read ahead: each layer hints its own misses only, and the logits are the same.
    let (plain, rec) = recorded(Budget::Auto);
    let all: Vec<usize> = (0..experts).collect();
    for layer in 0..layers {
        rec.inner.experts(layer, &all).unwrap();
    }
    let mut s = plain.new_session();
    let mut want = plain.forward(&mut s, &[303, 211, 294, 53], true, false).unwrap().logits;
    for token in [500, 250] {
        rec.hints.lock().unwrap().clear();
        want.extend(plain.forward(&mut s, &[token], true, false).unwrap().logits);
        let hints = rec.hints.lock().unwrap().clone();
        assert_eq!(hints.iter().map(|(l, _)| *l).collect::<Vec<_>>(), (0..layers).collect::<Vec<_>>(), "{hints:?}");
    }
    assert_eq!(logits, want);
}
