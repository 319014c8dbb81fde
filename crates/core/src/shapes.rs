//! Shapes of the two mixer layers, shared by the model and every backend.

/// Shape and conventions of a full-attention layer.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub rope_theta: f64,
    /// `q_proj` holds `[query | gate]` per head and the output is multiplied by `sigmoid(gate)`.
    pub gated: bool,
    /// 1 for zero-centred q/k norms (`1 + w`), 0 for plain ones.
    pub norm_offset: f32,
    pub eps: f32,
}

impl AttentionShape {
    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim * if self.gated { 2 } else { 1 }
    }
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub fn out_width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Shape of a GatedDeltaNet layer.
#[derive(Clone, Copy, Debug)]
pub struct DeltaNetShape {
    pub k_heads: usize,
    pub v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub conv_kernel: usize,
    pub eps: f32,
}

impl DeltaNetShape {
    pub fn key_width(&self) -> usize {
        self.k_heads * self.k_dim
    }
    pub fn value_width(&self) -> usize {
        self.v_heads * self.v_dim
    }
    pub fn conv_width(&self) -> usize {
        2 * self.key_width() + self.value_width()
    }
    /// Columns of the input projection: the conv channels (q, k, v), then z (`value_width`),
    /// then b and a (`v_heads` each).
    pub fn proj_width(&self) -> usize {
        self.conv_width() + self.value_width() + 2 * self.v_heads
    }
    pub fn state_len(&self) -> usize {
        self.v_heads * self.k_dim * self.v_dim
    }
}
