//! Accuracy per subject and overall, printed as a table and written as `report.json`, and the
//! per-question `results.csv`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::journal::Record;

/// Correct answers out of a number of questions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
}

impl Accuracy {
    fn add(&mut self, correct: bool) {
        self.correct += usize::from(correct);
        self.total += 1;
        self.accuracy = self.correct as f64 / self.total as f64;
    }
}

/// Per-subject and overall accuracy of `records`. Overall is over questions (not the mean of
/// subjects), as the reference script counts it.
pub fn tally<'a>(
    records: impl IntoIterator<Item = &'a Record>,
) -> (BTreeMap<String, Accuracy>, Accuracy) {
    let mut subjects: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut overall = Accuracy::default();
    for r in records {
        subjects
            .entry(r.subject.clone())
            .or_default()
            .add(r.correct);
        overall.add(r.correct);
    }
    (subjects, overall)
}

/// The accuracy table, on stdout.
pub fn print_table(subjects: &BTreeMap<String, Accuracy>, overall: &Accuracy) {
    let width = subjects.keys().map(String::len).max().unwrap_or(0).max(7);
    println!(
        "{:<width$}  {:>8}  {:>9}",
        "subject", "accuracy", "questions"
    );
    for (name, a) in subjects {
        println!(
            "{name:<width$}  {:>7.2}%  {:>9}",
            100.0 * a.accuracy,
            a.total
        );
    }
    println!(
        "{:<width$}  {:>7.2}%  {:>9}",
        "overall",
        100.0 * overall.accuracy,
        overall.total
    );
}

/// `results.csv`: one row per question, sorted by subject and index.
pub fn write_csv(path: &Path, records: &[&Record]) -> anyhow::Result<()> {
    let mut writer = csv::Writer::from_path(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writer.write_record([
        "subject",
        "index",
        "answer",
        "prediction",
        "logprob_a",
        "logprob_b",
        "logprob_c",
        "logprob_d",
        "correct",
    ])?;
    for r in records {
        let [a, b, c, d] = r.logprobs.map(|l| l.to_string());
        writer.write_record([
            r.subject.clone(),
            r.index.to_string(),
            r.answer.to_string(),
            r.prediction.to_string(),
            a,
            b,
            c,
            d,
            r.correct.to_string(),
        ])?;
    }
    writer
        .flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `report.json`, pretty-printed.
pub fn write_json(path: &Path, report: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_counts_questions_not_subjects() {
        let rec = |subject: &str, correct| Record {
            fingerprint: "f".into(),
            subject: subject.into(),
            index: 0,
            answer: 'A',
            prediction: if correct { 'A' } else { 'B' },
            logprobs: [0.0; 4],
            correct,
            context_tokens: 1,
            cached_tokens: 0,
        };
        let records = [
            rec("a", true),
            rec("a", false),
            rec("a", false),
            rec("b", true),
        ];
        let (subjects, overall) = tally(&records);
        assert_eq!((subjects["a"].correct, subjects["a"].total), (1, 3));
        assert_eq!(subjects["b"].accuracy, 1.0);
        assert_eq!(
            (overall.correct, overall.total, overall.accuracy),
            (2, 4, 0.5)
        );
    }
}
