//! The coarse operations a model is written against. Each backend (CPU, CUDA) implements them
//! over its own buffers; the model code never sees a device.
//!
//! Activations are `[tokens, width]` row-major f32 tensors. Operations take the token count
//! explicitly, so buffers may be larger than the data in them and can be reused across steps.

use anyhow::Result;
pub use moe_core::shapes::{AttentionShape, DeltaNetShape};
pub use moe_core::tier::TierStats as ExpertTierStats;
use moe_core::{Matrix, ops};
use moe_store::ExpertSource;

/// Small parameters of a DeltaNet layer, resident on the device.
pub struct DeltaNetParams<'a, B: Backend + ?Sized> {
    /// Depthwise causal convolution `[conv_width, kernel]`.
    pub conv: &'a B::Tensor,
    pub a_log: &'a B::Tensor,
    pub dt_bias: &'a B::Tensor,
    /// Gated RMSNorm weight `[v_dim]` (plain weight).
    pub norm: &'a B::Tensor,
}

/// Recurrent state of a DeltaNet layer: the last `kernel - 1` convolution inputs and the
/// `[v_heads, k_dim, v_dim]` delta-rule state.
pub struct DeltaNetState<B: Backend + ?Sized> {
    pub conv: B::Tensor,
    pub ssm: B::Tensor,
}

/// The key/value cache of one attention layer: `capacity` positions of `kv_width` floats each.
pub struct KvCache<B: Backend + ?Sized> {
    pub k: B::Tensor,
    pub v: B::Tensor,
    pub capacity: usize,
}

/// A routed expert's gate, up and down matrices, as [`Backend::expert_ffn`] takes them.
pub trait ExpertMatrices<W> {
    fn matrices(&self) -> [&W; 3];
}

impl<W> ExpertMatrices<W> for [W; 3] {
    fn matrices(&self) -> [&W; 3] {
        let [g, u, d] = self;
        [g, u, d]
    }
}

/// How the routers of a model pick experts.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    /// Routed experts per layer.
    pub experts: usize,
    pub top_k: usize,
    /// Renormalise the top-k probabilities to sum to 1.
    pub norm_topk: bool,
    /// Layers with routed experts (so `layers x experts` experts in all).
    pub layers: usize,
}

impl Routing {
    pub fn of(c: &moe_core::ModelConfig) -> Self {
        Routing { experts: c.experts, top_k: c.top_k, norm_topk: c.norm_topk, layers: c.layers.len() }
    }
}

/// The error of a step being recorded ([`Backend::record_step`]) that needs the host midway, for
/// example to route its tokens there: such a step runs directly instead.
#[derive(Debug, thiserror::Error)]
#[error("the step needs the host midway and cannot be recorded")]
pub struct NotRecordable;

pub trait Backend: Send + Sync {
    /// f32 activations on the device.
    type Tensor: Send + Sync;
    /// A weight matrix usable by `matmul` and `expert_ffn`.
    type Weight: Send + Sync;
    /// A routed expert made usable by [`expert_weights`](Self::expert_weights); dropped once
    /// its `expert_ffn` is queued.
    type ExpertWeights: ExpertMatrices<Self::Weight>;
    /// A decode step recorded for replay ([`record_step`](Self::record_step)).
    type Graph: Send;

    fn name(&self) -> String;

    /// Records the device work that `body` queues, one decode step of `token` at `position`, as a
    /// graph, queues it once, and returns it for [`replay_step`](Self::replay_step). `body` must
    /// take the token and position only through [`embed`](Self::embed) and
    /// [`attention`](Self::attention), and everything else it touches must keep its address
    /// across replays. `Ok(None)`, having queued nothing, where the backend cannot record (the
    /// default) or the step needs the host midway ([`NotRecordable`]): the caller then runs it
    /// directly.
    fn record_step(
        &self,
        _routing: &Routing,
        _token: u32,
        _position: usize,
        _body: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<Self::Graph>> {
        Ok(None)
    }

    /// Queues a recorded step for `token` at `position`. False, having queued nothing, when the
    /// backend's own buffers have moved since the recording (record the step again).
    fn replay_step(&self, _graph: &Self::Graph, _token: u32, _position: usize) -> Result<bool> {
        Ok(false)
    }

    /// Queues a replay of `graph` at `position` that waits on the device for its token
    /// ([`feed_step`](Self::feed_step)), and returns the step's number; with `pick` (the step's
    /// logits tensor and vocabulary), the greedy choice over those logits is queued behind it for
    /// [`take_pick`](Self::take_pick). So a decode may queue the next step before it knows the
    /// next token. Anything else queued on the backend before the step is fed lets it pass first.
    /// `None`, having queued nothing, where the backend cannot (the default) or its buffers have
    /// moved since the recording.
    fn queue_step(
        &self,
        _graph: &Self::Graph,
        _pick: Option<(&Self::Tensor, usize)>,
        _position: usize,
    ) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Gives a step from [`queue_step`](Self::queue_step) its token, or with `None` lets it pass
    /// leaving every state as it was. False where it has passed already.
    fn feed_step(&self, _step: u64, _token: Option<u32>) -> Result<bool> {
        Ok(false)
    }

    /// Waits for the greedy pick of a fed step from [`queue_step`](Self::queue_step).
    fn take_pick(&self, _step: u64) -> Result<u32> {
        anyhow::bail!("{} queues no steps", self.name())
    }

    /// Makes a matrix usable on the device: once at load for dense weights.
    fn weight(&self, m: &Matrix) -> Result<Self::Weight>;

    /// Routed expert `id` of `layer`, made usable on the device. `fetch` reads it from the expert
    /// store; a backend with a device-memory tier calls it only on a miss.
    fn expert_weights<F>(&self, layer: usize, id: usize, fetch: F) -> Result<Self::ExpertWeights>
    where
        F: FnOnce() -> Result<moe_store::Expert>;

    /// Keeps each routed expert in one tier: releases from `store`'s RAM tier the experts this
    /// backend has taken into its device-memory tier since the last call, and gives `store` back
    /// the ones it has evicted (copied out of device memory) instead of dropping them. The model
    /// calls it after each layer's experts.
    fn settle_experts(&self, _store: &dyn ExpertSource) {}

    /// Whether routed expert `id` of `layer` is resident on the device, so that
    /// [`expert_weights`](Self::expert_weights) will not fetch it (the model prefetches the others).
    fn has_expert(&self, _layer: usize, _id: usize) -> bool {
        false
    }

    /// Checks, before anything is loaded, that `dense_bytes` of dense weights and the expert budget
    /// fit the device's memory; the error says what would fit.
    fn check_memory(&self, _dense_bytes: u64) -> Result<()> {
        Ok(())
    }

    /// Loads every routed expert into the device's expert tier when they all fit its budget (so
    /// that decoding never waits for a fetch); a no-op for backends without one.
    fn preload_experts(&self, _store: &dyn ExpertSource, _routing: &Routing) -> Result<()> {
        Ok(())
    }

    /// The device tier's counters, for backends that keep one.
    fn expert_tier_stats(&self) -> Option<ExpertTierStats> {
        None
    }

    /// Measured device-memory and host-to-device bandwidth in GB/s, for backends with a device.
    fn device_bandwidth(&self, _seconds: f64) -> Option<(f64, f64)> {
        None
    }
    fn tensor(&self, values: &[f32]) -> Self::Tensor;
    fn zeros(&self, len: usize) -> Self::Tensor;
    /// A tensor of `len` values that the next operation overwrites entirely (not necessarily
    /// zeroed, which saves a fill on devices).
    fn scratch(&self, len: usize) -> Self::Tensor {
        self.zeros(len)
    }
    /// The first `len` values back on the host.
    fn read(&self, t: &Self::Tensor, len: usize) -> Vec<f32>;
    /// The index of the largest of the first `len` values, as `moe_core::sample::argmax` (greedy
    /// decoding without the logits on the host).
    fn argmax(&self, t: &Self::Tensor, len: usize) -> u32 {
        moe_core::sample::argmax(&self.read(t, len))
    }
    /// A new tensor of `len` values starting with the first `keep` values of `t` (cache growth).
    fn resized(&self, t: &Self::Tensor, keep: usize, len: usize) -> Self::Tensor;

    /// Rows `tokens` of the embedding table into `out` (`[tokens, hidden]`).
    fn embed(&self, table: &Self::Weight, tokens: &[u32], out: &mut Self::Tensor);
    /// `out[t] = W x[t]` for `tokens` rows.
    fn matmul(&self, w: &Self::Weight, x: &Self::Tensor, tokens: usize, out: &mut Self::Tensor);
    /// RMSNorm of `rows` rows of `w`'s width each: `x / rms(x) * (offset + w)`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, offset: f32, eps: f32, rows: usize, out: &mut Self::Tensor);
    /// `acc[..len] += x[..len]`.
    fn add(&self, acc: &mut Self::Tensor, x: &Self::Tensor, len: usize);
    /// `x += delta` over `rows` rows of `width` (`w`'s length), then `out = rms_norm(x)`: a
    /// residual add and the norm after it (one launch on a device).
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        delta: &Self::Tensor,
        w: &Self::Tensor,
        width: usize,
        offset: f32,
        eps: f32,
        rows: usize,
        out: &mut Self::Tensor,
    ) {
        self.add(x, delta, rows * width);
        self.rms_norm(x, w, offset, eps, rows, out);
    }

    /// Full attention of `tokens` new tokens at positions `past..past + tokens`: q/k norm, RoPE,
    /// append to the cache, causal GQA softmax attention, optional sigmoid output gate.
    /// `q` is `[tokens, q_width]`, `k`/`v` `[tokens, kv_width]`, `out` `[tokens, out_width]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        shape: &AttentionShape,
        q_norm: &Self::Tensor,
        k_norm: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut KvCache<Self>,
        past: usize,
        tokens: usize,
        out: &mut Self::Tensor,
    );

    /// GatedDeltaNet over `tokens` tokens: causal conv + SiLU, L2-normed q/k, gated delta rule
    /// carrying `state`, gated RMSNorm. `proj` is the input projection, `[tokens, proj_width]`:
    /// per row the q, k, v channels before the convolution (`conv_width`), the output gate z
    /// (`value_width`), then the pre-sigmoid beta and the pre-softplus decay input (`v_heads`
    /// each). `out` is `[tokens, value_width]`.
    fn delta_net(
        &self,
        shape: &DeltaNetShape,
        params: &DeltaNetParams<'_, Self>,
        proj: &Self::Tensor,
        state: &mut DeltaNetState<Self>,
        tokens: usize,
        out: &mut Self::Tensor,
    );

    /// One SwiGLU expert on selected rows of `x` (`[*, hidden]`):
    /// `acc[rows[i]] += scales[i] * down(silu(gate x) * up x)`.
    #[allow(clippy::too_many_arguments)]
    fn expert_ffn(
        &self,
        gate: &Self::Weight,
        up: &Self::Weight,
        down: &Self::Weight,
        x: &Self::Tensor,
        rows: &[u32],
        scales: &[f32],
        acc: &mut Self::Tensor,
    );

    /// The gated shared expert on all `tokens` rows of `x`:
    /// `acc[t] += sigmoid(gate_logit[t]) * down(silu(gate x[t]) * up x[t])`.
    #[allow(clippy::too_many_arguments)]
    fn shared_expert(
        &self,
        gate: &Self::Weight,
        up: &Self::Weight,
        down: &Self::Weight,
        gate_logit: &Self::Tensor,
        x: &Self::Tensor,
        tokens: usize,
        acc: &mut Self::Tensor,
    ) {
        host_gated_expert(self, [gate, up, down], gate_logit, x, tokens, acc)
    }

    /// The routed experts of `layer` for `tokens` tokens, routed on the device: the top-k of each
    /// row of `logits` (`[tokens, experts]`) fetched through `store` where the device lacks them,
    /// their weighted outputs added to `acc` (`[tokens, hidden]`, as `x`). `shared` queues the
    /// shared expert's contribution to `acc`; the backend calls it once, at the point where it best
    /// overlaps the experts' arrival. Returns how many expert uses there were, or `None` (having
    /// called nothing) where the backend has no such path: the model then routes on the host and
    /// calls [`expert_ffn`](Self::expert_ffn).
    #[allow(clippy::too_many_arguments)]
    fn routed_experts_on_device(
        &self,
        _layer: usize,
        _routing: &Routing,
        _tokens: usize,
        _logits: &Self::Tensor,
        _x: &Self::Tensor,
        _store: &dyn ExpertSource,
        _shared: &dyn Fn(&mut Self::Tensor),
        _acc: &mut Self::Tensor,
    ) -> Result<Option<usize>> {
        Ok(None)
    }
}

/// [`Backend::shared_expert`] through [`Backend::expert_ffn`], with the gates read to the host.
pub fn host_gated_expert<B: Backend + ?Sized>(
    b: &B,
    [gate, up, down]: [&B::Weight; 3],
    gate_logit: &B::Tensor,
    x: &B::Tensor,
    tokens: usize,
    acc: &mut B::Tensor,
) {
    let scales: Vec<f32> = b.read(gate_logit, tokens).into_iter().map(ops::sigmoid).collect();
    let rows: Vec<u32> = (0..tokens as u32).collect();
    b.expert_ffn(gate, up, down, x, &rows, &scales, acc);
}
