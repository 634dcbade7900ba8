//! A tiny persistent thread pool for the fast kernels.
//!
//! A decode step runs well over a hundred small products; spawning threads for each costs more
//! than the product itself, so the pool keeps `threads - 1` workers alive. A job is a closure
//! `f(part)` run once for every part `0..threads`: part 0 on the calling thread, the others on the
//! workers. Idle workers spin briefly (steps come back to back) and then sleep on a condvar.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(500);

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped (under `sleep`) each time a job is published.
    epoch: AtomicUsize,
    /// The current job; written only by the caller holding `caller`, before `epoch` is bumped.
    job: UnsafeCell<Option<Job>>,
    /// Workers that have not finished the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    sleepers: Mutex<usize>,
    wake: Condvar,
    /// Serialises callers: one job at a time.
    caller: Mutex<()>,
}

// SAFETY: `job` is only written by the thread holding `caller` while no worker reads it (all
// workers have finished the previous job, `pending == 0`), and published to workers through the
// Release/Acquire pair on `epoch`; the pointee is `Sync`. Every other field is a sync primitive.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw job pointer is only dereferenced while the caller keeps it alive.
unsafe impl Send for Shared {}

/// A fixed set of threads that run one job at a time.
pub struct Pool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    threads: usize,
}

impl Pool {
    /// A pool running jobs on `threads` threads (the caller plus `threads - 1` workers);
    /// 0 means one per available core.
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
            caller: Mutex::new(()),
        });
        let handles = (1..threads)
            .map(|part| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("rwkv-cpu-{part}"))
                    .spawn(move || worker(&shared, part))
                    .expect("spawning a CPU worker thread")
            })
            .collect();
        Self {
            shared,
            handles,
            threads,
        }
    }

    /// Number of parts a job is split into.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(part)` for every part in `0..threads()`, in parallel, and returns when all are done.
    pub fn run<F: Fn(usize) + Sync>(&self, f: F) {
        if self.threads == 1 {
            f(0);
            return;
        }
        let s = &*self.shared;
        let _one_caller = s.caller.lock().unwrap_or_else(|e| e.into_inner());
        let job: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: erasing the lifetime is sound because this function does not return (or
        // unwind: part 0 runs under catch_unwind) before every worker has finished with the job
        // (`pending` back to 0), so the pointer never outlives `f`.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        // SAFETY: we hold `caller` and the previous job is finished, so no worker reads `job`.
        unsafe { *s.job.get() = Some(job) };
        s.pending.store(self.threads - 1, Ordering::Relaxed);
        {
            let sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            s.epoch.fetch_add(1, Ordering::Release);
            if *sleepers > 0 {
                s.wake.notify_all();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let start = Instant::now();
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        assert!(
            !s.panicked.swap(false, Ordering::Relaxed),
            "a CPU worker thread panicked"
        );
    }
}

fn worker(s: &Shared, part: usize) {
    let mut seen = 0usize;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleepers = s.sleepers.lock().unwrap_or_else(|e| e.into_inner());
            *sleepers += 1;
            while s.epoch.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                sleepers = s.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
        }
        // SAFETY: the Acquire load of the new epoch orders this read after the caller's write,
        // and the caller keeps the job alive until `pending` reaches 0, which happens below.
        let job = unsafe { (*s.job.get()).expect("a job is published with each epoch") };
        // SAFETY: see above; the pointee is Sync, so calling it from this thread is allowed.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(part) }));
        if result.is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        {
            let _sleepers = self
                .shared
                .sleepers
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The `part`-th of `parts` near-equal pieces of `0..n`.
pub fn split(n: usize, parts: usize, part: usize) -> std::ops::Range<usize> {
    let (q, r) = (n / parts, n % parts);
    let start = part * q + part.min(r);
    start..start + q + usize::from(part < r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job_and_pieces_cover_the_range() {
        let pool = Pool::new(3);
        let hits = AtomicUsize::new(0);
        for _ in 0..1000 {
            pool.run(|p| {
                hits.fetch_add(1 << (8 * p), Ordering::Relaxed);
            });
        }
        assert_eq!(
            hits.load(Ordering::Relaxed),
            1000 * (1 + (1 << 8) + (1 << 16))
        );
        std::thread::sleep(Duration::from_millis(5)); // Let the workers fall asleep.
        pool.run(|p| {
            hits.fetch_add(p, Ordering::Relaxed);
        });
        for (n, parts) in [(10, 3), (2, 4), (0, 2), (17, 1)] {
            let pieces: Vec<_> = (0..parts).flat_map(|p| split(n, parts, p)).collect();
            assert_eq!(pieces, (0..n).collect::<Vec<_>>());
        }
    }
}
