//! Reading the MMLU CSV layout: `DIR/test/<subject>_test.csv` and `DIR/dev/<subject>_dev.csv`.
//!
//! Each row is a question, its four choices and the answer. Two flavours exist and both are read:
//! the Hugging Face `cais/mmlu` export (a `question,choice0,...,answer` header, answers 0-3) and
//! the original Hendrycks files (no header, answers A-D). Fields may be quoted and may span lines,
//! so parsing goes through the `csv` crate; every error names the file and the line.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// One multiple-choice question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub subject: String,
    /// Position among the data rows of its file (0-based, header excluded): the order of the
    /// Hugging Face dataset, and the key of results in the journal.
    pub index: usize,
    pub question: String,
    pub choices: [String; 4],
    /// The correct choice, 0-3.
    pub answer: usize,
}

/// The letter of choice `i` (0 -> `A`).
pub fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// The file of `subject` in `split` (`test` or `dev`).
pub fn split_path(dir: &Path, split: &str, subject: &str) -> PathBuf {
    dir.join(split).join(format!("{subject}_{split}.csv"))
}

/// Subjects with a test file, sorted.
pub fn list_subjects(dir: &Path) -> anyhow::Result<Vec<String>> {
    let test = dir.join("test");
    let entries = std::fs::read_dir(&test).with_context(|| {
        format!(
            "cannot read {} (the MMLU layout is DIR/test/<subject>_test.csv)",
            test.display()
        )
    })?;
    let mut subjects = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(subject) = name.to_str().and_then(|n| n.strip_suffix("_test.csv")) {
            subjects.push(subject.to_owned());
        }
    }
    if subjects.is_empty() {
        bail!("{} holds no <subject>_test.csv file", test.display());
    }
    subjects.sort();
    Ok(subjects)
}

/// Reads one subject's `split` file.
pub fn load_split(dir: &Path, split: &str, subject: &str) -> anyhow::Result<Vec<Question>> {
    let path = split_path(dir, split, subject);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes, subject).with_context(|| format!("in {}", path.display()))
}

/// Parses CSV `bytes` of `subject`; errors name the line.
pub fn parse(bytes: &[u8], subject: &str) -> anyhow::Result<Vec<Question>> {
    // Flexible, so that a row with the wrong number of fields reaches our own check and gets a
    // message that says what a row should hold.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(bytes);
    let mut questions = Vec::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            anyhow::anyhow!("line {line}: malformed CSV: {e}")
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let fields: Vec<&str> = record.iter().collect();
        if row == 0 && is_header(&fields) {
            continue;
        }
        let [question, a, b, c, d, answer] = fields[..] else {
            bail!(
                "line {line}: expected 6 fields (question, 4 choices, answer), found {}",
                fields.len()
            );
        };
        let answer = parse_answer(answer)
            .with_context(|| format!("line {line}: answer `{answer}` is not 0-3 or A-D"))?;
        questions.push(Question {
            subject: subject.to_owned(),
            index: questions.len(),
            question: question.to_owned(),
            choices: [a, b, c, d].map(str::to_owned),
            answer,
        });
    }
    Ok(questions)
}

/// The `question,choice0,...,answer` header of the Hugging Face export (a BOM tolerated).
fn is_header(fields: &[&str]) -> bool {
    let first = fields
        .first()
        .map(|f| f.trim_start_matches('\u{feff}').trim());
    first.is_some_and(|f| f.eq_ignore_ascii_case("question"))
        && fields
            .last()
            .is_some_and(|f| f.trim().eq_ignore_ascii_case("answer"))
}

fn parse_answer(text: &str) -> Option<usize> {
    match text.trim() {
        "0" | "A" => Some(0),
        "1" | "B" => Some(1),
        "2" | "C" => Some(2),
        "3" | "D" => Some(3),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_layouts_with_quotes_and_newlines() {
        let hf = "question,choice0,choice1,choice2,choice3,answer\n\
                  \"Q, with \"\"quotes\"\"\nand a newline\",0,1,\"2,3\",4,2\n\
                  plain,a,b,c,d,0\n";
        let qs = parse(hf.as_bytes(), "s").unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].question, "Q, with \"quotes\"\nand a newline");
        assert_eq!(qs[0].choices[2], "2,3");
        assert_eq!((qs[0].answer, qs[1].index, qs[1].answer), (2, 1, 0));
        let original = "Why?,a,b,c,d,D\n";
        let qs = parse(original.as_bytes(), "s").unwrap();
        assert_eq!((qs.len(), qs[0].answer), (1, 3));
    }

    #[test]
    fn bad_rows_name_the_line() {
        let err = parse(b"question,a,b,c,d,answer\nq,a,b,c,d,0\nq,a,b,c,d,7\n", "s").unwrap_err();
        assert!(format!("{err:#}").contains("line 3"), "{err:#}");
        let err = parse(b"q,a,b,c,d,0\n\"multi\nline\",a,b,0\n", "s").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("line 2") && msg.contains("found 4"), "{msg}");
    }
}
