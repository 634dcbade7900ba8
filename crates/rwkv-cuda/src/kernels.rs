//! Typed launch wrappers for the NVRTC kernels: every wrapper checks buffer sizes against the
//! shape it is given before anything is launched, and returns `CudaError::Shape` otherwise.
//! The token-mix and WKV wrappers, which read and write the state pool, are in `recurrent.rs`.

use cudarc::driver::LaunchConfig;

use crate::device::Device;
use crate::error::{CudaError, Result};
pub use crate::launch::{
    elementwise_config, group_config, row_config, sampling_config, wkv_config, wkv_prefill_config,
    Arg, Bf16Buf, CudaLauncher, DevBuf, F32Buf, I32Buf, Launcher, PoolArg, ELEMENTWISE_MAX_BLOCKS,
    ELEMENTWISE_THREADS, MAX_HEAD_SIZE, SAMPLING_THREADS,
};
pub use crate::recurrent::ShiftRows;

/// Activation codes shared with `kernels/common.cuh` (`ACT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Act {
    None = 0,
    Tanh = 1,
    Silu = 2,
    Relu2 = 3,
    Sigmoid = 4,
    /// exp(-exp(x)), the WKV decay.
    Decay = 5,
}

/// LayerNorm eps (ln1, ln2, ln_out).
pub const LN_EPS: f32 = 1e-5;
/// GroupNorm eps of ln_x (spec 2.1: 1e-5 * 8^2).
pub const GN_EPS: f32 = 64e-5;

pub(crate) fn int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::shape(op, format!("{v} does not fit in i32")))
}

pub(crate) fn long(v: usize) -> i64 {
    // usize -> i64 cannot overflow for any buffer that fits in device memory.
    v as i64
}

/// The rows of a GEMM input that holds hi (and, when split, lo) halves.
pub(crate) fn split_factor(split: bool) -> usize {
    if split {
        2
    } else {
        1
    }
}

pub(crate) fn p<T>(b: DevBuf<T>) -> Arg {
    Arg::P(b.ptr())
}

/// The kernels with checked, typed entry points.
pub struct Kernels {
    launcher: Box<dyn Launcher>,
    pub(crate) head_size: usize,
}

impl Kernels {
    /// Compiles and loads the kernels for a device (see [`CudaLauncher::load`]).
    pub fn load(dev: &Device, head_size: usize) -> Result<Self> {
        Ok(Self::with_launcher(
            Box::new(CudaLauncher::load(dev, head_size)?),
            head_size,
        ))
    }

    /// Kernels run by any launcher (the host emulation in tests).
    pub fn with_launcher(launcher: Box<dyn Launcher>, head_size: usize) -> Self {
        Self {
            launcher,
            head_size,
        }
    }

    pub(crate) fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        self.launcher.launch(name, cfg, args)
    }

    /// bf16 GEMM input from f32 rows: out [S*rows, cols] (hi rows, then lo rows when split).
    pub fn to_bf16(
        &self,
        x: F32Buf,
        out: Bf16Buf,
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        x.need("to_bf16", "x", n)?;
        out.need("to_bf16", "out", split_factor(split) * n)?;
        let args = [
            p(x),
            p(out),
            Arg::I(int("to_bf16", rows)?),
            Arg::I(int("to_bf16", cols)?),
            Arg::I(split.into()),
        ];
        self.launch("to_bf16_f32", elementwise_config(n), &args)
    }

    /// f32 copy of a bf16 buffer.
    pub fn to_f32(&self, x: Bf16Buf, out: F32Buf, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        x.need("to_f32", "x", n)?;
        out.need("to_f32", "out", n)?;
        self.launch(
            "to_f32_bf16",
            elementwise_config(n),
            &[p(x), p(out), Arg::L(long(n))],
        )
    }

    /// out = (accumulate ? out : 0) + gate * act(tmp_hi + tmp_lo + bias), all [rows, cols].
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_out_f32(
        &self,
        tmp: F32Buf,
        out: F32Buf,
        bias: Option<F32Buf>,
        gate: Option<F32Buf>,
        rows: usize,
        cols: usize,
        split: bool,
        act: Act,
        accumulate: bool,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        const OP: &str = "gemm_out_f32";
        tmp.need(OP, "tmp", split_factor(split) * n)?;
        out.need(OP, "out", n)?;
        if let Some(b) = bias {
            b.need(OP, "bias", cols)?;
        }
        if let Some(g) = gate {
            g.need(OP, "gate", n)?;
        }
        let args = [
            p(tmp),
            p(out),
            p(bias.unwrap_or_else(DevBuf::null)),
            p(gate.unwrap_or_else(DevBuf::null)),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
            Arg::I(act as i32),
            Arg::I(accumulate.into()),
        ];
        self.launch(OP, elementwise_config(n), &args)
    }

    /// The same sum and activation as `gemm_out_f32`, written as the next GEMM's bf16 input.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_out_bf16(
        &self,
        tmp: F32Buf,
        out: Bf16Buf,
        bias: Option<F32Buf>,
        rows: usize,
        cols: usize,
        split: bool,
        act: Act,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        const OP: &str = "gemm_out_bf16";
        let s = split_factor(split);
        tmp.need(OP, "tmp", s * n)?;
        out.need(OP, "out", s * n)?;
        if let Some(b) = bias {
            b.need(OP, "bias", cols)?;
        }
        let args = [
            p(tmp),
            p(out),
            p(bias.unwrap_or_else(DevBuf::null)),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
            Arg::I(act as i32),
        ];
        self.launch(OP, elementwise_config(n), &args)
    }

    /// The batched k, v, r, g projection's output `tmp` (four `[S*rows, cols]` blocks in that
    /// order) summed into k, v, r and silu(g), each `[rows, cols]`.
    #[allow(clippy::too_many_arguments)]
    pub fn kvrg_out(
        &self,
        tmp: F32Buf,
        [k, v, r, g]: [F32Buf; 4],
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        const OP: &str = "kvrg_out";
        tmp.need(OP, "tmp", 4 * split_factor(split) * n)?;
        for (name, out) in [("k", k), ("v", v), ("r", r), ("g", g)] {
            out.need(OP, name, n)?;
        }
        let args = [
            p(tmp),
            p(k),
            p(v),
            p(r),
            p(g),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
        ];
        self.launch("kvrg_out_f32", elementwise_config(n), &args)
    }

    /// x += gate * (tmp_hi + tmp_lo) (`gemm_out_f32` with accumulate), then out = LN(x; w, b):
    /// the residual update that ends a block and the LayerNorm that starts the next.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layer_norm(
        &self,
        tmp: F32Buf,
        gate: Option<F32Buf>,
        x: F32Buf,
        (w, b): (F32Buf, F32Buf),
        out: F32Buf,
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        const OP: &str = "residual_layer_norm";
        let n = rows * cols;
        tmp.need(OP, "tmp", split_factor(split) * n)?;
        if let Some(g) = gate {
            g.need(OP, "gate", n)?;
        }
        x.need(OP, "x", n)?;
        out.need(OP, "out", n)?;
        w.need(OP, "weight", cols)?;
        b.need(OP, "bias", cols)?;
        let args = [
            p(tmp),
            p(gate.unwrap_or_else(DevBuf::null)),
            p(x),
            p(w),
            p(b),
            p(out),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
            Arg::F(LN_EPS),
        ];
        self.launch("residual_layer_norm_f32", row_config(rows, cols)?, &args)
    }

    /// `x[t] = emb[tokens[t]]` as f32. Token ids must already be checked against `vocab`.
    pub fn embedding(
        &self,
        emb: Bf16Buf,
        vocab: usize,
        tokens: DevBuf<u32>,
        x: F32Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        const OP: &str = "embedding";
        emb.need(OP, "emb", vocab * cols)?;
        tokens.need(OP, "tokens", rows)?;
        x.need(OP, "x", n)?;
        let args = [
            p(emb),
            p(tokens),
            p(x),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
        ];
        self.launch("embedding_bf16", elementwise_config(n), &args)
    }

    /// out = LN(x; w, b) over rows of `cols`, f32 out.
    pub fn layer_norm(
        &self,
        x: F32Buf,
        w: F32Buf,
        b: F32Buf,
        out: F32Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        const OP: &str = "layer_norm";
        x.need(OP, "x", rows * cols)?;
        out.need(OP, "out", rows * cols)?;
        w.need(OP, "weight", cols)?;
        b.need(OP, "bias", cols)?;
        let args = [
            p(x),
            p(w),
            p(b),
            p(out),
            Arg::I(int(OP, cols)?),
            Arg::F(LN_EPS),
        ];
        self.launch("layer_norm_f32", row_config(rows, cols)?, &args)
    }

    /// LN of the gathered rows `idx` (each < `src_rows`) of x, as a bf16 GEMM input [S*rows, cols].
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm_gather_bf16(
        &self,
        x: F32Buf,
        src_rows: usize,
        idx: I32Buf,
        w: F32Buf,
        b: F32Buf,
        out: Bf16Buf,
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        const OP: &str = "layer_norm_gather";
        x.need(OP, "x", src_rows * cols)?;
        idx.need(OP, "idx", rows)?;
        w.need(OP, "weight", cols)?;
        b.need(OP, "bias", cols)?;
        out.need(OP, "out", split_factor(split) * rows * cols)?;
        let args = [
            p(x),
            p(idx),
            p(w),
            p(b),
            p(out),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(split.into()),
            Arg::F(LN_EPS),
        ];
        self.launch("layer_norm_bf16", row_config(rows, cols)?, &args)
    }

    /// Per-head GroupNorm of y times the gate g, as the bf16 input of the output projection.
    #[allow(clippy::too_many_arguments)]
    pub fn group_norm_gate(
        &self,
        y: F32Buf,
        g: F32Buf,
        w: F32Buf,
        b: F32Buf,
        out: Bf16Buf,
        rows: usize,
        cols: usize,
        split: bool,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        const OP: &str = "group_norm_gate";
        let n = self.head_size;
        if n == 0 || !cols.is_multiple_of(n) {
            return Err(CudaError::shape(
                OP,
                format!("{cols} columns in heads of {n}"),
            ));
        }
        y.need(OP, "y", rows * cols)?;
        g.need(OP, "g", rows * cols)?;
        w.need(OP, "weight", cols)?;
        b.need(OP, "bias", cols)?;
        out.need(OP, "out", split_factor(split) * rows * cols)?;
        let args = [
            p(y),
            p(g),
            p(w),
            p(b),
            p(out),
            Arg::I(int(OP, rows)?),
            Arg::I(int(OP, cols)?),
            Arg::I(int(OP, n)?),
            Arg::I(split.into()),
            Arg::F(GN_EPS),
        ];
        self.launch(
            "group_norm_gate_f32",
            group_config(rows, cols / n, n)?,
            &args,
        )
    }

    /// `out[row] = softmax(x[row] / temperature)`.
    pub fn softmax(
        &self,
        x: F32Buf,
        out: F32Buf,
        rows: usize,
        cols: usize,
        temperature: f32,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        const OP: &str = "softmax";
        if !(temperature > 0.0 && temperature.is_finite()) {
            return Err(CudaError::shape(OP, format!("temperature {temperature}")));
        }
        x.need(OP, "x", rows * cols)?;
        out.need(OP, "out", rows * cols)?;
        let args = [
            p(x),
            p(out),
            Arg::I(int(OP, cols)?),
            Arg::F(1.0 / temperature),
        ];
        self.launch("softmax_f32", sampling_config(rows)?, &args)
    }

    /// Each row's largest entry and softmax denominator `sum(exp(x - max))` at temperature 1
    /// (NaN as -inf, +inf as the largest finite value).
    pub fn row_mass(
        &self,
        x: F32Buf,
        max: F32Buf,
        sum: F32Buf,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        const OP: &str = "row_mass";
        x.need(OP, "x", rows * cols)?;
        max.need(OP, "max", rows)?;
        sum.need(OP, "sum", rows)?;
        let args = [p(x), p(max), p(sum), Arg::I(int(OP, cols)?)];
        self.launch("row_mass_f32", sampling_config(rows)?, &args)
    }

    /// The k largest entries of each row (value descending, ties by lower index).
    pub fn top_k(
        &self,
        x: F32Buf,
        idx: I32Buf,
        val: F32Buf,
        rows: usize,
        cols: usize,
        k: usize,
    ) -> Result<()> {
        if rows == 0 || k == 0 {
            return Ok(());
        }
        const OP: &str = "top_k";
        if k > cols {
            return Err(CudaError::shape(OP, format!("k = {k} > {cols} columns")));
        }
        x.need(OP, "x", rows * cols)?;
        idx.need(OP, "idx", rows * k)?;
        val.need(OP, "val", rows * k)?;
        let args = [
            p(x),
            p(idx),
            p(val),
            Arg::I(int(OP, cols)?),
            Arg::I(int(OP, k)?),
        ];
        self.launch("topk_f32", sampling_config(rows)?, &args)
    }
}
