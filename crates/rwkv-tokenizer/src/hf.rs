//! Hugging Face `tokenizer.json` support (e.g. `20B_tokenizer.json` of the Pile models).
//!
//! Encoding goes straight through the `tokenizers` crate, exactly like the reference's
//! `Tokenizer.from_file(path).encode(s).ids`. Decoding needs raw bytes per token so that a stream
//! can split a multi-byte character across tokens; for byte-level BPE (the GPT-2/NeoX family) the
//! bytes are recovered by inverting the byte-to-char table, which is what the crate's `ByteLevel`
//! decoder does before its lossy UTF-8 step. Other decoders fall back to whole-sequence decoding.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;

use crate::error::{Result, TokenizerError};

/// Ids above this are refused: the per-id byte table is dense.
const MAX_ID: u32 = (1 << 24) - 1;
const NAME: &str = "Hugging Face";

/// A Hugging Face tokenizer loaded from a `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    source_name: String,
    vocab_size: usize,
    /// Ids of special added tokens; like the reference (`skip_special_tokens`), they decode to "".
    special: HashSet<u32>,
    /// Raw bytes of every id when the decoder is byte-level; `None` inside for unknown ids.
    byte_table: Option<Vec<Option<Vec<u8>>>>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size)
            .field("byte_level", &self.byte_table.is_some())
            .finish_non_exhaustive()
    }
}

impl HfTokenizer {
    /// Loads a `tokenizer.json` file. Nothing is fetched from the network.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_bytes(&json, &path.display().to_string())
    }

    /// Parses the contents of a `tokenizer.json`; `source_name` is used in error messages.
    pub fn from_json_bytes(json: &[u8], source_name: &str) -> Result<Self> {
        let load_error = |message: String| TokenizerError::HfLoad {
            source_name: source_name.to_string(),
            message,
        };
        // `tokenizers` 0.22 panics instead of returning an error on some malformed files (its
        // `DecoderWrapper` deserializer calls `.expect("Helper")`, e.g. on a decoder object
        // with a misspelt or non-UTF-8 key); found by the `tokenizer` fuzz target.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json));
        let inner = match parsed {
            Ok(result) => result.map_err(|e| load_error(e.to_string()))?,
            Err(_) => {
                return Err(load_error(
                    "malformed tokenizer.json (the tokenizers crate panicked parsing it)".into(),
                ))
            }
        };
        let max_id = inner.get_vocab(true).into_values().max().unwrap_or(0);
        if max_id > MAX_ID {
            return Err(load_error(format!("token id {max_id} is too large")));
        }
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        let mut tokenizer = Self {
            inner,
            source_name: source_name.to_string(),
            vocab_size: max_id as usize + 1,
            special,
            byte_table: None,
        };
        if matches!(
            tokenizer.inner.get_decoder(),
            Some(DecoderWrapper::ByteLevel(_))
        ) {
            tokenizer.byte_table = Some(tokenizer.build_byte_table());
        }
        Ok(tokenizer)
    }

    /// The wrapped `tokenizers` tokenizer, for anything this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Number of id slots, `max id + 1` (50277 for `20B_tokenizer.json`).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Encodes text as the reference does (`encode(s).ids`, special tokens added if the
    /// post-processor adds any, added tokens such as `<|endoftext|>` recognised in the text).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| TokenizerError::Hf {
                operation: "encode",
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Encodes bytes, which must be valid UTF-8 (the `tokenizers` crate only takes text).
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        let text = std::str::from_utf8(bytes).map_err(|e| TokenizerError::InvalidUtf8 {
            offset: e.valid_up_to(),
        })?;
        self.encode(text)
    }

    /// Raw bytes of one token: `Some(b"")` for special tokens, `None` for unknown ids or when the
    /// decoder is not byte-level (bytes per token are then not well defined).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.byte_table.as_ref()?.get(id as usize)?.as_deref()
    }

    /// Concatenated bytes of `ids` (special tokens contribute nothing); unknown ids are errors.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let unknown = |id| TokenizerError::UnknownId {
            id,
            tokenizer: NAME,
        };
        let Some(table) = &self.byte_table else {
            if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
                return Err(unknown(id));
            }
            return Ok(self.decode_text(ids)?.into_bytes());
        };
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let bytes = table.get(id as usize).and_then(Option::as_deref);
            out.extend_from_slice(bytes.ok_or_else(|| unknown(id))?);
        }
        Ok(out)
    }

    /// Like [`decode_bytes`](Self::decode_bytes) but unknown ids decode to nothing.
    pub fn decode_bytes_lossy(&self, ids: &[u32]) -> Vec<u8> {
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| self.inner.id_to_token(id).is_some())
            .collect();
        // Only unknown ids can make decode_bytes fail, and they were just removed; a decoder
        // error (non-byte-level path) still must not panic, so it yields nothing.
        self.decode_bytes(&known).unwrap_or_default()
    }

    /// Decodes to text (lossy UTF-8); unknown ids are errors. Same text as the reference's
    /// `decode(ids)` for byte-level tokenizers.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if self.byte_table.is_some() {
            let bytes = self.decode_bytes(ids)?;
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownId {
                id,
                tokenizer: NAME,
            });
        }
        self.decode_text(ids)
    }

    fn decode_text(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Hf {
                operation: "decode",
                message: e.to_string(),
            })
    }

    /// Bytes of every id under the byte-level decoder's rule: map each char back to its byte;
    /// a token with any char outside the table (e.g. added runs of plain spaces) is taken as
    /// its UTF-8 text.
    fn build_byte_table(&self) -> Vec<Option<Vec<u8>>> {
        let char_to_byte = byte_level_decoder_table();
        (0..self.vocab_size as u32)
            .map(|id| {
                if self.special.contains(&id) {
                    return Some(Vec::new());
                }
                let token = self.inner.id_to_token(id)?;
                let mapped: Option<Vec<u8>> = token
                    .chars()
                    .map(|c| char_to_byte.get(c as usize).copied().flatten())
                    .collect();
                Some(mapped.unwrap_or_else(|| token.into_bytes()))
            })
            .collect()
    }
}

/// Inverse of GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other
/// 68 bytes are shifted to U+0100..U+0143. Indexed by code point.
fn byte_level_decoder_table() -> Vec<Option<u8>> {
    let mut table = vec![None; 0x144];
    let mut shifted = 0x100usize;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable {
            table[usize::from(b)] = Some(b);
        } else {
            table[shifted] = Some(b);
            shifted += 1;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neox() -> HfTokenizer {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/20B_tokenizer.json");
        HfTokenizer::from_file(path).unwrap()
    }

    fn node_test(name: &str) -> String {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/20B-node-tests/");
        std::fs::read_to_string(format!("{dir}{name}")).unwrap()
    }

    #[test]
    fn neox_tokenizer_encodes_hello_world() {
        let tok = neox();
        assert_eq!(tok.vocab_size(), 50277);
        let ids = tok.encode("Hello, world!").unwrap();
        assert_eq!(ids, [12092, 13, 1533, 2]);
        assert_eq!(tok.decode(&ids).unwrap(), "Hello, world!");
        assert_eq!(tok.encode("\n").unwrap(), [187]);
        assert_eq!(tok.encode("\n\n").unwrap(), [535]);
    }

    #[test]
    fn node_hello_world_case_matches() {
        let tok = neox();
        let expected: Vec<u32> = serde_json::from_str(&node_test("hello-world.json")).unwrap();
        let text = node_test("hello-world.txt");
        assert_eq!(tok.encode(&text).unwrap(), expected);
        assert_eq!(tok.decode(&expected).unwrap(), text);
    }

    #[test]
    fn node_test_string_matches_whole_and_line_by_line() {
        let tok = neox();
        let text = node_test("test-string.txt");
        let whole: Vec<u32> = serde_json::from_str(&node_test("test-string.json")).unwrap();
        let ids = tok.encode(&text).unwrap();
        assert_eq!(ids, whole);
        let lines: Vec<Vec<u32>> =
            serde_json::from_str(&node_test("test-string-lines.json")).unwrap();
        let text_lines: Vec<&str> = text.lines().collect();
        assert_eq!(text_lines.len(), lines.len());
        for (line, expected) in text_lines.iter().zip(&lines) {
            assert_eq!(&tok.encode(line).unwrap(), expected, "line {line:?}");
        }
    }

    #[test]
    fn byte_level_decoding_equals_the_crates_own_decode() {
        let tok = neox();
        let text = node_test("test-string.txt");
        let ids = tok.encode(&text).unwrap();
        assert_eq!(
            tok.decode(&ids).unwrap(),
            tok.inner.decode(&ids, true).unwrap()
        );
        // Not byte-equal to the input: the NFC normalizer composes e.g. "a\u{304}" to "ā".
        let decoded = tok.decode_bytes(&ids).unwrap();
        assert!(decoded.len() <= text.len() && decoded.starts_with(b"The following"));
        // Every single id decodes like the crate does it, including added space runs.
        for id in 0..tok.vocab_size() as u32 {
            let ours = String::from_utf8_lossy(&tok.decode_bytes(&[id]).unwrap()).into_owned();
            assert_eq!(ours, tok.inner.decode(&[id], true).unwrap(), "id {id}");
        }
    }

    #[test]
    fn special_tokens_decode_to_nothing_and_unknown_ids_are_errors() {
        let tok = neox();
        assert_eq!(tok.token_bytes(0), Some(&b""[..]));
        assert_eq!(tok.decode(&[12092, 0, 2]).unwrap(), "Hello!");
        assert_eq!(tok.token_bytes(50254), Some(&[b' '; 24][..]));
        let err = tok.decode_bytes(&[12092, 50277]).unwrap_err();
        assert!(err.to_string().contains("50277"), "{err}");
        assert_eq!(tok.decode_bytes_lossy(&[12092, 50277, 2]), b"Hello!");
    }

    #[test]
    fn invalid_utf8_bytes_and_bad_json_are_errors() {
        let tok = neox();
        let err = tok.encode_bytes(b"ab\xFFc").unwrap_err();
        assert!(matches!(err, TokenizerError::InvalidUtf8 { offset: 2 }));
        assert_eq!(tok.encode_bytes(b"Hello").unwrap(), [12092]);
        let err = HfTokenizer::from_json_bytes(b"{not json", "broken.json").unwrap_err();
        assert!(err.to_string().contains("broken.json"), "{err}");
        assert!(HfTokenizer::from_file("/nonexistent/tokenizer.json").is_err());
    }

    #[test]
    fn byte_level_table_covers_every_byte_once() {
        let table = byte_level_decoder_table();
        let mut seen: Vec<u8> = table.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..=255u8).collect::<Vec<_>>());
        assert_eq!(table['Ġ' as usize], Some(b' '));
        assert_eq!(table['Ċ' as usize], Some(b'\n'));
    }

    /// Regression (fuzz target `tokenizer`): a `decoder` object with a corrupted `type` key made
    /// `tokenizers` panic inside `from_bytes`; loading must report an error instead.
    #[test]
    fn corrupted_decoder_object_is_an_error_not_a_panic() {
        let json =
            b"{\"version\":\"1.0\",\"truncation\":null,\"padding\":null,\"added_tokens\":[],\
            \"normalizer\":null,\"pre_tokenizer\":null,\"post_processor\":null,\
            \"decoder\":{\"t\xebpe\":\"ByteLevel\"},\
            \"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]}}";
        let err = HfTokenizer::from_json_bytes(json, "bad.json").unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
    }
}
