use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The packed model directory to check.
    dir: PathBuf,
}

/// Re-hashes every file of a packed model and compares sizes and checksums with its manifest.
pub fn run(a: Args) -> Result<()> {
    let start = Instant::now();
    moe_store::verify_packed(&a.dir).with_context(|| format!("verifying {}", a.dir.display()))?;
    println!(
        "{}: every file and expert record matches its checksum ({:.1}s)",
        a.dir.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
