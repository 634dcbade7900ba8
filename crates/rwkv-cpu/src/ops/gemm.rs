//! Fast products `Y = X · Wᵀ` with `W` kept in its file dtype (bf16) or quantized to int8 with one
//! scale per output row, and f32 activations and accumulation.
//!
//! `W` [out, in] is repacked at load time into panels of [`NR`] = 16 output rows: a panel holds,
//! for each input index k, the 16 weights `W[p·16 + j][k]` side by side, so one 32-byte (bf16) or
//! 16-byte (int8) load feeds 16 outputs. A micro-kernel multiplies up to [`MR`] activation rows
//! by one panel, broadcasting `x[m][k]` and keeping `MR × 16` f32 accumulators in registers, so the
//! panel is read once per `MR` rows (batched decode reads the weights once per step for up to six
//! sequences at a time, and the panel stays in L1/L2 for the next tile).
//!
//! bf16 panels interleave each group of 16 as `n0 n8 n1 n9 … n7 n15`: read as 32-bit lanes, the
//! low halves are `n0..n7` and the high halves `n8..n15`, so widening to f32 is one shift and one
//! AND, no shuffles. The AVX-512 kernel widens the same 16 values in memory order into one
//! register and un-permutes the 16 sums when it stores them.
//!
//! Kernels: AVX-512F, AVX2+FMA and portable scalar code, chosen by runtime feature detection
//! ([`Isa::detect`]). All of them compute the same sums in f32; they differ only in rounding
//! (FMA vs separate multiply-add, and the order of partial sums).

use std::sync::atomic::{AtomicUsize, Ordering};

use super::pool::{split, Pool};

/// Output rows per panel.
pub const NR: usize = 16;
/// Activation rows per micro-kernel call.
pub const MR: usize = 6;

/// An accumulator tile: `MR` activation rows by `NR` outputs.
type Tile = [[f32; NR]; MR];

/// Panel slot of output `j` within a bf16 panel group (see the module docs).
const fn bf16_slot(j: usize) -> usize {
    if j < 8 {
        2 * j
    } else {
        2 * (j - 8) + 1
    }
}

/// The instruction set a kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best kernel set this CPU supports.
    pub fn detect() -> Self {
        Self::available()
            .into_iter()
            .last()
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU can run the kernel set.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every kernel set this CPU can run, portable first.
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }
}

/// Packed weight storage.
#[derive(Clone, Debug)]
enum Data {
    /// bf16 bit patterns, panels interleaved as in the module docs.
    Bf16(Vec<u16>),
    /// int8 values in plain panel order, and one f32 scale per output row.
    Int8 { q: Vec<i8>, scale: Vec<f32> },
}

/// A weight matrix `W` [rows = outputs, cols = inputs] in panel layout.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    panels: usize,
    data: Data,
}

impl PackedMatrix {
    /// Packs bf16 bits stored [out, in] row-major (nn.Linear layout).
    pub fn bf16(rows: usize, cols: usize, bits: &[u16]) -> Self {
        assert_eq!(bits.len(), rows * cols, "matrix data length");
        let panels = rows.div_ceil(NR);
        let mut data = vec![0u16; panels * cols * NR];
        for n in 0..rows {
            let (p, j) = (n / NR, n % NR);
            let base = p * cols * NR + bf16_slot(j);
            for (k, &b) in bits[n * cols..(n + 1) * cols].iter().enumerate() {
                data[base + k * NR] = b;
            }
        }
        Self {
            rows,
            cols,
            panels,
            data: Data::Bf16(data),
        }
    }

    /// Packs bf16 bits stored [in, out] (the LoRA matrices).
    pub fn bf16_from_in_out(inputs: usize, outputs: usize, bits: &[u16]) -> Self {
        assert_eq!(bits.len(), inputs * outputs, "matrix data length");
        let mut t = vec![0u16; bits.len()];
        for i in 0..inputs {
            for o in 0..outputs {
                t[o * inputs + i] = bits[i * outputs + o];
            }
        }
        Self::bf16(outputs, inputs, &t)
    }

    /// Quantizes f32 values stored [out, in] to int8 with one scale per output row:
    /// `scale = max|w| / 127`, `q = round(w / scale)`.
    pub fn int8(rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols, "matrix data length");
        let panels = rows.div_ceil(NR);
        let mut q = vec![0i8; panels * cols * NR];
        let mut scale = vec![0.0f32; panels * NR];
        for n in 0..rows {
            let row = &values[n * cols..(n + 1) * cols];
            let max = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            scale[n] = s;
            let (p, j) = (n / NR, n % NR);
            for (k, &v) in row.iter().enumerate() {
                q[p * cols * NR + k * NR + j] = (v / s).round().clamp(-127.0, 127.0) as i8;
            }
        }
        Self {
            rows,
            cols,
            panels,
            data: Data::Int8 { q, scale },
        }
    }

    /// Bytes of weight data (excluding padding bookkeeping).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Data::Bf16(d) => d.len() * 2,
            Data::Int8 { q, scale } => q.len() + scale.len() * 4,
        }
    }

    /// Element `W[n][k]` as the kernels see it (dequantized for int8).
    pub fn get(&self, n: usize, k: usize) -> f32 {
        let (p, j) = (n / NR, n % NR);
        let base = p * self.cols * NR + k * NR;
        match &self.data {
            Data::Bf16(d) => f32::from_bits(u32::from(d[base + bf16_slot(j)]) << 16),
            Data::Int8 { q, scale } => f32::from(q[base + j]) * scale[n],
        }
    }

    /// `Σ_k x[k] · W[n][k]` for one output row (candidate-token logits).
    pub fn row_dot(&self, n: usize, x: &[f32]) -> f32 {
        assert_eq!(x.len(), self.cols);
        let (p, j) = (n / NR, n % NR);
        let base = p * self.cols * NR;
        match &self.data {
            Data::Bf16(d) => {
                let s = bf16_slot(j);
                x.iter()
                    .enumerate()
                    .map(|(k, xv)| xv * f32::from_bits(u32::from(d[base + k * NR + s]) << 16))
                    .sum()
            }
            Data::Int8 { q, scale } => {
                let dot: f32 = x
                    .iter()
                    .enumerate()
                    .map(|(k, xv)| xv * f32::from(q[base + k * NR + j]))
                    .sum();
                dot * scale[n]
            }
        }
    }
}

/// A raw output pointer shared by the parts of a product; each part writes disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the parts of one product write disjoint (row, column) cells, and `matmul` does not
// return before every part is done, so sharing the pointer between threads is race-free.
unsafe impl Send for OutPtr {}
// SAFETY: see above.
unsafe impl Sync for OutPtr {}

/// Below this many multiply-adds a product runs on the calling thread alone.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `out[t][o] = Σ_i x[t][i] · W[o][i]` for `t < rows`; `out` is [rows, w.rows].
pub fn matmul(pool: &Pool, isa: Isa, x: &[f32], rows: usize, w: &PackedMatrix, out: &mut [f32]) {
    matmul_impl(pool, isa, x, rows, w, None, out);
}

/// [`matmul`] that skips the inputs which are zero in every row, reading only their weights'
/// complement: ffn.value after relu² at small batch (decode), where most inputs are exactly 0.
/// Falls back to the dense product when fewer than a quarter of the inputs are zero. Skipping
/// exact zeros changes no term of the sum, only the grouping of the partial sums.
pub fn matmul_skip_zeros(
    pool: &Pool,
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &PackedMatrix,
    out: &mut [f32],
) {
    assert_eq!(x.len(), rows * w.cols, "matmul input shape");
    let nz = NonZero::of(x, rows, w.cols);
    if nz.len() * 4 > w.cols * 3 {
        matmul_impl(pool, isa, x, rows, w, None, out);
    } else {
        matmul_impl(pool, isa, x, rows, w, Some(&nz), out);
    }
}

fn matmul_impl(
    pool: &Pool,
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &PackedMatrix,
    sparse: Option<&NonZero>,
    out: &mut [f32],
) {
    assert_eq!(x.len(), rows * w.cols, "matmul input shape");
    // The SIMD kernels may only run where the CPU has their features (their safety contract).
    assert!(
        isa.is_supported(),
        "this CPU cannot run the {isa:?} kernels"
    );
    assert_eq!(out.len(), rows * w.rows, "matmul output shape");
    if out.is_empty() {
        return;
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let parts = if rows * w.rows * w.cols < PARALLEL_MIN_WORK {
        1
    } else {
        pool.threads().min(w.panels)
    };
    // Panels are handed out in chunks from a shared counter, so a thread that the OS delays
    // (shared 2-core machines) leaves its remaining chunks to the other one.
    let chunks = if parts == 1 {
        1
    } else {
        (parts * 8).min(w.panels)
    };
    let next = AtomicUsize::new(0);
    let job = |part: usize| {
        if part < parts {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    break;
                }
                let panels = split(w.panels, chunks, c);
                // SAFETY: each chunk index is taken by exactly one thread, and a chunk writes
                // only the columns of its own panels, for rows < `rows`, all inside `out`
                // (checked above).
                unsafe { matmul_panels(isa, x, rows, w, panels, sparse, ptr) };
            }
        }
    };
    if parts == 1 {
        job(0);
    } else {
        pool.run(job);
    }
}

/// Activation rows processed per pass over a thread's panels: the block of `x` (f32) stays
/// within about 256 KiB so it is re-read from L2 for every panel.
fn row_block(cols: usize) -> usize {
    ((256 * 1024 / 4 / cols.max(1)) / MR * MR).max(MR)
}

/// Inputs per k-block: a panel slice (KC × 16 bf16 = 8 KiB) and an `MR`-row slice of `x`
/// (6 KiB) stay in L1 while a tile is computed; partial sums go through `out`.
fn k_blocks(cols: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    const KC: usize = 256;
    let n = cols.div_ceil(KC).max(1);
    let kc = cols.div_ceil(n);
    (0..n).map(move |b| b * kc..((b + 1) * kc).min(cols))
}

/// Computes the columns of `panels` for every row.
///
/// # Safety
/// `out` must point to a [rows, w.rows] buffer whose columns in `panels` no one else accesses.
unsafe fn matmul_panels(
    isa: Isa,
    x: &[f32],
    rows: usize,
    w: &PackedMatrix,
    panels: std::ops::Range<usize>,
    sparse: Option<&NonZero>,
    out: OutPtr,
) {
    let k = w.cols;
    let block = row_block(k);
    let scale = match &w.data {
        Data::Bf16(_) => None,
        Data::Int8 { scale, .. } => Some(scale.as_slice()),
    };
    // With a single tile of rows the panel is read once anyway; k-blocking only pays when
    // several tiles reuse it.
    let k_blocks: Vec<_> = if rows <= MR || sparse.is_some() {
        std::iter::once(0..k).collect()
    } else {
        k_blocks(k).collect()
    };
    let mut tile: Tile = [[0.0; NR]; MR];
    for b0 in (0..rows).step_by(block) {
        let b1 = (b0 + block).min(rows);
        for (kb, ks) in k_blocks.iter().enumerate() {
            let last = ks.end == k;
            for p in panels.clone() {
                let width = NR.min(w.rows - p * NR);
                for m0 in (b0..b1).step_by(MR) {
                    let m = MR.min(b1 - m0);
                    let cols = match sparse {
                        Some(nz) => Cols::Index(nz),
                        None => Cols::Range(ks.start, ks.end),
                    };
                    tile_dispatch(isa, &x[m0 * k..(m0 + m) * k], m, w, p, cols, &mut tile);
                    for (i, acc) in tile.iter().enumerate().take(m) {
                        // SAFETY: row m0 + i < rows and columns p·NR .. p·NR + width <= w.rows
                        // belong to this part alone.
                        let cells = unsafe {
                            std::slice::from_raw_parts_mut(
                                out.0.add((m0 + i) * w.rows + p * NR),
                                width,
                            )
                        };
                        let acc = &acc[..width];
                        if kb != 0 {
                            cells.iter_mut().zip(acc).for_each(|(c, a)| *c += a);
                        } else {
                            cells.copy_from_slice(acc);
                        }
                        if let (true, Some(scale)) = (last, scale) {
                            let s = &scale[p * NR..p * NR + width];
                            cells.iter_mut().zip(s).for_each(|(c, s)| *c *= s);
                        }
                    }
                }
            }
        }
    }
}

/// Which inputs a micro-kernel call sums over.
#[derive(Clone, Copy)]
enum Cols<'a> {
    /// A contiguous block of inputs.
    Range(usize, usize),
    /// Only these inputs (see [`NonZero`]).
    Index(&'a NonZero),
}

/// The inputs that are nonzero in at least one activation row, ascending; built only by
/// [`NonZero::of`], so every index is inside the rows it was built from.
pub struct NonZero {
    idx: Vec<u32>,
    cols: usize,
}

impl NonZero {
    /// The columns of `x` ([rows, cols]) that are nonzero in some row.
    pub fn of(x: &[f32], rows: usize, cols: usize) -> Self {
        let mut any = vec![false; cols];
        for row in x.chunks_exact(cols).take(rows) {
            for (a, v) in any.iter_mut().zip(row) {
                *a |= *v != 0.0;
            }
        }
        let idx = (0..cols as u32).filter(|&i| any[i as usize]).collect();
        Self { idx, cols }
    }

    /// Number of nonzero columns.
    pub fn len(&self) -> usize {
        self.idx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idx.is_empty()
    }
}

/// One micro-kernel call: `tile[i][j] = Σ_{k ∈ cols} x[i][k] · W[p·NR + j][k]` for
/// `i < m ≤ MR` (unscaled for int8); `x` holds `m` rows of `w.cols` values.
fn tile_dispatch(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &PackedMatrix,
    p: usize,
    cols: Cols<'_>,
    tile: &mut Tile,
) {
    let ldx = w.cols;
    let (k0, k1, idx) = match cols {
        Cols::Range(a, b) => (a, b, None),
        Cols::Index(nz) => {
            assert_eq!(nz.cols, ldx, "sparse index built for another width");
            (0, ldx, Some(nz.idx.as_slice()))
        }
    };
    assert!((1..=MR).contains(&m) && x.len() >= m * ldx && p < w.panels && k0 <= k1 && k1 <= ldx);
    // Steps of the kernel loop: the inputs k0..k1, or the listed ones.
    let (k, ip, sparse) = match idx {
        None => (k1 - k0, std::ptr::null(), false),
        Some(i) => (i.len(), i.as_ptr(), true),
    };
    let span = (p * ldx + k0) * NR..(p * ldx + k1) * NR;
    let xp = x[k0..].as_ptr();
    match (isa, &w.data) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Data::Bf16(d)) => {
            let panel = &d[span];
            // SAFETY: matmul_impl asserted that the CPU supports `Avx2` (avx2 + fma). Dense:
            // the kernel reads m rows (stride ldx) of k floats from x[k0..] and k·NR values of the
            // panel slice, in bounds (asserted above). Sparse: k0 = 0 and every listed index is
            // < ldx (NonZero invariant, width asserted above), so the same bounds hold.
            unsafe { x86::by_m!(m, sparse, bf16_avx2, xp, ldx, k, ip, panel.as_ptr(), tile) }
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Data::Int8 { q, .. }) => {
            let panel = &q[span];
            // SAFETY: as for bf16 above.
            unsafe { x86::by_m!(m, sparse, i8_avx2, xp, ldx, k, ip, panel.as_ptr(), tile) }
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Data::Bf16(d)) => {
            let panel = &d[span];
            // SAFETY: matmul_impl asserted avx512f support (`Avx512`); bounds as above.
            unsafe { x86::by_m!(m, sparse, bf16_avx512, xp, ldx, k, ip, panel.as_ptr(), tile) }
        }
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Data::Int8 { q, .. }) => {
            let panel = &q[span];
            // SAFETY: as for bf16 above.
            unsafe { x86::by_m!(m, sparse, i8_avx512, xp, ldx, k, ip, panel.as_ptr(), tile) }
        }
        (_, Data::Bf16(d)) => {
            let panel = &d[span];
            portable(&x[k0..], ldx, m, k, idx, tile, |kk, wv| {
                let g = &panel[kk * NR..(kk + 1) * NR];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = f32::from_bits(u32::from(g[bf16_slot(j)]) << 16);
                }
            })
        }
        (_, Data::Int8 { q, .. }) => {
            let panel = &q[span];
            portable(&x[k0..], ldx, m, k, idx, tile, |kk, wv| {
                let g = &panel[kk * NR..(kk + 1) * NR];
                for (v, &b) in wv.iter_mut().zip(g) {
                    *v = f32::from(b);
                }
            })
        }
    }
}

/// The portable micro-kernel: decodes one group of 16 weights per k and accumulates.
fn portable(
    x: &[f32],
    ldx: usize,
    m: usize,
    k: usize,
    idx: Option<&[u32]>,
    tile: &mut Tile,
    decode: impl Fn(usize, &mut [f32; NR]),
) {
    let mut acc: Tile = [[0.0; NR]; MR];
    let mut wv = [0.0f32; NR];
    for step in 0..k {
        let kk = idx.map_or(step, |i| i[step] as usize);
        decode(kk, &mut wv);
        for (i, a) in acc.iter_mut().enumerate().take(m) {
            let xv = x[i * ldx + kk];
            for (a, w) in a.iter_mut().zip(&wv) {
                *a += xv * w;
            }
        }
    }
    *tile = acc;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Tile, NR};
    use std::arch::x86_64::*;

    /// Prefetch distance in bytes of the weight stream (tuned on the 2-core EPYC dev VM: 1-2.5
    /// KiB gave +30-50% single-thread DRAM throughput on the 65536x768 head).
    const PREFETCH_BYTES: usize = 1536;

    /// Calls `$f::<M, U, S>` for the runtime row count `$m` and sparsity `$s`, with `U`
    /// independent accumulator sets (k unrolled) so that small M still has enough FMA chains in
    /// flight.
    macro_rules! by_m {
        ($m:expr, $s:expr, $f:ident, $($arg:expr),*) => {
            match ($m, $s) {
                (1, false) => x86::$f::<1, 4, false>($($arg),*),
                (2, false) => x86::$f::<2, 2, false>($($arg),*),
                (3, false) => x86::$f::<3, 1, false>($($arg),*),
                (4, false) => x86::$f::<4, 1, false>($($arg),*),
                (5, false) => x86::$f::<5, 1, false>($($arg),*),
                (_, false) => x86::$f::<6, 1, false>($($arg),*),
                (1, true) => x86::$f::<1, 4, true>($($arg),*),
                (2, true) => x86::$f::<2, 2, true>($($arg),*),
                (3, true) => x86::$f::<3, 1, true>($($arg),*),
                (4, true) => x86::$f::<4, 1, true>($($arg),*),
                (5, true) => x86::$f::<5, 1, true>($($arg),*),
                (_, true) => x86::$f::<6, 1, true>($($arg),*),
            }
        };
    }
    pub(super) use by_m;

    /// Defines an AVX2 micro-kernel; `$load(ptr, kk)` widens the 16 weights of input `kk` into
    /// (outputs 0..8, outputs 8..16).
    macro_rules! avx2_kernel {
        ($name:ident, $t:ty, $load:ident) => {
            /// # Safety
            /// The CPU must support avx2 and fma; `x` must hold `M` rows (stride `ldx`) and `w` a whole
            /// panel; dense (`!S`): steps `0..k` are inputs `0..k` of `x` and `w`; sparse: `idx`
            /// holds `k` input indices, each inside `x`'s rows and the panel.
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn $name<const M: usize, const U: usize, const S: bool>(
                x: *const f32,
                ldx: usize,
                k: usize,
                idx: *const u32,
                w: *const $t,
                tile: &mut Tile,
            ) {
                // Input index of step i: i itself, or idx[i] when sparse (S).
                // SAFETY: when S, idx holds k valid input indices (caller contract).
                let at = |i: usize| {
                    if S {
                        unsafe { *idx.add(i) as usize }
                    } else {
                        i
                    }
                };
                let mut lo = [[_mm256_setzero_ps(); M]; U];
                let mut hi = [[_mm256_setzero_ps(); M]; U];
                let ahead = PREFETCH_BYTES / (NR * std::mem::size_of::<$t>());
                let mut kk = 0;
                while kk + U <= k {
                    // Stream hint for the weights a few KiB ahead (prefetches never fault, so
                    // running past the panel's end is harmless); wrapping_add keeps the pointer
                    // arithmetic defined.
                    if !S {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((kk + ahead) * NR) as *const i8);
                    }
                    for u in 0..U {
                        // SAFETY: kk + u < k, inside the panel and the rows.
                        let (wl, wh) = unsafe { $load(w, at(kk + u)) };
                        for m in 0..M {
                            // SAFETY: m < M rows of k floats.
                            let xb = _mm256_set1_ps(unsafe { *x.add(m * ldx + at(kk + u)) });
                            lo[u][m] = _mm256_fmadd_ps(xb, wl, lo[u][m]);
                            hi[u][m] = _mm256_fmadd_ps(xb, wh, hi[u][m]);
                        }
                    }
                    kk += U;
                }
                while kk < k {
                    // SAFETY: kk < k.
                    let (wl, wh) = unsafe { $load(w, at(kk)) };
                    for m in 0..M {
                        // SAFETY: m < M rows of k floats.
                        let xb = _mm256_set1_ps(unsafe { *x.add(m * ldx + at(kk)) });
                        lo[0][m] = _mm256_fmadd_ps(xb, wl, lo[0][m]);
                        hi[0][m] = _mm256_fmadd_ps(xb, wh, hi[0][m]);
                    }
                    kk += 1;
                }
                for m in 0..M {
                    let (mut l, mut h) = (lo[0][m], hi[0][m]);
                    for u in 1..U {
                        l = _mm256_add_ps(l, lo[u][m]);
                        h = _mm256_add_ps(h, hi[u][m]);
                    }
                    // SAFETY: tile rows hold NR = 16 floats.
                    unsafe {
                        _mm256_storeu_ps(tile[m].as_mut_ptr(), l);
                        _mm256_storeu_ps(tile[m].as_mut_ptr().add(8), h);
                    }
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn load_bf16_avx2(w: *const u16, kk: usize) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 16 values at w + kk·NR and avx2 support.
        unsafe {
            let raw = _mm256_loadu_si256(w.add(kk * NR) as *const __m256i);
            let lo = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw));
            let hi = _mm256_castsi256_ps(_mm256_and_si256(
                raw,
                _mm256_set1_epi32(0xffff_0000_u32 as i32),
            ));
            (lo, hi)
        }
    }

    #[inline(always)]
    unsafe fn load_i8_avx2(w: *const i8, kk: usize) -> (__m256, __m256) {
        // SAFETY: the caller guarantees 16 values at w + kk·NR and avx2 support.
        unsafe {
            let raw = _mm_loadu_si128(w.add(kk * NR) as *const __m128i);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(raw, raw)));
            (lo, hi)
        }
    }

    avx2_kernel!(bf16_avx2, u16, load_bf16_avx2);
    avx2_kernel!(i8_avx2, i8, load_i8_avx2);

    /// Defines an AVX-512 micro-kernel; `$load(ptr, kk)` widens the 16 weights of input `kk`
    /// into one register in storage order, and `$slot(j)` is the lane holding output `j`.
    macro_rules! avx512_kernel {
        ($name:ident, $t:ty, $load:ident, $slot:expr) => {
            /// # Safety
            /// The CPU must support avx512f; other requirements as for the AVX2 kernels.
            #[target_feature(enable = "avx512f")]
            pub(super) unsafe fn $name<const M: usize, const U: usize, const S: bool>(
                x: *const f32,
                ldx: usize,
                k: usize,
                idx: *const u32,
                w: *const $t,
                tile: &mut Tile,
            ) {
                // Input index of step i: i itself, or idx[i] when sparse (S).
                // SAFETY: when S, idx holds k valid input indices (caller contract).
                let at = |i: usize| {
                    if S {
                        unsafe { *idx.add(i) as usize }
                    } else {
                        i
                    }
                };
                let mut acc = [[_mm512_setzero_ps(); M]; U];
                let ahead = PREFETCH_BYTES / (NR * std::mem::size_of::<$t>());
                let mut kk = 0;
                while kk + U <= k {
                    // Stream hint, as in the AVX2 kernels.
                    if !S {
                        _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add((kk + ahead) * NR) as *const i8);
                    }
                    for u in 0..U {
                        // SAFETY: kk + u < k.
                        let wv = unsafe { $load(w, at(kk + u)) };
                        for m in 0..M {
                            // SAFETY: m < M rows of k floats.
                            let xb = _mm512_set1_ps(unsafe { *x.add(m * ldx + at(kk + u)) });
                            acc[u][m] = _mm512_fmadd_ps(xb, wv, acc[u][m]);
                        }
                    }
                    kk += U;
                }
                while kk < k {
                    // SAFETY: kk < k.
                    let wv = unsafe { $load(w, at(kk)) };
                    for m in 0..M {
                        // SAFETY: m < M rows of k floats.
                        let xb = _mm512_set1_ps(unsafe { *x.add(m * ldx + at(kk)) });
                        acc[0][m] = _mm512_fmadd_ps(xb, wv, acc[0][m]);
                    }
                    kk += 1;
                }
                let slot: fn(usize) -> usize = $slot;
                for m in 0..M {
                    let mut a = acc[0][m];
                    for u in 1..U {
                        a = _mm512_add_ps(a, acc[u][m]);
                    }
                    let mut lanes = [0.0f32; NR];
                    // SAFETY: `lanes` holds 16 floats.
                    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
                    for j in 0..NR {
                        tile[m][j] = lanes[slot(j)];
                    }
                }
            }
        };
    }

    #[inline(always)]
    unsafe fn load_bf16_avx512(w: *const u16, kk: usize) -> __m512 {
        // SAFETY: the caller guarantees 16 values at w + kk·NR and avx512f support.
        unsafe {
            let raw = _mm256_loadu_si256(w.add(kk * NR) as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
        }
    }

    #[inline(always)]
    unsafe fn load_i8_avx512(w: *const i8, kk: usize) -> __m512 {
        // SAFETY: the caller guarantees 16 values at w + kk·NR and avx512f support.
        unsafe {
            let raw = _mm_loadu_si128(w.add(kk * NR) as *const __m128i);
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(raw))
        }
    }

    avx512_kernel!(bf16_avx512, u16, load_bf16_avx512, super::bf16_slot);
    avx512_kernel!(i8_avx512, i8, load_i8_avx512, |j| j);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::Matrix;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn bf16_bits(v: &[f32]) -> Vec<u16> {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_bits())
            .collect()
    }

    fn reference(x: &[f32], rows: usize, w: &PackedMatrix) -> Vec<f32> {
        let mut out = vec![0.0; rows * w.rows];
        for t in 0..rows {
            for n in 0..w.rows {
                out[t * w.rows + n] = (0..w.cols)
                    .map(|k| f64::from(x[t * w.cols + k]) * f64::from(w.get(n, k)))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "{what}: element {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn every_kernel_matches_a_float64_product_for_bf16_and_int8() {
        let pool = Pool::new(2);
        for (rows, outputs, inputs) in [
            (1, 16, 8),
            (1, 37, 65),
            (2, 48, 128),
            (5, 33, 96),
            (6, 64, 64),
            (7, 40, 160),
            (17, 300, 257),
            (64, 96, 384),
            (200, 40, 768),
            (90, 20, 2688),
        ] {
            let x = values(rows * inputs, 1 + rows as u64);
            let wv = values(outputs * inputs, 7 + inputs as u64);
            for w in [
                PackedMatrix::bf16(outputs, inputs, &bf16_bits(&wv)),
                PackedMatrix::int8(outputs, inputs, &wv),
            ] {
                let want = reference(&x, rows, &w);
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; rows * outputs];
                    matmul(&pool, isa, &x, rows, &w, &mut out);
                    let what = format!("{isa:?} {rows}x{inputs}->{outputs}");
                    assert_close(&out, &want, 2e-5 * (inputs as f32).sqrt(), &what);
                }
            }
        }
    }

    #[test]
    fn simd_kernels_agree_with_the_portable_kernel() {
        let pool = Pool::new(2);
        let (rows, outputs, inputs) = (13, 200, 768);
        let x = values(rows * inputs, 3);
        let wv = values(outputs * inputs, 4);
        let w = PackedMatrix::bf16(outputs, inputs, &bf16_bits(&wv));
        let mut base = vec![0.0; rows * outputs];
        matmul(&pool, Isa::Portable, &x, rows, &w, &mut base);
        for isa in Isa::available() {
            let mut out = vec![0.0; rows * outputs];
            matmul(&pool, isa, &x, rows, &w, &mut out);
            assert_close(&out, &base, 1e-5, &format!("{isa:?}"));
        }
    }

    #[test]
    fn skipping_zero_inputs_matches_the_dense_product() {
        let pool = Pool::new(2);
        for (rows, outputs, inputs) in [(1, 48, 2688), (2, 40, 300), (7, 33, 96)] {
            // relu²-like activations: about 70% exact zeros, shared by all rows for some columns.
            let x: Vec<f32> = values(rows * inputs, 21)
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if v.abs() < 0.7 || i % inputs % 5 == 0 {
                        0.0
                    } else {
                        v * v
                    }
                })
                .collect();
            let wv = values(outputs * inputs, 22);
            for w in [
                PackedMatrix::bf16(outputs, inputs, &bf16_bits(&wv)),
                PackedMatrix::int8(outputs, inputs, &wv),
            ] {
                let want = reference(&x, rows, &w);
                for isa in Isa::available() {
                    let mut out = vec![f32::NAN; rows * outputs];
                    matmul_skip_zeros(&pool, isa, &x, rows, &w, &mut out);
                    let what = format!("sparse {isa:?} {rows}x{inputs}->{outputs}");
                    assert_close(&out, &want, 2e-5 * (inputs as f32).sqrt(), &what);
                }
            }
        }
        let dense = values(3 * 64, 5);
        let nz = NonZero::of(&dense, 3, 64);
        assert_eq!(nz.len(), 64);
        assert!(NonZero::of(&[0.0; 8], 1, 8).is_empty());
    }

    #[test]
    fn packing_keeps_bf16_exact_and_in_out_transposes() {
        let wv = values(40 * 24, 9);
        let bits = bf16_bits(&wv);
        let w = PackedMatrix::bf16(40, 24, &bits);
        let f32w = Matrix::new(
            40,
            24,
            bits.iter()
                .map(|b| f32::from_bits(u32::from(*b) << 16))
                .collect(),
        );
        for n in 0..40 {
            for k in 0..24 {
                assert_eq!(w.get(n, k), f32w.row(n)[k]);
            }
        }
        // [in=2, out=3] stored row-major: in 0 -> (1, 2, 3), in 1 -> (4, 5, 6).
        let t = PackedMatrix::bf16_from_in_out(2, 3, &bf16_bits(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        assert_eq!((t.get(2, 0), t.get(2, 1)), (3.0, 6.0));
        let x = [0.5, -2.0];
        assert_eq!(t.row_dot(2, &x), 1.5 - 12.0);
    }

    #[test]
    fn int8_quantization_error_is_bounded_by_half_a_step() {
        let wv = values(50 * 70, 11);
        let w = PackedMatrix::int8(50, 70, &wv);
        for n in 0..50 {
            let row = &wv[n * 70..(n + 1) * 70];
            let step = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (k, v) in row.iter().enumerate() {
                assert!((w.get(n, k) - v).abs() <= 0.5 * step * 1.0001);
            }
        }
    }
}
