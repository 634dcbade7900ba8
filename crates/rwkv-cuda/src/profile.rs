//! Device time per kernel of one step, for finding where a step's time goes on a GPU
//! ([`CudaBackend::profile_step`](crate::CudaBackend::profile_step)).
//!
//! While a [`Profile`] is on, every kernel launch and GEMM on the compute stream is bracketed by
//! two timing events; the report adds the intervals up by kernel (GEMMs by shape). The events
//! cost a little device time each, so the sum is an upper bound on the busy time and the
//! shares are what matter. Off (the default), a launch pays one relaxed atomic load.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::error::{CudaError, Result};

/// One kernel's (or GEMM shape's) share of a profiled step.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub name: String,
    pub launches: usize,
    /// Device milliseconds, all launches together.
    pub ms: f64,
}

struct Span {
    name: Cow<'static, str>,
    start: CudaEvent,
    end: CudaEvent,
}

/// The timing events of the launches issued while on (one per device).
#[derive(Default)]
pub struct Profile {
    on: AtomicBool,
    spans: Mutex<Vec<Span>>,
}

impl Profile {
    /// Starts recording (dropping anything recorded before).
    pub fn start(&self) {
        self.lock().clear();
        self.on.store(true, Ordering::Relaxed);
    }

    /// Stops recording; [`Profile::report`] reads what was recorded.
    pub fn stop(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Span>> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `issue` (which queues work on `stream`), timed as `name` when recording.
    pub fn span<T>(
        &self,
        stream: &Arc<CudaStream>,
        name: impl FnOnce() -> Cow<'static, str>,
        issue: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        if !self.on.load(Ordering::Relaxed) {
            return issue();
        }
        let timed = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream
            .record_event(timed)
            .map_err(CudaError::driver("profile event"))?;
        let out = issue()?;
        let end = stream
            .record_event(timed)
            .map_err(CudaError::driver("profile event"))?;
        self.lock().push(Span {
            name: name(),
            start,
            end,
        });
        Ok(out)
    }

    /// Device time by name, largest first (waits for the recorded work to finish).
    pub fn report(&self) -> Result<Vec<KernelTime>> {
        let spans = std::mem::take(&mut *self.lock());
        let mut by_name: HashMap<Cow<'static, str>, (usize, f64)> = HashMap::new();
        for s in spans {
            let ms = s
                .start
                .elapsed_ms(&s.end)
                .map_err(CudaError::driver("profile elapsed time"))?;
            let e = by_name.entry(s.name).or_default();
            e.0 += 1;
            e.1 += f64::from(ms);
        }
        Ok(summarize(by_name))
    }
}

fn summarize(by_name: HashMap<Cow<'static, str>, (usize, f64)>) -> Vec<KernelTime> {
    let mut out: Vec<KernelTime> = by_name
        .into_iter()
        .map(|(name, (launches, ms))| KernelTime {
            name: name.into_owned(),
            launches,
            ms,
        })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then_with(|| a.name.cmp(&b.name)));
    out
}

/// One line per kernel, `name xN T ms (P %)`, for the `lines` largest; the rest on one line;
/// then the total.
pub fn format_report(times: &[KernelTime], lines: usize) -> String {
    let total: f64 = times.iter().map(|t| t.ms).sum();
    let share = |ms: f64| 100.0 * ms / total.max(f64::MIN_POSITIVE);
    let mut out = String::new();
    let mut line = |name: &str, launches: usize, ms: f64| {
        out.push_str(&format!(
            "  {name:<40} x{launches:<5} {ms:>9.3} ms {:>5.1} %\n",
            share(ms)
        ));
    };
    let (shown, rest) = times.split_at(lines.min(times.len()));
    for t in shown {
        line(&t.name, t.launches, t.ms);
    }
    if !rest.is_empty() {
        let others = format!("{} others", rest.len());
        line(
            &others,
            rest.iter().map(|t| t.launches).sum(),
            rest.iter().map(|t| t.ms).sum(),
        );
    }
    line("total", times.iter().map(|t| t.launches).sum(), total);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_sums_by_name_largest_first() {
        let mut m = HashMap::new();
        m.insert(Cow::Borrowed("wkv6_decode_f32"), (24, 1.8));
        m.insert(Cow::Owned("gemm 2048x7168 rows 256".to_string()), (24, 2.5));
        m.insert(Cow::Borrowed("layer_norm_f32"), (1, 0.01));
        let times = summarize(m);
        let names: Vec<_> = times.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "gemm 2048x7168 rows 256",
                "wkv6_decode_f32",
                "layer_norm_f32"
            ]
        );
        let text = format_report(&times, 2);
        assert!(text.contains("58.0 %"), "{text}");
        assert!(text.contains("1 others"), "{text}");
        let total = text.lines().last().unwrap();
        assert!(total.contains("total") && total.contains("x49"), "{text}");
        assert!(total.contains("100.0 %"), "{text}");
    }
}
