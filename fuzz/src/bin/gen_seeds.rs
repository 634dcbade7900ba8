//! Writes small, valid seed inputs for every fuzz target.
//!
//! Usage: `gen_seeds <fixtures dir> <corpus dir>`; `scripts/fuzz.sh` runs it. Seeds are built at
//! run time from the repository's fixtures instead of being committed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rwkv_engine::export::{encode, SessionSnapshot};
use rwkv_fuzz::{state_config, STATE_HASH};
use rwkv_model::synthetic::{random_checkpoint, SyntheticSpec};
use rwkv_model::{Checkpoint, DType, ModelWeights, State, Tensor};
use rwkv_tokenizer::Tokenizer;
use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, fixtures, corpus] = args.as_slice() else {
        eprintln!("usage: gen_seeds <fixtures dir> <corpus dir>");
        std::process::exit(2);
    };
    let (fixtures, corpus) = (Path::new(fixtures), Path::new(corpus));
    pickle_and_pth(fixtures, corpus);
    safetensors(corpus);
    tokenizer(corpus);
    state_import(corpus);
    // The weights target edits a built-in model; a few edit scripts are enough to start.
    let dir = target_dir(corpus, "weights");
    write(&dir, "keep", &[]);
    write(&dir, "drop", &[3, 0, 0, 0]);
    write(&dir, "reshape", &[5, 1, 3, 7, 9, 2, 1, 0]);
}

fn target_dir(corpus: &Path, name: &str) -> PathBuf {
    let dir = corpus.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

/// A protocol-2 pickle of `{'w': _rebuild_tensor_v2(<bf16 storage "0", 6>, 0, (2, 3), (3, 1),
/// False, OrderedDict())}` (the same bytes as the unit test in pickle.rs).
fn tiny_pickle() -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'w'];
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\nq\x01(");
    p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nBFloat16Storage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x06tQ");
    p.extend_from_slice(b"K\x00K\x02K\x03\x86K\x03K\x01\x86\x89ccollections\nOrderedDict\n)RtR");
    p.extend_from_slice(b"u.");
    p
}

/// A torch.save-style zip: `archive/data.pkl`, then `archive/data/<key>` for every storage.
fn zip_pth(pkl: &[u8], storages: &[(String, Vec<u8>)], method: CompressionMethod) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    w.start_file("archive/data.pkl", stored).unwrap();
    w.write_all(pkl).unwrap();
    for (key, bytes) in storages {
        let opts = SimpleFileOptions::default().compression_method(method);
        w.start_file(format!("archive/data/{key}"), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.start_file("archive/version", stored).unwrap();
    w.write_all(b"3\n").unwrap();
    w.finish().unwrap().into_inner()
}

fn pickle_and_pth(fixtures: &Path, corpus: &Path) {
    let pickles = target_dir(corpus, "pickle");
    let pths = target_dir(corpus, "pth");
    let tiny = tiny_pickle();
    write(&pickles, "tiny", &tiny);
    let storage = vec![("0".to_string(), vec![0x3f; 12])];
    write(
        &pths,
        "tiny-stored",
        &zip_pth(&tiny, &storage, CompressionMethod::Stored),
    );
    write(
        &pths,
        "tiny-deflated",
        &zip_pth(&tiny, &storage, CompressionMethod::Deflated),
    );
    // The real pickles of the fixtures (one written by torch itself), and a copy of each
    // fixture whose storages are zeros, deflated: the whole pickle in a few KiB.
    for name in [
        "rwkv6-tiny-c128-l2.pth",
        "real/tiny-rwkv-6v0-1m.pth",
        "extra/rwkv6-check-timestate-c128-l2.pth",
    ] {
        let path = fixtures.join(name);
        let Ok(file) = fs::read(&path) else {
            eprintln!("gen_seeds: {} is missing, skipped", path.display());
            continue;
        };
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(&file[..])).unwrap();
        let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
        let pkl_name = names.iter().find(|n| n.ends_with("data.pkl")).unwrap();
        let prefix = pkl_name.strip_suffix("data.pkl").unwrap().to_owned();
        let mut pkl = Vec::new();
        archive
            .by_name(pkl_name)
            .unwrap()
            .read_to_end(&mut pkl)
            .unwrap();
        let storages: Vec<(String, Vec<u8>)> = names
            .iter()
            .filter_map(|n| n.strip_prefix(&format!("{prefix}data/")))
            .map(|key| {
                let size = archive
                    .by_name(&format!("{prefix}data/{key}"))
                    .unwrap()
                    .size();
                (key.to_owned(), vec![0; size as usize])
            })
            .collect();
        let stem = Path::new(name)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        write(&pickles, &stem, &pkl);
        let pth = zip_pth(&pkl, &storages, CompressionMethod::Deflated);
        // The rebuilt file must load, or the seed is useless.
        let ckpt = Checkpoint::from_bytes(&stem, &pth).expect("rebuilt .pth seed loads");
        assert!(!ckpt.tensors().is_empty());
        write(&pths, &stem, &pth);
    }
}

fn tiny_model() -> BTreeMap<String, Tensor> {
    random_checkpoint(&SyntheticSpec {
        n_embd: 32,
        n_layer: 2,
        vocab_size: 12,
        head_size: 8,
        maa_lora: 2,
        decay_lora: 3,
        seed: 1,
    })
}

fn safetensors(corpus: &Path) {
    let dir = target_dir(corpus, "safetensors");
    let tmp = dir.join("tmp.safetensors");
    let model = tiny_model();
    // The weights target edits this same model: check it is valid.
    ModelWeights::from_checkpoint(&Checkpoint::from_tensors("tiny", model.clone()))
        .expect("the tiny synthetic model loads");
    let mut small = BTreeMap::new();
    small.insert(
        "a".to_string(),
        Tensor::from_f32(DType::F32, vec![2, 2], &[1.0, 2.0, 3.0, 4.0]),
    );
    small.insert(
        "b".to_string(),
        Tensor::from_f32(DType::F16, vec![3], &[0.5, 1.5, -2.0]),
    );
    small.insert(
        "c".to_string(),
        Tensor::from_f32(DType::BF16, vec![1, 1, 2], &[7.0, 8.0]),
    );
    for (name, tensors) in [("tiny-model", &model), ("three-tensors", &small)] {
        Checkpoint::save_safetensors(tensors, &tmp).unwrap();
        let bytes = fs::read(&tmp).unwrap();
        Checkpoint::from_bytes(name, &bytes).expect("safetensors seed loads");
        write(&dir, name, &bytes);
    }
    fs::remove_file(&tmp).unwrap();
}

/// A minimal byte-level BPE `tokenizer.json`.
const HF_JSON: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":0,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,
"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"post_processor":null,
"decoder":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
"model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,
"vocab":{"<|endoftext|>":0,"h":1,"e":2,"l":3,"o":4,"he":5,"ll":6,"Ġ":7,"w":8,"r":9,"d":10,"hell":11},
"merges":["h e","l l","he ll"]}}"#;

fn tokenizer(corpus: &Path) {
    let dir = target_dir(corpus, "tokenizer");
    let with_mode = |mode: u8, payload: &[u8]| [&[mode][..], payload].concat();
    let texts: [&[u8]; 4] = [
        b"Hello, world! The quick brown fox.",
        "\u{4f60}\u{597d}\u{ff0c}\u{4e16}\u{754c} \u{1f600} caf\u{e9}".as_bytes(),
        b"\xff\xfe invalid \xe2\x82 utf8 \xf0\x9f",
        b"\n\n\t  def f(x):\n    return x * 2\n",
    ];
    let world = Tokenizer::world();
    for (i, text) in texts.iter().enumerate() {
        write(&dir, &format!("encode-{i}"), &with_mode(0, text));
        let ids = world.encode_bytes(text).unwrap();
        let id_bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        write(&dir, &format!("decode-{i}"), &with_mode(1, &id_bytes));
    }
    // A small World vocabulary: every single byte (lines 1..=256 of the official file) plus a
    // few longer tokens.
    let vocab = include_str!("../../../crates/rwkv-tokenizer/assets/rwkv_vocab_v20230424.txt");
    let mut lines: Vec<&str> = vocab.lines().take(256).collect();
    lines.extend(vocab.lines().skip(10_000).take(40));
    write(&dir, "vocab", &with_mode(2, lines.join("\n").as_bytes()));
    write(&dir, "hf-json", &with_mode(3, HF_JSON.as_bytes()));
    rwkv_tokenizer::HfTokenizer::from_json_bytes(HF_JSON.as_bytes(), "seed")
        .expect("the tokenizer.json seed loads");
}

fn state_import(corpus: &Path) {
    let dir = target_dir(corpus, "state_import");
    let cfg = state_config();
    let data = (0..cfg.state_len())
        .map(|i| i as f32 * 0.25 - 3.0)
        .collect();
    let snap = SessionSnapshot {
        history: vec![1, 2, 3],
        pending: vec![9],
        state: State::from_flat(&cfg, data).unwrap(),
    };
    let bytes = encode(&STATE_HASH, &cfg, &snap);
    write(&dir, "export", &[&[0u8][..], &bytes].concat());
    write(&dir, "export-fixcrc", &[&[1u8][..], &bytes].concat());
    let empty = SessionSnapshot {
        history: vec![],
        pending: vec![],
        state: State::zeros(&cfg),
    };
    let bytes = encode(&STATE_HASH, &cfg, &empty);
    write(&dir, "export-empty", &[&[1u8][..], &bytes].concat());
}
