//! Launch wrappers of the kernels that read or write the state pool: the token shifts and mixes
//! (`token_mix.cu`) and the WKV recurrence (`wkv6.cu`). Same contract as `kernels.rs`: sizes are
//! checked before any launch.

use crate::error::{CudaError, Result};
use crate::kernels::{
    elementwise_config, int, long, p, split_factor, wkv_config, wkv_prefill_config, Arg, Bf16Buf,
    F32Buf, I32Buf, Kernels, PoolArg,
};

/// The row metadata of the token shift: per row, its previous row (or `-(slot + 1)` for a
/// sequence's first row) and its sequence's last row (see `plan.rs`).
#[derive(Clone, Copy, Debug)]
pub struct ShiftRows {
    pub prev: I32Buf,
    pub last: I32Buf,
}

impl ShiftRows {
    fn need(&self, op: &'static str, rows: usize) -> Result<()> {
        self.prev.need(op, "row_prev", rows)?;
        self.last.need(op, "row_last", rows)
    }
}

impl Kernels {
    /// Time-mix token shift: dx = prev - a and the ddlerp LoRA input xm = a + dx * maa_x; the
    /// shift state of each sequence's slot becomes its last row of `a` (`row_last`).
    #[allow(clippy::too_many_arguments)]
    pub fn tmix_shift(
        &self,
        a: F32Buf,
        pool: PoolArg,
        shift_off: usize,
        rows_meta: ShiftRows,
        maa_x: F32Buf,
        dx: F32Buf,
        xm: Bf16Buf,
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        const OP: &str = "tmix_shift";
        pool.check(OP, shift_off, cols)?;
        a.need(OP, "a", n)?;
        rows_meta.need(OP, rows)?;
        maa_x.need(OP, "maa_x", cols)?;
        dx.need(OP, "dx", n)?;
        xm.need(OP, "xm", split_factor(split) * n)?;
        let args = [
            p(a),
            p(pool.buf),
            p(rows_meta.prev),
            p(rows_meta.last),
            Arg::L(long(pool.stride)),
            Arg::L(long(shift_off)),
            p(maa_x),
            p(dx),
            p(xm),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
        ];
        self.launch("tmix_shift_f32", elementwise_config(n), &args)
    }

    /// The five ddlerp outputs x_w, x_k, x_v, x_r, x_g as bf16 GEMM inputs `[5][S*rows][cols]`,
    /// from the maa_w2 LoRA output m `[5][S*rows][cols]` and lambda `[5][cols]`.
    #[allow(clippy::too_many_arguments)]
    pub fn tmix_mix(
        &self,
        a: F32Buf,
        dx: F32Buf,
        m: F32Buf,
        lambda: F32Buf,
        xs: Bf16Buf,
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        const OP: &str = "tmix_mix";
        let all = 5 * split_factor(split) * n;
        a.need(OP, "a", n)?;
        dx.need(OP, "dx", n)?;
        m.need(OP, "m", all)?;
        lambda.need(OP, "lambda", 5 * cols)?;
        xs.need(OP, "xs", all)?;
        let args = [
            p(a),
            p(dx),
            p(m),
            p(lambda),
            p(xs),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
        ];
        self.launch("tmix_mix_f32", elementwise_config(n), &args)
    }

    /// Channel-mix token shift and mixes: x_k and x_r as bf16 GEMM inputs; updates the shift
    /// state like [`Kernels::tmix_shift`].
    #[allow(clippy::too_many_arguments)]
    pub fn cmix_shift(
        &self,
        b: F32Buf,
        pool: PoolArg,
        shift_off: usize,
        rows_meta: ShiftRows,
        maa_k: F32Buf,
        maa_r: F32Buf,
        xk: Bf16Buf,
        xr: Bf16Buf,
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        const OP: &str = "cmix_shift";
        pool.check(OP, shift_off, cols)?;
        b.need(OP, "b", n)?;
        rows_meta.need(OP, rows)?;
        maa_k.need(OP, "maa_k", cols)?;
        maa_r.need(OP, "maa_r", cols)?;
        xk.need(OP, "xk", split_factor(split) * n)?;
        xr.need(OP, "xr", split_factor(split) * n)?;
        let args = [
            p(b),
            p(pool.buf),
            p(rows_meta.prev),
            p(rows_meta.last),
            Arg::L(long(pool.stride)),
            Arg::L(long(shift_off)),
            p(maa_k),
            p(maa_r),
            p(xk),
            p(xr),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
        ];
        self.launch("cmix_shift_f32", elementwise_config(n), &args)
    }

    /// WKV for sequences of exactly one token: row `dec_row[b]`, state slot `dec_slot[b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn wkv6_decode(
        &self,
        pool: PoolArg,
        wkv_off: usize,
        dec_row: I32Buf,
        dec_slot: I32Buf,
        seqs: usize,
        rkvw: [F32Buf; 4],
        u: F32Buf,
        y: F32Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.wkv6(
            "wkv6_decode_f32",
            wkv_config,
            pool,
            wkv_off,
            &[dec_row, dec_slot],
            seqs,
            rkvw,
            u,
            y,
            rows,
            cols,
        )
    }

    /// WKV for sequences of several tokens: rows `pre_first[b] .. pre_end[b]`, slot `pre_slot[b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn wkv6_prefill(
        &self,
        pool: PoolArg,
        wkv_off: usize,
        pre_first: I32Buf,
        pre_end: I32Buf,
        pre_slot: I32Buf,
        seqs: usize,
        rkvw: [F32Buf; 4],
        u: F32Buf,
        y: F32Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.wkv6(
            "wkv6_prefill_f32",
            wkv_prefill_config,
            pool,
            wkv_off,
            &[pre_first, pre_end, pre_slot],
            seqs,
            rkvw,
            u,
            y,
            rows,
            cols,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn wkv6(
        &self,
        name: &'static str,
        config: fn(usize, usize, usize) -> Result<cudarc::driver::LaunchConfig>,
        pool: PoolArg,
        wkv_off: usize,
        meta: &[I32Buf],
        seqs: usize,
        [r, k, v, w]: [F32Buf; 4],
        u: F32Buf,
        y: F32Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if seqs == 0 {
            return Ok(());
        }
        let n = self.head_size;
        if n == 0 || !cols.is_multiple_of(n) {
            return Err(CudaError::shape(
                name,
                format!("{cols} columns in heads of {n}"),
            ));
        }
        let heads = cols / n;
        pool.check(name, wkv_off, heads * n * n)?;
        for m in meta {
            m.need(name, "sequence metadata", seqs)?;
        }
        for (b, what) in [(r, "r"), (k, "k"), (v, "v"), (w, "w"), (y, "y")] {
            b.need(name, what, rows * cols)?;
        }
        u.need(name, "u", cols)?;
        let mut args = vec![
            p(pool.buf),
            Arg::L(long(pool.stride)),
            Arg::L(long(wkv_off)),
        ];
        args.extend(meta.iter().map(|&m| p(m)));
        args.extend([
            Arg::I(int(name, heads)?),
            p(r),
            p(k),
            p(v),
            p(w),
            p(u),
            p(y),
        ]);
        self.launch(name, config(seqs, heads, n)?, &args)
    }
}
