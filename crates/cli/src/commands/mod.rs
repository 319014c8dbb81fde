pub mod bench;
pub mod chat;
pub mod convert;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod sampling;
pub mod serve;
pub mod synth;
pub mod verify;

use anyhow::Result;
use clap::{Args as ClapArgs, ValueEnum};
use moe_engine::generate::GenerateStats;
use moe_engine::{CpuBackend, Model, cuda_backend::CudaBackend};
use moe_store::{Budget, Eviction, StoreOptions};
use std::path::PathBuf;

/// The model to run, shared by every command that runs one.
#[derive(ClapArgs, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory: a Hugging Face checkpoint or a packed flash-moe model
    /// (default: the demo model shipped in models/demo).
    #[arg(long, default_value_os_t = default_model())]
    pub model: PathBuf,
    /// Routed experts per token (default: the model's own top-k).
    #[arg(long)]
    pub experts_per_token: Option<usize>,
    /// Bytes of RAM for cached experts: e.g. 8GiB, 512MiB, 0 (no cache), or auto (available
    /// memory less the dense weights and room for the system).
    #[arg(long, default_value = "auto")]
    pub ram_budget: Budget,
    /// Threads reading experts from disk in parallel.
    #[arg(long, default_value_t = moe_store::DEFAULT_IO_THREADS)]
    pub io_threads: usize,
    /// Which cached expert to drop when the RAM budget is full: lfru (frequency with ageing) or lru.
    #[arg(long, default_value = "lfru")]
    pub eviction: Eviction,
    /// Read packed expert files through the page cache instead of with O_DIRECT.
    #[arg(long)]
    pub no_direct_io: bool,
    /// Bytes of GPU memory for routed experts on --device cuda: e.g. 40GiB, 0 (upload every use),
    /// or auto (free GPU memory once the dense weights are loaded, less 2 GiB).
    #[arg(long, default_value = "auto")]
    pub vram_budget: Budget,
    /// On the GPU, queue every decode step's kernels one by one instead of replaying the step
    /// recorded as a CUDA graph (for comparisons and debugging).
    #[arg(long)]
    pub no_graphs: bool,
    /// Where to compute: auto picks the GPU when one is present.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

/// A model on whichever backend `--device` chose.
pub enum AnyModel {
    Cpu(Box<Model<CpuBackend>>),
    Cuda(Box<Model<CudaBackend>>),
}

/// Runs `$body` with `$m` bound to the model, whatever its backend (the body is compiled once
/// per backend).
macro_rules! with_model {
    ($model:expr, $m:ident => $body:expr) => {
        match $model {
            $crate::commands::AnyModel::Cpu($m) => $body,
            $crate::commands::AnyModel::Cuda($m) => $body,
        }
    };
}
pub(crate) use with_model;

impl ModelArgs {
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            ram_budget: self.ram_budget,
            io_threads: self.io_threads,
            eviction: self.eviction,
            direct_io: !self.no_direct_io,
            host_memory: None,
        }
    }

    pub fn load(&self) -> Result<AnyModel> {
        let gpu = match self.device {
            Device::Cpu => None,
            Device::Cuda => Some(CudaBackend::with_vram_budget(0, self.vram_budget)?),
            Device::Auto => CudaBackend::with_vram_budget(0, self.vram_budget).ok(),
        };
        Ok(match gpu {
            Some(g) => {
                g.use_graphs(!self.no_graphs);
                // Expert buffers in the GPU's page-locked memory: disk reads land where the DMA
                // to the device reads from, with no staging copy.
                let store = StoreOptions { host_memory: Some(g.gpu().pinned_pool()), ..self.store_options() };
                AnyModel::Cuda(Box::new(self.load_on(g, &store)?))
            }
            None => AnyModel::Cpu(Box::new(self.load_on(CpuBackend, &self.store_options())?)),
        })
    }

    fn load_on<B: moe_engine::Backend>(&self, backend: B, store: &StoreOptions) -> Result<Model<B>> {
        moe_engine::load_with(&self.model, self.experts_per_token, store, backend)
    }
}

/// `models/demo` under the working directory, or beside the binary's checkout
/// (`target/release/flash-moe` -> `models/demo`), so `cargo run` works from anywhere in the repo.
fn default_model() -> PathBuf {
    let rel = PathBuf::from("models/demo");
    if rel.is_dir() {
        return rel;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().map(|d| d.join("models/demo")).find(|d| d.is_dir()))
        .unwrap_or(rel)
}

pub fn print_stats<B: moe_engine::Backend>(s: &GenerateStats, model: &moe_engine::Model<B>) {
    eprintln!(
        "[{} prompt tokens in {:.2}s ({:.1} tok/s), first token after {:.2}s, {} generated at {:.2} tok/s, stop: {:?}; backend {}]",
        s.prompt_tokens,
        s.prefill.as_secs_f64(),
        s.prefill_tok_s(),
        s.time_to_first_token.as_secs_f64(),
        s.generated_tokens,
        s.decode_tok_s(),
        s.stop,
        model.backend().name()
    );
    eprintln!("{}", store_stats(model));
}

/// Expert traffic since the model was loaded, on one line.
pub fn store_stats<B: moe_engine::Backend>(model: &moe_engine::Model<B>) -> String {
    let s = model.experts().stats();
    format!(
        "[experts: {} requests, {:.1}% from RAM, {} read from disk ({:.1} MiB at {:.2} GB/s), waited {:.2}s on I/O, {} evictions, {} released to VRAM, {} taken back from it, {:.1} MiB resident]",
        s.requests(),
        100.0 * s.hit_rate(),
        s.reads,
        s.bytes_read as f64 / (1 << 20) as f64,
        s.read_gbps(),
        s.stall_time.as_secs_f64(),
        s.evictions,
        s.released,
        s.adopted,
        s.resident_bytes as f64 / (1 << 20) as f64,
    )
}
