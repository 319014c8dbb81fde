//! Time per sampled token over a vocabulary the size of Qwen3.5's (248320), for the sampling
//! settings people use: `cargo run --release -p moe-core --example sampler_bench`. The sampler runs
//! on the host after every decode step, so it adds to the step's time in `generate`, `chat` and
//! `serve` (the `bench` command does not sample).
use moe_core::sample::{Sampler, SamplingParams};
use std::time::Instant;

fn main() {
    const VOCAB: usize = 248_320;
    const ROUNDS: u32 = 50;
    // Two shapes of logits: uniform in [-15, 15] (a flat distribution, many tokens in the top-p
    // nucleus) and a peaked one (most tokens far below a few dozen likely ones).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    let flat: Vec<f32> = (0..VOCAB).map(|_| uniform() * 30.0 - 15.0).collect();
    let peaked: Vec<f32> = (0..VOCAB).map(|_| 12.0 * uniform().powi(40) - 4.0 + uniform()).collect();
    let settings = [
        ("greedy", SamplingParams::default()),
        (
            "T 0.7, top-k 20, top-p 0.95",
            SamplingParams { temperature: 0.7, top_k: 20, top_p: 0.95, ..Default::default() },
        ),
        ("T 0.7, top-p 0.9", SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() }),
        ("T 1, min-p 0.05", SamplingParams { temperature: 1.0, min_p: 0.05, ..Default::default() }),
        ("T 1", SamplingParams { temperature: 1.0, ..Default::default() }),
        (
            "T 0.7, top-p 0.9, repetition 1.1",
            SamplingParams { temperature: 0.7, top_p: 0.9, repetition_penalty: 1.1, ..Default::default() },
        ),
        // The defaults of `generate` and `chat`.
        (
            "CLI defaults (T 0.7, k 40, p 0.95, min-p 0.05, rep 1.1)",
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                repetition_penalty: 1.1,
                ..Default::default()
            },
        ),
    ];
    // A conversation's worth of history for the penalties.
    let history: Vec<u32> = (0..2048).map(|i| (i * 977) % VOCAB as u32).collect();
    println!("{:56} {:>12} {:>12}", "settings", "flat (us)", "peaked (us)");
    for (name, params) in settings {
        let mut times = [0.0; 2];
        for (t, logits) in times.iter_mut().zip([&flat, &peaked]) {
            let mut sampler = Sampler::new(params.clone());
            let mut work = logits.clone();
            let mut elapsed = 0.0;
            for _ in 0..ROUNDS {
                work.copy_from_slice(logits);
                let start = Instant::now();
                std::hint::black_box(sampler.sample(&mut work, &history));
                elapsed += start.elapsed().as_secs_f64();
            }
            *t = elapsed * 1e6 / ROUNDS as f64;
        }
        println!("{name:56} {:12.1} {:12.1}", times[0], times[1]);
    }
}
