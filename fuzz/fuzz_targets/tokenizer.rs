//! The tokenizers: World encode/decode and streaming decode on arbitrary input, and loading a
//! World vocabulary or a Hugging Face `tokenizer.json` from arbitrary bytes.
//!
//! The first byte picks the mode; the rest is the payload.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rwkv_tokenizer::{HfTokenizer, StreamDecoder, Tokenizer, WorldTokenizer};

/// Ids from the payload, 4 bytes each; `small` folds them into the vocabulary's range (plus a
/// little) so that most of them are real tokens.
fn ids(payload: &[u8], small: bool, vocab: usize) -> Vec<u32> {
    payload
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .map(|id| if small { id % (vocab as u32 + 8) } else { id })
        .collect()
}

/// Properties every tokenizer must have on `payload`.
fn exercise(tok: &Tokenizer, payload: &[u8], world: bool) {
    // Encoding never panics; World round-trips any bytes exactly.
    let text = String::from_utf8_lossy(payload);
    if let Ok(enc) = tok.encode(&text) {
        if world {
            assert_eq!(tok.decode(&enc).unwrap(), text);
        }
    }
    if world {
        let enc = tok.encode_bytes(payload).unwrap();
        assert_eq!(tok.decode_bytes(&enc).unwrap(), payload);
    }
    // Decoding arbitrary ids, lossy and strict, and streaming them.
    for small in [true, false] {
        let ids = ids(payload, small, tok.vocab_size());
        let lossy = tok.decode_bytes_lossy(&ids);
        if let Ok(strict) = tok.decode_bytes(&ids) {
            assert_eq!(strict, lossy);
        }
        let _ = tok.decode(&ids);
        let mut stream = StreamDecoder::new();
        let mut out = String::new();
        let mut fed = Vec::new();
        for &id in &ids {
            if let Ok(piece) = stream.push(tok, id) {
                out.push_str(&piece);
                fed.extend_from_slice(tok.token_bytes(id).unwrap_or_default());
            }
            assert!(stream.pending_len() <= 3);
        }
        out.push_str(&stream.finish());
        if world {
            assert_eq!(out, String::from_utf8_lossy(&fed));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys installs a panic hook that aborts even on panics the library catches
    // (HfTokenizer::from_json_bytes contains a panic inside `tokenizers`). Restore the default
    // hook; a panic that escapes to the harness still aborts (libfuzzer-sys catches it and calls
    // `abort`), so it is still reported as a crash.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 | 1 => exercise(&Tokenizer::world(), payload, true),
        2 => {
            // A World vocabulary file.
            let text = String::from_utf8_lossy(payload);
            if let Ok(tok) = WorldTokenizer::from_vocab_str(&text, "fuzz.txt") {
                let tok = Tokenizer::World(Arc::new(tok));
                exercise(&tok, b"hello \xff\xfe world", true);
                exercise(&tok, payload, true);
            }
        }
        _ => {
            // A Hugging Face tokenizer.json.
            if let Ok(tok) = HfTokenizer::from_json_bytes(payload, "fuzz.json") {
                let tok = Tokenizer::Hf(Arc::new(tok));
                exercise(&tok, b"hello world \xe2\x82\xac", false);
            }
        }
    }
});
