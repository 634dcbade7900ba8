//! Branch-free loops over the whole vocabulary that the compiler can vectorise.
//!
//! Sampling is a handful of passes over 65,536 floats per token and per sequence, so each pass
//! must run at vector speed: libm's scalar `expf` costs ~5 ns per call, and a single running sum
//! is a serial dependency chain. Here every loop keeps [`LANES`] independent accumulators and
//! avoids branches and library calls, which LLVM turns into SIMD even for baseline x86-64.

use crate::logprobs::clean;

/// Independent accumulators per loop; 8 fills two SSE or one AVX register of f32.
const LANES: usize = 8;

/// `exp(x)` for `x <= 0`, within 2 ulp of `f32::exp`; results below `f32::MIN_POSITIVE` flush to 0.
///
/// The Cephes `expf` scheme: `x = n·ln2 + r` with `|r| <= ln2/2`, a degree-6 polynomial for
/// `exp(r)`, and `2^n` built from exponent bits. Flushing the subnormal tail changes nothing a
/// sampler can observe (those probabilities are below 1e-38).
#[inline]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5·2^23 rounds to an integer in the low mantissa bits, without a libm `round`.
    const ROUNDER: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const SMALLEST: f32 = -87.336_54; // ln(f32::MIN_POSITIVE)
    let y = x.max(SMALLEST) * LOG2_E + ROUNDER;
    let n = y - ROUNDER;
    let r = x.max(SMALLEST) - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
    let exp_r = p * r * r + r + 1.0;
    // n is in [-126, 0] here, so the biased exponent n + 127 is a valid normal exponent.
    let n_int = y.to_bits() as i32 - ROUNDER.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < SMALLEST {
        0.0
    } else {
        exp_r * scale
    }
}

/// Replaces NaN by -inf and +inf by `f32::MAX` in place, and returns the maximum.
pub(crate) fn clean_and_max(logits: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = logits.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (m, l) in lanes.iter_mut().zip(chunk) {
            *l = clean(*l);
            *m = if *l > *m { *l } else { *m };
        }
    }
    let mut max = lanes.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for l in chunks.into_remainder() {
        *l = clean(*l);
        max = max.max(*l);
    }
    max
}

/// The index of the first maximum of the cleaned logits (NaN as -inf, +inf as `f32::MAX`) and
/// that maximum, leaving `logits` as they are: greedy sampling's answer. `(0, -inf)` when every
/// logit is -inf or NaN.
///
/// Two read-only vectorised passes, the second stopping at the maximum. Writing nothing matters:
/// a batch's logits are far larger than the caches, so this is bound by memory traffic. (Tracking
/// indices in the first pass looks cheaper, but LLVM keeps them in scalar registers, which made
/// it twice as slow.)
pub(crate) fn argmax(logits: &[f32]) -> (u32, f32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            let l = clean(l);
            *m = if l > *m { l } else { *m };
        }
    }
    let max = lanes
        .into_iter()
        .chain(rest.iter().map(|&l| clean(l)))
        .fold(f32::NEG_INFINITY, f32::max);
    (first_index(logits, |l| clean(l) == max, max), max)
}

/// The first index where `is_max` holds, scanning blocks without early exit inside a block (so
/// the comparisons vectorise) and stopping at the first block that has one. 0 when `max` is
/// -inf: nothing can be chosen, and greedy sampling then returns token 0.
fn first_index(xs: &[f32], is_max: impl Fn(f32) -> bool, max: f32) -> u32 {
    const BLOCK: usize = 64;
    if max == f32::NEG_INFINITY {
        return 0;
    }
    for (b, block) in xs.chunks(BLOCK).enumerate() {
        if block.iter().fold(false, |hit, &l| hit | is_max(l)) {
            let at = block.iter().position(|&l| is_max(l)).unwrap_or(0);
            return (b * BLOCK + at) as u32;
        }
    }
    0
}

/// `max + ln(sum(exp(l - max)))` over the cleaned logits: the log-softmax normaliser. `max`
/// must be their (finite) maximum. Terms are the 2-ulp `exp` below, summed in `f64` lanes, so
/// the result is within ~3e-7 of the exact value.
pub(crate) fn log_sum_exp(logits: &[f32], max: f32) -> f64 {
    let term = |l: f32| f64::from(exp_nonpositive(clean(l) - max));
    let mut lanes = [0.0f64; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (acc, &l) in lanes.iter_mut().zip(chunk) {
            *acc += term(l);
        }
    }
    let sum = lanes.iter().sum::<f64>() + rest.iter().map(|&l| term(l)).sum::<f64>();
    f64::from(max) + sum.ln()
}

/// Writes `out[i] = exp((logits[i] - max) · scale)` and returns the sum of `out`.
///
/// `max` must be the maximum of `logits` and `scale` positive, so every exponent is `<= 0`. The
/// sum is accumulated in `f32` lanes and added up in `f64`.
pub(crate) fn exp_shifted(logits: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f64 {
    debug_assert_eq!(logits.len(), out.len());
    // Two simple loops rather than one fused loop: LLVM vectorises each of them, but not the
    // fused version (the store-then-accumulate pattern defeats its SLP pass).
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { exp_into_avx2(logits, max, scale, out) };
        return sum(out);
    }
    exp_into(logits, max, scale, out);
    sum(out)
}

#[inline(always)]
fn exp_into(logits: &[f32], max: f32, scale: f32, out: &mut [f32]) {
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = exp_nonpositive((l - max) * scale);
    }
}

/// [`exp_into`] compiled for AVX2: twice the lanes of baseline x86-64's SSE2. The same IEEE
/// operations in the same order (Rust never fuses a multiply-add on its own, and FMA is not
/// enabled), so the results are bit-identical to the baseline path; only the speed differs. This
/// pass is half of a top-p sampling step over 65,536 logits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_into_avx2(logits: &[f32], max: f32, scale: f32, out: &mut [f32]) {
    exp_into(logits, max, scale, out);
}

/// Sum of `xs`, in `f32` lanes added up in `f64`.
pub(crate) fn sum(xs: &[f32]) -> f64 {
    let mut lanes = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (acc, &x) in lanes.iter_mut().zip(chunk) {
            *acc += x;
        }
    }
    lanes.iter().chain(rest).map(|&x| f64::from(x)).sum()
}

/// How many entries are `>= threshold`, and their sum.
///
/// The `f32` lane sums carry a relative error around 1e-6 for 65,536 entries; callers only use the
/// result to decide whether a threshold is worth trying, never for the cutoff itself.
pub(crate) fn mass_above(xs: &[f32], threshold: f32) -> (usize, f64) {
    let mut mass = [0.0f32; LANES];
    let mut count = [0u32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for ((m, c), &x) in mass.iter_mut().zip(&mut count).zip(chunk) {
            let keep = x >= threshold;
            *m += if keep { x } else { 0.0 };
            *c += u32::from(keep);
        }
    }
    let kept_rest = rest.iter().filter(|&&x| x >= threshold);
    let total = mass.iter().map(|&m| f64::from(m)).sum::<f64>()
        + kept_rest.clone().map(|&x| f64::from(x)).sum::<f64>();
    let n = count.iter().map(|&c| c as usize).sum::<usize>() + kept_rest.count();
    (n, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn exp_matches_the_library_within_two_ulp_on_its_whole_range() {
        let mut x = 0.0f32;
        while x > -87.3 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(ulps(got, want) <= 2, "exp({x}) = {got}, want {want}");
            x -= 0.000_731;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn the_avx2_exp_pass_is_bit_identical_to_the_baseline_one() {
        let logits: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 2000) as f32 * -0.05)
            .collect();
        let (mut base, mut wide) = (vec![0.0; logits.len()], vec![0.0; logits.len()]);
        exp_into(&logits, 0.5, 0.7, &mut base);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            unsafe { exp_into_avx2(&logits, 0.5, 0.7, &mut wide) };
            let same = base
                .iter()
                .zip(&wide)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same);
        }
        assert!(base.iter().all(|v| v.is_finite() && *v >= 0.0));
    }

    #[test]
    fn exp_shifted_writes_every_entry_and_returns_their_sum() {
        let logits: Vec<f32> = (0..11).map(|i| -(i as f32)).collect();
        let mut out = vec![0.0; 11];
        let total = exp_shifted(&logits, 0.0, 0.5, &mut out);
        let want: Vec<f32> = logits.iter().map(|l| (l * 0.5).exp()).collect();
        assert!(out.iter().zip(&want).all(|(a, b)| ulps(*a, *b) <= 2));
        let want_total: f64 = want.iter().map(|&x| f64::from(x)).sum();
        assert!((total - want_total).abs() < 1e-6);
    }

    #[test]
    fn max_cleans_non_finite_values_and_sees_the_remainder() {
        let mut xs = vec![0.0f32; 19];
        xs[3] = f32::NAN;
        xs[18] = 4.0;
        assert_eq!(clean_and_max(&mut xs), 4.0);
        assert_eq!(xs[3], f32::NEG_INFINITY);
        xs[5] = f32::INFINITY;
        assert_eq!(clean_and_max(&mut xs), f32::MAX);
        assert_eq!(clean_and_max(&mut []), f32::NEG_INFINITY);
    }

    #[test]
    fn argmax_reads_non_finite_values_as_cleaned_and_sees_the_remainder() {
        let mut xs = vec![0.0f32; 19];
        xs[3] = f32::NAN;
        xs[18] = 4.0;
        assert_eq!(argmax(&xs), (18, 4.0));
        assert!(xs[3].is_nan(), "left as it was");
        xs[5] = f32::INFINITY;
        assert_eq!(argmax(&xs), (5, f32::MAX));
        assert_eq!(argmax(&[]), (0, f32::NEG_INFINITY));
        assert_eq!(argmax(&[f32::NAN; 20]), (0, f32::NEG_INFINITY));
    }

    /// The scalar definition: first index of the maximum after cleaning.
    fn first_max(xs: &[f32]) -> (u32, f32) {
        let cleaned: Vec<f32> = xs.iter().map(|&l| clean(l)).collect();
        let max = cleaned.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let at = cleaned.iter().position(|&l| l == max).unwrap_or(0);
        (at as u32, max)
    }

    #[test]
    fn argmax_is_the_first_maximum_in_every_lane_and_remainder_position() {
        // Few distinct values, so every row has ties, spread over lanes and the remainder.
        let mut state = 12345u32;
        for len in [1, 7, 8, 9, 16, 37, 100, 1003] {
            for _ in 0..50 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        match (state >> 16) % 7 {
                            0 => f32::NAN,
                            1 => f32::NEG_INFINITY,
                            v => v as f32,
                        }
                    })
                    .collect();
                let want = first_max(&xs);
                assert_eq!(argmax(&xs), want, "{xs:?}");
            }
        }
    }

    #[test]
    fn log_sum_exp_matches_an_f64_computation() {
        let xs: Vec<f32> = (0..1001)
            .map(|i| ((i * 7919) % 613) as f32 / 37.0 - 8.0)
            .collect();
        let (_, max) = argmax(&xs);
        let want = xs.iter().map(|&l| f64::from(l).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&xs, max) - want).abs() < 1e-6);
        let with_holes = [f32::NAN, 1.0, f32::NEG_INFINITY, 1.0];
        assert!((log_sum_exp(&with_holes, 1.0) - (1.0 + 2f64.ln())).abs() < 1e-6);
    }

    #[test]
    fn mass_above_counts_and_sums_including_the_remainder() {
        let xs: Vec<f32> = (0..21).map(|i| i as f32).collect();
        assert_eq!(mass_above(&xs, 15.0), (6, 105.0));
        assert_eq!(mass_above(&xs, 100.0), (0, 0.0));
    }
}
