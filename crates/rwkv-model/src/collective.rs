//! Collective communication between the ranks of a tensor-parallel group.
//!
//! The [`Collective`] trait is what a sharded forward needs: a sum all-reduce over f32 buffers.
//! Backends implement it over their transport (NCCL in `rwkv-cuda`); [`InProcessCollective`]
//! connects ranks that are threads of one process, so the sharding math is testable on CPU.

use std::sync::{Arc, Barrier, Mutex};

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

struct Group {
    barrier: Barrier,
    /// Each rank's contribution to the reduction in progress.
    slots: Vec<Mutex<Vec<f32>>>,
}

/// Ranks that are threads of one process, meeting at a [`Barrier`] over shared buffers.
///
/// The sum is taken over ranks 0, 1, …, world−1 in that order on every rank, so every rank gets
/// bit-identical results and runs are reproducible. A rank that panics between collective calls
/// leaves the others waiting at the barrier (as a crashed NCCL peer would).
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
            barrier: Barrier::new(world),
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
            return Ok(());
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
        self.group.barrier.wait();
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
        self.group.barrier.wait();
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
}
