//! Streaming UTF-8 detokenisation.
//!
//! Tokens are byte strings, so one character may be split over several tokens (the World
//! vocabulary has byte tokens for this). The reference re-decodes all pending tokens after each
//! step and waits while the result contains U+FFFD, which blocks forever on a genuinely invalid
//! byte. This decoder instead emits every complete character at once, holds back only an
//! incomplete trailing sequence (at most 3 bytes), and turns invalid bytes into U+FFFD so the
//! stream always moves on. The concatenated output equals `String::from_utf8_lossy` of all bytes.

use crate::error::Result;
use crate::Tokenizer;

/// Incremental UTF-8 decoder for a stream of tokens or bytes.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    /// Bytes of an incomplete trailing character (0..=3 bytes), waiting for their continuation.
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the bytes of `id` and returns the text completed by it (possibly empty).
    /// Unknown ids are an error and leave the decoder unchanged.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.push_ids(tokenizer, &[id])
    }

    /// Appends the bytes of several ids at once; see [`push`](Self::push).
    pub fn push_ids(&mut self, tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
        let bytes = tokenizer.decode_bytes(ids)?;
        Ok(self.push_bytes(&bytes))
    }

    /// Appends raw bytes and returns the newly completed text. Invalid bytes become U+FFFD.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        if self.pending.is_empty() {
            return self.decode_keep_tail(bytes);
        }
        let mut joined = std::mem::take(&mut self.pending);
        joined.extend_from_slice(bytes);
        self.decode_keep_tail(&joined)
    }

    /// Flushes what is still held back (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Number of bytes currently held back (never more than 3).
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Decodes `bytes`, storing an incomplete final sequence in `pending` instead of emitting it.
    fn decode_keep_tail(&mut self, bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len());
        let mut rest = bytes;
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    out.push_str(text);
                    return out;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid` is valid UTF-8 by definition, so this borrows without replacing.
                    out.push_str(&String::from_utf8_lossy(valid));
                    match e.error_len() {
                        // A malformed sequence: replace it (one U+FFFD, as the lossy decoder does)
                        // and keep going.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = after.get(bad..).unwrap_or_default();
                        }
                        // The input ends inside a character: wait for the rest of it.
                        None => {
                            self.pending = after.to_vec();
                            return out;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::WorldTokenizer;

    /// Byte tokens of the World vocabulary: id = byte + 1.
    fn byte_ids(text: &str) -> Vec<u32> {
        text.bytes().map(|b| u32::from(b) + 1).collect()
    }

    #[test]
    fn chinese_split_into_byte_tokens_never_emits_partial_characters() {
        let tok = Tokenizer::world();
        let text = "今天是美好的一天。RWKV 中文 😀!";
        let mut decoder = StreamDecoder::new();
        let mut pieces = Vec::new();
        for id in byte_ids(text) {
            let piece = decoder.push(&tok, id).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
            assert!(decoder.pending_len() <= 3);
            pieces.push(piece);
        }
        pieces.push(decoder.finish());
        assert_eq!(pieces.concat(), text);
        // A 3-byte character arrives over three tokens: two empty pieces, then the character.
        assert_eq!(&pieces[..3], ["", "", "今"]);
    }

    #[test]
    fn real_token_stream_concatenates_to_the_full_text() {
        let tok = Tokenizer::world();
        let text = "Today is a beautiful day. 今天是美好的一天。\nUser: 你好\n\nAssistant:";
        let ids = tok.encode(text).unwrap();
        let mut decoder = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&decoder.push(&tok, id).unwrap());
        }
        out.push_str(&decoder.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_and_the_stream_continues() {
        let mut decoder = StreamDecoder::new();
        assert_eq!(decoder.push_bytes(b"ab\xFF"), "ab\u{FFFD}");
        assert_eq!(decoder.push_bytes(b"cd"), "cd");
        // A lead byte followed by a non-continuation byte is invalid, not "incomplete".
        assert_eq!(decoder.push_bytes(b"\xE4"), "");
        assert_eq!(decoder.push_bytes(b"x"), "\u{FFFD}x");
        assert_eq!(decoder.pending_len(), 0);
    }

    #[test]
    fn finish_flushes_an_unfinished_character_lossily() {
        let mut decoder = StreamDecoder::new();
        assert_eq!(decoder.push_bytes("a中".as_bytes().get(..3).unwrap()), "a");
        assert_eq!(decoder.pending_len(), 2);
        assert_eq!(decoder.finish(), "\u{FFFD}");
        assert_eq!(decoder.finish(), "");
    }

    #[test]
    fn unknown_ids_are_errors_and_leave_the_stream_intact() {
        let tok = Tokenizer::world();
        let mut decoder = StreamDecoder::new();
        assert_eq!(decoder.push(&tok, 229).unwrap(), ""); // 0xE4, first byte of 中
        assert!(decoder.push(&tok, 0).is_err());
        assert!(decoder.push(&tok, 65535).is_err());
        assert_eq!(decoder.push_ids(&tok, &[185, 174]).unwrap(), "中");
    }

    #[test]
    fn random_byte_splits_equal_lossy_decoding_of_the_whole() {
        let world = WorldTokenizer::builtin();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..300 {
            // Mix valid multi-byte text with random garbage.
            let mut bytes = "héllo 中文 😀 ".repeat(round % 3).into_bytes();
            bytes.extend((0..next() % 40).map(|_| next() as u8));
            bytes.extend_from_slice(world.token_bytes((next() % 65529) as u32 + 1).unwrap());
            let mut decoder = StreamDecoder::new();
            let mut out = String::new();
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = (next() % 5) as usize % (rest.len() + 1);
                let (chunk, tail) = rest.split_at(n.max(1).min(rest.len()));
                out.push_str(&decoder.push_bytes(chunk));
                assert!(decoder.pending_len() <= 3);
                rest = tail;
            }
            out.push_str(&decoder.finish());
            assert_eq!(out, String::from_utf8_lossy(&bytes), "round {round}");
        }
    }
}
