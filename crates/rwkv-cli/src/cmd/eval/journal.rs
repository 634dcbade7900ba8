//! The journal: one JSON line per finished question in `OUTPUT_DIR/journal.jsonl`, appended as
//! results arrive, so an interrupted sweep loses at most the questions in flight.
//!
//! A record is keyed by subject, index and the settings fingerprint (model, prompt format,
//! shots): `--resume` skips exactly the questions whose key is already there, and results of
//! other settings in the same file are left alone and never mixed in.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One scored question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub fingerprint: String,
    pub subject: String,
    pub index: usize,
    /// The correct letter.
    pub answer: char,
    /// The letter of the most likely choice.
    pub prediction: char,
    /// `ln p` of `" A"`..`" D"` after the prompt.
    pub logprobs: [f32; 4],
    pub correct: bool,
    pub context_tokens: usize,
    pub cached_tokens: usize,
}

impl Record {
    pub fn key(&self) -> (String, usize) {
        (self.subject.clone(), self.index)
    }
}

/// A short, stable hash of the settings that determine a result, given as `(name, value)`
/// pairs in a fixed order.
pub fn fingerprint(settings: &[(&str, String)]) -> String {
    let mut hasher = Sha256::new();
    for (name, value) in settings {
        // Length-prefixed, so that no two different lists hash the same text.
        hasher.update(format!("{}:{name}={}:{value}\n", name.len(), value.len()));
    }
    super::super::to_hex(&hasher.finalize()[..8])
}

/// The open journal file.
pub struct Journal {
    path: PathBuf,
    file: File,
}

/// What an existing journal held for these settings.
pub struct Resumed {
    pub records: HashMap<(String, usize), Record>,
    /// Records of other settings (kept in the file, not used).
    pub other_settings: usize,
    /// Lines that were not records (ignored; their questions are scored again).
    pub unreadable: usize,
}

impl Journal {
    /// Opens `dir/journal.jsonl` for appending. Without `resume`, a journal that already holds
    /// results is an error rather than being overwritten: it may be hours of work.
    pub fn open(dir: &Path, resume: bool, fingerprint: &str) -> anyhow::Result<(Self, Resumed)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output directory {}", dir.display()))?;
        let path = dir.join("journal.jsonl");
        let mut resumed = Resumed {
            records: HashMap::new(),
            other_settings: 0,
            unreadable: 0,
        };
        if path.exists() {
            let text = std::fs::read(&path)
                .with_context(|| format!("cannot read the journal {}", path.display()))?;
            let has_results = text.iter().any(|b| !b.is_ascii_whitespace());
            if has_results && !resume {
                bail!(
                    "{} already holds results: pass --resume to continue it, or choose another \
                     --output-dir (or delete the file) to start over",
                    path.display()
                );
            }
            // A line cut short by an interruption would glue itself to the next record, so
            // the file is cut back to its last complete line.
            let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            if complete < text.len() {
                resumed.unreadable += 1;
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(complete as u64))
                    .with_context(|| format!("cannot repair the journal {}", path.display()))?;
            }
            for line in text[..complete].split(|&b| b == b'\n') {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Record>(line) {
                    Ok(r) if r.fingerprint == fingerprint => {
                        resumed.records.entry(r.key()).or_insert(r);
                    }
                    Ok(_) => resumed.other_settings += 1,
                    Err(_) => resumed.unreadable += 1,
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open the journal {}", path.display()))?;
        Ok((Self { path, file }, resumed))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as one write, so a crash leaves at most a partial last line.
    pub fn append(&mut self, record: &Record) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .with_context(|| format!("cannot write the journal {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fp: &str, index: usize) -> Record {
        Record {
            fingerprint: fp.into(),
            subject: "s".into(),
            index,
            answer: 'A',
            prediction: 'B',
            logprobs: [-1.0, -0.5, -2.0, -3.0],
            correct: false,
            context_tokens: 10,
            cached_tokens: 0,
        }
    }

    #[test]
    fn resumes_its_own_records_and_repairs_a_cut_line() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut j, r) = Journal::open(dir.path(), false, "fp").unwrap();
            assert!(r.records.is_empty());
            j.append(&record("fp", 0)).unwrap();
            j.append(&record("other", 0)).unwrap();
            j.append(&record("fp", 1)).unwrap();
        }
        let path = dir.path().join("journal.jsonl");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"fingerprint\":\"fp\",\"sub").unwrap();
        drop(f);
        assert!(Journal::open(dir.path(), false, "fp").is_err());
        let (mut j, r) = Journal::open(dir.path(), true, "fp").unwrap();
        assert_eq!(r.records.len(), 2);
        assert_eq!((r.other_settings, r.unreadable), (1, 1));
        assert_eq!(r.records[&("s".to_owned(), 1)], record("fp", 1));
        j.append(&record("fp", 2)).unwrap();
        let (_, r) = Journal::open(dir.path(), true, "fp").unwrap();
        assert_eq!((r.records.len(), r.unreadable), (3, 0));
    }

    #[test]
    fn fingerprints_are_stable_and_distinguish_settings() {
        let settings = |shots: &str| [("shots", shots.to_owned()), ("model", "m".to_owned())];
        let a = fingerprint(&settings("0"));
        assert_eq!(a, fingerprint(&settings("0")));
        assert_ne!(a, fingerprint(&settings("5")));
        assert_eq!(a.len(), 16);
    }
}
