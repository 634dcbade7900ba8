//! The steps that check CUDA-graph replay against eager steps, shared by the emulated test
//! (`emu/graph.rs`) and the GPU test (`gpu.rs`): prefills and decodes over six slots in which
//! three decode shapes (three rows, one row, two rows) each come back with other slots, order,
//! tokens and outputs, so each is run eagerly, captured, then replayed.

use rwkv_model::{OutputRows, SeqStep};

/// Token ids for the script: `prompts` (5, 3 and 1 tokens), and 32 one-token `decodes`.
pub struct ScriptTokens {
    pub prompts: [Vec<u32>; 3],
    pub decodes: Vec<Vec<u32>>,
}

impl ScriptTokens {
    /// From a generator of `n` token ids for a seed.
    pub fn new(tokens: impl Fn(usize, u64) -> Vec<u32>) -> Self {
        Self {
            prompts: [tokens(5, 1), tokens(3, 2), tokens(1, 3)],
            decodes: (0..32).map(|i| tokens(1, 100 + i)).collect(),
        }
    }
}

fn at(slot: usize, tokens: &[u32], output: OutputRows) -> SeqStep<'_> {
    SeqStep {
        slot,
        tokens,
        output,
    }
}

/// The script's steps (slots 0..6).
pub fn graph_script(t: &ScriptTokens) -> Vec<Vec<SeqStep<'_>>> {
    use OutputRows::{All, Last, Top};
    let [p0, p1, p2] = &t.prompts;
    let d = &t.decodes;
    let none: &[u32] = &[];
    vec![
        // Prefill (mixed lengths): never a graph.
        vec![at(0, p0, Last), at(1, p1, Last), at(2, p2, Last)],
        // Three rows: seen once (eager), captured, replayed; the last on slots never used.
        vec![at(0, &d[0], Last), at(1, &d[1], Top(3)), at(2, &d[2], Last)],
        vec![at(2, &d[3], Top(5)), at(0, &d[4], Last), at(1, &d[5], All)],
        vec![at(3, &d[6], Last), at(4, &d[7], Last), at(5, &d[8], Top(1))],
        // One row, three rows replayed again, one row captured.
        vec![at(1, &d[9], Last)],
        vec![
            at(5, &d[10], Last),
            at(1, &d[11], Last),
            at(0, &d[12], Last),
        ],
        vec![at(1, &d[13], Top(2))],
        // An empty sequence adds no row: two rows.
        vec![at(2, none, Last), at(3, &d[14], Last), at(4, &d[15], Last)],
        // A prefill between decodes, then a replay.
        vec![at(3, p0, Last), at(4, &d[16], Last)],
        vec![
            at(4, &d[17], Last),
            at(3, &d[18], Last),
            at(2, &d[19], Last),
        ],
        // Two rows captured, then replayed.
        vec![
            at(3, &d[24], Last),
            at(2, none, Last),
            at(4, &d[25], Top(4)),
        ],
        vec![at(0, &d[26], Last), at(5, &d[27], Last)],
    ]
}
