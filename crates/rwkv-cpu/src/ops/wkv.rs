//! The WKV6 recurrence of spec section 2.4, sequential over the tokens of one sequence.

/// Per-token inputs of one sequence, each [T, C] row-major, and the bonus u [C].
pub struct WkvInputs<'a> {
    pub r: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    /// The decay exp(-exp(d)), already computed, in (0, 1).
    pub w: &'a [f32],
    pub u: &'a [f32],
}

/// Runs the recurrence for every token, writing y [T, C] and updating `state` [H][key][value].
pub fn wkv6_sequence(inp: &WkvInputs<'_>, head_size: usize, state: &mut [f32], y: &mut [f32]) {
    let c = inp.u.len();
    wkv6_heads(inp, head_size, 0, state, y, c);
}

/// The recurrence for the heads `first..first + state.len() / N²` only: `state` holds those
/// heads and `y` is [T, y_width] with the heads' outputs at columns `0..heads·N`.
/// Same arithmetic on every CPU; with AVX2 the loops are just compiled wider (no FMA
/// contraction happens without fast-math, so results are bit-identical).
pub fn wkv6_heads(
    inp: &WkvInputs<'_>,
    head_size: usize,
    first: usize,
    state: &mut [f32],
    y: &mut [f32],
    y_width: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: avx2 was just detected; the function has no other preconditions.
        unsafe { wkv6_heads_avx2(inp, head_size, first, state, y, y_width) };
        return;
    }
    wkv6_heads_generic(inp, head_size, first, state, y, y_width);
}

/// # Safety
/// The CPU must support avx2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn wkv6_heads_avx2(
    inp: &WkvInputs<'_>,
    head_size: usize,
    first: usize,
    state: &mut [f32],
    y: &mut [f32],
    y_width: usize,
) {
    wkv6_heads_generic(inp, head_size, first, state, y, y_width);
}

#[inline(always)]
fn wkv6_heads_generic(
    inp: &WkvInputs<'_>,
    head_size: usize,
    first: usize,
    state: &mut [f32],
    y: &mut [f32],
    y_width: usize,
) {
    let c = inp.u.len();
    let n = head_size;
    let heads = state.len() / (n * n);
    for (t, y_t) in y.chunks_exact_mut(y_width).enumerate() {
        let row = t * c..(t + 1) * c;
        let (r, k, v, w) = (
            &inp.r[row.clone()],
            &inp.k[row.clone()],
            &inp.v[row.clone()],
            &inp.w[row],
        );
        for (i, s) in state.chunks_exact_mut(n * n).enumerate().take(heads) {
            let h = first + i;
            let hr = h * n..(h + 1) * n;
            let yr = i * n..(i + 1) * n;
            let head = WkvInputs {
                r: &r[hr.clone()],
                k: &k[hr.clone()],
                v: &v[hr.clone()],
                w: &w[hr.clone()],
                u: &inp.u[hr.clone()],
            };
            wkv6_head_step(&head, s, &mut y_t[yr]);
        }
    }
}

#[inline(always)]
/// One token of one head: y[j] = Σ_i r[i]·(u[i]·k[i]·v[j] + S[i][j]); S[i][j] = w[i]·S[i][j] + k[i]·v[j].
fn wkv6_head_step(head: &WkvInputs<'_>, s: &mut [f32], y: &mut [f32]) {
    let WkvInputs { r, k, v, w, u } = *head;
    let n = v.len();
    y.fill(0.0);
    for (i, s_row) in s.chunks_exact_mut(n).enumerate() {
        let (ri, ki, wi) = (r[i], k[i], w[i]);
        let bonus = u[i] * ki;
        for j in 0..n {
            let kv = ki * v[j];
            y[j] += ri * (bonus * v[j] + s_row[j]);
            s_row[j] = s_row[j] * wi + kv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_head_step_matches_hand_computation() {
        // N = 2, one head, one token, state S = [[1, 2], [3, 4]].
        let (r, k, v, w, u) = ([1.0, 2.0], [0.5, -1.0], [2.0, 3.0], [0.5, 0.25], [0.1, 0.2]);
        let mut s = vec![1.0, 2.0, 3.0, 4.0];
        let mut y = vec![0.0; 2];
        let inp = WkvInputs {
            r: &r,
            k: &k,
            v: &v,
            w: &w,
            u: &u,
        };
        wkv6_sequence(&inp, 2, &mut s, &mut y);
        // y[j] = Σ_i r_i (u_i k_i v_j + S_ij)
        let y0 = r[0] * (u[0] * k[0] * v[0] + 1.0) + r[1] * (u[1] * k[1] * v[0] + 3.0);
        let y1 = r[0] * (u[0] * k[0] * v[1] + 2.0) + r[1] * (u[1] * k[1] * v[1] + 4.0);
        assert_eq!(y, vec![y0, y1]);
        assert_eq!(s, vec![0.5 + 1.0, 1.0 + 1.5, 0.75 - 2.0, 1.0 - 3.0]);
    }
}
