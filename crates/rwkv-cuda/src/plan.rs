//! The host-side layout of one ragged forward step: which rows belong to which sequence and
//! slot, packed into one i32 upload for the kernels.
//!
//! The rows of a step are the new tokens of every sequence, stacked in step order; sequences
//! without tokens are left out (their slot is untouched and they produce no logits).

use std::ops::Range;

use rwkv_model::nucleus::NUCLEUS_CANDIDATES;
use rwkv_model::{Nucleus, OutputRows, SeqStep};

use crate::error::{CudaError, Result};

/// Row metadata of one step (all indices i32, as the kernels read them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchPlan {
    /// Token ids, one per row.
    pub tokens: Vec<u32>,
    /// Per row: the previous row of the same sequence, or -(slot + 1) for a sequence's first
    /// row (its previous token is in the slot's shift state).
    pub row_prev: Vec<i32>,
    /// Per row: the last row of its sequence (the shift kernels store that row's value in the
    /// slot's shift state when they read the first row's previous value).
    pub row_last: Vec<i32>,
    /// Per non-empty sequence: its slot (host side only).
    pub seq_slot: Vec<i32>,
    /// Sequences with exactly one token: their row and slot (WKV decode kernel).
    pub dec_row: Vec<i32>,
    pub dec_slot: Vec<i32>,
    /// Sequences with several tokens: first row, end row (exclusive) and slot (prefill kernel).
    pub pre_first: Vec<i32>,
    pub pre_end: Vec<i32>,
    pub pre_slot: Vec<i32>,
    /// Rows that need logits, in output order.
    pub head_rows: Vec<i32>,
    /// Rows that need only their best tokens (`OutputRows::Top`, and `OutputRows::Nucleus`
    /// with its filter in `top_nucleus`), in output order, and how
    /// many each needs (host side only).
    pub top_rows: Vec<i32>,
    pub top_k: Vec<usize>,
    pub top_nucleus: Vec<Option<Nucleus>>,
}

/// Where each array of [`BatchPlan::packed`] starts in the packed buffer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedMeta {
    pub row_prev: Range<usize>,
    pub row_last: Range<usize>,
    pub dec_row: Range<usize>,
    pub dec_slot: Range<usize>,
    pub pre_first: Range<usize>,
    pub pre_end: Range<usize>,
    pub pre_slot: Range<usize>,
    pub head_rows: Range<usize>,
    pub top_rows: Range<usize>,
}

fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::shape("batch plan", format!("{what} {v} exceeds i32")))
}

impl BatchPlan {
    /// Builds the plan. Slots must already be validated (in range, distinct).
    pub fn new(steps: &[SeqStep<'_>]) -> Result<Self> {
        let mut plan = Self::default();
        for step in steps {
            let n = step.tokens.len();
            let first = plan.tokens.len();
            let end = first + n;
            i32_of("row", end)?;
            let slot = i32_of("slot", step.slot)?;
            if slot == i32::MAX {
                return Err(CudaError::shape("batch plan", "slot i32::MAX"));
            }
            // Head rows, in the order the Backend contract returns them.
            let wanted = step.output.rows(n);
            plan.head_rows.extend((end - wanted..end).map(|r| r as i32));
            let ranked = match step.output {
                OutputRows::Top(k) => Some((k, None)),
                OutputRows::Nucleus(f) => Some((NUCLEUS_CANDIDATES, Some(f))),
                _ => None,
            };
            if let (Some((k, nucleus)), true) = (ranked, n > 0) {
                plan.top_rows.push((end - 1) as i32);
                plan.top_k.push(k);
                plan.top_nucleus.push(nucleus);
            }
            if n == 0 {
                continue;
            }
            plan.tokens.extend_from_slice(step.tokens);
            plan.row_prev.push(-(slot + 1));
            plan.row_prev.extend((first..end - 1).map(|r| r as i32));
            plan.row_last
                .extend(std::iter::repeat_n((end - 1) as i32, n));
            plan.seq_slot.push(slot);
            if n == 1 {
                plan.dec_row.push(first as i32);
                plan.dec_slot.push(slot);
            } else {
                plan.pre_first.push(first as i32);
                plan.pre_end.push(end as i32);
                plan.pre_slot.push(slot);
            }
        }
        Ok(plan)
    }

    /// Number of rows (new tokens) in the step.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// Number of sequences with at least one token.
    pub fn seqs(&self) -> usize {
        self.seq_slot.len()
    }

    /// The slots this step reads and writes.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.seq_slot.iter().map(|&s| s as usize)
    }

    /// The arrays in upload order (the order of [`PackedMeta`]'s fields).
    fn device_arrays(&self) -> [&[i32]; 9] {
        [
            &self.row_prev,
            &self.row_last,
            &self.dec_row,
            &self.dec_slot,
            &self.pre_first,
            &self.pre_end,
            &self.pre_slot,
            &self.head_rows,
            &self.top_rows,
        ]
    }

    /// Where each array of [`BatchPlan::packed`] starts in the packed buffer.
    pub fn layout(&self) -> PackedMeta {
        let mut at = 0;
        let [row_prev, row_last, dec_row, dec_slot, pre_first, pre_end, pre_slot, head_rows, top_rows] =
            self.device_arrays().map(|v| {
                at += v.len();
                at - v.len()..at
            });
        PackedMeta {
            row_prev,
            row_last,
            dec_row,
            dec_slot,
            pre_first,
            pre_end,
            pre_slot,
            head_rows,
            top_rows,
        }
    }

    /// All i32 arrays in one buffer (one upload per step) and where each one is.
    pub fn packed(&self) -> (Vec<i32>, PackedMeta) {
        let layout = self.layout();
        let mut out = Vec::with_capacity(layout.top_rows.end);
        for v in self.device_arrays() {
            out.extend_from_slice(v);
        }
        (out, layout)
    }
}

/// How many logit rows a step produces (the Backend contract).
pub fn output_rows(steps: &[SeqStep<'_>]) -> usize {
    steps.iter().map(|s| s.output.rows(s.tokens.len())).sum()
}

/// Convenience for tests and callers building steps.
pub fn step(slot: usize, tokens: &[u32], output: OutputRows) -> SeqStep<'_> {
    SeqStep {
        slot,
        tokens,
        output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ragged_batch_rows_and_metadata() {
        let a = [5, 6, 7];
        let b = [9];
        let c: [u32; 0] = [];
        let d = [1, 2];
        let steps = [
            step(3, &a, OutputRows::All),
            step(0, &b, OutputRows::Last),
            step(7, &c, OutputRows::Last),
            step(2, &d, OutputRows::None),
        ];
        let p = BatchPlan::new(&steps).unwrap();
        assert_eq!(p.tokens, vec![5, 6, 7, 9, 1, 2]);
        assert_eq!(p.rows(), 6);
        assert_eq!(p.row_prev, vec![-4, 0, 1, -1, -3, 4]);
        assert_eq!(p.row_last, vec![2, 2, 2, 3, 5, 5]);
        assert_eq!(p.seq_slot, vec![3, 0, 2]);
        assert_eq!((p.dec_row.clone(), p.dec_slot.clone()), (vec![3], vec![0]));
        assert_eq!(p.pre_first, vec![0, 4]);
        assert_eq!(p.pre_end, vec![3, 6]);
        assert_eq!(p.pre_slot, vec![3, 2]);
        assert_eq!(p.head_rows, vec![0, 1, 2, 3]);
        assert_eq!(output_rows(&steps), p.head_rows.len());
        assert_eq!(p.slots().collect::<Vec<_>>(), vec![3, 0, 2]);
        assert_eq!(p.seqs(), 3);
    }

    #[test]
    fn packed_metadata_round_trips() {
        let a = [1, 2, 3];
        let b = [4];
        let steps = [step(1, &a, OutputRows::Last), step(4, &b, OutputRows::All)];
        let p = BatchPlan::new(&steps).unwrap();
        let (buf, m) = p.packed();
        assert_eq!(&buf[m.row_prev.clone()], p.row_prev.as_slice());
        assert_eq!(&buf[m.row_last.clone()], &[2, 2, 2, 3]);
        assert_eq!(&buf[m.dec_row.clone()], &[3]);
        assert_eq!(&buf[m.pre_end.clone()], &[3]);
        assert_eq!(&buf[m.head_rows.clone()], &[2, 3]);
        assert_eq!(buf.len(), m.head_rows.end);
    }

    #[test]
    fn empty_steps_give_an_empty_plan() {
        let p = BatchPlan::new(&[]).unwrap();
        assert_eq!(p.rows(), 0);
        assert!(p.packed().0.is_empty());
    }
}
