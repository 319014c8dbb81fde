//! The Qwen MoE families (Qwen3.5-MoE, Qwen3-Next, Qwen3-MoE), written once against
//! [`Backend`]: load by canonical tensor names, then run a batch of tokens through the layers,
//! carrying the per-layer state of a [`Session`].

use crate::backend::*;
use anyhow::{Context, Result, bail};
use moe_core::{Family, LayerKind, Matrix, ModelConfig, ops};
use moe_store::{Expert, ExpertSource, ModelFiles, TensorSource};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    embed: B::Weight,
    /// `None` when the output head is tied to the embeddings.
    lm_head: Option<B::Weight>,
    final_norm: B::Tensor,
    layers: Vec<Layer<B>>,
    experts: Arc<dyn ExpertSource>,
    attention: AttentionShape,
    delta: DeltaNetShape,
    profile: Mutex<Profile>,
    /// Whether decoding reads the next layer's likely experts ahead (see `look_ahead`);
    /// `FLASH_MOE_LOOKAHEAD=0` turns it off, for comparisons.
    lookahead: bool,
}

/// Where the time of forward passes went, summed over calls since the last reset.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub attention: Duration,
    pub delta_net: Duration,
    pub router: Duration,
    /// Waiting for routed experts to arrive from the expert store.
    pub expert_wait: Duration,
    pub experts: Duration,
    pub shared_expert: Duration,
    /// Embedding, norms, residual adds and the output head.
    pub other: Duration,
    /// Decode steps replayed from a recorded graph, whole (the device does not report phases).
    pub replayed: Duration,
    pub tokens: usize,
    /// Routed expert computations (an expert used by several tokens of a batch counts once).
    pub expert_uses: usize,
    /// Decode steps replayed from a recorded graph.
    pub replays: usize,
}

impl Profile {
    pub fn total(&self) -> Duration {
        self.attention
            + self.delta_net
            + self.router
            + self.expert_wait
            + self.experts
            + self.shared_expert
            + self.other
            + self.replayed
    }

    /// The phases and their times, for reports.
    pub fn phases(&self) -> [(&'static str, Duration); 8] {
        [
            ("attention", self.attention),
            ("deltanet", self.delta_net),
            ("router", self.router),
            ("expert wait", self.expert_wait),
            ("experts", self.experts),
            ("shared expert", self.shared_expert),
            ("other", self.other),
            ("replayed steps", self.replayed),
        ]
    }
}

struct Layer<B: Backend> {
    input_norm: B::Tensor,
    post_norm: B::Tensor,
    mixer: Mixer<B>,
    router: B::Weight,
    shared: Option<SharedExpert<B>>,
}

enum Mixer<B: Backend> {
    Attention { q: B::Weight, k: B::Weight, v: B::Weight, o: B::Weight, q_norm: B::Tensor, k_norm: B::Tensor },
    DeltaNet(DeltaNetLayer<B>),
}

struct DeltaNetLayer<B: Backend> {
    /// All input projections as one matrix, so that they run as one product: output columns
    /// `q | k | v | z | b | a` (see [`Backend::delta_net`]).
    in_proj: B::Weight,
    conv: B::Tensor,
    a_log: B::Tensor,
    dt_bias: B::Tensor,
    norm: B::Tensor,
    out: B::Weight,
}

struct SharedExpert<B: Backend> {
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
    /// `[1, hidden]`: the sigmoid gate on the shared expert's output.
    scale: B::Weight,
}

/// What a forward pass returns.
pub struct Output {
    /// `[positions, vocab]`: every position's logits, or just the last one's.
    pub logits: Vec<f32>,
    /// The residual stream after each layer (`[tokens, hidden]` each), when asked for.
    pub hidden: Vec<Vec<f32>>,
}

/// Per-conversation state: the KV caches and DeltaNet states of every layer, and the recorded
/// decode step.
pub struct Session<B: Backend> {
    layers: Vec<LayerState<B>>,
    /// Tokens processed so far (the position of the next token).
    pub position: usize,
    graph: StepGraph<B>,
    /// The recorded step at `position`, queued before its token was known
    /// ([`Backend::queue_step`]).
    ahead: Option<u64>,
}

/// A session's decode step recorded for replay ([`Backend::record_step`]). A recording holds the
/// addresses of the session's caches, so it is redone when they grow.
enum StepGraph<B: Backend> {
    /// The first decode step runs directly: it sizes the backend's scratch, which a recording
    /// cannot allocate.
    Warmup,
    /// Record at the next decode step.
    Pending,
    Recorded {
        graph: B::Graph,
        logits: B::Tensor,
        kv_capacity: usize,
    },
    /// The backend cannot record this model's steps.
    Unavailable,
}

impl<B: Backend> Session<B> {
    /// The positions the KV caches hold (all alike), 0 without attention layers.
    fn kv_capacity(&self) -> usize {
        self.layers
            .iter()
            .find_map(|l| match l {
                LayerState::Attention(cache) => Some(cache.capacity),
                LayerState::DeltaNet(_) => None,
            })
            .unwrap_or(0)
    }
}

enum LayerState<B: Backend> {
    Attention(KvCache<B>),
    DeltaNet(DeltaNetState<B>),
}

impl<B: Backend> Model<B> {
    pub fn load(files: &ModelFiles, config: ModelConfig, backend: B) -> Result<Self> {
        let c = &config;
        let t: &dyn TensorSource = &*files.tensors;
        backend.check_memory(t.dense_bytes() as u64)?;
        let (h, offset) = (c.hidden, c.family.norm_offset());
        let weight = |name: &str, rows, cols| -> Result<B::Weight> { backend.weight(&t.matrix(name, rows, cols)?) };
        let values =
            |name: &str, shape: &[usize]| -> Result<B::Tensor> { Ok(backend.tensor(&t.tensor(name)?.values(shape)?)) };
        let attention = AttentionShape {
            heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
            rotary_dim: c.rotary_dim,
            rope_theta: c.rope_theta,
            gated: c.family.gated_attention(),
            norm_offset: offset,
            eps: c.rms_eps,
        };
        let delta = DeltaNetShape {
            k_heads: c.delta_k_heads,
            v_heads: c.delta_v_heads,
            k_dim: c.delta_k_dim,
            v_dim: c.delta_v_dim,
            conv_kernel: c.conv_kernel,
            eps: c.rms_eps,
        };
        let mut layers = Vec::with_capacity(c.layers.len());
        for (i, kind) in c.layers.iter().enumerate() {
            let p = format!("layers.{i}.");
            let mixer = match kind {
                LayerKind::Attention => {
                    let a = format!("{p}self_attn.");
                    let (kvw, ow) = (attention.kv_width(), attention.out_width());
                    Mixer::Attention {
                        q: weight(&format!("{a}q_proj.weight"), attention.q_width(), h)?,
                        k: weight(&format!("{a}k_proj.weight"), kvw, h)?,
                        v: weight(&format!("{a}v_proj.weight"), kvw, h)?,
                        o: weight(&format!("{a}o_proj.weight"), h, ow)?,
                        q_norm: values(&format!("{a}q_norm.weight"), &[c.head_dim])?,
                        k_norm: values(&format!("{a}k_norm.weight"), &[c.head_dim])?,
                    }
                }
                LayerKind::DeltaNet => {
                    let a = format!("{p}linear_attn.");
                    let (cw, vw, nv) = (delta.conv_width(), delta.value_width(), delta.v_heads);
                    let matrix = |name: &str, rows| t.matrix(&format!("{a}{name}.weight"), rows, h);
                    let in_proj = if t.contains(&format!("{a}in_proj_qkvz.weight")) {
                        // Qwen3-Next groups its outputs per key head.
                        let (qkvz, ba) = fused_orders(&delta);
                        let qkvz = matrix("in_proj_qkvz", cw + vw)?.select_rows(&qkvz);
                        Matrix::concat_rows(&[&qkvz, &matrix("in_proj_ba", 2 * nv)?.select_rows(&ba)])
                    } else {
                        let (qkv, z) = (matrix("in_proj_qkv", cw)?, matrix("in_proj_z", vw)?);
                        Matrix::concat_rows(&[&qkv, &z, &matrix("in_proj_b", nv)?, &matrix("in_proj_a", nv)?])
                    }
                    .with_context(|| format!("layer {i}: joining the DeltaNet input projections"))?;
                    Mixer::DeltaNet(DeltaNetLayer {
                        in_proj: backend.weight(&in_proj)?,
                        conv: values(&format!("{a}conv1d.weight"), &[cw, 1, delta.conv_kernel])?,
                        a_log: values(&format!("{a}A_log"), &[nv])?,
                        dt_bias: values(&format!("{a}dt_bias"), &[nv])?,
                        norm: values(&format!("{a}norm.weight"), &[delta.v_dim])?,
                        out: weight(&format!("{a}out_proj.weight"), h, vw)?,
                    })
                }
            };
            let m = format!("{p}mlp.");
            let shared = match c.shared_inter {
                Some(si) => Some(SharedExpert {
                    gate: weight(&format!("{m}shared_expert.gate_proj.weight"), si, h)?,
                    up: weight(&format!("{m}shared_expert.up_proj.weight"), si, h)?,
                    down: weight(&format!("{m}shared_expert.down_proj.weight"), h, si)?,
                    scale: weight(&format!("{m}shared_expert_gate.weight"), 1, h)?,
                }),
                None => None,
            };
            layers.push(Layer {
                input_norm: values(&format!("{p}input_layernorm.weight"), &[h])?,
                post_norm: values(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                mixer,
                router: weight(&format!("{m}gate.weight"), c.experts, h)?,
                shared,
            });
        }
        let embed = weight("embed_tokens.weight", c.vocab, h)?;
        let lm_head = if c.tie_embeddings { None } else { Some(weight("lm_head.weight", c.vocab, h)?) };
        backend.preload_experts(&*files.experts, &Routing::of(c)).context("loading the experts into device memory")?;
        Ok(Model {
            final_norm: values("norm.weight", &[h])?,
            embed,
            lm_head,
            layers,
            experts: files.experts.clone(),
            attention,
            delta,
            backend,
            config,
            profile: Mutex::default(),
            lookahead: std::env::var("FLASH_MOE_LOOKAHEAD").map_or(true, |v| v != "0"),
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn experts(&self) -> &dyn ExpertSource {
        &*self.experts
    }

    /// The time spent per phase since the last call (and resets it).
    pub fn take_profile(&self) -> Profile {
        std::mem::take(&mut *self.profile.lock().unwrap())
    }

    pub fn new_session(&self) -> Session<B> {
        let b = &self.backend;
        let layers = self
            .config
            .layers
            .iter()
            .map(|kind| match kind {
                LayerKind::Attention => LayerState::Attention(KvCache { k: b.zeros(0), v: b.zeros(0), capacity: 0 }),
                LayerKind::DeltaNet => LayerState::DeltaNet(DeltaNetState {
                    conv: b.zeros((self.delta.conv_kernel - 1) * self.delta.conv_width()),
                    ssm: b.zeros(self.delta.state_len()),
                }),
            })
            .collect();
        Session { layers, position: 0, graph: StepGraph::Warmup, ahead: None }
    }

    /// Runs `tokens` through the model at the session's position, all at once (prefill) or one
    /// at a time when called with single tokens (decode); both give the same logits.
    pub fn forward(&self, session: &mut Session<B>, tokens: &[u32], all_logits: bool, capture: bool) -> Result<Output> {
        let (c, b, n, past) = (&self.config, &self.backend, tokens.len(), session.position);
        self.settle(session)?;
        self.admit(session, tokens)?;
        let mut prof = Profile { tokens: n, ..Profile::default() };
        let (logits, hidden) = if n == 1 && !capture {
            (self.decode(session, tokens[0], &mut prof, |logits| b.read(logits, c.vocab))?, Vec::new())
        } else {
            let rows = if all_logits { n } else { 1 };
            let mut logits = b.scratch(rows * c.vocab);
            let hidden = self.queue(&mut session.layers, tokens, past, rows, capture, &mut prof, &mut logits)?;
            let mut clock = Stopwatch::start();
            let logits = b.read(&logits, rows * c.vocab);
            clock.lap(&mut prof.other);
            (logits, hidden)
        };
        session.position += n;
        self.profile.lock().unwrap().add(&prof);
        Ok(Output { logits, hidden })
    }

    /// Decodes `token` as `forward` does and returns the greedy choice of the next token (the
    /// largest logit, ties to the lowest id) instead of the logits: the backend finds it where
    /// the logits are, so that they never cross to the host (on the GPU a step's 1 MB copy and
    /// the host's copy out of its staging, 100 us a token).
    ///
    /// With a recorded step, the step after this one is queued before this one's choice comes
    /// back, waiting on the device for the token that the next call brings: the device goes from
    /// one step to the next without waiting for the host to launch it. A session left with such a
    /// step lets it pass (its states unchanged) at its next use other than this, or at
    /// [`settle`](Self::settle).
    pub fn forward_greedy(&self, session: &mut Session<B>, token: u32) -> Result<u32> {
        let (b, vocab) = (&self.backend, self.config.vocab);
        let ahead = session.ahead.take();
        if let Err(e) = self.admit(session, &[token]) {
            if let Some(step) = ahead {
                b.feed_step(step, None)?;
            }
            return Err(e);
        }
        let mut prof = Profile { tokens: 1, ..Profile::default() };
        let mut clock = Stopwatch::start();
        // The step queued ahead by the last call, unless something let it pass since; else a
        // replay queued now.
        let fed = match ahead {
            Some(step) if b.feed_step(step, Some(token))? => Some(step),
            _ => match self.queue_recorded(session, session.position)? {
                Some(step) if b.feed_step(step, Some(token))? => Some(step),
                _ => None,
            },
        };
        let next = match fed {
            Some(step) => {
                session.ahead = self.queue_recorded(session, session.position + 1)?;
                let next = b.take_pick(step)?;
                clock.lap(&mut prof.replayed);
                prof.replays += 1;
                next
            }
            None => self.decode(session, token, &mut prof, |logits| b.argmax(logits, vocab))?,
        };
        session.position += 1;
        self.profile.lock().unwrap().add(&prof);
        Ok(next)
    }

    /// Queues the session's recorded step at `position`, waiting for its token, with its greedy
    /// pick behind it: `None` where there is no recording, its caches have grown since, or they
    /// do not reach `position`.
    fn queue_recorded(&self, session: &Session<B>, position: usize) -> Result<Option<u64>> {
        let kv = session.kv_capacity();
        match &session.graph {
            StepGraph::Recorded { graph, logits, kv_capacity }
                if *kv_capacity == kv && (kv == 0 || position < kv) && position < self.config.max_positions =>
            {
                self.backend.queue_step(graph, Some((logits, self.config.vocab)), position)
            }
            _ => Ok(None),
        }
    }

    /// Lets the step that [`forward_greedy`](Self::forward_greedy) queued ahead of its token
    /// pass, leaving the session's states as they were: for callers that stop decoding (the
    /// session's other uses do it themselves).
    pub fn settle(&self, session: &mut Session<B>) -> Result<()> {
        if let Some(step) = session.ahead.take() {
            self.backend.feed_step(step, None)?;
        }
        Ok(())
    }

    /// Checks that `tokens` can go through the model at the session's position, and makes room
    /// for them in its caches.
    fn admit(&self, session: &mut Session<B>, tokens: &[u32]) -> Result<()> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            bail!("no tokens to process");
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            bail!("token id {bad} is out of range: the vocabulary has {} entries", c.vocab);
        }
        let past = session.position;
        if past + n > c.max_positions {
            bail!("{} tokens exceed the context of {} positions", past + n, c.max_positions);
        }
        self.reserve(session, past + n);
        Ok(())
    }

    /// One token at the session's position, its logits handed to `finish` (which reads them back
    /// or picks from them): a replay of the session's recorded step where the backend records
    /// steps, else the step queued directly.
    fn decode<T>(
        &self,
        session: &mut Session<B>,
        token: u32,
        prof: &mut Profile,
        finish: impl Fn(&B::Tensor) -> T,
    ) -> Result<T> {
        let (b, vocab, past) = (&self.backend, self.config.vocab, session.position);
        let kv = session.kv_capacity();
        let mut clock = Stopwatch::start();
        if let StepGraph::Recorded { graph, logits, kv_capacity } = &session.graph
            && *kv_capacity == kv
            && b.replay_step(graph, token, past)?
        {
            let out = finish(logits);
            clock.lap(&mut prof.replayed);
            prof.replays += 1;
            return Ok(out);
        }
        let mut logits = b.scratch(vocab);
        match session.graph {
            StepGraph::Pending | StepGraph::Recorded { .. } => {
                let layers = &mut session.layers;
                let mut step = || self.queue(layers, &[token], past, 1, false, prof, &mut logits).map(drop);
                let recorded = b.record_step(&Routing::of(&self.config), token, past, &mut step)?;
                if let Some(graph) = recorded {
                    let out = finish(&logits);
                    session.graph = StepGraph::Recorded { graph, logits, kv_capacity: kv };
                    return Ok(out);
                }
                session.graph = StepGraph::Unavailable;
            }
            StepGraph::Warmup => session.graph = StepGraph::Pending,
            StepGraph::Unavailable => {}
        }
        self.queue(&mut session.layers, &[token], past, 1, false, prof, &mut logits)?;
        clock = Stopwatch::start();
        let out = finish(&logits);
        clock.lap(&mut prof.other);
        Ok(out)
    }

    /// Queues `tokens` at positions `past..` through every layer (carrying `layers`' state) and
    /// the output head, whose logits for the last `rows` positions go to `logits`. Returns the
    /// residual stream after each layer when `capture`.
    #[allow(clippy::too_many_arguments)]
    fn queue(
        &self,
        layers: &mut [LayerState<B>],
        tokens: &[u32],
        past: usize,
        rows: usize,
        capture: bool,
        prof: &mut Profile,
        logits: &mut B::Tensor,
    ) -> Result<Vec<Vec<f32>>> {
        let (b, c, n) = (&self.backend, &self.config, tokens.len());
        let h = c.hidden;
        let mut clock = Stopwatch::start();
        let mut x = b.scratch(n * h);
        b.embed(&self.embed, tokens, &mut x);
        let mut normed = b.scratch(n * h);
        let mut mixed = b.scratch(n * h);
        let mut hidden = Vec::new();
        let (offset, eps) = (c.family.norm_offset(), c.rms_eps);
        // The previous layer's MoE output, added to the residual stream by the next norm.
        let mut pending: Option<B::Tensor> = None;
        for (i, (layer, state)) in self.layers.iter().zip(layers.iter_mut()).enumerate() {
            match pending.take() {
                Some(moe) => b.add_rms_norm(&mut x, &moe, &layer.input_norm, h, offset, eps, n, &mut normed),
                None => b.rms_norm(&x, &layer.input_norm, offset, eps, n, &mut normed),
            }
            clock.lap(&mut prof.other);
            match (&layer.mixer, state) {
                (Mixer::Attention { q, k, v, o, q_norm, k_norm }, LayerState::Attention(cache)) => {
                    let s = &self.attention;
                    let (mut qb, mut kb, mut vb) =
                        (b.scratch(n * s.q_width()), b.scratch(n * s.kv_width()), b.scratch(n * s.kv_width()));
                    b.matmul(q, &normed, n, &mut qb);
                    b.matmul(k, &normed, n, &mut kb);
                    b.matmul(v, &normed, n, &mut vb);
                    let mut attn = b.scratch(n * s.out_width());
                    b.attention(s, q_norm, k_norm, &qb, &kb, &vb, cache, past, n, &mut attn);
                    b.matmul(o, &attn, n, &mut mixed);
                    clock.lap(&mut prof.attention);
                }
                (Mixer::DeltaNet(d), LayerState::DeltaNet(dstate)) => {
                    self.delta_net(d, &normed, dstate, n, &mut mixed);
                    clock.lap(&mut prof.delta_net);
                }
                _ => unreachable!("session state built from the same layer list"),
            }
            b.add_rms_norm(&mut x, &mixed, &layer.post_norm, h, offset, eps, n, &mut normed);
            clock.lap(&mut prof.other);
            let moe = self.moe(i, layer, &normed, n, prof).with_context(|| format!("layer {i}"))?;
            clock = Stopwatch::start();
            if capture {
                b.add(&mut x, &moe, n * h);
                hidden.push(b.read(&x, n * h));
            } else {
                pending = Some(moe);
            }
        }
        if rows == n {
            match pending.take() {
                Some(moe) => b.add_rms_norm(&mut x, &moe, &self.final_norm, h, offset, eps, n, &mut normed),
                None => b.rms_norm(&x, &self.final_norm, offset, eps, n, &mut normed),
            }
        } else {
            if let Some(moe) = pending.take() {
                b.add(&mut x, &moe, n * h);
            }
            let last = b.tensor(&b.read(&x, n * h)[(n - 1) * h..]);
            b.rms_norm(&last, &self.final_norm, offset, eps, 1, &mut normed);
        }
        b.matmul(self.lm_head.as_ref().unwrap_or(&self.embed), &normed, rows, logits);
        clock.lap(&mut prof.other);
        Ok(hidden)
    }

    /// Grows the session's KV caches to hold at least `positions`, doubling to keep growth rare.
    fn reserve(&self, session: &mut Session<B>, positions: usize) {
        let w = self.attention.kv_width();
        let cap = positions.next_power_of_two().clamp(64, self.config.max_positions.max(positions));
        for state in &mut session.layers {
            if let LayerState::Attention(cache) = state
                && positions > cache.capacity
            {
                cache.k = self.backend.resized(&cache.k, cache.capacity * w, cap * w);
                cache.v = self.backend.resized(&cache.v, cache.capacity * w, cap * w);
                cache.capacity = cap;
            }
        }
    }

    fn delta_net(
        &self,
        d: &DeltaNetLayer<B>,
        x: &B::Tensor,
        state: &mut DeltaNetState<B>,
        n: usize,
        out: &mut B::Tensor,
    ) {
        let (b, s) = (&self.backend, &self.delta);
        let mut proj = b.scratch(n * s.proj_width());
        b.matmul(&d.in_proj, x, n, &mut proj);
        let params = DeltaNetParams { conv: &d.conv, a_log: &d.a_log, dt_bias: &d.dt_bias, norm: &d.norm };
        let mut o = b.scratch(n * s.value_width());
        b.delta_net(s, &params, &proj, state, n, &mut o);
        b.matmul(&d.out, &o, n, out);
    }

    /// Routed experts (each computed once for all the tokens routed to it, in ascending id as
    /// transformers accumulates them) plus the gated shared expert. A backend that routes on the
    /// device takes single tokens (decode) whole.
    fn moe(&self, layer: usize, l: &Layer<B>, x: &B::Tensor, n: usize, prof: &mut Profile) -> Result<B::Tensor> {
        let (b, c) = (&self.backend, &self.config);
        let mut clock = Stopwatch::start();
        let mut logits = b.scratch(n * c.experts);
        b.matmul(&l.router, x, n, &mut logits);
        if n == 1 {
            self.look_ahead(layer, x);
        }
        clock.lap(&mut prof.router);
        let mut acc = b.zeros(n * c.hidden);
        let shared = |acc: &mut B::Tensor| {
            if let Some(s) = &l.shared {
                self.shared_expert(s, x, n, acc);
            }
        };
        let (routing, store) = (Routing::of(c), &*self.experts);
        if let Some(uses) = b.routed_experts_on_device(layer, &routing, n, &logits, x, store, &shared, &mut acc)? {
            b.settle_experts(store);
            clock.lap(&mut prof.experts);
            prof.expert_uses += uses;
            return Ok(acc);
        }
        let logits = b.read(&logits, n * c.experts);
        let mut routes: BTreeMap<usize, (Vec<u32>, Vec<f32>)> = BTreeMap::new();
        for t in 0..n {
            for (e, w) in ops::route(&logits[t * c.experts..(t + 1) * c.experts], c.top_k, c.norm_topk) {
                let r = routes.entry(e).or_default();
                r.0.push(t as u32);
                r.1.push(w);
            }
        }
        let missing: Vec<usize> = routes.keys().copied().filter(|&e| !b.has_expert(layer, e)).collect();
        self.experts.prefetch(layer, &missing);
        clock.lap(&mut prof.router);
        // The shared expert runs while the routed experts are read.
        shared(&mut acc);
        clock.lap(&mut prof.shared_expert);
        // One batch request: the store reads whatever is not in RAM yet in parallel (and joins the
        // reads the prefetch started), so disk reads overlap each other even without a cache.
        let mut fetched: HashMap<usize, Expert> =
            missing.iter().copied().zip(self.experts.experts(layer, &missing)?).collect();
        clock.lap(&mut prof.expert_wait);
        for (e, (rows, scales)) in &routes {
            // An expert the device held a moment ago may have been evicted since: fetch it then.
            let fetch = || Ok(fetched.remove(e).map_or_else(|| self.experts.expert(layer, *e), Ok)?);
            let w = b.expert_weights(layer, *e, fetch)?;
            let [g, u, d] = w.matrices();
            clock.lap(&mut prof.expert_wait);
            b.expert_ffn(g, u, d, x, rows, scales, &mut acc);
            clock.lap(&mut prof.experts);
        }
        b.settle_experts(store);
        clock.lap(&mut prof.expert_wait);
        prof.expert_uses += routes.len();
        Ok(acc)
    }

    /// While some expert is on disk alone, guesses the experts layer `layer + 1` will take from
    /// its router applied to this layer's MoE input (the residual stream changes little from one
    /// layer to the next) and asks the store to start reading those it lacks: their reads overlap
    /// this layer's experts and the next layer's mixer instead of following them.
    fn look_ahead(&self, layer: usize, x: &B::Tensor) {
        let (b, c) = (&self.backend, &self.config);
        let Some(next) = self.layers.get(layer + 1).filter(|_| self.lookahead) else { return };
        let cached =
            self.experts.stats().resident_experts as usize + b.expert_tier_stats().map_or(0, |s| s.resident_experts);
        if cached >= self.layers.len() * c.experts {
            return;
        }
        let mut logits = b.scratch(c.experts);
        b.matmul(&next.router, x, 1, &mut logits);
        let logits = b.read(&logits, c.experts);
        let guess: Vec<usize> = ops::route(&logits, c.top_k, c.norm_topk)
            .into_iter()
            .map(|(e, _)| e)
            .filter(|&e| !b.has_expert(layer + 1, e))
            .collect();
        self.experts.prefetch(layer + 1, &guess);
    }

    fn shared_expert(&self, s: &SharedExpert<B>, x: &B::Tensor, n: usize, acc: &mut B::Tensor) {
        let b = &self.backend;
        let mut gate = b.scratch(n);
        b.matmul(&s.scale, x, n, &mut gate);
        b.shared_expert(&s.gate, &s.up, &s.down, &gate, x, n, acc);
    }
}

/// Adds the time since the previous lap to a phase.
struct Stopwatch(Instant);

impl Stopwatch {
    fn start() -> Self {
        Stopwatch(Instant::now())
    }

    fn lap(&mut self, slot: &mut Duration) {
        let now = Instant::now();
        *slot += now - self.0;
        self.0 = now;
    }
}

impl Profile {
    fn add(&mut self, o: &Profile) {
        self.attention += o.attention;
        self.delta_net += o.delta_net;
        self.router += o.router;
        self.expert_wait += o.expert_wait;
        self.experts += o.experts;
        self.shared_expert += o.shared_expert;
        self.other += o.other;
        self.replayed += o.replayed;
        self.tokens += o.tokens;
        self.expert_uses += o.expert_uses;
        self.replays += o.replays;
    }
}

/// Row orders of `in_proj_qkvz` and `in_proj_ba` (row `i` of the result is row `order[i]`) that
/// turn Qwen3-Next's per-key-head groups `[q_g | k_g | v_g | z_g]` and `[b_g | a_g]` into
/// `q | k | v | z` and `b | a`.
fn fused_orders(s: &DeltaNetShape) -> (Vec<u32>, Vec<u32>) {
    let r = s.v_heads / s.k_heads;
    let (dk, rv) = (s.k_dim, r * s.v_dim);
    let group = 2 * dk + 2 * rv;
    let part = |offset: usize, len: usize| -> Vec<u32> {
        (0..s.k_heads).flat_map(|g| (0..len).map(move |i| (g * group + offset + i) as u32)).collect()
    };
    let qkvz = [part(0, dk), part(dk, dk), part(2 * dk, rv), part(2 * dk + rv, rv)].concat();
    let ba_part = |offset: usize| -> Vec<u32> {
        (0..s.k_heads).flat_map(|g| (0..r).map(move |i| (g * 2 * r + offset + i) as u32)).collect()
    };
    let ba = [ba_part(0), ba_part(r)].concat();
    (qkvz, ba)
}

/// The family a model directory holds, for messages.
pub fn describe(c: &ModelConfig) -> String {
    let kinds = |k| c.layers.iter().filter(|l| **l == k).count();
    let family = match c.family {
        Family::Qwen35Moe => "Qwen3.5-MoE",
        Family::Qwen3Next => "Qwen3-Next",
        Family::Qwen3Moe => "Qwen3-MoE",
    };
    format!(
        "{family} ({}): {} layers ({} attention, {} DeltaNet), hidden {}, {} experts top-{}",
        c.family.name(),
        c.layers.len(),
        kinds(LayerKind::Attention),
        kinds(LayerKind::DeltaNet),
        c.hidden,
        c.experts,
        c.top_k
    )
}
