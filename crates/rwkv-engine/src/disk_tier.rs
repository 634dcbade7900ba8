//! The third state tier: session states the host tier evicts, kept in files on local disk.
//!
//! Without it, a session whose state falls out of the host tier replays its whole history on
//! its next turn. With it, the state is written to a file (the export format of
//! [`crate::export`], so it carries the model's hash and a CRC-32) and read back on that turn:
//! one file read instead of a prefill. The tier is bounded by bytes with LRU eviction, like the
//! host tier, and only this process uses its files: they are deleted when evicted or taken
//! back, when the engine stops, and (left over from a crash) when the next one starts.
//!
//! Writing happens on a thread of its own, so the step loop never waits for the disk when the
//! host tier overflows: a state stays in memory until its file is complete (written under a
//! temporary name, then renamed), and a session that comes back before that gets it from
//! memory. Deletions go through the same thread, after the write they follow. Reading happens
//! on the engine thread when the session's next turn is placed (it is what that turn waits
//! for, and costs less than the prefill it replaces). A corrupted or unreadable file is a
//! miss, and the session replays its history.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use rwkv_model::{ModelConfig, State};

use crate::error::EngineError;
use crate::export;
use crate::sessions::SessionKey;
use crate::tiers::{LruStore, Weigh};

/// The extension of the tier's files; files with it in the directory belong to the tier.
const EXTENSION: &str = "rwkvstate";
/// The extension of a file being written.
const PARTIAL: &str = "partial";

/// Work for the writer thread, done in order.
enum Job {
    Write { path: PathBuf, state: Arc<State> },
    Delete(PathBuf),
}

/// One state file; dropping the entry deletes the file (after any write queued for it).
#[derive(Debug)]
struct StateFile {
    path: PathBuf,
    bytes: usize,
    jobs: Sender<Job>,
}

impl Weigh for StateFile {
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        // The writer is gone only at shutdown; the next start removes what is left.
        let _ = self.jobs.send(Job::Delete(self.path.clone()));
    }
}

/// Session states on local disk, bounded by bytes, least recently used evicted first.
pub(crate) struct DiskTier {
    files: LruStore<SessionKey, StateFile>,
    /// States whose files are not complete yet, by path.
    unwritten: HashMap<PathBuf, Arc<State>>,
    /// Paths the writer is done with (written, or failed: then reading them misses).
    finished: Receiver<PathBuf>,
    jobs: Sender<Job>,
    writer: Option<JoinHandle<()>>,
    dir: PathBuf,
    next_file: u64,
    model_hash: [u8; 32],
    cfg: ModelConfig,
    /// Holds an exclusive lock on the directory's lock file while the tier is open: file names
    /// are this process's own counter, so a second process on the same directory would delete
    /// and overwrite this one's states (and hand one session another's).
    _lock: fs::File,
}

impl DiskTier {
    /// Opens (creating it if needed) the tier's directory, holding at most `capacity` bytes,
    /// removes the files an earlier run left there and starts the writer thread.
    pub(crate) fn open(
        dir: &Path,
        capacity: usize,
        model_hash: [u8; 32],
        cfg: ModelConfig,
    ) -> Result<Self, EngineError> {
        let fail = |what: &str, e: std::io::Error| {
            EngineError::Config(format!("disk tier {}: {what}: {e}", dir.display()))
        };
        fs::create_dir_all(dir).map_err(|e| fail("cannot create the directory", e))?;
        let lock = fs::File::create(dir.join(".lock"))
            .map_err(|e| fail("cannot create the lock file", e))?;
        if let Err(e) = lock.try_lock() {
            return Err(EngineError::Config(format!(
                "disk tier {}: the directory is in use by another worker ({e}); give each \
                 worker a directory of its own",
                dir.display()
            )));
        }
        let entries = fs::read_dir(dir).map_err(|e| fail("cannot list the directory", e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path
                .extension()
                .is_some_and(|x| x == EXTENSION || x == PARTIAL)
            {
                fs::remove_file(&path).map_err(|e| fail("cannot remove an old state file", e))?;
            }
        }
        let (jobs, queue) = mpsc::channel();
        let (done, finished) = mpsc::channel();
        let writer_cfg = cfg.clone();
        let writer = std::thread::Builder::new()
            .name("rwkv-disk-tier".into())
            .spawn(move || write_files(&queue, &done, &model_hash, &writer_cfg))
            .map_err(|e| fail("cannot start the writer thread", e))?;
        Ok(Self {
            files: LruStore::new(capacity),
            unwritten: HashMap::new(),
            finished,
            jobs,
            writer: Some(writer),
            dir: dir.to_owned(),
            next_file: 0,
            model_hash,
            cfg,
            _lock: lock,
        })
    }

    /// Queues a session's state for writing; false if it cannot be kept (larger than the
    /// tier). Older files are evicted to make room.
    pub(crate) fn put(&mut self, key: SessionKey, state: State) -> bool {
        self.reap();
        let bytes = export::encoded_len(0, state.as_flat().len());
        if bytes > self.files.capacity_bytes() {
            return false;
        }
        self.next_file += 1;
        let path = self.dir.join(format!("{}.{EXTENSION}", self.next_file));
        let state = Arc::new(state);
        let queued = self.jobs.send(Job::Write {
            path: path.clone(),
            state: Arc::clone(&state),
        });
        if queued.is_err() {
            return false;
        }
        self.unwritten.insert(path.clone(), state);
        let file = StateFile {
            path,
            bytes,
            jobs: self.jobs.clone(),
        };
        // Evicted entries delete their files as they drop.
        drop(self.files.insert(key, file));
        true
    }

    /// Takes a session's state out of the tier (its file is deleted). `None` if the tier does
    /// not hold it or its file is unreadable or corrupted.
    pub(crate) fn take(&mut self, key: &SessionKey) -> Option<State> {
        self.reap();
        let file = self.files.remove(key)?;
        match self.unwritten.remove(&file.path) {
            Some(state) => Some(Arc::unwrap_or_clone(state)),
            None => self.read(&file.path),
        }
    }

    /// A copy of a session's state, leaving it in the tier.
    pub(crate) fn get(&mut self, key: &SessionKey) -> Option<State> {
        self.reap();
        let path = self.files.get(key)?.path.clone();
        if let Some(state) = self.unwritten.get(&path) {
            return Some(State::clone(state));
        }
        let state = self.read(&path);
        if state.is_none() {
            // Unusable: forget it rather than fail again next time.
            self.files.remove(key);
        }
        state
    }

    /// Forgets a session's state (deleting its file).
    pub(crate) fn remove(&mut self, key: &SessionKey) {
        self.reap();
        if let Some(file) = self.files.remove(key) {
            self.unwritten.remove(&file.path);
        }
    }

    /// Bytes of the files held (including those still being written).
    pub(crate) fn used_bytes(&self) -> usize {
        self.files.used_bytes()
    }

    /// Number of states held.
    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    /// Waits until every queued write and deletion is done.
    #[cfg(test)]
    fn flush(&mut self) {
        // A deletion of a path that never exists, as a marker: when the writer reports it,
        // everything queued before it is done.
        let marker = self.dir.join(format!("flush.{PARTIAL}"));
        if self.jobs.send(Job::Delete(marker.clone())).is_ok() {
            while let Ok(path) = self.finished.recv() {
                if path == marker {
                    break;
                }
                self.unwritten.remove(&path);
            }
        }
    }

    /// Forgets the in-memory copies of states whose files are complete.
    fn reap(&mut self) {
        while let Ok(path) = self.finished.try_recv() {
            self.unwritten.remove(&path);
        }
    }

    fn read(&self, path: &Path) -> Option<State> {
        let bytes = fs::read(path).ok()?;
        export::decode(&self.model_hash, &self.cfg, &bytes)
            .ok()
            .map(|snapshot| snapshot.state)
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        // Every entry queues its deletion; then the writer drains the queue and stops once the
        // last sender (ours) is gone.
        self.files = LruStore::new(0);
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(writer) = self.writer.take() {
            // A writer that panicked has nothing left to clean up.
            let _ = writer.join();
        }
    }
}

/// The writer thread: writes each state under a temporary name and renames it into place (so
/// a complete file is the only kind a reader can see), deletes files, and reports every path
/// it is done with.
fn write_files(
    queue: &Receiver<Job>,
    done: &Sender<PathBuf>,
    model_hash: &[u8; 32],
    cfg: &ModelConfig,
) {
    while let Ok(job) = queue.recv() {
        let path = match job {
            Job::Write { path, state } => {
                let bytes = export::encode_parts(model_hash, cfg, &[], &[], &state);
                drop(state);
                let partial = path.with_extension(PARTIAL);
                let written =
                    fs::write(&partial, &bytes).and_then(|()| fs::rename(&partial, &path));
                if written.is_err() {
                    // A missing file reads as a miss; leave nothing half-written behind.
                    let _ = fs::remove_file(&partial);
                }
                path
            }
            Job::Delete(path) => {
                let _ = fs::remove_file(&path);
                path
            }
        };
        // The tier may be gone (shutdown); then nobody needs to know.
        let _ = done.send(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig {
            n_embd: 8,
            n_layer: 2,
            n_head: 2,
            head_size: 4,
            dim_ffn: 16,
            vocab_size: 16,
            maa_lora: 2,
            decay_lora: 2,
            weight_dtype: rwkv_model::DType::F32,
            has_time_state: false,
        }
    }

    fn state(fill: f32) -> State {
        let cfg = cfg();
        State::from_flat(&cfg, vec![fill; cfg.state_len()]).unwrap()
    }

    fn key(id: u64) -> SessionKey {
        SessionKey::new("t", id)
    }

    /// State files in the directory (the lock file stays while the tier is open, and after).
    fn state_files(dir: &Path) -> Vec<PathBuf> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == EXTENSION || x == PARTIAL)
            })
            .collect()
    }

    fn files(dir: &Path) -> usize {
        state_files(dir).len()
    }

    #[test]
    fn states_round_trip_evict_lru_and_leave_no_files_behind() {
        let dir = tempfile::tempdir().unwrap();
        let one = export::encoded_len(0, cfg().state_len());
        let mut tier = DiskTier::open(dir.path(), 2 * one, [1; 32], cfg()).unwrap();
        assert!(tier.put(key(1), state(1.0)));
        assert!(tier.put(key(2), state(2.0)));
        tier.flush();
        assert_eq!(tier.get(&key(1)), Some(state(1.0))); // Now 2 is the least recently used.
        assert!(tier.put(key(3), state(3.0)));
        tier.flush();
        assert_eq!((tier.len(), files(dir.path())), (2, 2));
        assert_eq!(tier.take(&key(2)), None, "evicted");
        assert_eq!(tier.take(&key(3)), Some(state(3.0)));
        assert_eq!(tier.take(&key(3)), None, "taken out");
        tier.remove(&key(1));
        tier.flush();
        assert_eq!(
            (tier.len(), tier.used_bytes(), files(dir.path())),
            (0, 0, 0)
        );
    }

    #[test]
    fn a_state_is_readable_before_its_file_is_written_and_files_go_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 1 << 20, [1; 32], cfg()).unwrap();
        // Whether or not the writer got to them yet, the states come back.
        for id in 0..20 {
            assert!(tier.put(key(id), state(id as f32)));
        }
        assert_eq!(tier.get(&key(3)), Some(state(3.0)));
        assert_eq!(tier.take(&key(19)), Some(state(19.0)));
        assert_eq!(tier.len(), 19);
        drop(tier);
        assert_eq!(files(dir.path()), 0, "the engine's files go with it");
    }

    #[test]
    fn corrupted_files_are_misses_and_old_files_are_cleared_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 1 << 20, [1; 32], cfg()).unwrap();
        assert!(tier.put(key(1), state(1.0)));
        tier.flush();
        let path = state_files(dir.path()).remove(0);
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(&path, bytes).unwrap();
        assert_eq!(tier.get(&key(1)), None);
        assert_eq!(tier.len(), 0, "a corrupted file is forgotten");
        drop(tier);

        fs::write(dir.path().join(format!("7.{EXTENSION}")), b"left over").unwrap();
        fs::write(dir.path().join(format!("8.{PARTIAL}")), b"half").unwrap();
        fs::write(dir.path().join("keep.txt"), b"not ours").unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20, [1; 32], cfg()).unwrap();
        assert_eq!((tier.len(), files(dir.path())), (0, 0));
        assert!(
            dir.path().join("keep.txt").exists(),
            "files not ours are left alone"
        );
    }

    #[test]
    fn a_state_larger_than_the_tier_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 16, [1; 32], cfg()).unwrap();
        assert!(!tier.put(key(1), state(1.0)));
        tier.flush();
        assert_eq!(files(dir.path()), 0);
    }
}
