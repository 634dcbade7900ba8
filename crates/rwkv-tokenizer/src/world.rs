//! The RWKV World tokenizer (`rwkv_vocab_v20230424.txt`).
//!
//! Vocabulary lines are `<id> <literal> <len>` where the literal is a Python str or bytes literal
//! (see the `literal` submodule); encoding is greedy longest-prefix matching on the UTF-8 bytes with no
//! normalisation and no special tokens (see the `trie` submodule). id 0 is end-of-text and has no bytes.

mod literal;
mod trie;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::error::{Result, TokenizerError};
use trie::{Trie, TrieError};

/// The official World vocabulary, embedded so that [`WorldTokenizer::builtin`] needs no file.
const BUILTIN_VOCAB: &str = include_str!("../assets/rwkv_vocab_v20230424.txt");
/// Name used for the embedded vocabulary in error messages.
const BUILTIN_NAME: &str = "builtin:rwkv_vocab_v20230424.txt";
/// Ids above this are refused: the id table is dense, so a stray huge id would allocate gigabytes.
const MAX_ID: u32 = (1 << 24) - 1;

/// One parsed vocabulary line.
struct Entry {
    line: usize,
    id: u32,
    bytes: Vec<u8>,
}

/// Greedy longest-match byte tokenizer with the World vocabulary format.
pub struct WorldTokenizer {
    /// All token bytes, concatenated; `spans[id]` indexes into it.
    data: Vec<u8>,
    /// Byte range of each id in `data`; `None` for ids without a token (e.g. 0).
    spans: Vec<Option<(usize, usize)>>,
    trie: Trie,
    source_name: String,
}

impl std::fmt::Debug for WorldTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The vocabulary itself is far too large to print.
        f.debug_struct("WorldTokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

impl WorldTokenizer {
    /// End-of-text / document separator id. It has no bytes and is never produced by encoding.
    pub const END_OF_TEXT: u32 = 0;

    /// The official World tokenizer from the embedded vocabulary, parsed once and shared.
    pub fn builtin() -> Arc<WorldTokenizer> {
        static BUILTIN: OnceLock<Arc<WorldTokenizer>> = OnceLock::new();
        BUILTIN
            .get_or_init(|| {
                // Cannot fail: the embedded file is fixed at compile time and the test
                // `builtin_vocabulary_parses_with_every_length_column_correct` parses it.
                let tokenizer = Self::from_vocab_str(BUILTIN_VOCAB, BUILTIN_NAME)
                    .expect("embedded World vocabulary is valid");
                Arc::new(tokenizer)
            })
            .clone()
    }

    /// Loads a World-format vocabulary file (LF or CRLF line endings).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let raw = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path.display().to_string();
        let text = String::from_utf8(raw).map_err(|e| {
            let bytes = e.as_bytes();
            let at = e.utf8_error().valid_up_to();
            TokenizerError::VocabParse {
                line: 1 + bytes.iter().take(at).filter(|&&b| b == b'\n').count(),
                source_name: name.clone(),
                message: format!("invalid UTF-8 at byte offset {at}"),
            }
        })?;
        Self::from_vocab_str(&text, &name)
    }

    /// Parses a World-format vocabulary held in memory; `source_name` is used in error messages.
    pub fn from_vocab_str(text: &str, source_name: &str) -> Result<Self> {
        let entries = parse_vocab(text, source_name)?;
        Self::from_entries(entries, source_name)
    }

    fn from_entries(entries: Vec<Entry>, source_name: &str) -> Result<Self> {
        let invalid = |message: String| TokenizerError::VocabInvalid {
            source_name: source_name.to_string(),
            message,
        };
        let max_id = entries.iter().map(|e| e.id).max().unwrap_or(0);
        let mut spans: Vec<Option<(usize, usize)>> = vec![None; max_id as usize + 1];
        let mut data = Vec::with_capacity(entries.iter().map(|e| e.bytes.len()).sum());
        let mut lines = vec![0usize; max_id as usize + 1];
        for entry in &entries {
            let slot = &mut spans[entry.id as usize];
            if slot.is_some() {
                let first = lines[entry.id as usize];
                let msg = format!(
                    "duplicate token id {} (first defined on line {first})",
                    entry.id
                );
                return Err(parse_error(source_name, entry.line, msg));
            }
            *slot = Some((data.len(), data.len() + entry.bytes.len()));
            lines[entry.id as usize] = entry.line;
            data.extend_from_slice(&entry.bytes);
        }
        let trie = Trie::build(entries.iter().map(|e| (e.id, e.bytes.as_slice())));
        let trie = trie.map_err(|e| match e {
            TrieError::Duplicate { id, first_id } => parse_error(
                source_name,
                lines[id as usize],
                format!("token {id} has the same bytes as token {first_id}"),
            ),
            TrieError::EmptyToken { id } => {
                parse_error(source_name, lines[id as usize], "empty token".into())
            }
            TrieError::MissingByte { byte } => invalid(format!(
                "no single-byte token for byte 0x{byte:02X}: every byte needs one so any input \
                 can be encoded"
            )),
            TrieError::TooLarge => invalid("vocabulary too large".into()),
        })?;
        Ok(Self {
            data,
            spans,
            trie,
            source_name: source_name.to_string(),
        })
    }

    /// Number of id slots, `max id + 1` (65530 for the official vocabulary: ids 0..=65529, where
    /// 0 is end-of-text). Models may have more embedding rows (65536); those ids have no bytes.
    pub fn vocab_size(&self) -> usize {
        self.spans.len()
    }

    /// The bytes of one token, or `None` for ids without one (0, 65530.., out of range).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let (start, end) = (*self.spans.get(id as usize)?)?;
        self.data.get(start..end)
    }

    /// The id of the token whose bytes are exactly `bytes`, if there is one.
    pub fn token_id(&self, bytes: &[u8]) -> Option<u32> {
        self.trie.exact(bytes)
    }

    /// Encodes text: greedy longest-prefix matching on its UTF-8 bytes.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_bytes(text.as_bytes())
    }

    /// Encodes arbitrary bytes (need not be UTF-8); every byte is covered by some token.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        // Average World token is ~4 bytes of English text; this avoids most regrowth.
        let mut out = Vec::with_capacity(bytes.len() / 3 + 1);
        let mut rest = bytes;
        while let Some((id, len)) = self.trie.longest_prefix(rest) {
            out.push(id);
            // `len` is at least 1 and at most `rest.len()`, so this always advances.
            rest = rest.get(len..).unwrap_or_default();
        }
        out
    }

    /// Concatenated bytes of `ids`; an id without a token is an error naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = self.token_bytes(id).ok_or(TokenizerError::UnknownId {
                id,
                tokenizer: "World",
            })?;
            out.extend_from_slice(bytes);
        }
        Ok(out)
    }

    /// Like [`decode_bytes`](Self::decode_bytes) but ids without a token decode to nothing.
    pub fn decode_bytes_lossy(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id).unwrap_or_default());
        }
        out
    }

    /// Decodes to text; unknown ids are errors, invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.decode_bytes(ids)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

fn parse_error(source_name: &str, line: usize, message: String) -> TokenizerError {
    TokenizerError::VocabParse {
        source_name: source_name.to_string(),
        line,
        message,
    }
}

/// Parses every non-empty line; errors name the 1-based line.
fn parse_vocab(text: &str, source_name: &str) -> Result<Vec<Entry>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut entries = Vec::with_capacity(65_536);
    for (index, raw) in text.split('\n').enumerate() {
        // CRLF copies of the vocabulary exist; the literal never ends in a raw CR.
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.is_empty() {
            continue;
        }
        let (id, bytes) = parse_line(line).map_err(|m| parse_error(source_name, index + 1, m))?;
        entries.push(Entry {
            line: index + 1,
            id,
            bytes,
        });
    }
    if entries.is_empty() {
        return Err(TokenizerError::VocabInvalid {
            source_name: source_name.to_string(),
            message: "no tokens".into(),
        });
    }
    Ok(entries)
}

/// `<id> <literal> <len>`: id before the first space, len after the last, literal in between.
fn parse_line(line: &str) -> std::result::Result<(u32, Vec<u8>), String> {
    let shape = || format!("expected `<id> <literal> <len>`, found {line:?}");
    let (id_text, rest) = line.split_once(' ').ok_or_else(shape)?;
    let (literal_text, len_text) = rest.rsplit_once(' ').ok_or_else(shape)?;
    let id: u32 = id_text
        .parse()
        .map_err(|_| format!("invalid token id {id_text:?}"))?;
    if id > MAX_ID {
        return Err(format!(
            "token id {id} is larger than the supported {MAX_ID}"
        ));
    }
    let len: usize = len_text
        .parse()
        .map_err(|_| format!("invalid byte length {len_text:?}"))?;
    let bytes = literal::decode_literal(literal_text).map_err(|m| format!("token {id}: {m}"))?;
    if bytes.is_empty() {
        return Err(format!("token {id} is empty"));
    }
    // The reference asserts this for every line; it catches str/bytes literal mix-ups.
    if bytes.len() != len {
        return Err(format!(
            "token {id}: literal {literal_text} is {} bytes but the length column says {len}",
            bytes.len()
        ));
    }
    Ok((id, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Lines `{"text": ..., "ids": [...]}` or `{"bytes_hex": ..., "ids": [...]}` of a fixture.
    fn cases(jsonl: &str) -> Vec<(Vec<u8>, Vec<u32>)> {
        jsonl
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let bytes = match v["text"].as_str() {
                    Some(text) => text.as_bytes().to_vec(),
                    None => hex(v["bytes_hex"].as_str().unwrap()),
                };
                let ids = v["ids"].as_array().unwrap();
                let ids = ids.iter().map(|i| i.as_u64().unwrap() as u32).collect();
                (bytes, ids)
            })
            .collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn check_cases(jsonl: &str, expected_count: usize) {
        let tok = WorldTokenizer::builtin();
        let cases = cases(jsonl);
        assert_eq!(cases.len(), expected_count);
        for (bytes, ids) in cases {
            assert_eq!(tok.encode_bytes(&bytes), ids, "encoding {bytes:?}");
            assert_eq!(tok.decode_bytes(&ids).unwrap(), bytes);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                assert_eq!(tok.encode(text), ids);
                assert_eq!(tok.decode(&ids).unwrap(), text);
            }
        }
    }

    /// Tiny deterministic generator so the tests need no extra dependency.
    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// The spec's rule, written as plainly as possible: try the longest length first.
    fn naive_encode(vocab: &HashMap<Vec<u8>, u32>, bytes: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let max = (bytes.len() - pos).min(128);
            let (id, len) = (1..=max)
                .rev()
                .find_map(|l| vocab.get(&bytes[pos..pos + l]).map(|&id| (id, l)))
                .unwrap();
            out.push(id);
            pos += len;
        }
        out
    }

    fn vocab_map(tok: &WorldTokenizer) -> HashMap<Vec<u8>, u32> {
        (0..tok.vocab_size() as u32)
            .filter_map(|id| Some((tok.token_bytes(id)?.to_vec(), id)))
            .collect()
    }

    #[test]
    fn builtin_vocabulary_parses_with_every_length_column_correct() {
        // from_vocab_str checks len(bytes) == <len> on every line; this is the self-check.
        let tok = WorldTokenizer::from_vocab_str(BUILTIN_VOCAB, BUILTIN_NAME).unwrap();
        assert_eq!(tok.vocab_size(), 65530);
        let present = (0..65530)
            .filter(|&id| tok.token_bytes(id).is_some())
            .count();
        assert_eq!(present, 65529);
        for b in 0..=255u8 {
            assert_eq!(tok.token_bytes(u32::from(b) + 1), Some(&[b][..]));
        }
        assert_eq!(tok.token_bytes(65529), Some(&[b' '; 128][..]));
        assert_eq!(
            tok.token_bytes(2423),
            Some(&[0xC2, 0x80][..]),
            "str '\\x80'"
        );
        assert_eq!(tok.token_bytes(129), Some(&[0x80][..]), "bytes b'\\x80'");
        assert_eq!(tok.token_bytes(9804), Some("\u{2002}".as_bytes()));
        assert_eq!(tok.token_bytes(0), None);
        assert_eq!(tok.token_bytes(65530), None);
        assert_eq!(tok.token_bytes(u32::MAX), None);
    }

    #[test]
    fn lf_and_crlf_vocabularies_give_the_same_tokens() {
        let lf = BUILTIN_VOCAB.replace("\r\n", "\n");
        let from_lf = WorldTokenizer::from_vocab_str(&lf, "lf").unwrap();
        let builtin = WorldTokenizer::builtin();
        for id in 0..65536 {
            assert_eq!(from_lf.token_bytes(id), builtin.token_bytes(id));
        }
    }

    #[test]
    fn spec_section_4_2_vectors_encode_exactly() {
        let tok = WorldTokenizer::builtin();
        let vectors: [(&str, &[u32]); 4] = [
            (
                "The Eiffel tower is in the city of",
                &[6699, 304, 25740, 109, 39990, 4600, 4596, 22590, 30449, 4706],
            ),
            ("\nElon Musk has", &[11, 994, 2098, 29435, 21800]),
            (
                "User: hi\n\nAssistant:",
                &[24281, 59, 4571, 261, 5585, 41693, 59],
            ),
            ("Hello, world!", &[33155, 45, 40213, 34]),
        ];
        for (text, ids) in vectors {
            assert_eq!(tok.encode(text), ids, "{text:?}");
            assert_eq!(tok.decode(ids).unwrap(), text);
        }
        assert_eq!(tok.encode("\n"), [11]);
        assert_eq!(tok.encode(" "), [33]);
        assert_eq!(tok.encode(""), Vec::<u32>::new());
    }

    #[test]
    fn every_world_case_encodes_to_its_ids_and_decodes_back() {
        check_cases(include_str!("../assets/world-cases.jsonl"), 29);
    }

    #[test]
    fn every_public_vector_encodes_to_its_ids_and_decodes_back() {
        check_cases(
            include_str!("../assets/world-tokenizer-public-vectors.jsonl"),
            3,
        );
    }

    #[test]
    fn endoftext_text_is_encoded_as_ordinary_bytes() {
        let tok = WorldTokenizer::builtin();
        let ids = tok.encode("<|endoftext|>");
        assert!(!ids.contains(&0));
        assert_eq!(tok.decode(&ids).unwrap(), "<|endoftext|>");
    }

    #[test]
    fn random_bytes_round_trip_and_match_naive_longest_prefix() {
        let tok = WorldTokenizer::builtin();
        let vocab = vocab_map(&tok);
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..40 {
            let len = rng.below(600);
            let bytes: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                // Glue random tokens together so long matches and near-misses are exercised.
                let mut v = Vec::new();
                while v.len() < len {
                    let id = 1 + rng.below(65529) as u32;
                    v.extend_from_slice(tok.token_bytes(id).unwrap());
                }
                v
            };
            let ids = tok.encode_bytes(&bytes);
            assert_eq!(ids, naive_encode(&vocab, &bytes), "round {round}");
            assert_eq!(tok.decode_bytes(&ids).unwrap(), bytes);
        }
    }

    #[test]
    fn token_id_finds_exact_tokens_only() {
        let tok = WorldTokenizer::builtin();
        assert_eq!(tok.token_id(b"\n\n"), Some(261));
        assert_eq!(tok.token_id(b"User"), Some(24281));
        assert_eq!(tok.token_id(&[b' '; 128]), Some(65529));
        assert_eq!(tok.token_id(&[b' '; 129]), None);
        assert_eq!(tok.token_id(b""), None);
    }

    #[test]
    fn decoding_an_unknown_id_is_an_error_naming_it() {
        let tok = WorldTokenizer::builtin();
        for id in [0, 65530, 65535, u32::MAX] {
            let err = tok.decode_bytes(&[33, id]).unwrap_err();
            assert!(matches!(err, TokenizerError::UnknownId { id: i, .. } if i == id));
            assert!(err.to_string().contains(&id.to_string()), "{err}");
        }
        assert_eq!(tok.decode_bytes_lossy(&[33, 0, 65535, 34]), b" !");
    }

    #[test]
    fn wrong_length_column_is_an_error_naming_the_line() {
        let mut text: String = (0..=255u32)
            .map(|b| format!("{} b'\\x{b:02x}' 1\n", b + 1))
            .collect();
        text.push_str("257 '\\x80' 1\n");
        let err = WorldTokenizer::from_vocab_str(&text, "v.txt").unwrap_err();
        assert!(matches!(err, TokenizerError::VocabParse { line: 257, .. }));
        assert!(err.to_string().starts_with("v.txt:257:"), "{err}");
    }

    #[test]
    fn malformed_vocabularies_are_errors_not_panics() {
        let base: String = (0..=255u32)
            .map(|b| format!("{} b'\\x{b:02x}' 1\r\n", b + 1))
            .collect();
        assert!(WorldTokenizer::from_vocab_str(&base, "ok").is_ok());
        for bad in [
            "x 'a' 1",
            "1 'a'",
            "1 'a' x",
            "99999999999 'a' 1",
            "16777216 'a' 1",
            "300 '' 0",
            "300 'ab 2",
            "300 b'\\x41' 1",
            "1 'zz' 2",
        ] {
            let text = format!("{base}{bad}\n");
            let err = WorldTokenizer::from_vocab_str(&text, "bad").unwrap_err();
            assert!(err.to_string().contains("bad:257:"), "{bad:?}: {err}");
        }
        let missing_byte = base.replace("66 b'\\x41' 1\r\n", "");
        let err = WorldTokenizer::from_vocab_str(&missing_byte, "m").unwrap_err();
        assert!(err.to_string().contains("0x41"), "{err}");
        assert!(WorldTokenizer::from_vocab_str("", "empty").is_err());
    }

    #[test]
    fn arbitrary_lines_never_panic_the_parser() {
        let mut rng = XorShift(42);
        let alphabet = [
            "1", " ", "'", "\"", "b", "\\", "x", "u", "8", "0", "中", "\r", "\n",
        ];
        for _ in 0..2000 {
            let line: String = (0..rng.below(16))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = WorldTokenizer::from_vocab_str(&line, "fuzz");
        }
    }

    #[test]
    fn from_file_reads_a_vocabulary_and_reports_missing_files() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/assets/rwkv_vocab_v20230424.txt"
        );
        let tok = WorldTokenizer::from_file(path).unwrap();
        assert_eq!(tok.encode("Hello, world!"), [33155, 45, 40213, 34]);
        let err = WorldTokenizer::from_file("/nonexistent/vocab.txt").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vocab.txt"), "{err}");
    }

    #[test]
    fn encoding_is_fast_enough_for_serving() {
        let tok = WorldTokenizer::builtin();
        let text = include_str!("../assets/20B-node-tests/test-string.txt").repeat(20);
        let start = std::time::Instant::now();
        let ids = tok.encode(&text);
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        let rate = text.len() as f64 / secs;
        eprintln!("World encode: {:.1} MB/s", rate / 1e6);
        // Generous floor (debug profile, shared CI cores); real throughput is far higher.
        assert!(rate > 1e6, "{rate} bytes/s");
    }
}
