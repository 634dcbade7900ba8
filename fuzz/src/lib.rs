//! What the fuzz targets and the seed generator (`src/bin/gen_seeds.rs`) must agree on.

use rwkv_model::{DType, ModelConfig};

/// The model hash session exports in the `state_import` target are bound to.
pub const STATE_HASH: [u8; 32] = [7; 32];

/// The small model the `state_import` target decodes exports for.
pub fn state_config() -> ModelConfig {
    ModelConfig {
        n_embd: 8,
        n_layer: 2,
        n_head: 1,
        head_size: 8,
        dim_ffn: 16,
        vocab_size: 10,
        maa_lora: 2,
        decay_lora: 2,
        weight_dtype: DType::F32,
        has_time_state: false,
    }
}
