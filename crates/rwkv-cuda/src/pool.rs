//! The device state pool: fixed-size slots in one f32 buffer, addressed by index, and state
//! swaps between the pool and pinned host buffers on the copy stream.
//!
//! # Layout
//!
//! Slot `s` occupies `[s * state_len, (s + 1) * state_len)`, laid out exactly like the host
//! [`State`]: per layer `[att_shift C][wkv H*N*N, indexed head, key, value][ffn_shift C]`. A
//! slot therefore moves in one contiguous copy, and the WKV kernels read `S[i][j]` with thread j
//! on consecutive addresses.
//!
//! # Ordering between the compute and copy streams
//!
//! Kernels touching a slot run on the compute stream; swaps run on the copy stream. Each slot
//! remembers the event recorded after the last compute work that touched it and the event
//! recorded after the last copy that touched it ([`SlotSync`]):
//! - before a copy touches slot s, the copy stream waits for s's last compute event (the copy
//!   sees every earlier forward step's writes, and a swap-in cannot overwrite a state that an
//!   earlier step still reads);
//! - before compute work touches slot s, the compute stream waits for s's last copy event (a
//!   forward step reads the swapped-in state, and does not overwrite a slot whose swap-out is
//!   still reading it).
//!
//! Waits are only inserted for the slots involved, so a swap overlaps with forward steps on
//! other slots. A pinned buffer keeps the event recorded after the last copy into or out of it
//! and waits for it before the host reads or writes it, so a host buffer is never reused or read
//! while a copy is in flight. (cudarc's own per-buffer events are not recorded: the device
//! disables its event tracking, see `device.rs`.)

use std::ops::Range;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};
use rwkv_model::{ModelConfig, State};

use crate::device::Device;
use crate::error::{CudaError, Result};
use crate::kernels::PoolArg;

/// Where everything lives in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLayout {
    pub slots: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub head_size: usize,
}

impl PoolLayout {
    pub fn new(cfg: &ModelConfig, slots: usize) -> Self {
        Self {
            slots,
            n_layer: cfg.n_layer,
            n_embd: cfg.n_embd,
            n_head: cfg.n_head,
            head_size: cfg.head_size,
        }
    }

    /// f32 values of one layer: two shift vectors and H*N*N WKV values.
    pub fn layer_len(&self) -> usize {
        2 * self.n_embd + self.wkv_len()
    }

    pub fn wkv_len(&self) -> usize {
        self.n_head * self.head_size * self.head_size
    }

    /// f32 values of one slot.
    pub fn state_len(&self) -> usize {
        self.n_layer * self.layer_len()
    }

    /// f32 values of the whole pool.
    pub fn total_len(&self) -> Result<usize> {
        self.slots
            .checked_mul(self.state_len())
            .ok_or_else(|| CudaError::shape("state pool", format!("{} slots overflow", self.slots)))
    }

    /// The values of slot `slot`.
    pub fn slot_range(&self, slot: usize) -> Range<usize> {
        let len = self.state_len();
        slot * len..(slot + 1) * len
    }

    /// Offset of layer `layer`'s att_shift inside a slot.
    pub fn att_shift(&self, layer: usize) -> usize {
        layer * self.layer_len()
    }

    /// Offset of layer `layer`'s WKV state inside a slot.
    pub fn wkv(&self, layer: usize) -> usize {
        layer * self.layer_len() + self.n_embd
    }

    /// Offset of layer `layer`'s ffn_shift inside a slot.
    pub fn ffn_shift(&self, layer: usize) -> usize {
        layer * self.layer_len() + self.n_embd + self.wkv_len()
    }

    /// Checks a slot index.
    pub fn check_slot(&self, slot: usize) -> Result<()> {
        rwkv_model::backend::check_slot(slot, self.slots).map_err(CudaError::from)
    }
}

/// Per-slot events still to be waited for, generic over the event handle so the bookkeeping
/// is testable without a device.
#[derive(Debug)]
pub struct SlotSync<E> {
    after_compute: Vec<Option<E>>,
    after_copy: Vec<Option<E>>,
}

impl<E: Clone> SlotSync<E> {
    pub fn new(slots: usize) -> Self {
        Self {
            after_compute: vec![None; slots],
            after_copy: vec![None; slots],
        }
    }

    /// The copy the compute stream must wait for before touching `slot`, if any. Once waited
    /// for, stream order covers it, so it is cleared.
    pub fn compute_wait(&mut self, slot: usize) -> Option<E> {
        self.after_copy[slot].take()
    }

    /// Compute work touching `slot` was issued, followed by `event`.
    pub fn compute_done(&mut self, slot: usize, event: E) {
        self.after_compute[slot] = Some(event);
    }

    /// The compute work the copy stream must wait for before touching `slot`, if any.
    pub fn copy_wait(&mut self, slot: usize) -> Option<E> {
        self.after_compute[slot].take()
    }

    /// A copy touching `slot` was issued, followed by `event`.
    pub fn copy_done(&mut self, slot: usize, event: E) {
        self.after_copy[slot] = Some(event);
    }
}

/// One sequence's state in pinned (page-locked) host memory, the target of
/// [`crate::CudaBackend::swap_out`] and the source of [`crate::CudaBackend::swap_in`].
/// Reading it waits for a copy still in flight.
pub struct HostState {
    buf: PinnedHostSlice<f32>,
    /// Recorded on the copy stream after the last swap that used this buffer.
    copied: Option<CudaEvent>,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("len", &self.buf.len())
            .finish()
    }
}

impl Drop for HostState {
    /// Waits for a swap still using the buffer before its pinned memory is freed: cudarc's own
    /// wait on drop relies on event tracking, which the backend turns off (device.rs), so
    /// `copied` is the only fence, and a caller may drop a buffer whose swap is in flight.
    fn drop(&mut self) {
        // A first failure may be an error cudarc stored earlier and hands to the next call
        // (clearing it) before that call waits: the second try waits for real.
        if self.wait_for_copy().is_err() {
            if let Err(e) = self.wait_for_copy() {
                tracing::warn!(error = %e, "a state swap failed while its host buffer was dropped");
            }
        }
    }
}

impl HostState {
    /// A zeroed pinned buffer of `len` f32 values.
    pub(crate) fn alloc(dev: &Device, len: usize) -> Result<Self> {
        // SAFETY: the memory is uninitialised; it is zeroed below through a raw pointer before
        // any reference to it exists. Flags 0: cached host memory (fast to read back on the
        // host, unlike cudarc's default write-combined allocation).
        let mut buf = unsafe { dev.ctx.alloc_pinned_with_flags::<f32>(len.max(1), 0) }
            .map_err(CudaError::driver("allocate pinned host memory"))?;
        let ptr = buf
            .as_mut_ptr()
            .map_err(CudaError::driver("pinned host memory"))?;
        // SAFETY: `ptr` points at `len.max(1)` f32 values owned by `buf`, and no copy uses the
        // fresh buffer yet; all-zero bits are a valid f32.
        unsafe { std::ptr::write_bytes(ptr, 0, len.max(1)) };
        Ok(Self { buf, copied: None })
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Waits for the last swap that used this buffer.
    fn wait_for_copy(&self) -> Result<()> {
        match &self.copied {
            Some(event) => event
                .synchronize()
                .map_err(CudaError::driver("wait for state copy")),
            None => Ok(()),
        }
    }

    /// The values, after any copy into this buffer has finished.
    pub fn as_slice(&self) -> Result<&[f32]> {
        self.wait_for_copy()?;
        self.buf
            .as_slice()
            .map_err(CudaError::driver("wait for state copy"))
    }

    /// The values for writing, after any copy out of or into this buffer has finished.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        self.wait_for_copy()?;
        self.buf
            .as_mut_slice()
            .map_err(CudaError::driver("wait for state copy"))
    }

    /// A host [`State`] with these values.
    pub fn to_state(&self, cfg: &ModelConfig) -> Result<State> {
        State::from_flat(cfg, self.as_slice()?.to_vec())
            .map_err(|e| CudaError::Backend(rwkv_model::BackendError::State(e.to_string())))
    }
}

/// The pool on the device.
pub struct StatePool {
    pub layout: PoolLayout,
    buf: CudaSlice<f32>,
    sync: SlotSync<Arc<CudaEvent>>,
}

impl StatePool {
    /// Allocates `layout.slots` slots and sets each to `initial` (a device state).
    pub fn new(dev: &Device, layout: PoolLayout, initial: &CudaSlice<f32>) -> Result<Self> {
        let total = layout.total_len()?;
        if initial.len() < layout.state_len() {
            return Err(CudaError::shape("state pool", "initial state too short"));
        }
        let buf = dev.zeros::<f32>(total)?;
        let mut pool = Self {
            layout,
            buf,
            sync: SlotSync::new(layout.slots),
        };
        for slot in 0..layout.slots {
            pool.fill(dev, slot, initial)?;
        }
        Ok(pool)
    }

    /// The pool as a kernel argument.
    pub fn arg(&self, dev: &Device) -> PoolArg {
        PoolArg {
            buf: dev.buf(&self.buf),
            stride: self.layout.state_len(),
            slots: self.layout.slots,
        }
    }

    /// Makes the compute stream wait for pending copies of these slots. Call before issuing
    /// compute work that touches them.
    pub fn before_compute(
        &mut self,
        dev: &Device,
        slots: impl IntoIterator<Item = usize>,
    ) -> Result<()> {
        for slot in slots {
            if let Some(e) = self.sync.compute_wait(slot) {
                dev.compute
                    .wait(&e)
                    .map_err(CudaError::driver("wait for state copy"))?;
            }
        }
        Ok(())
    }

    /// Records that compute work touching these slots has been issued.
    pub fn after_compute(
        &mut self,
        dev: &Device,
        slots: impl IntoIterator<Item = usize>,
    ) -> Result<()> {
        let event = Arc::new(
            dev.compute
                .record_event(None)
                .map_err(CudaError::driver("record compute event"))?,
        );
        for slot in slots {
            self.sync.compute_done(slot, event.clone());
        }
        Ok(())
    }

    fn before_copy(&mut self, dev: &Device, slot: usize) -> Result<()> {
        if let Some(e) = self.sync.copy_wait(slot) {
            dev.copy
                .wait(&e)
                .map_err(CudaError::driver("wait for compute"))?;
        }
        Ok(())
    }

    fn after_copy(&mut self, dev: &Device, slot: usize) -> Result<()> {
        let event = dev
            .copy
            .record_event(None)
            .map_err(CudaError::driver("record copy event"))?;
        self.sync.copy_done(slot, Arc::new(event));
        Ok(())
    }

    fn check_host(&self, host: &HostState) -> Result<()> {
        if host.len() == self.layout.state_len() {
            Ok(())
        } else {
            Err(CudaError::shape(
                "swap",
                format!(
                    "host state has {} values, a slot has {}",
                    host.len(),
                    self.layout.state_len()
                ),
            ))
        }
    }

    /// Starts copying slot `slot` into `host` on the copy stream; `host.as_slice()` waits for it.
    pub fn swap_out(&mut self, dev: &Device, slot: usize, host: &mut HostState) -> Result<()> {
        self.layout.check_slot(slot)?;
        self.check_host(host)?;
        self.before_copy(dev, slot)?;
        let view = self.buf.slice(self.layout.slot_range(slot));
        dev.copy
            .memcpy_dtoh(&view, &mut host.buf)
            .map_err(CudaError::driver("swap out"))?;
        host.copied = Some(record_copy(dev)?);
        self.after_copy(dev, slot)
    }

    /// Starts copying `host` into slot `slot` on the copy stream; later compute work on the slot
    /// waits for it.
    pub fn swap_in(&mut self, dev: &Device, slot: usize, host: &mut HostState) -> Result<()> {
        self.layout.check_slot(slot)?;
        self.check_host(host)?;
        self.before_copy(dev, slot)?;
        let range = self.layout.slot_range(slot);
        let mut view = self.buf.slice_mut(range);
        dev.copy
            .memcpy_htod(&host.buf, &mut view)
            .map_err(CudaError::driver("swap in"))?;
        host.copied = Some(record_copy(dev)?);
        self.after_copy(dev, slot)
    }

    /// Overwrites a slot from host memory, on the compute stream.
    pub fn load(&mut self, dev: &Device, slot: usize, data: &[f32]) -> Result<()> {
        self.layout.check_slot(slot)?;
        if data.len() != self.layout.state_len() {
            return Err(CudaError::shape(
                "load state",
                format!("{} values", data.len()),
            ));
        }
        self.before_compute(dev, [slot])?;
        let mut view = self.buf.slice_mut(self.layout.slot_range(slot));
        dev.compute
            .memcpy_htod(data, &mut view)
            .map_err(CudaError::driver("load state"))?;
        self.after_compute(dev, [slot])
    }

    /// Copies a slot to host memory, on the compute stream (waits for it).
    pub fn save(&mut self, dev: &Device, slot: usize) -> Result<Vec<f32>> {
        self.layout.check_slot(slot)?;
        self.before_compute(dev, [slot])?;
        let view = self.buf.slice(self.layout.slot_range(slot));
        let out = dev
            .compute
            .clone_dtoh(&view)
            .map_err(CudaError::driver("save state"))?;
        dev.compute
            .synchronize()
            .map_err(CudaError::driver("save state"))?;
        self.after_compute(dev, [slot])?;
        Ok(out)
    }

    /// Sets a slot from a device state (reset to the initial state).
    pub fn fill(&mut self, dev: &Device, slot: usize, src: &CudaSlice<f32>) -> Result<()> {
        self.layout.check_slot(slot)?;
        self.before_compute(dev, [slot])?;
        let len = self.layout.state_len();
        let from = src.slice(0..len);
        let mut view = self.buf.slice_mut(self.layout.slot_range(slot));
        dev.compute
            .memcpy_dtod(&from, &mut view)
            .map_err(CudaError::driver("reset state"))?;
        self.after_compute(dev, [slot])
    }

    /// Copies slot `src` into slot `dst` (fork).
    pub fn copy(&mut self, dev: &Device, src: usize, dst: usize) -> Result<()> {
        self.layout.check_slot(src)?;
        self.layout.check_slot(dst)?;
        if src == dst {
            return Ok(());
        }
        self.before_compute(dev, [src, dst])?;
        let (lo, hi) = (src.min(dst), src.max(dst));
        let len = self.layout.state_len();
        // Split so that one view can be read while the other is written.
        let (mut head, mut tail) = self.buf.split_at_mut(hi * len);
        let mut lo_view = head.slice_mut(lo * len..(lo + 1) * len);
        let mut hi_view = tail.slice_mut(0..len);
        let result = if src < dst {
            dev.compute.memcpy_dtod(&lo_view, &mut hi_view)
        } else {
            dev.compute.memcpy_dtod(&hi_view, &mut lo_view)
        };
        result.map_err(CudaError::driver("copy state"))?;
        self.after_compute(dev, [src, dst])
    }
}

/// An event after the work issued so far on the copy stream.
fn record_copy(dev: &Device) -> Result<CudaEvent> {
    dev.copy
        .record_event(None)
        .map_err(CudaError::driver("record copy event"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rwkv_model::DType;

    fn cfg() -> ModelConfig {
        ModelConfig {
            n_embd: 16,
            n_layer: 3,
            n_head: 2,
            head_size: 8,
            dim_ffn: 32,
            vocab_size: 10,
            maa_lora: 4,
            decay_lora: 4,
            weight_dtype: DType::BF16,
            has_time_state: false,
        }
    }

    #[test]
    fn layout_matches_the_host_state_layout() {
        let cfg = cfg();
        let layout = PoolLayout::new(&cfg, 4);
        assert_eq!(layout.state_len(), cfg.state_len());
        assert_eq!(layout.layer_len(), cfg.layer_state_len());
        let data: Vec<f32> = (0..cfg.state_len()).map(|i| i as f32).collect();
        let state = State::from_flat(&cfg, data.clone()).unwrap();
        for l in 0..cfg.n_layer {
            let (att, wkv, ffn) = state.layer(l);
            let c = cfg.n_embd;
            assert_eq!(&data[layout.att_shift(l)..layout.att_shift(l) + c], att);
            assert_eq!(&data[layout.wkv(l)..layout.wkv(l) + layout.wkv_len()], wkv);
            assert_eq!(&data[layout.ffn_shift(l)..layout.ffn_shift(l) + c], ffn);
        }
    }

    #[test]
    fn slots_are_disjoint_and_cover_the_pool() {
        let layout = PoolLayout::new(&cfg(), 5);
        let total = layout.total_len().unwrap();
        assert_eq!(total, 5 * layout.state_len());
        let mut next = 0;
        for s in 0..5 {
            let r = layout.slot_range(s);
            assert_eq!(r.start, next);
            assert_eq!(r.len(), layout.state_len());
            next = r.end;
        }
        assert_eq!(next, total);
        assert!(layout.check_slot(4).is_ok());
        assert!(layout.check_slot(5).is_err());
        let huge = PoolLayout {
            slots: usize::MAX,
            ..layout
        };
        assert!(huge.total_len().is_err());
    }

    #[test]
    fn slot_sync_waits_only_for_the_slots_involved_and_only_once() {
        let mut s: SlotSync<u32> = SlotSync::new(3);
        assert_eq!(s.compute_wait(0), None);
        assert_eq!(s.copy_wait(0), None);
        // A step on slots 0 and 1 (event 7), then a swap-out of slot 1 (event 8).
        s.compute_done(0, 7);
        s.compute_done(1, 7);
        assert_eq!(s.copy_wait(1), Some(7));
        s.copy_done(1, 8);
        assert_eq!(
            s.copy_wait(1),
            None,
            "stream order covers an event once waited for"
        );
        // The next step on slot 0 needs no wait; one on slot 1 waits for the swap.
        assert_eq!(s.compute_wait(0), None);
        assert_eq!(s.compute_wait(1), Some(8));
        assert_eq!(s.compute_wait(1), None);
        assert_eq!(s.compute_wait(2), None);
        // A later copy of slot 0 still waits for the step.
        assert_eq!(s.copy_wait(0), Some(7));
    }
}
