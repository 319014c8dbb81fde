use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use moe_store::manifest::Manifest;
use moe_store::{DenseFormat, ExpertFormat, MANIFEST_FILE};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The model to convert: a Hugging Face safetensors directory, an mlx-community one, or a
    /// packed flash-moe model. It is only read.
    #[arg(long)]
    model: PathBuf,
    /// The packed directory to write (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Routed experts: q4 (MLX 4-bit sources are copied bit for bit), q2 (flash-moe's 2-bit),
    /// q8 or bf16.
    #[arg(long, default_value = "q4")]
    experts: ExpertFormat,
    /// Dense weight matrices: q8 (sources quantised to 8 bits or fewer are kept as they are) or
    /// bf16. Norms and other vectors keep their dtype.
    #[arg(long, default_value = "q8")]
    dense: DenseFormat,
    /// Replace an existing destination, once the new model is complete.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> Result<()> {
    refuse_existing(&a.out, a.force)?;
    if let (Ok(out), Ok(src)) = (std::fs::canonicalize(&a.out), std::fs::canonicalize(&a.model))
        && src.starts_with(&out)
    {
        bail!("{} is or contains the source model {}; choose another --out", a.out.display(), a.model.display());
    }
    let src = moe_store::open(&a.model)?;
    eprintln!(
        "converting {} ({}) to {}: experts {}, dense {}",
        a.model.display(),
        moe_engine::model::describe(&src.config),
        a.out.display(),
        a.experts.name(),
        a.dense.name()
    );
    let start = Instant::now();
    let (bar, mut progress) = progress_bar();
    let result = moe_store::write_packed(&src, &a.out, a.experts, a.dense, a.force, &mut progress);
    bar.finish_and_clear();
    result.with_context(|| format!("converting {} to {}", a.model.display(), a.out.display()))?;
    summary(&a.out, start)?;
    if !a.out.join("tokenizer.json").is_file() {
        eprintln!(
            "note: {} has no tokenizer.json, so neither has {}: it computes logits, but to generate text \
             copy the tokenizer files beside it",
            a.model.display(),
            a.out.display()
        );
    }
    Ok(())
}

/// Refuses an existing destination before any work, with the flag that overrides it.
pub fn refuse_existing(out: &Path, force: bool) -> Result<()> {
    if !force && std::fs::symlink_metadata(out).is_ok() {
        bail!("{} already exists; pass --force to replace it", out.display());
    }
    Ok(())
}

/// A progress bar on standard error (drawn only on a terminal) counting output bytes and their
/// rate, and the callback that moves it.
pub fn progress_bar() -> (ProgressBar, impl FnMut(u64, u64)) {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed_precise} (eta {eta})",
        )
        .expect("a valid template"),
    );
    let handle = bar.clone();
    (bar, move |done: u64, total: u64| {
        handle.set_length(total);
        handle.set_position(done);
    })
}

/// Prints what was written, from the manifest: sizes, files and the rate.
pub fn summary(out: &Path, start: Instant) -> Result<()> {
    let path = out.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let m = Manifest::parse(&path, &text)?;
    let experts: u64 = m.experts.files.iter().map(|f| f.file.bytes).sum();
    let copied: u64 = m.files.iter().map(|f| f.bytes).sum();
    let total = m.dense.file.bytes + experts + copied;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {}: {} (dense {}, experts {} in {} layers of {} x {} bytes) in {:.1}s, {:.0} MB/s",
        out.display(),
        human(total),
        human(m.dense.file.bytes),
        human(experts),
        m.experts.layers,
        m.experts.experts,
        m.experts.stride,
        secs,
        total as f64 / secs.max(1e-9) / 1e6
    );
    let names: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    println!("copied files: {}", if names.is_empty() { "none".to_string() } else { names.join(", ") });
    Ok(())
}

/// `bytes` with a binary unit: 812 B, 3.4 KiB, 12.0 MiB, 1.50 GiB.
fn human(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.2} GiB", b / 1_073_741_824.0),
    }
}
