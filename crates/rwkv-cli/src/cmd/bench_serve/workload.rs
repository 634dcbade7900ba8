//! The requests of one benchmark point: prompts of random words with lengths drawn from the
//! configured distributions, and Poisson arrival times. Everything comes from a seeded ChaCha
//! generator, so a run is reproducible across machines and versions of `rand`.
//!
//! Prompt lengths are approximate by construction rather than measured: every word of [`WORDS`]
//! (with its leading space) is one token of the RWKV World vocabulary and no two of them merge,
//! so a prompt of N words is N tokens on a World-vocabulary server (the test below checks this).
//! On other tokenizers it is close. Reports use the `usage.prompt_tokens` the server returns,
//! never the target, so the numbers stay right either way and no `/tokenize` round trip is
//! needed per prompt.
//!
//! Each point of a sweep draws its own prompts (a separate ChaCha stream): reusing them would
//! let the server's prefix-state cache answer every prompt of the later points.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Common English words that are each a single World token when preceded by a space.
pub const WORDS: &[&str] = &[
    "about", "after", "airport", "all", "also", "an", "and", "animal", "any", "are", "area", "art",
    "as", "at", "be", "because", "been", "before", "between", "bird", "body", "book", "both",
    "bridge", "brother", "but", "by", "can", "car", "case", "change", "child", "church", "city",
    "color", "company", "could", "country", "day", "doctor", "door", "during", "each", "early",
    "end", "energy", "even", "evening", "fact", "family", "father", "field", "film", "first",
    "fish", "food", "for", "force", "forest", "form", "friend", "from", "game", "garden",
    "general", "group", "had", "hand", "has", "have", "head", "health", "her", "him", "his",
    "history", "home", "horse", "house", "idea", "if", "in", "into", "is", "island", "issue", "it",
    "its", "land", "law", "letter", "level", "life", "light", "line", "long", "made", "many",
    "market", "may", "money", "more", "morning", "most", "mother", "mountain", "music", "name",
    "nation", "new", "night", "not", "number", "ocean", "of", "on", "one", "only", "or", "order",
    "other", "out", "over", "paper", "part", "party", "people", "period", "picture", "place",
    "plan", "point", "power", "program", "public", "report", "river", "road", "room", "same",
    "school", "season", "service", "ship", "side", "sister", "so", "some", "sound", "state",
    "stone", "story", "student", "study", "such", "summer", "system", "table", "teacher", "team",
    "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those",
    "three", "through", "time", "to", "today", "town", "train", "tree", "two", "under", "up",
    "use", "used", "valley", "village", "voice", "war", "was", "water", "way", "week", "well",
    "were", "what", "when", "where", "which", "while", "who", "window", "winter", "with", "word",
    "work", "world", "would", "year", "years",
];

/// A length `len`, or uniform in `[len*(1-r), len*(1+r)]` (integers) with `ratio` r.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LengthDist {
    pub len: usize,
    pub ratio: f64,
}

impl LengthDist {
    /// The inclusive range lengths are drawn from (never below 1: an empty prompt or a
    /// `max_tokens` of 0 is a different kind of request).
    pub fn bounds(&self) -> (usize, usize) {
        let lo = ((self.len as f64) * (1.0 - self.ratio)).round().max(1.0) as usize;
        let hi = ((self.len as f64) * (1.0 + self.ratio)).round() as usize;
        (lo, hi.max(lo))
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let (lo, hi) = self.bounds();
        rng.gen_range(lo..=hi)
    }
}

/// What to generate for each point.
#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    /// Jobs per point: requests (completions) or conversations (chat).
    pub jobs: usize,
    /// Turns per job: 1 for completions.
    pub turns: usize,
    pub input: LengthDist,
    pub output: LengthDist,
    pub seed: u64,
}

/// One request's worth of new input: the prompt (completions) or the user's message (chat).
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub text: String,
    /// Words in `text`: the intended token count.
    pub words: usize,
    pub max_tokens: usize,
}

/// A completion request, or a simulated user's whole conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Sampling seed sent with the first request (turn t sends `seed + t`), so the server's
    /// random choices are reproducible too.
    pub seed: u64,
    pub turns: Vec<Turn>,
}

/// `n` random words, each with a leading space (how they are single tokens).
pub fn random_text(rng: &mut impl Rng, n: usize) -> String {
    let mut text = String::with_capacity(n * 7);
    for _ in 0..n {
        text.push(' ');
        text.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    text
}

/// A generator for `point` of the sweep; `lane` separates jobs from arrival times so changing
/// the request rate does not change the prompts.
fn rng_for(seed: u64, point: u64, lane: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(point.wrapping_mul(2).wrapping_add(lane));
    rng
}

/// The jobs of sweep point `point`.
pub fn jobs(spec: &WorkloadSpec, point: u64) -> Vec<Job> {
    let mut rng = rng_for(spec.seed, point, 0);
    (0..spec.jobs)
        .map(|_| {
            // A 31-bit seed: JSON integers of any client library hold it.
            let seed = u64::from(rng.gen::<u32>() >> 1);
            let turns = (0..spec.turns.max(1))
                .map(|_| {
                    let words = spec.input.sample(&mut rng);
                    let max_tokens = spec.output.sample(&mut rng);
                    Turn {
                        text: random_text(&mut rng, words),
                        words,
                        max_tokens,
                    }
                })
                .collect();
            Job { seed, turns }
        })
        .collect()
}

/// Start offsets of `n` jobs arriving as a Poisson process of `rate` per second (exponential
/// gaps, as vLLM's benchmark draws them); all zero for an infinite rate.
pub fn arrivals(rate: f64, n: usize, seed: u64, point: u64) -> Vec<Duration> {
    if !rate.is_finite() {
        return vec![Duration::ZERO; n];
    }
    let mut rng = rng_for(seed, point, 1);
    let mut t = 0.0f64;
    (0..n)
        .map(|_| {
            let offset = Duration::from_secs_f64(t);
            // Inverse-CDF sampling; `1 - u` is in (0, 1], so the logarithm is finite.
            let u: f64 = rng.gen();
            t += -(1.0 - u).ln() / rate;
            offset
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            jobs: 50,
            turns: 2,
            input: LengthDist {
                len: 100,
                ratio: 0.5,
            },
            output: LengthDist { len: 8, ratio: 0.0 },
            seed: 7,
        }
    }

    #[test]
    fn length_bounds_follow_the_range_ratio() {
        let d = |len, ratio| LengthDist { len, ratio }.bounds();
        assert_eq!(d(100, 0.0), (100, 100));
        assert_eq!(d(100, 0.5), (50, 150));
        assert_eq!(d(3, 0.9), (1, 6));
        assert_eq!(d(0, 0.0), (1, 1));
    }

    #[test]
    fn jobs_are_reproducible_in_range_and_differ_between_points() {
        let spec = spec();
        let a = jobs(&spec, 0);
        assert_eq!(a, jobs(&spec, 0));
        assert_ne!(a, jobs(&spec, 1));
        assert_eq!(a.len(), 50);
        for job in &a {
            assert_eq!(job.turns.len(), 2);
            for turn in &job.turns {
                assert!((50..=150).contains(&turn.words));
                assert_eq!(turn.text.split_whitespace().count(), turn.words);
                assert_eq!(turn.max_tokens, 8);
            }
        }
    }

    #[test]
    fn arrivals_are_poisson_and_reproducible() {
        let n = 4000;
        let a = arrivals(10.0, n, 1, 0);
        assert_eq!(a, arrivals(10.0, n, 1, 0));
        assert_eq!(a[0], Duration::ZERO);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        // Mean gap 1/rate = 0.1 s; 4000 samples put the mean within a few percent.
        let mean_gap = a[n - 1].as_secs_f64() / (n - 1) as f64;
        assert!((mean_gap - 0.1).abs() < 0.01, "{mean_gap}");
        assert!(arrivals(f64::INFINITY, 3, 1, 0).iter().all(|d| d.is_zero()));
    }

    #[test]
    fn words_are_single_world_tokens_that_never_merge() {
        let tok = rwkv_tokenizer::Tokenizer::world();
        for a in WORDS {
            assert_eq!(tok.encode(&format!(" {a}")).unwrap().len(), 1, "` {a}`");
        }
        // Greedy longest match could join neighbours (` of the` is a World token for some
        // words): every pair stays two tokens.
        for a in WORDS {
            let mut text = String::new();
            for b in WORDS {
                text.clear();
                text.push(' ');
                text.push_str(a);
                text.push(' ');
                text.push_str(b);
                assert_eq!(tok.encode(&text).unwrap().len(), 2, "`{text}`");
            }
        }
        // And a whole generated prompt has exactly one token per word.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let text = random_text(&mut rng, 500);
        assert_eq!(tok.encode(&text).unwrap().len(), 500);
    }
}
