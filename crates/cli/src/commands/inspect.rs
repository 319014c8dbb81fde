use super::ModelArgs;
use anyhow::Result;
use moe_core::LayerKind;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: Args) -> Result<()> {
    let files = moe_store::open(&a.model.model)?;
    let mut c = files.config.clone();
    if let Some(k) = a.model.experts_per_token {
        c = c.with_top_k(k)?;
    }
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    println!("model      {}", files.dir.display());
    println!("family     {}", moe_engine::model::describe(&c));
    println!("hidden {}  vocab {}  context {}  rms eps {:e}", c.hidden, c.vocab, c.max_positions, c.rms_eps);
    println!(
        "attention  {} heads / {} KV heads x {}, rotary {} dims, theta {}, {}",
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.rotary_dim,
        c.rope_theta,
        if c.family.gated_attention() { "output gate" } else { "no gate" }
    );
    if c.layers.contains(&LayerKind::DeltaNet) {
        println!(
            "deltanet   {} key heads / {} value heads, dims {}/{}, conv kernel {}",
            c.delta_k_heads, c.delta_v_heads, c.delta_k_dim, c.delta_v_dim, c.conv_kernel
        );
    }
    println!(
        "experts    {} routed x {} wide, top-{}{}, shared {}",
        c.experts,
        c.expert_inter,
        c.top_k,
        if c.norm_topk { " renormalised" } else { "" },
        c.shared_inter.map_or("none".to_string(), |s| format!("{s} wide"))
    );
    let types: String = c.layers.iter().map(|l| if *l == LayerKind::Attention { 'A' } else { 'D' }).collect();
    println!("layers     {types}  (A attention, D DeltaNet)");
    let names = files.tensors.names();
    let dense = files.tensors.dense_bytes();
    let (per_expert, experts_total) = (files.experts.expert_bytes(), files.experts.total_bytes());
    println!("tensors    {} dense, {} routed experts", names.len(), c.layers.len() * c.experts);
    println!(
        "bytes      dense {:.3} GiB, routed experts {:.3} GiB ({} bytes each)",
        gib(dense),
        gib(experts_total),
        per_expert
    );
    let per_token = per_expert * c.top_k * c.layers.len();
    println!(
        "per token  {:.1} MiB of routed experts ({} layers x {} experts)",
        per_token as f64 / (1 << 20) as f64,
        c.layers.len(),
        c.top_k
    );
    Ok(())
}
