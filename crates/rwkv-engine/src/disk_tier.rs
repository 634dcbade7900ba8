//! The third state tier: session states the host tier evicts, kept in files on local disk.
//!
//! Without it, a session whose state falls out of the host tier replays its whole history on
//! its next turn. With it, the state is written to a file (the export format of
//! [`crate::export`], so it carries the model's hash and a CRC-32) and read back on that turn:
//! one file read instead of a prefill. The tier is bounded by bytes with LRU eviction, like the
//! host tier, and only this process uses its files: they are deleted when evicted, taken back,
//! or left over from an earlier run (sessions do not outlive their worker process).
//!
//! Reads and writes happen on the engine thread, between steps. They only happen when the host
//! tier overflows (a write) and when an evicted session comes back (a read), and a read costs
//! less than the prefill it replaces; a corrupted or unreadable file counts as a miss, so the
//! session falls back to replaying its history.

use std::fs;
use std::path::{Path, PathBuf};

use rwkv_model::{ModelConfig, State};

use crate::error::EngineError;
use crate::export::{self, SessionSnapshot};
use crate::sessions::SessionKey;
use crate::tiers::{LruStore, Weigh};

/// The extension of the tier's files; files with it in the directory belong to the tier.
const EXTENSION: &str = "rwkvstate";

/// One state file; dropping the entry deletes the file.
#[derive(Debug)]
struct StateFile {
    path: PathBuf,
    bytes: usize,
}

impl Weigh for StateFile {
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        // Already gone is fine; anything else leaves a file the next start removes.
        let _ = fs::remove_file(&self.path);
    }
}

/// Session states on local disk, bounded by bytes, least recently used evicted first.
#[derive(Debug)]
pub(crate) struct DiskTier {
    dir: PathBuf,
    files: LruStore<SessionKey, StateFile>,
    next_file: u64,
    model_hash: [u8; 32],
    cfg: ModelConfig,
}

impl DiskTier {
    /// Opens (creating it if needed) the tier's directory, holding at most `capacity` bytes,
    /// and removes the files an earlier run left there.
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
        let entries = fs::read_dir(dir).map_err(|e| fail("cannot list the directory", e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == EXTENSION) {
                fs::remove_file(&path).map_err(|e| fail("cannot remove an old state file", e))?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            files: LruStore::new(capacity),
            next_file: 0,
            model_hash,
            cfg,
        })
    }

    /// Writes a session's state; false if it could not be kept (larger than the tier, or a
    /// write error). Older files are evicted to make room.
    pub(crate) fn put(&mut self, key: SessionKey, state: State) -> bool {
        let snapshot = SessionSnapshot {
            history: Vec::new(),
            pending: Vec::new(),
            state,
        };
        let bytes = export::encode(&self.model_hash, &self.cfg, &snapshot);
        if bytes.len() > self.files.capacity_bytes() {
            return false;
        }
        self.next_file += 1;
        let file = StateFile {
            path: self.dir.join(format!("{}.{EXTENSION}", self.next_file)),
            bytes: bytes.len(),
        };
        if fs::write(&file.path, &bytes).is_err() {
            // Dropping `file` removes whatever part was written.
            return false;
        }
        // Evicted files are deleted as their entries drop.
        drop(self.files.insert(key, file));
        true
    }

    /// Takes a session's state out of the tier (its file is deleted). `None` if the tier does
    /// not hold it or the file is unreadable or corrupted.
    pub(crate) fn take(&mut self, key: &SessionKey) -> Option<State> {
        let file = self.files.remove(key)?;
        self.read(&file)
    }

    /// A copy of a session's state, leaving it in the tier.
    pub(crate) fn get(&mut self, key: &SessionKey) -> Option<State> {
        let file = self.files.get(key)?;
        let path = file.path.clone();
        let state = self.read_path(&path);
        if state.is_none() {
            // Unusable: forget it rather than fail again next time.
            self.files.remove(key);
        }
        state
    }

    /// Forgets a session's state (deleting its file).
    pub(crate) fn remove(&mut self, key: &SessionKey) {
        self.files.remove(key);
    }

    /// Bytes of the files held.
    pub(crate) fn used_bytes(&self) -> usize {
        self.files.used_bytes()
    }

    /// Number of states held.
    pub(crate) fn len(&self) -> usize {
        self.files.len()
    }

    fn read(&self, file: &StateFile) -> Option<State> {
        self.read_path(&file.path)
    }

    fn read_path(&self, path: &Path) -> Option<State> {
        let bytes = fs::read(path).ok()?;
        export::decode(&self.model_hash, &self.cfg, &bytes)
            .ok()
            .map(|snapshot| snapshot.state)
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

    fn files(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn states_round_trip_evict_lru_and_leave_no_files_behind() {
        let dir = tempfile::tempdir().unwrap();
        let one = export::encode(
            &[1; 32],
            &cfg(),
            &SessionSnapshot {
                history: Vec::new(),
                pending: Vec::new(),
                state: state(0.0),
            },
        )
        .len();
        let mut tier = DiskTier::open(dir.path(), 2 * one, [1; 32], cfg()).unwrap();
        assert!(tier.put(key(1), state(1.0)));
        assert!(tier.put(key(2), state(2.0)));
        assert_eq!(tier.get(&key(1)), Some(state(1.0))); // Now 2 is the least recently used.
        assert!(tier.put(key(3), state(3.0)));
        assert_eq!((tier.len(), files(dir.path())), (2, 2));
        assert_eq!(tier.take(&key(2)), None, "evicted");
        assert_eq!(tier.take(&key(3)), Some(state(3.0)));
        assert_eq!(tier.take(&key(3)), None, "taken out");
        tier.remove(&key(1));
        assert_eq!(
            (tier.len(), tier.used_bytes(), files(dir.path())),
            (0, 0, 0)
        );
    }

    #[test]
    fn corrupted_files_are_misses_and_old_files_are_cleared_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 1 << 20, [1; 32], cfg()).unwrap();
        assert!(tier.put(key(1), state(1.0)));
        let path = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        fs::write(&path, bytes).unwrap();
        assert_eq!(tier.get(&key(1)), None);
        assert_eq!(tier.len(), 0, "a corrupted file is forgotten");

        fs::write(dir.path().join(format!("7.{EXTENSION}")), b"left over").unwrap();
        fs::write(dir.path().join("keep.txt"), b"not ours").unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 20, [1; 32], cfg()).unwrap();
        assert_eq!((tier.len(), files(dir.path())), (0, 1));
    }

    #[test]
    fn a_state_larger_than_the_tier_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut tier = DiskTier::open(dir.path(), 16, [1; 32], cfg()).unwrap();
        assert!(!tier.put(key(1), state(1.0)));
        assert_eq!(files(dir.path()), 0);
    }
}
