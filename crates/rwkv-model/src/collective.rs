//! Collective communication between the ranks of a tensor-parallel group.
//!
//! The [`Collective`] trait is what a sharded forward needs: a sum all-reduce over f32 buffers.
//! Backends implement it over their transport (NCCL in `rwkv-cuda`); [`InProcessCollective`]
//! connects ranks that are threads of one process, so the sharding math is testable on CPU.
//!
//! A group can be aborted ([`GroupAbort`]): when one rank fails in the middle of a step, its
//! peers are waiting in a collective for a contribution that will never come; aborting makes
//! every pending and later call fail at once instead of waiting forever.

use std::sync::{Arc, Condvar, Mutex};

/// Why a collective operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    #[error(
        "all-reduce length mismatch: rank {rank} passed {len} values, rank 0 passed {expected}"
    )]
    LengthMismatch {
        rank: usize,
        len: usize,
        expected: usize,
    },
    #[error("collective transport failed: {0}")]
    Transport(String),
    #[error("the tensor-parallel group was aborted after a rank failed")]
    Aborted,
}

/// Ends a group's collectives: every rank blocked in one, and every later call, fails with
/// [`CollectiveError::Aborted`] (or the transport's equivalent). Idempotent; callable from any
/// thread, while other threads are inside collective calls.
pub trait GroupAbort: Send + Sync {
    fn abort(&self);
}

/// One rank's handle on a group of `world()` ranks. Every rank must make the same sequence of
/// calls with buffers of the same length.
pub trait Collective: Send + Sync {
    /// This rank, in `0..world()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world(&self) -> usize;

    /// Replaces `data` on every rank with the element-wise sum of all ranks' `data`.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CollectiveError>;
}

/// A reusable barrier that an abort releases for good.
struct Meeting {
    world: usize,
    state: Mutex<MeetingState>,
    changed: Condvar,
}

#[derive(Default)]
struct MeetingState {
    arrived: usize,
    generation: u64,
    aborted: bool,
}

impl Meeting {
    /// Waits until all `world` ranks have arrived (or the group is aborted).
    fn wait(&self) -> Result<(), CollectiveError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.aborted {
            return Err(CollectiveError::Aborted);
        }
        st.arrived += 1;
        if st.arrived == self.world {
            st.arrived = 0;
            st.generation += 1;
            self.changed.notify_all();
            return Ok(());
        }
        let generation = st.generation;
        while st.generation == generation && !st.aborted {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.generation == generation {
            Err(CollectiveError::Aborted)
        } else {
            Ok(())
        }
    }

    fn abort(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.aborted = true;
        self.changed.notify_all();
    }
}

struct Group {
    meeting: Meeting,
    /// Each rank's contribution to the reduction in progress.
    slots: Vec<Mutex<Vec<f32>>>,
}

impl GroupAbort for Group {
    fn abort(&self) {
        self.meeting.abort();
    }
}

/// Ranks that are threads of one process, meeting at a [`Barrier`] over shared buffers.
///
/// The sum is taken over ranks 0, 1, …, world−1 in that order on every rank, so every rank gets
/// bit-identical results and runs are reproducible. A rank that fails between collective calls
/// leaves the others waiting (as a crashed NCCL peer would) until the group is aborted
/// ([`InProcessCollective::aborter`]).
pub struct InProcessCollective {
    rank: usize,
    world: usize,
    group: Arc<Group>,
}

impl InProcessCollective {
    /// Handles for ranks `0..world`, in rank order. `world` must be at least 1.
    pub fn group(world: usize) -> Vec<Self> {
        assert!(world > 0, "a collective group needs at least one rank");
        let group = Arc::new(Group {
            meeting: Meeting {
                world,
                state: Mutex::new(MeetingState::default()),
                changed: Condvar::new(),
            },
            slots: (0..world).map(|_| Mutex::new(Vec::new())).collect(),
        });
        (0..world)
            .map(|rank| Self {
                rank,
                world,
                group: Arc::clone(&group),
            })
            .collect()
    }

    /// A handle that aborts this rank's whole group.
    pub fn aborter(&self) -> Arc<dyn GroupAbort> {
        self.group.clone()
    }
}

impl Collective for InProcessCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CollectiveError> {
        if self.world == 1 {
            // Nobody to wait for, but an aborted group stays aborted.
            return self.group.meeting.wait();
        }
        let lock = |r: usize| {
            self.group.slots[r]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        };
        {
            let mut mine = lock(self.rank);
            mine.clear();
            mine.extend_from_slice(data);
        }
        self.group.meeting.wait()?;
        // Every rank checks every length, so all of them return the same error together.
        let expected = lock(0).len();
        let mut result = Ok(());
        for r in 0..self.world {
            let len = lock(r).len();
            if len != expected {
                result = Err(CollectiveError::LengthMismatch {
                    rank: r,
                    len,
                    expected,
                });
                break;
            }
        }
        if result.is_ok() {
            data.copy_from_slice(&lock(0));
            for r in 1..self.world {
                let other = lock(r);
                data.iter_mut().zip(other.iter()).for_each(|(d, o)| *d += o);
            }
        }
        // Nobody may overwrite its slot for the next call before everyone has read this one.
        self.group.meeting.wait()?;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        for world in [1, 2, 3, 4] {
            let comms = InProcessCollective::group(world);
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = comms
                    .iter()
                    .map(|c| {
                        s.spawn(move || {
                            let mut out = Vec::new();
                            // Several rounds reuse the shared slots.
                            for round in 0..3 {
                                let mut data: Vec<f32> =
                                    (0..5).map(|i| (c.rank() * 10 + i + round) as f32).collect();
                                c.all_reduce_sum(&mut data).unwrap();
                                out.extend(data);
                            }
                            out
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let want: Vec<f32> = (0..3)
                .flat_map(|round| {
                    (0..5)
                        .map(move |i| (0..world).map(|r| (r * 10 + i + round) as f32).sum::<f32>())
                })
                .collect();
            for r in &results {
                assert_eq!(r, &want, "world {world}");
            }
        }
    }

    #[test]
    fn mismatched_lengths_fail_on_every_rank() {
        let comms = InProcessCollective::group(2);
        let errs: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .map(|c| {
                    s.spawn(move || {
                        let mut data = vec![1.0; 3 + c.rank()];
                        c.all_reduce_sum(&mut data).unwrap_err()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want = CollectiveError::LengthMismatch {
            rank: 1,
            len: 4,
            expected: 3,
        };
        assert_eq!(errs, [want.clone(), want]);
    }

    #[test]
    fn an_abort_releases_waiting_ranks_and_fails_later_calls() {
        let comms = InProcessCollective::group(3);
        let abort = comms[2].aborter();
        let errs: Vec<_> = std::thread::scope(|s| {
            // Ranks 0 and 1 meet in a collective that rank 2 never joins.
            let waiting: Vec<_> = comms[..2]
                .iter()
                .map(|c| s.spawn(move || c.all_reduce_sum(&mut [1.0, 2.0])))
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(50));
            abort.abort();
            waiting.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            errs,
            [Err(CollectiveError::Aborted), Err(CollectiveError::Aborted)]
        );
        assert_eq!(
            comms[2].all_reduce_sum(&mut [0.0]),
            Err(CollectiveError::Aborted)
        );
        // A group of one is aborted too.
        let one = InProcessCollective::group(1);
        assert_eq!(one[0].all_reduce_sum(&mut [1.0]), Ok(()));
        one[0].aborter().abort();
        assert_eq!(
            one[0].all_reduce_sum(&mut [1.0]),
            Err(CollectiveError::Aborted)
        );
    }
}
