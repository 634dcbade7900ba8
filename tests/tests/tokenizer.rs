//! World tokenizer cases generated with the official package after the tokenizer was written
//! (tests/fixtures/extra): scripts, emoji, control characters, long space runs, invalid bytes.

use rwkv_tokenizer::WorldTokenizer;

fn cases(file: &str) -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/extra")
        .join(file);
    std::fs::read_to_string(path)
        .unwrap()
        .split('\n')
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn text_cases_match_the_reference_ids_and_round_trip() {
    let tok = WorldTokenizer::builtin();
    let all = cases("tokenizer-extra.jsonl");
    assert!(all.len() >= 10);
    for case in all {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text), ids(&case), "text {text:?}");
        assert_eq!(tok.decode_bytes(&ids(&case)).unwrap(), text.as_bytes());
    }
}

#[test]
fn byte_cases_match_the_reference_ids_and_round_trip() {
    let tok = WorldTokenizer::builtin();
    for case in cases("tokenizer-extra-bytes.jsonl") {
        let hex = case["hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(tok.encode_bytes(&bytes), ids(&case), "bytes {hex}");
        assert_eq!(tok.decode_bytes(&ids(&case)).unwrap(), bytes);
    }
}
