//! LayerNorm over rows and the per-head GroupNorm of the time-mix output.

pub use rwkv_model::weights::layer_norm_in_place;

/// LayerNorm eps of ln1, ln2 and ln_out.
pub const LN_EPS: f32 = 1e-5;
/// GroupNorm eps of `ln_x`: 1e-5 · head_size_divisor² with divisor 8, as hard-coded by the reference.
pub const GN_EPS: f32 = 64e-5;

/// `out = LN(x)` row by row.
pub fn layer_norm_rows(x: &[f32], weight: &[f32], bias: &[f32], out: &mut [f32]) {
    out.copy_from_slice(x);
    for row in out.chunks_exact_mut(weight.len()) {
        layer_norm_in_place(row, weight, bias, LN_EPS);
    }
}

/// GroupNorm with one group per head of `head_size` channels, then the per-channel affine.
pub fn group_norm_rows(y: &mut [f32], head_size: usize, weight: &[f32], bias: &[f32]) {
    for row in y.chunks_exact_mut(weight.len()) {
        for (h, group) in row.chunks_exact_mut(head_size).enumerate() {
            let range = h * head_size..(h + 1) * head_size;
            layer_norm_in_place(group, &weight[range.clone()], &bias[range], GN_EPS);
        }
    }
}
