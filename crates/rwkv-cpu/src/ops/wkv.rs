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
    let n = head_size;
    for (t, y_t) in y.chunks_exact_mut(c).enumerate() {
        let row = t * c..(t + 1) * c;
        let (r, k, v, w) = (
            &inp.r[row.clone()],
            &inp.k[row.clone()],
            &inp.v[row.clone()],
            &inp.w[row],
        );
        for (h, s) in state.chunks_exact_mut(n * n).enumerate() {
            let hr = h * n..(h + 1) * n;
            let head = WkvInputs {
                r: &r[hr.clone()],
                k: &k[hr.clone()],
                v: &v[hr.clone()],
                w: &w[hr.clone()],
                u: &inp.u[hr.clone()],
            };
            wkv6_head_step(&head, s, &mut y_t[hr]);
        }
    }
}

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
