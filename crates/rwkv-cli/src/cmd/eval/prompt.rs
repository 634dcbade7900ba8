//! MMLU prompts, exactly as RWKV's reference MMLU script (`rwkv_mmlu_eval.py` in BlinkDL's
//! RWKV-LM) builds them, and the token prefix that questions of one subject share.
//!
//! The reference: the template below with `<Q>`, `<|A|>`..`<|D|>` and `<SUBJECT>` replaced in
//! that order (underscores of the subject become spaces), `\r\n` turned into `\n`, the whole text
//! stripped of surrounding whitespace, tokenized in one piece, token 0 prepended; the prediction
//! is the most likely of the tokens `" A"`..`" D"` after the last prompt token.
//!
//! K-shot (the reference script is zero-shot only, so this format is ours): the first K dev
//! questions, each rendered with the same template and completed with `" <letter>.\n\n"`, come
//! before the test prompt, and the whole text is tokenized in one piece like the zero-shot one.
//!
//! Prefix sharing never changes those tokens: the shared prefix is the tokenization of the text
//! every prompt of a subject starts with (the shots and the template up to `Answer this
//! question:`), and a question uses the cached state only when its own tokens really start with
//! it (greedy tokenization can merge across the boundary, e.g. `"\n "` is one token).

use anyhow::Context;
use rwkv_tokenizer::Tokenizer;

use super::data::{letter, Question};

/// The reference template.
pub const TEMPLATE: &str = "User: You are a very talented expert in <SUBJECT>. Answer this question:\n<Q>\nA. <|A|>\nB. <|B|>\nC. <|C|>\nD. <|D|>\n\nAssistant: The answer is";

/// Where the subject-independent part of a question starts: the shared prefix ends just before.
const QUESTION_START: &str = "\n<Q>";

/// The candidate continuations, one token each in the World vocabulary.
pub const CHOICES: [&str; 4] = [" A", " B", " C", " D"];

/// Names the prompt format in result fingerprints; change it when the format changes, so that
/// `--resume` never mixes results of two formats.
pub const FORMAT_VERSION: &str = "rwkv-mmlu-v1";

/// `question` in the template, with the reference's replacement order (a question that contains
/// `<|A|>` or `<SUBJECT>` gets the same surprising text as in the reference).
pub fn render(question: &Question) -> String {
    let [a, b, c, d] = &question.choices;
    TEMPLATE
        .replace("<Q>", &question.question)
        .replace("<|A|>", a)
        .replace("<|B|>", b)
        .replace("<|C|>", c)
        .replace("<|D|>", d)
        .replace("<SUBJECT>", &question.subject.replace('_', " "))
}

/// The few-shot block: each dev question answered, separated by blank lines.
pub fn few_shot_block(shots: &[Question]) -> String {
    shots
        .iter()
        .map(|q| format!("{} {}.\n\n", render(q), letter(q.answer)))
        .collect()
}

/// The subject's part of the template, up to where the question begins.
fn header(subject: &str) -> String {
    let end = TEMPLATE.find(QUESTION_START).unwrap_or(TEMPLATE.len());
    TEMPLATE[..end].replace("<SUBJECT>", &subject.replace('_', " "))
}

/// Whitespace as Python's `str.strip()` sees it: Unicode whitespace plus the separators
/// `\x1c`-`\x1f`.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// The reference's `.replace('\r\n','\n').strip()`.
pub fn normalize(text: &str) -> String {
    text.replace("\r\n", "\n")
        .trim_matches(is_py_space)
        .to_owned()
}

/// Tokenizes prompts with the reference's conventions.
pub struct PromptBuilder<'a> {
    tokenizer: &'a Tokenizer,
    /// Token ids of [`CHOICES`].
    pub choice_tokens: [u32; 4],
}

/// The token prefix shared by a subject's prompts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedPrefix {
    pub tokens: Vec<u32>,
}

/// One question's prompt tokens.
#[derive(Clone, Debug)]
pub struct Prompt {
    pub tokens: Vec<u32>,
    /// The prompt starts with the subject's shared prefix (and is longer than it).
    pub shares_prefix: bool,
}

impl<'a> PromptBuilder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> anyhow::Result<Self> {
        let mut choice_tokens = [0; 4];
        for (slot, text) in choice_tokens.iter_mut().zip(CHOICES) {
            let ids = tokenizer.encode(text)?;
            let [id] = ids[..] else {
                anyhow::bail!(
                    "the tokenizer splits `{text}` into {} tokens; MMLU scoring needs one token \
                     per answer letter (use the World tokenizer)",
                    ids.len()
                );
            };
            *slot = id;
        }
        Ok(Self {
            tokenizer,
            choice_tokens,
        })
    }

    /// Token 0, then the normalized text's tokens.
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut tokens = vec![0];
        tokens.extend(
            self.tokenizer
                .encode(text)
                .context("cannot tokenize a prompt")?,
        );
        Ok(tokens)
    }

    /// The prefix every prompt of `subject` with `shots` in front starts with.
    pub fn shared_prefix(&self, subject: &str, shots: &[Question]) -> anyhow::Result<SharedPrefix> {
        let text = few_shot_block(shots) + &header(subject);
        // Only leading whitespace goes: the text continues after the prefix.
        let text = text.replace("\r\n", "\n");
        let text = text.trim_start_matches(is_py_space);
        Ok(SharedPrefix {
            tokens: self.encode(text)?,
        })
    }

    /// The prompt of `question` after `shots`.
    pub fn prompt(
        &self,
        question: &Question,
        shots: &[Question],
        shared: &SharedPrefix,
    ) -> anyhow::Result<Prompt> {
        let text = normalize(&(few_shot_block(shots) + &render(question)));
        let tokens = self.encode(&text)?;
        let shares_prefix =
            tokens.len() > shared.tokens.len() && tokens.starts_with(&shared.tokens);
        Ok(Prompt {
            tokens,
            shares_prefix,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn question(subject: &str, text: &str, answer: usize) -> Question {
        Question {
            subject: subject.into(),
            index: 0,
            question: text.into(),
            choices: ["w".into(), "x".into(), "y".into(), "z".into()],
            answer,
        }
    }

    #[test]
    fn renders_the_reference_template() {
        let q = question("high_school_physics", "Why?", 0);
        assert_eq!(
            render(&q),
            "User: You are a very talented expert in high school physics. Answer this question:\n\
             Why?\nA. w\nB. x\nC. y\nD. z\n\nAssistant: The answer is"
        );
        assert_eq!(normalize(" \r\nhi\r\nthere \n"), "hi\nthere");
        let block = few_shot_block(&[question("s", "1+1?", 2)]);
        assert!(block.ends_with("The answer is C.\n\n"), "{block}");
    }

    #[test]
    fn prompts_start_with_token_zero_and_share_the_subject_prefix() {
        let tok = Tokenizer::world();
        let b = PromptBuilder::new(&tok).unwrap();
        assert_eq!(b.choice_tokens.len(), 4);
        let shots = [question("s", "1+1?", 2)];
        let shared = b.shared_prefix("s", &shots).unwrap();
        let p = b
            .prompt(&question("s", "Why?", 1), &shots, &shared)
            .unwrap();
        assert_eq!(p.tokens[0], 0);
        assert!(p.shares_prefix);
        // The reference tokenizes the whole text at once; the prompt is exactly that.
        let whole = normalize(&(few_shot_block(&shots) + &render(&question("s", "Why?", 1))));
        assert_eq!(p.tokens[1..], tok.encode(&whole).unwrap()[..]);
    }
}
