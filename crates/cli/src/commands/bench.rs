//! `flash-moe bench`: decode speed next to the bound the machine sets, in one run.

use super::ModelArgs;
use anyhow::{Context, Result};
use moe_engine::{Backend, Model};
use moe_store::probe;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens to decode (after the prompt).
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Prompt tokens processed (as one batch) before decoding.
    #[arg(long, default_value_t = 8)]
    prompt_tokens: usize,
    /// Seconds each bandwidth probe runs.
    #[arg(long, default_value_t = 3.0)]
    probe_seconds: f64,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
    /// Before timing, read every expert once into the RAM tier when they all fit its budget, so
    /// that decoding measures the RAM path rather than the first reads from disk.
    #[arg(long)]
    warm_ram: bool,
}

const GB: f64 = 1e9;

pub fn run(a: Args) -> Result<()> {
    let files = moe_store::open_with(&a.model.model, &a.model.store_options())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let probe_time = Duration::from_secs_f64(a.probe_seconds);
    let expert_bytes = files.experts.expert_bytes();
    let disk_files = probe::expert_files(&a.model.model)?;
    let disk = probe::disk_read_bandwidth(&disk_files, expert_bytes, a.model.io_threads, probe_time)
        .context("measuring the disk")?;
    let dram_gbps = probe::memory_read_bandwidth(1 << 30, threads);
    // Bytes of resident weights one token reads: everything dense except the embedding table,
    // of which it reads one row (unless the table is also the output head).
    let c = &files.config;
    let embed = files.tensors.matrix("embed_tokens.weight", c.vocab, c.hidden)?.byte_len();
    let dense_per_token = files.tensors.dense_bytes() - if c.tie_embeddings { 0 } else { embed - embed / c.vocab };
    drop(files);

    let machine = Machine { disk, dram_gbps, threads, dense_per_token };
    super::with_model!(a.model.load()?, m => decode(&a, &m, &machine))
}

/// What the probes measured and the dense bytes a token reads.
struct Machine {
    disk: probe::DiskBandwidth,
    dram_gbps: f64,
    threads: usize,
    dense_per_token: usize,
}

fn decode<B: Backend>(a: &Args, model: &Model<B>, machine: &Machine) -> Result<()> {
    let Machine { disk, dram_gbps, threads, dense_per_token } = *machine;
    let expert_bytes = model.experts().expert_bytes();
    let c = model.config.clone();

    if a.warm_ram {
        let store = model.experts();
        if store.stats().budget_bytes >= store.total_bytes() as u64 {
            let ids: Vec<usize> = (0..c.experts).collect();
            for layer in 0..c.layers.len() {
                for batch in ids.chunks(32) {
                    store.experts(layer, batch)?;
                }
            }
        } else {
            eprintln!("--warm-ram: the experts do not all fit the RAM budget; not warmed");
        }
    }
    let prompt: Vec<u32> = (0..a.prompt_tokens.max(1) as u32).map(|i| (i * 7919 + 13) % c.vocab as u32).collect();
    let mut session = model.new_session();
    let start = Instant::now();
    let logits = model.forward(&mut session, &prompt, false, false)?.logits;
    std::hint::black_box(&logits);
    let prefill = start.elapsed();
    let before = model.experts().stats();
    let vram_before = model.backend().expert_tier_stats();
    model.take_profile();
    let start = Instant::now();
    // Greedy steps (the next token chosen where the logits are, as `generate` does at
    // temperature 0), fed random tokens, not the model's own choices: a random-weight model's
    // greedy output repeats itself, which would route every step to the same experts and flatter
    // the cache.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..a.tokens {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::hint::black_box(model.forward_greedy(&mut session, (seed % c.vocab as u64) as u32)?);
    }
    let decode = start.elapsed();
    model.settle(&mut session)?;
    let after = model.experts().stats();
    let vram_after = model.backend().expert_tier_stats();
    let profile = model.take_profile();
    let n = a.tokens.max(1) as f64;
    let tok_s = n / decode.as_secs_f64();
    let hits = (after.hits - before.hits) as f64 / n;
    let misses = (after.requests() - before.requests()) as f64 / n - hits;
    let disk_bytes = (after.bytes_read - before.bytes_read) as f64 / n;
    let ram_expert_bytes = hits * expert_bytes as f64;
    let mem_time = (dense_per_token as f64 + ram_expert_bytes) / (dram_gbps * GB);
    let disk_time = disk_bytes / (disk.gb_per_s * GB);
    let roofline = 1.0 / mem_time.max(disk_time);
    let bound = if disk_time > mem_time { "disk" } else { "memory" };
    let per_layer = |d: Duration| d.as_secs_f64() * 1e3 / n / c.layers.len() as f64;
    // The GPU path: dense weights and VRAM hits read from device memory, misses copied in from
    // pinned staging, which is filled from the RAM tier (host memory) or the disk.
    let vram = vram_after.zip(vram_before).map(|(v, b)| {
        let hits = (v.hits - b.hits) as f64 / n;
        let misses = (v.misses - b.misses) as f64 / n;
        let uploaded = (v.bytes_uploaded - b.bytes_uploaded) as f64 / n;
        let direct = (v.direct_uploads - b.direct_uploads) as f64 / n;
        (v, hits, misses, uploaded, direct)
    });
    let gpu = vram.and_then(|(_, vram_hits, _, uploaded, _)| {
        let (dev_gbps, h2d_gbps) = model.backend().device_bandwidth(a.probe_seconds)?;
        let times = [
            ("gpu memory", (dense_per_token as f64 + vram_hits * expert_bytes as f64) / (dev_gbps * GB)),
            ("host->device", uploaded / (h2d_gbps * GB)),
            ("disk", disk_time),
            // What the device takes from host memory is what crosses the bus (the tier's count;
            // the store's hits also count the lookups that build a layer's address table, every
            // expert once, which read nothing: a run 2 of 32 tokens named host memory its bound
            // at 17.5 ms a token against the bus's 12.9). Host memory gives these bytes at least
            // the rate the page-locked copy probe (`h2d`) got out of it: the CPU read probe, a
            // few host threads, can come out below that (50-84 GB/s against 55 on the H200).
            ("host memory", uploaded / (dram_gbps.max(h2d_gbps) * GB)),
        ];
        let (bound, worst) = times.iter().fold(("", 0.0f64), |m, &(k, t)| if t > m.1 { (k, t) } else { m });
        Some((dev_gbps, h2d_gbps, times, bound, 1.0 / worst))
    });

    if a.json {
        let phases: serde_json::Map<String, serde_json::Value> =
            profile.phases().iter().map(|(k, d)| (k.to_string(), per_layer(*d).into())).collect();
        let mut report = serde_json::json!({
            "model": a.model.model.display().to_string(),
            "family": c.family.name(),
            "layers": c.layers.len(),
            "experts_per_token": c.top_k,
            "backend": model.backend().name(),
            "ram_budget": a.model.ram_budget.to_string(),
            "eviction": a.model.eviction.to_string(),
            "disk_gbps": disk.gb_per_s,
            "disk_direct_io": disk.direct,
            "dram_gbps": dram_gbps,
            "prefill_tok_s": prompt.len() as f64 / prefill.as_secs_f64(),
            "replayed_steps": profile.replays,
            "decode_tok_s": tok_s,
            "dense_bytes_per_token": dense_per_token,
            "expert_bytes_per_token_ram": ram_expert_bytes,
            "expert_bytes_per_token_disk": disk_bytes,
            "expert_hit_rate": hits / (hits + misses).max(1e-9),
            "roofline_tok_s": roofline,
            "bound": bound,
            "fraction_of_roofline": tok_s / roofline,
            "ms_per_layer": phases,
        });
        if let Some((v, hits, misses, uploaded, direct)) = vram {
            report["vram"] = serde_json::json!({
                "budget": v.budget,
                "resident_experts": v.resident_experts,
                "resident_bytes": v.resident_bytes,
                "hits_per_token": hits,
                "misses_per_token": misses,
                "bytes_uploaded_per_token": uploaded,
                "hit_rate": hits / (hits + misses).max(1e-9),
                "evictions": v.evictions,
                "direct_uploads_per_token": direct,
            });
        }
        if let Some((dev, h2d, _, bound, roof)) = gpu {
            report["gpu_memory_gbps"] = dev.into();
            report["gpu_host_to_device_gbps"] = h2d.into();
            report["gpu_roofline_tok_s"] = roof.into();
            report["gpu_bound"] = bound.into();
            report["gpu_fraction_of_roofline"] = (tok_s / roof).into();
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "model        {} ({} layers, top-{}, backend {})",
        a.model.model.display(),
        c.layers.len(),
        c.top_k,
        model.backend().name()
    );
    println!(
        "machine      disk {:.2} GB/s ({} reads of {:.2} MiB, {} threads), memory {:.1} GB/s ({threads} threads)",
        disk.gb_per_s,
        if disk.direct { "O_DIRECT" } else { "buffered: the filesystem refused O_DIRECT" },
        mib(expert_bytes as f64),
        a.model.io_threads,
        dram_gbps
    );
    println!(
        "store        RAM budget {}, eviction {}, VRAM budget {}",
        a.model.ram_budget, a.model.eviction, a.model.vram_budget
    );
    println!("prefill      {} tokens at {:.1} tok/s", prompt.len(), prompt.len() as f64 / prefill.as_secs_f64());
    println!("decode       {} tokens at {:.2} tok/s ({:.1} ms/token)", a.tokens, tok_s, 1e3 / tok_s);
    println!(
        "bytes/token  dense {:.1} MiB, experts from RAM {:.1} MiB ({:.1} hits), experts from disk {:.1} MiB ({:.1} misses); hit rate {:.1}%",
        mib(dense_per_token as f64),
        mib(ram_expert_bytes),
        hits,
        mib(disk_bytes),
        misses,
        100.0 * hits / (hits + misses).max(1e-9)
    );
    // The host roofline (dense weights read from DRAM) describes the CPU backend only.
    if gpu.is_none() {
        println!(
            "roofline     memory path {:.1} ms, disk path {:.1} ms per token -> {:.2} tok/s ({bound}-bound); achieved {:.0}%",
            mem_time * 1e3,
            disk_time * 1e3,
            roofline,
            100.0 * tok_s / roofline
        );
    }
    if let Some((v, hits, misses, uploaded, direct)) = vram {
        println!(
            "vram tier    budget {}: {} experts resident ({:.2} GiB), {} evictions; per token {:.1} hits, {:.1} misses ({:.1}% hits), {:.1} MiB uploaded ({:.0}% of uploads without staging)",
            v.budget.map_or("auto (unresolved)".to_string(), moe_store::format_bytes),
            v.resident_experts,
            v.resident_bytes as f64 / (1u64 << 30) as f64,
            v.evictions,
            hits,
            misses,
            100.0 * hits / (hits + misses).max(1e-9),
            mib(uploaded),
            100.0 * direct / misses.max(1e-9)
        );
    }
    if let Some((dev, h2d, times, bound, roof)) = gpu {
        let parts: Vec<String> = times.iter().map(|(k, t)| format!("{k} {:.2} ms", t * 1e3)).collect();
        println!("gpu          memory {dev:.0} GB/s (device copy), host->device {h2d:.1} GB/s (pinned)");
        println!(
            "gpu roofline {} per token -> {roof:.2} tok/s ({bound}-bound); achieved {:.0}%",
            parts.join(", "),
            100.0 * tok_s / roof
        );
    }
    let phases: Vec<String> = profile.phases().iter().map(|(k, d)| format!("{k} {:.3}", per_layer(*d))).collect();
    println!("ms/layer     {}", phases.join(", "));
    if profile.replays > 0 {
        println!("graphs       {} of {} decode steps replayed from a recorded graph", profile.replays, a.tokens);
    }
    println!("{}", super::store_stats(model));
    Ok(())
}
