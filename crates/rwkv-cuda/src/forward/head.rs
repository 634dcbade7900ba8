//! The head of a step: `ln_out` and the `[V, C]` GEMM for the rows that need logits, in chunks
//! of [`HEAD_CHUNK`] rows, and the device-side ranking of the rows that need only their best
//! tokens (`Top`) or their nucleus (`Nucleus`).

use rwkv_model::nucleus::kept_set;
use rwkv_model::{Candidate, NucleusRow};

use super::{Bufs, Meta, Step, HEAD_CHUNK};
use crate::error::{CudaError, Result};
use crate::gemm::{GemmSpec, WeightLayout};
use crate::kernels::{Act, F32Buf, I32Buf};
use crate::plan::BatchPlan;

impl Step<'_> {
    /// ln_out and the head, only for the requested rows, in chunks of [`HEAD_CHUNK`] rows.
    pub(super) fn head(
        &self,
        b: &Bufs,
        m: &Meta,
        plan: &BatchPlan,
        logits: &mut [f32],
    ) -> Result<()> {
        let v = self.cfg.vocab_size;
        let total = plan.head_rows.len();
        let mut start = 0;
        while start < total {
            let pc = HEAD_CHUNK.min(total - start);
            let hout = self.head_chunk(b, plan, m.head_rows.slice(start, pc)?, pc)?;
            self.exec.download_f32(
                hout.slice(0, pc * v)?,
                &mut logits[start * v..(start + pc) * v],
            )?;
            start += pc;
        }
        Ok(())
    }

    /// The head for the rows that need only their best tokens: each chunk's logits stay on the
    /// device, the top-k kernel ranks them, and only the ids and logits of the candidates are
    /// downloaded (a few bytes per row instead of a vocabulary of floats). A nucleus row also
    /// gets its softmax denominator, which decides its kept set from the candidates; where they
    /// do not decide it, its whole row is downloaded while the chunk's logits are still there.
    pub(super) fn head_candidates(
        &self,
        b: &Bufs,
        m: &Meta,
        plan: &BatchPlan,
        top: &mut Vec<Candidate>,
        nucleus: &mut Vec<NucleusRow>,
    ) -> Result<()> {
        let v = self.cfg.vocab_size;
        let total = plan.top_rows.len();
        let (tidx, tval) = (self.bufs.tidx, self.bufs.tval);
        let mut start = 0;
        while start < total {
            let pc = HEAD_CHUNK.min(total - start);
            let ks = &plan.top_k[start..start + pc];
            let filters = &plan.top_nucleus[start..start + pc];
            let kmax = ks.iter().copied().max().unwrap_or(1).min(v);
            let hout = self.head_chunk(b, plan, m.top_rows.slice(start, pc)?, pc)?;
            self.kx().top_k(hout, tidx, tval, pc, v, kmax)?;
            let mass = if filters.iter().any(Option::is_some) {
                let (max, sum) = (
                    self.bufs.tmass.slice(0, pc)?,
                    self.bufs.tmass.slice(pc, pc)?,
                );
                self.kx().row_mass(hout, max, sum, pc, v)?;
                let mut mass = vec![0f32; 2 * pc];
                self.exec
                    .download_f32(self.bufs.tmass.slice(0, 2 * pc)?, &mut mass)?;
                mass
            } else {
                Vec::new()
            };
            let mut ids = vec![0i32; pc * kmax];
            let mut vals = vec![0f32; pc * kmax];
            self.exec
                .download_i32(tidx.slice(0, pc * kmax)?, &mut ids)?;
            self.exec
                .download_f32(tval.slice(0, pc * kmax)?, &mut vals)?;
            // The downloads land in pageable memory, so they are complete when they return.
            for (row, (&k, filter)) in ks.iter().zip(filters).enumerate() {
                let at = row * kmax;
                let k = k.min(kmax);
                let cands = ids[at..at + k]
                    .iter()
                    .zip(&vals[at..at + k])
                    .map(|(&id, &logit)| {
                        let token = u32::try_from(id)
                            .ok()
                            .filter(|&t| (t as usize) < v)
                            .ok_or_else(|| {
                                CudaError::shape("top_k", format!("candidate id {id} out of range"))
                            })?;
                        Ok(Candidate { token, logit })
                    });
                let Some(filter) = filter else {
                    for c in cands {
                        top.push(c?);
                    }
                    continue;
                };
                let cands = cands.collect::<Result<Vec<_>>>()?;
                let (max, sum) = (mass[row], mass[pc + row]);
                match kept_set(&cands, max, sum, *filter, v) {
                    Some(kept) => nucleus.push(NucleusRow::Kept(kept)),
                    None => {
                        let mut full = vec![0f32; v];
                        self.exec.download_f32(hout.slice(row * v, v)?, &mut full)?;
                        nucleus.push(NucleusRow::Row(full));
                    }
                }
            }
            start += pc;
        }
        Ok(())
    }

    /// ln_out and the head GEMM for `pc` rows (`idx`, at most [`HEAD_CHUNK`]): f32 logits in
    /// the head output buffer, which is returned.
    fn head_chunk(&self, b: &Bufs, plan: &BatchPlan, idx: I32Buf, pc: usize) -> Result<F32Buf> {
        let (c, v) = (self.cfg.n_embd, self.cfg.vocab_size);
        let split = self.precision.split();
        let (hx, htmp, hout) = (self.bufs.hx, self.bufs.htmp, self.bufs.hout);
        let (ln_w, ln_b) = self.weights.ln_out;
        self.kx()
            .layer_norm_gather_bf16(b.x, plan.rows(), idx, ln_w, ln_b, hx, pc, c, split)?;
        let spec = GemmSpec::dense(WeightLayout::OutIn, v, c, self.rows_s(pc));
        self.gemm(&spec, self.weights.head, hx, htmp)?;
        self.kx()
            .gemm_out_f32(htmp, hout, None, None, pc, v, split, Act::None, false)?;
        Ok(hout)
    }
}
