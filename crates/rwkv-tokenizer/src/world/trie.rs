//! Byte trie for greedy longest-prefix matching.
//!
//! A dense 256-way node per prefix would cost hundreds of MB for the 65k World tokens, so nodes keep
//! their children as a sorted edge list (compressed sparse rows) searched by byte. The first two
//! levels are the hottest, so they are resolved with dense tables instead: one lookup for the
//! first byte and one for the first two bytes, which is also what makes the common short tokens fast.

use std::collections::HashMap;

/// Marks a node that ends no token.
const NO_TOKEN: u32 = u32::MAX;
/// Marks a missing child in the dense tables.
const NO_NODE: u32 = u32::MAX;

/// An immutable byte trie mapping byte strings to token ids.
#[derive(Debug)]
pub(crate) struct Trie {
    /// Token id of every single byte. Construction guarantees all 256 exist, so encoding always
    /// makes progress.
    byte_token: [u32; 256],
    /// Node reached by the first two bytes (index `b0 * 256 + b1`), or `NO_NODE`.
    pair_node: Vec<u32>,
    /// Token id ending at each node, or `NO_TOKEN`.
    node_token: Vec<u32>,
    /// Children of node `n` are edges `edge_start[n]..edge_start[n + 1]`, sorted by label.
    edge_start: Vec<u32>,
    edge_label: Vec<u8>,
    edge_child: Vec<u32>,
}

/// Why a set of tokens cannot form a trie.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TrieError {
    /// The empty byte string cannot be a token: matching it would never advance.
    EmptyToken { id: u32 },
    /// Two ids share the same bytes; greedy matching would be ambiguous.
    Duplicate { id: u32, first_id: u32 },
    /// Some single byte has no token, so some inputs could not be encoded.
    MissingByte { byte: u8 },
    /// More trie nodes than u32 indices (not reachable with any real vocabulary).
    TooLarge,
}

impl Trie {
    /// Builds the trie from `(id, bytes)` pairs.
    pub(crate) fn build<'a>(
        tokens: impl IntoIterator<Item = (u32, &'a [u8])>,
    ) -> Result<Self, TrieError> {
        let mut builder = Builder::default();
        for (id, bytes) in tokens {
            builder.insert(id, bytes)?;
        }
        builder.finish()
    }

    /// Longest token that is a prefix of `input`: `(id, length)`. `None` only for empty input.
    #[inline]
    pub(crate) fn longest_prefix(&self, input: &[u8]) -> Option<(u32, usize)> {
        let (&b0, _) = input.split_first()?;
        // Every single byte is a token (checked at build time), so this is the fallback match.
        let mut best = (self.byte_token[usize::from(b0)], 1);
        let Some(&b1) = input.get(1) else {
            return Some(best);
        };
        let mut node = self.pair_node[usize::from(b0) * 256 + usize::from(b1)];
        if node == NO_NODE {
            return Some(best);
        }
        let mut len = 2;
        loop {
            let token = self.node_token[node as usize];
            if token != NO_TOKEN {
                best = (token, len);
            }
            let Some(&b) = input.get(len) else { break };
            match self.child(node, b) {
                Some(next) => node = next,
                None => break,
            }
            len += 1;
        }
        Some(best)
    }

    /// Id of the token whose bytes are exactly `bytes`.
    pub(crate) fn exact(&self, bytes: &[u8]) -> Option<u32> {
        match bytes {
            [] => None,
            [b] => Some(self.byte_token[usize::from(*b)]),
            [b0, b1, rest @ ..] => {
                let mut node = self.pair_node[usize::from(*b0) * 256 + usize::from(*b1)];
                if node == NO_NODE {
                    return None;
                }
                for &b in rest {
                    node = self.child(node, b)?;
                }
                let token = self.node_token[node as usize];
                (token != NO_TOKEN).then_some(token)
            }
        }
    }

    #[inline]
    fn child(&self, node: u32, byte: u8) -> Option<u32> {
        let n = node as usize;
        let lo = self.edge_start[n] as usize;
        let hi = self.edge_start[n + 1] as usize;
        let labels = &self.edge_label[lo..hi];
        // Deep nodes have few children; a linear scan beats binary search there.
        let k = if labels.len() <= 8 {
            labels.iter().position(|&l| l == byte)?
        } else {
            labels.binary_search(&byte).ok()?
        };
        Some(self.edge_child[lo + k])
    }
}

/// Mutable trie used only during construction; children live in a hash map.
#[derive(Default)]
struct Builder {
    /// Token id per node; node 0 is the root.
    node_token: Vec<u32>,
    children: HashMap<(u32, u8), u32>,
}

impl Builder {
    fn insert(&mut self, id: u32, bytes: &[u8]) -> Result<(), TrieError> {
        if bytes.is_empty() {
            return Err(TrieError::EmptyToken { id });
        }
        if self.node_token.is_empty() {
            self.node_token.push(NO_TOKEN);
        }
        let mut node = 0u32;
        for &b in bytes {
            node = match self.children.get(&(node, b)) {
                Some(&child) => child,
                None => {
                    let child = u32::try_from(self.node_token.len())
                        .ok()
                        .filter(|&c| c != NO_NODE)
                        .ok_or(TrieError::TooLarge)?;
                    self.node_token.push(NO_TOKEN);
                    self.children.insert((node, b), child);
                    child
                }
            };
        }
        let slot = &mut self.node_token[node as usize];
        if *slot != NO_TOKEN {
            return Err(TrieError::Duplicate {
                id,
                first_id: *slot,
            });
        }
        *slot = id;
        Ok(())
    }

    /// Freezes the hash-map trie into the compact read-only layout.
    fn finish(self) -> Result<Trie, TrieError> {
        let root_child = |b: u8| self.children.get(&(0, b)).copied();
        let mut byte_token = [NO_TOKEN; 256];
        for b in 0..=255u8 {
            let token = root_child(b).map_or(NO_TOKEN, |n| self.node_token[n as usize]);
            if token == NO_TOKEN {
                return Err(TrieError::MissingByte { byte: b });
            }
            byte_token[usize::from(b)] = token;
        }
        // Which first byte leads to each depth-1 node, to fill the two-byte table in one pass.
        let mut first_byte: Vec<Option<u8>> = vec![None; self.node_token.len()];
        for b in 0..=255u8 {
            if let Some(n) = root_child(b) {
                first_byte[n as usize] = Some(b);
            }
        }
        let mut pair_node = vec![NO_NODE; 256 * 256];
        for (&(parent, b1), &child) in &self.children {
            if let Some(b0) = first_byte[parent as usize] {
                pair_node[usize::from(b0) * 256 + usize::from(b1)] = child;
            }
        }
        let (edge_start, edge_label, edge_child) = self.edges()?;
        Ok(Trie {
            byte_token,
            pair_node,
            node_token: self.node_token,
            edge_start,
            edge_label,
            edge_child,
        })
    }

    /// Compressed sparse rows of all edges, children sorted by label.
    #[allow(clippy::type_complexity)]
    fn edges(&self) -> Result<(Vec<u32>, Vec<u8>, Vec<u32>), TrieError> {
        let mut all: Vec<(u32, u8, u32)> = self
            .children
            .iter()
            .map(|(&(parent, label), &child)| (parent, label, child))
            .collect();
        all.sort_unstable();
        let n_nodes = self.node_token.len();
        let mut edge_start = vec![0u32; n_nodes + 1];
        for &(parent, _, _) in &all {
            edge_start[parent as usize + 1] += 1;
        }
        for i in 0..n_nodes {
            edge_start[i + 1] = edge_start[i]
                .checked_add(edge_start[i + 1])
                .ok_or(TrieError::TooLarge)?;
        }
        let edge_label = all.iter().map(|e| e.1).collect();
        let edge_child = all.iter().map(|e| e.2).collect();
        Ok((edge_start, edge_label, edge_child))
    }
}

#[cfg(test)]
mod tests {
    use super::{Trie, TrieError};

    fn all_bytes() -> Vec<(u32, Vec<u8>)> {
        (0..=255u8).map(|b| (u32::from(b) + 1, vec![b])).collect()
    }

    fn build(extra: &[(u32, &[u8])]) -> Result<Trie, TrieError> {
        let mut tokens = all_bytes();
        tokens.extend(extra.iter().map(|(id, b)| (*id, b.to_vec())));
        Trie::build(tokens.iter().map(|(id, b)| (*id, b.as_slice())))
    }

    #[test]
    fn longest_prefix_prefers_the_longest_token_and_backs_off() {
        let trie = build(&[(300, b"ab"), (301, b"abcd")]).unwrap();
        assert_eq!(trie.longest_prefix(b"abcde"), Some((301, 4)));
        // "abc" is no token: the match backs off to the deepest token seen ("ab").
        assert_eq!(trie.longest_prefix(b"abcx"), Some((300, 2)));
        assert_eq!(trie.longest_prefix(b"a"), Some((98, 1)));
        assert_eq!(trie.longest_prefix(b"zz"), Some((123, 1)));
        assert_eq!(trie.longest_prefix(b""), None);
    }

    #[test]
    fn exact_lookup_finds_only_whole_tokens() {
        let trie = build(&[(300, b"ab"), (301, b"abcd")]).unwrap();
        assert_eq!(trie.exact(b"abcd"), Some(301));
        assert_eq!(trie.exact(b"abc"), None);
        assert_eq!(trie.exact(b"x"), Some(121));
        assert_eq!(trie.exact(b""), None);
    }

    #[test]
    fn invalid_token_sets_are_rejected() {
        assert_eq!(
            build(&[(300, b"")]).unwrap_err(),
            TrieError::EmptyToken { id: 300 }
        );
        assert_eq!(
            build(&[(300, b"ab"), (301, b"ab")]).unwrap_err(),
            TrieError::Duplicate {
                id: 301,
                first_id: 300
            }
        );
        let missing = Trie::build([(1u32, b"a".as_slice())]).unwrap_err();
        assert_eq!(missing, TrieError::MissingByte { byte: 0 });
    }
}
